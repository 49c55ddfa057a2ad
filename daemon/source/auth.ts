/**
 * The source's side of page connection authentication (protocol/auth.ts): both threads that
 * accept HELLOs (the demand connections' and the bulk thread's) check them here.
 */
import { checkProof } from '../../protocol/auth.js';
import { ProtocolError } from '../../protocol/errors.js';
import type { HelloFrame } from '../transport/server.js';

/**
 * Checks a HELLO's proof of the migration secret (protocol/auth.ts). With authentication off, a
 * migration without a secret accepts any HELLO; one with a secret is still checked.
 */
export function authenticate(
  hello: HelloFrame,
  nonce: Uint8Array,
  secret: Uint8Array | null,
  authRequired: boolean,
): void {
  if (!secret) {
    if (authRequired) throw new ProtocolError('AUTH_FAILED', 'the migration has no secret');
    return;
  }
  if (!checkProof(hello.auth, secret, nonce, hello.channel, hello.migrationId)) {
    throw new ProtocolError(
      'AUTH_FAILED',
      hello.auth.byteLength === 0 ? 'HELLO carries no proof of the secret' : 'wrong proof',
    );
  }
}
