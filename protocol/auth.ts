/**
 * Authentication of page connections (protocol/README.md, "Authentication"), as pure functions.
 *
 * Each migration has a secret of 16 to 64 bytes, shared by the source that serves it and the
 * dest that fetches it (the VMM hands it over with the uffd; it is written as lowercase hex).
 * On every connection the source sends a fresh 16-byte nonce in the WebSocket upgrade response
 * (header `yabusame-nonce`, 32 hex digits) and echoes it in WELCOME; the dest's HELLO carries
 * HMAC-SHA256(secret, "yabusame hello v2" NUL, nonce, channel, migration id) in its auth field,
 * which the source compares in constant time. The secret never travels; a proof is good for one
 * connection, one channel and one migration.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import type { ChannelKind } from './wire.js';

/** The upgrade response header that carries the nonce (lower case, as node reports headers). */
export const NONCE_HEADER = 'yabusame-nonce';
export const NONCE_BYTES = 16;
/** HMAC-SHA256: the length of HELLO's auth field when authenticated. */
export const PROOF_BYTES = 32;
export const SECRET_MIN_BYTES = 16;
export const SECRET_MAX_BYTES = 64;

const DOMAIN = Buffer.from('yabusame hello v2\0', 'ascii');
const SECRET_RE = new RegExp(`^(?:[0-9a-f]{2}){${SECRET_MIN_BYTES},${SECRET_MAX_BYTES}}$`);
const NONCE_RE = new RegExp(`^[0-9a-f]{${2 * NONCE_BYTES}}$`);

/** A secret as written (hex), or null when it is not 16..64 bytes of lowercase hex. */
export function parseSecret(hex: string): Buffer | null {
  return SECRET_RE.test(hex) ? Buffer.from(hex, 'hex') : null;
}

/** The nonce header's value, or null when it is not 32 lowercase hex digits. */
export function parseNonce(value: string | string[] | undefined): Buffer | null {
  return typeof value === 'string' && NONCE_RE.test(value) ? Buffer.from(value, 'hex') : null;
}

/** The proof a dest puts in HELLO's auth field. */
export function helloProof(
  secret: Uint8Array,
  nonce: Uint8Array,
  channel: ChannelKind,
  migrationId: string,
): Buffer {
  return createHmac('sha256', secret)
    .update(DOMAIN)
    .update(nonce)
    .update(Uint8Array.of(channel))
    .update(migrationId, 'utf8')
    .digest();
}

/** Whether `auth` is the proof for this connection, compared in constant time. */
export function checkProof(
  auth: Uint8Array,
  secret: Uint8Array,
  nonce: Uint8Array,
  channel: ChannelKind,
  migrationId: string,
): boolean {
  if (auth.byteLength !== PROOF_BYTES) return false;
  return timingSafeEqual(auth, helloProof(secret, nonce, channel, migrationId));
}
