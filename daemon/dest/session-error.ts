/**
 * The destination session's boundary: every code that ends a handoff or a session goes to the
 * VMM in an `error` reply (and to the source in an ERROR frame), so it is a HandoffErrorCode,
 * documented in protocol/README.md.
 */
import {
  CodedError,
  type HandoffErrorCode,
  type SESSION_END_CODES,
} from '../../protocol/errors.js';

/** The codes a session's own machinery (placement, faults, shutdown) ends it with. */
export type SessionEndCode = (typeof SESSION_END_CODES)[number];

export class SessionError extends CodedError<HandoffErrorCode> {}
