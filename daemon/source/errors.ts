/**
 * The source core's error: a stable `code` (metric label, asserted in tests, mapped to an HTTP
 * status by the control API or carried in an ERROR frame) and a sentence.
 *
 * Codes: IMAGE_OPEN, IMAGE_IO, IMAGE_CLOSED, IMAGE_NO_REGIONS, IMAGE_REGION_NAME,
 * IMAGE_REGION_PAGE_SIZE, IMAGE_REGION_MISALIGNED, IMAGE_REGION_EMPTY, IMAGE_REGION_OUTSIDE_FILE,
 * IMAGE_REGION_OVERLAP, BAD_STATE, MIGRATION_EXISTS, UNKNOWN_MIGRATION.
 */
export class SourceError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SourceError';
    this.code = code;
  }
}
