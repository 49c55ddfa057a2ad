/**
 * The source core's boundary: a stable `code` (metric label, asserted in tests, the control
 * API's `error.code`, mapped to an HTTP status by control-api.ts) and a sentence. Every code is
 * listed in README.md ("The source's control API").
 */
import { CodedError } from '../../protocol/errors.js';

export const SOURCE_ERROR_CODES = [
  // images
  'IMAGE_ROOT',
  'IMAGE_OUTSIDE_ROOT',
  'IMAGE_NOT_FOUND',
  'IMAGE_NOT_REGULAR',
  'IMAGE_OPEN',
  'IMAGE_IO',
  'IMAGE_CLOSED',
  'IMAGE_NO_REGIONS',
  'IMAGE_REGION_NAME',
  'IMAGE_REGION_PAGE_SIZE',
  'IMAGE_REGION_MISALIGNED',
  'IMAGE_REGION_EMPTY',
  'IMAGE_REGION_OUTSIDE_FILE',
  'IMAGE_REGION_OVERLAP',
  // migrations
  'BAD_STATE',
  'MIGRATION_EXISTS',
  'UNKNOWN_MIGRATION',
  'TOO_MANY_MIGRATIONS',
  'INVALID_ID',
  'INVALID_SECRET',
  // the control API's requests
  'INVALID_REQUEST',
  'INVALID_JSON',
  'NOT_FOUND',
  'METHOD_NOT_ALLOWED',
  'UNAUTHORIZED',
  'UNSUPPORTED_MEDIA_TYPE',
  'BODY_TOO_LARGE',
  'INTERNAL',
] as const;
export type SourceErrorCode = (typeof SOURCE_ERROR_CODES)[number];

export class SourceError extends CodedError<SourceErrorCode> {}
