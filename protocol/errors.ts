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
