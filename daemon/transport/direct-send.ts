/**
 * One small ws message sent with one send(2) of our own, on a connection whose reading is ours
 * already (raw-receive.ts): it skips ws's sender and node's stream (a frame header, cork, two
 * writes, uncork, a write request and its callbacks), which cost a demand answer or REQUEST a
 * good part of its CPU. The caller sends this way only while nothing else waits to be written
 * on the socket (ws.bufferedAmount is 0), so the bytes keep their order; whatever the kernel did
 * not take is handed back, for the socket's stream, behind which every later frame then queues.
 *
 * A client's frames are masked (RFC 6455 5.3) with keys from a pool of random bytes, as ws
 * draws them; a server's are not.
 */
import { randomFillSync } from 'node:crypto';
import { MSG_DONTWAIT } from '../linux/abi.js';
import * as sys from '../linux/sys.js';

/** A server's frames up to this size are copied behind their header and sent so. */
const UNMASKED_MAX_BYTES = 16 * 1024 + 64;
/** A client's are masked byte by byte: only short ones (a REQUEST, a CREDIT). */
const MASKED_MAX_BYTES = 1024;

const KEY_POOL_BYTES = 8192;
let keyPool: Buffer | null = null;
let keyAt = KEY_POOL_BYTES;

function maskKey(): Buffer {
  if (keyAt === KEY_POOL_BYTES) {
    keyPool ??= Buffer.allocUnsafeSlow(KEY_POOL_BYTES);
    randomFillSync(keyPool);
    keyAt = 0;
  }
  keyAt += 4;
  return keyPool!.subarray(keyAt - 4, keyAt);
}

const ALL_SENT = Buffer.alloc(0);

export class DirectSender {
  private buf: Buffer | null = null;
  private readonly maxBytes: number;

  /** `fd`: the socket's, valid while the caller's ws is OPEN; `masked`: we are the client. */
  constructor(
    private readonly fd: number,
    private readonly masked: boolean,
  ) {
    this.maxBytes = masked ? MASKED_MAX_BYTES : UNMASKED_MAX_BYTES;
  }

  /**
   * Sends `frame` as one binary message. null: nothing was sent (too large, or the socket is full
   * or failed): ws must send it. Otherwise the bytes the kernel did not take (empty: all went).
   */
  trySend(frame: Uint8Array): Buffer | null {
    const len = frame.byteLength;
    if (len > this.maxBytes) return null;
    const head = (len < 126 ? 2 : 4) + (this.masked ? 4 : 0);
    this.buf ??= Buffer.allocUnsafeSlow(8 + this.maxBytes);
    const b = this.buf;
    b[0] = 0x82; // FIN, binary
    const maskBit = this.masked ? 0x80 : 0;
    if (len < 126) b[1] = maskBit | len;
    else {
      b[1] = maskBit | 126;
      b.writeUInt16BE(len, 2);
    }
    if (this.masked) {
      const key = maskKey();
      key.copy(b, head - 4);
      for (let i = 0; i < len; i++) b[head + i] = frame[i]! ^ key[i & 3]!;
    } else b.set(frame, head);
    const total = head + len;
    const rc = sys.trySend(this.fd, b.subarray(0, total), MSG_DONTWAIT);
    if (rc < 0) return null; // EAGAIN: ws queues it; an error: ws meets it too and closes
    return rc < total ? Buffer.from(b.subarray(rc, total)) : ALL_SENT;
  }
}
