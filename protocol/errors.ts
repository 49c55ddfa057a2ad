/**
 * Coded errors. Every boundary of yabusame throws one class derived from CodedError, whose `code`
 * is a stable string from that boundary's union: it is the metric label, what tests assert, and
 * what goes on the wire (ERROR frames, handoff `error` replies). The lists below are every code
 * that may leave a daemon; protocol/README.md documents each one (tests/unit/error-codes.test.ts
 * checks both directions).
 */
export class CodedError<C extends string = string> extends Error {
  readonly code: C;
  constructor(code: C, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
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

/**
 * Codes that end a running session on the destination (after `ack`). The dest sends them to the
 * VMM in an `error` reply and to the source in an ERROR frame (DAEMON_STOPPING and VMM_GONE only
 * to the source: the VMM is gone or will resume with the next daemon).
 */
export const SESSION_END_CODES = [
  'VMM_GONE',
  'DAEMON_STOPPING',
  'REGION_UNMAPPED',
  'PLACE_FAILED',
  'FAULT_UNRESOLVABLE',
  'FAULT_OUTSIDE_REGIONS',
  'HEARTBEAT_TIMEOUT',
  'SOURCE_IO',
  'INTERNAL_ERROR',
  'SESSION_FAILED',
] as const;

/** Every code an ERROR frame may carry, in either direction (README.md, "Error codes"). */
export const PAGE_ERROR_CODES = [
  ...FRAME_ERROR_CODES,
  'FRAME_TEXT',
  'VERSION_UNSUPPORTED',
  'AUTH_FAILED',
  'UNKNOWN_MIGRATION',
  'BAD_STATE',
  'OUT_OF_RANGE',
  'IMAGE_IO',
  'MIGRATION_ABORTED',
  ...SESSION_END_CODES,
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
  'HANDOFF_REGION_UNMAPPED',
  'HANDOFF_WP_UNSUPPORTED',
  'HANDOFF_NO_SECRET',
  'HANDOFF_PEER_DENIED',
  'HANDOFF_QUOTA',
  'HANDOFF_BUSY',
  'HANDOFF_SOCKET_BUSY',
  'SOURCE_DENIED',
  'HANDOFF_TOO_LARGE',
  'HANDOFF_TIMEOUT',
  'SOURCE_UNREACHABLE',
  'SOURCE_MISMATCH',
  'DUPLICATE_MIGRATION',
  'SESSION_LIMIT',
  'SOURCE_TIMEOUT',
  'SOURCE_CLOSED',
  // The source refused HELLO, or ended the migration later, with this code.
  ...PAGE_ERROR_CODES,
] as const;
export type HandoffErrorCode = (typeof HANDOFF_ERROR_CODES)[number];

/**
 * The protocol boundary's error: thrown by the codecs (FRAME_*, HANDOFF_*) and by whatever
 * refuses a peer's request with a code that goes back to that peer.
 */
export class ProtocolError extends CodedError<HandoffErrorCode> {}

/** The code of `err` (an error with a `code`, or a code itself) if it is one of `codes`, else `fallback`. */
export function codeOf<C extends string>(
  err: unknown,
  codes: readonly C[],
  fallback: NoInfer<C>,
): C {
  const code = typeof err === 'string' ? err : (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && (codes as readonly string[]).includes(code)
    ? (code as C)
    : fallback;
}
