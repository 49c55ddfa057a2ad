/**
 * One small ws message sent with one send(2) of our own, on a connection whose reading is ours
 * already (raw-receive.ts): it skips ws's sender and node's stream (a frame header, cork, two
 * writes, uncork, a write request and its callbacks), which cost a demand answer or REQUEST a
 * good part of its CPU. It sends only while nothing else waits to be written on the socket
 * (ws.bufferedAmount is 0), so the bytes keep their order; whatever the kernel did not take goes
 * to the socket's stream, behind which every later frame then queues (ws's included).
 *
 * A client's frames are masked (RFC 6455 5.3) with keys from a pool of random bytes, as ws
 * draws them; a server's are not.
 */
import { randomFillSync } from 'node:crypto';
import type WebSocket from 'ws';
import { MSG_DONTWAIT } from '../linux/abi.js';
import * as sys from '../linux/sys.js';
import { wsSocket } from './internals.js';
import { xorMask } from './raw-receive.js';

/** A server's frames up to this size are copied behind their header and sent so. */
const UNMASKED_MAX_BYTES = 16 * 1024 + 64;
/** A client's are masked byte by byte: only short ones (a REQUEST, a CREDIT). */
const MASKED_MAX_BYTES = 1024;

const KEY_POOL_BYTES = 8192;
let keyPool: Buffer | null = null;
let keyAt = KEY_POOL_BYTES;

function maskKey(): number {
  if (keyAt === KEY_POOL_BYTES) {
    keyPool ??= Buffer.allocUnsafeSlow(KEY_POOL_BYTES);
    randomFillSync(keyPool);
    keyAt = 0;
  }
  keyAt += 4;
  return keyPool!.readUInt32BE(keyAt - 4);
}

export class DirectSender {
  private buf: Buffer | null = null;
  private readonly maxBytes: number;

  /**
   * `fd`: the socket under `ws`, valid while ws is OPEN (the caller sends only then: ws destroys
   * the socket after); `masked`: we are the client.
   */
  constructor(
    private readonly ws: WebSocket,
    private readonly fd: number,
    private readonly masked: boolean,
  ) {
    this.maxBytes = masked ? MASKED_MAX_BYTES : UNMASKED_MAX_BYTES;
  }

  /**
   * Sends `frame` as one binary message, if it is short and nothing waits to be written in ws or
   * node's stream. -1: nothing was sent (too large, something waits, or the socket is full or
   * failed): ws must send it. Otherwise the bytes the kernel did not take, queued on the socket's
   * stream (0: all went); `restWritten` gets that count once they are written.
   */
  send(frame: Uint8Array, restWritten?: (bytes: number) => void): number {
    const len = frame.byteLength;
    if (len > this.maxBytes || this.ws.bufferedAmount !== 0) return -1;
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
    b.set(frame, head);
    if (this.masked) {
      const key = maskKey();
      b.writeUInt32BE(key, head - 4);
      xorMask(b.subarray(head, head + len), key);
    }
    const total = head + len;
    const rc = sys.trySend(this.fd, b.subarray(0, total), MSG_DONTWAIT);
    if (rc < 0) return -1; // EAGAIN: ws queues it; an error: ws meets it too and closes
    if (rc === total) return 0;
    const rest = Buffer.from(b.subarray(rc, total));
    wsSocket(this.ws).write(rest, () => restWritten?.(rest.length));
    return rest.length;
  }
}
