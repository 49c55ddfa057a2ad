/**
 * The protocol boundary's error: a stable `code` (metric label, asserted in tests, carried in
 * ERROR frames and handoff replies) and a human sentence.
 */
export class ProtocolError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ProtocolError';
    this.code = code;
  }
}

/** Codes decodeFrame throws; each means the message was malformed (see README.md). */
export const FRAME_ERROR_CODES = [
  'FRAME_EMPTY',
  'FRAME_UNKNOWN_TYPE',
  'FRAME_TRUNCATED',
  'FRAME_BAD_LENGTH',
  'FRAME_BAD_MAGIC',
  'FRAME_BAD_CHANNEL',
  'FRAME_BAD_VALUE',
  'FRAME_CHECKSUM',
] as const;

/** Every code an ERROR frame may carry (README.md, "Error codes"). */
export const PAGE_ERROR_CODES = [
  ...FRAME_ERROR_CODES,
  'FRAME_TEXT',
  'VERSION_UNSUPPORTED',
  'UNKNOWN_MIGRATION',
  'BAD_STATE',
  'OUT_OF_RANGE',
  'IMAGE_IO',
  'MIGRATION_ABORTED',
] as const;
export type PageErrorCode = (typeof PAGE_ERROR_CODES)[number];

/** Every code a handoff `error` reply may carry (README.md, "Handoff protocol"). */
export const HANDOFF_ERROR_CODES = [
  'HANDOFF_BAD_JSON',
  'HANDOFF_INVALID',
  'HANDOFF_BAD_PAGE_SIZE',
  'HANDOFF_UNALIGNED',
  'HANDOFF_OVERLAP',
  'HANDOFF_NO_FD',
  'HANDOFF_TOO_MANY_FDS',
  'HANDOFF_NOT_UFFD',
  'HANDOFF_UFFD_UNINITIALIZED',
  'HANDOFF_REGISTER_FAILED',
  'HANDOFF_TOO_LARGE',
  'HANDOFF_TIMEOUT',
  'SOURCE_UNREACHABLE',
  'SOURCE_MISMATCH',
  'DUPLICATE_MIGRATION',
  'SESSION_LIMIT',
  'SOURCE_TIMEOUT',
  'SOURCE_CLOSED',
  'UNKNOWN_MIGRATION',
  'VERSION_UNSUPPORTED',
  'BAD_STATE',
  'INTERNAL_ERROR',
  'SESSION_FAILED',
] as const;
export type HandoffErrorCode = (typeof HANDOFF_ERROR_CODES)[number];
