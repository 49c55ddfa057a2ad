/**
 * The receiving half of a plain (not TLS) ws connection, read from its socket with recv(2)
 * instead of through node's stream and ws's receiver.
 *
 * The background channel gives a `PayloadSink` (the payload ring): there, DATA payloads are
 * nearly every byte, and each one went through three copies before it reached the ring (node's
 * read buffer, ws's reassembly of a message from several reads, the ring). Here a DATA payload
 * is received straight into the room the sink gives, once all of it is queued in the socket:
 * SO_RCVLOWAT makes poll wait for it, FIONREAD confirms it, so the room is taken and filled in
 * one go and no other connection's payload can be interleaved into the ring. Every other
 * message (ZERO, PROGRESS, ERROR, ws control frames) is cut out of a small staging buffer,
 * several per recv, and decoded by the channel as it decodes ws's messages.
 *
 * The demand channel gives no sink: its DATA frames are whole messages too, one per fault, used
 * only while they are delivered. What it saves is the stream machinery a message went through
 * in node and ws: in the bench's demand-idle, 12 to 15 µs of the dest's CPU per fault.
 *
 * The source reads its demand connections the same way (no sink), from the other side of
 * RFC 6455: a client's frames, which must be masked, are unmasked in place.
 *
 * RFC 6455: a frame masked the wrong way for its side, RSV bits, an unknown opcode, a fragmented
 * control frame or a message over Limits.MAX_FRAME_BYTES fail the connection (as SOURCE_IO on the
 * dest), as ws fails them. Fragmented data messages are reassembled (ws never fragments one, but
 * the RFC allows it) and decoded whole. Sending is ws's, or direct-send.ts's for short frames.
 */
import { performance } from 'node:perf_hooks';
import { ProtocolError, codeOf, PAGE_ERROR_CODES } from '../../protocol/errors.js';
import { decodeDataHeader, verifyDataPayload, type DataHeader } from '../../protocol/page-codec.js';
import { FrameType, HeaderSize, Limits, type FrameOf } from '../../protocol/wire.js';
import { MSG_DONTWAIT } from '../linux/abi.js';
import { ERRNO, errnoName } from '../linux/errors.js';
import * as sys from '../linux/sys.js';
import type { CloseInfo } from './client.js';

/**
 * Where DATA payloads go. reserve() gives room for `n` bytes (or null: the receiver then uses a
 * buffer of its own); commit() takes the room last reserved, once the payload in it is complete
 * and verified, right before the frame is delivered. Reserved room that is not committed stays
 * free.
 */
export interface PayloadSink {
  reserve(n: number): Buffer | null;
  commit(): void;
}

export interface RawReceiverHooks {
  /**
   * A whole message other than a DATA frame read apart (decoded by the channel, as the
   * messages ws delivers; it is a view into the receiver's buffers, valid during the call only).
   */
  message(data: Buffer, isBinary: boolean): void;
  /** A DATA frame read apart from its header, its payload (frame.payload) verified. */
  data(frame: FrameOf<typeof FrameType.DATA>, payload: Buffer, receivedAt: number): void;
  ping(data: Buffer): void;
  pong(): void;
  /** The connection is over (EOF, a close frame, a bad frame, an error); called once. */
  closed(info: CloseInfo): void;
}

const OP_CONTINUATION = 0x0;
const OP_TEXT = 0x1;
const OP_BINARY = 0x2;
const OP_CLOSE = 0x8;
const OP_PING = 0x9;
const OP_PONG = 0xa;

/** Staging for headers and small messages: several ZERO frames come in one recv. */
const STAGING_BYTES = 64 * 1024;
/** The longest ws header of a server frame (2 + 8-byte length) and a DATA header after it. */
const DATA_HEAD_BYTES = 10 + HeaderSize.DATA;
/**
 * Largest payload waited for whole with SO_RCVLOWAT (a 2 MiB huge page and a little more):
 * Linux caps the low-water mark at half of tcp_rmem's maximum (3 MiB by default). A larger one
 * is read as it comes, into a buffer of its own.
 */
const LOWAT_MAX_BYTES = 2 * 1024 * 1024 + 64 * 1024;

/** Which end of the connection this is, as the receiver reads it. */
export interface RawRole {
  /** The peer is a client: its frames must be masked (a server's must not be). */
  readonly peerIsClient: boolean;
  /** The close info's code when the peer closed the connection (EOF or a close frame). */
  readonly closedCode: string;
  /** ... when it broke the ws protocol or the socket failed. */
  readonly ioCode: string;
  /** The peer, in messages. */
  readonly peerName: string;
}

/** The dest reading a source (the default). */
export const READING_SOURCE: RawRole = {
  peerIsClient: false,
  closedCode: 'SOURCE_CLOSED',
  ioCode: 'SOURCE_IO',
  peerName: 'the source',
};

/** The source reading a dest. */
export const READING_DEST: RawRole = {
  peerIsClient: true,
  closedCode: 'CLOSED',
  ioCode: 'PEER_IO',
  peerName: 'the peer',
};

class Fail extends Error {
  constructor(readonly info: CloseInfo) {
    super(info.message);
  }
}

/**
 * XORs `data` in place with the masking key `key` (its 4 bytes, big-endian; RFC 6455 5.3): masks
 * a client's payload, or unmasks it.
 */
export function xorMask(data: Uint8Array, key: number): void {
  for (let i = 0; i < data.length; i++) data[i]! ^= (key >>> (24 - ((i & 3) << 3))) & 0xff;
}

/** A DATA frame whose payload is being received. */
interface PendingData {
  header: Buffer;
  h: DataHeader;
  /** The payload's room: the sink's (inSink), or the scratch buffer. */
  into: Buffer | null;
  inSink: boolean;
  got: number;
  /** SO_RCVLOWAT was set for the rest of it once already. */
  waited: boolean;
}

/** Receivers whose fd is open (and watched), on this thread. */
const live = new Set<RawReceiver>();

/**
 * Closes every receiver of this thread. For a worker about to be terminated: a uv_poll event
 * during node's teardown of the thread would call JavaScript that no longer runs (node aborts).
 */
export function closeAllReceivers(): void {
  for (const r of live) r.close();
}

export class RawReceiver {
  private readonly staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
  private start = 0;
  private end = 0;
  private lowat = 1;
  private pending: PendingData | null = null;
  /**
   * A message's remaining bytes being read: one too large for staging (not a DATA frame read
   * apart into a sink), or a fragment.
   */
  private body: {
    buf: Buffer;
    got: number;
    op: number;
    fin: boolean;
    /** The frame's masking key (a client's frame; 0 for a server's, which is not masked). */
    mask: number;
  } | null = null;
  /** Fragments of a data message so far, and its opcode. */
  private fragments: Buffer[] | null = null;
  private fragmentsOp = 0;
  private fragmentsBytes = 0;
  /** The last message was DATA: read only the next headers, the payload goes to the sink. */
  private streaming = false;
  private scratchBuf: Buffer | null = null;
  private closed = false;
  private paused = false;
  /** Set by drain(): called once the source has closed. */
  private draining: (() => void) | null = null;
  private pumping = false;
  private readonly watch: sys.FdWatch;

  /**
   * Takes `fd` (a dup of the socket's): it is closed with the receiver. Without a sink, DATA
   * frames are whole messages like the others (a demand channel: one small frame per fault,
   * placed during its delivery).
   */
  constructor(
    private readonly fd: number,
    private readonly sink: PayloadSink | undefined,
    private readonly hooks: RawReceiverHooks,
    private readonly role: RawRole = READING_SOURCE,
  ) {
    this.watch = sys.watchReadable(fd, (hangup) => this.pump(hangup));
    live.add(this);
  }

  pause(): void {
    if (this.closed || this.paused) return;
    this.paused = true;
    this.watch.pause();
  }

  resume(): void {
    if (this.closed || !this.paused) return;
    this.paused = false;
    this.watch.resume();
    // Frames already staged are delivered even if the socket has nothing new.
    if (this.end > this.start) setImmediate(() => this.pump(false));
  }

  /**
   * Stops delivering; reads and drops whatever still comes until the source closes, then
   * closes the fd and calls `onEnd`. Closing a socket with unread bytes queued resets the
   * connection instead of closing it: the source would see ECONNRESET after a close handshake.
   */
  drain(onEnd: () => void): void {
    if (this.closed) return;
    this.draining = onEnd;
    this.pending = null;
    this.body = null;
    this.fragments = null;
    this.start = this.end = 0;
    this.setLowat(1);
    if (this.paused) {
      this.paused = false;
      this.watch.resume();
    }
  }

  /** Stops reading and closes the fd; no hook is called after. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    live.delete(this);
    this.watch.stop();
    sys.close(this.fd);
  }

  private fail(info: CloseInfo): void {
    if (this.closed || this.draining) return;
    this.close();
    this.hooks.closed(info);
  }

  private pump(hangup: boolean): void {
    if (this.closed) return;
    if (this.draining) {
      this.discard();
      return;
    }
    if (this.paused || this.pumping) return;
    this.pumping = true;
    try {
      // A frame's delivery may close, pause or drain this receiver: checked after each step.
      while (!this.closed && !this.paused && !this.draining && this.step(hangup));
    } catch (err) {
      if (err instanceof Fail) this.fail(err.info);
      else if (err instanceof ProtocolError) {
        this.fail({ code: codeOf(err, PAGE_ERROR_CODES, 'FRAME_BAD_VALUE'), message: err.message });
      } else {
        this.fail({ code: this.role.ioCode, message: (err as Error).message });
      }
    } finally {
      this.pumping = false;
    }
  }

  private discard(): void {
    for (;;) {
      const rc = sys.tryRecv(this.fd, this.staging, MSG_DONTWAIT);
      if (rc > 0) continue;
      if (rc === -ERRNO.EAGAIN || rc === -ERRNO.EINTR) return;
      const onEnd = this.draining!;
      this.close();
      onEnd();
      return;
    }
  }

  /**
   * The last recv into staging returned less than it asked for: the socket had nothing more
   * then, so the next one waits for poll instead of costing a syscall that answers EAGAIN.
   */
  private emptied = false;

  /** One step: parse or receive something. False: wait for the socket. */
  private step(hangup: boolean): boolean {
    if (this.pending || this.body) {
      this.emptied = false;
      return this.pending ? this.receiveData(hangup) : this.receiveBody();
    }
    if (this.parseHeader()) return true;
    if (this.emptied) {
      this.emptied = false;
      return false;
    }
    return this.fill();
  }

  /** recv into staging; false when nothing is there now. */
  private fill(): boolean {
    if (this.start === this.end) this.start = this.end = 0;
    else if (this.end > STAGING_BYTES - DATA_HEAD_BYTES) {
      this.staging.copyWithin(0, this.start, this.end);
      this.end -= this.start;
      this.start = 0;
    }
    const want = this.streaming
      ? Math.max(1, DATA_HEAD_BYTES - (this.end - this.start))
      : STAGING_BYTES - this.end;
    return this.received(
      sys.tryRecv(this.fd, this.staging.subarray(this.end, this.end + want), MSG_DONTWAIT),
      (n) => {
        this.end += n;
        this.emptied = n < want;
      },
    );
  }

  /** A recv result: bytes counted by `take`, false for EAGAIN; EOF and errors close. */
  private received(rc: number, take: (n: number) => void): boolean {
    if (rc > 0) {
      take(rc);
      return true;
    }
    if (rc === -ERRNO.EAGAIN || rc === -ERRNO.EINTR) return false;
    const { closedCode, ioCode, peerName } = this.role;
    if (rc === 0)
      throw new Fail({ code: closedCode, message: `${peerName} closed the connection` });
    throw new Fail({ code: ioCode, message: `recv failed: ${errnoName(-rc)}` });
  }

  /** Parses one ws frame header from staging and acts on it; false when more bytes are needed. */
  private parseHeader(): boolean {
    const st = this.staging;
    const have = this.end - this.start;
    if (have < 2) return false;
    const b0 = st[this.start]!;
    const b1 = st[this.start + 1]!;
    const fin = (b0 & 0x80) !== 0;
    const op = b0 & 0x0f;
    let len = b1 & 0x7f;
    let head = 2;
    if (len === 126) head = 4;
    else if (len === 127) head = 10;
    const masked = (b1 & 0x80) !== 0;
    const maskAt = this.start + head;
    if (masked) head += 4;
    if (have < head) return false;
    if (b0 & 0x70) this.wsError('RSV bits set');
    if (masked !== this.role.peerIsClient) {
      this.wsError(masked ? 'a masked frame from the server' : 'an unmasked frame from the client');
    }
    if (len === 126) len = st.readUInt16BE(this.start + 2);
    else if (len === 127) {
      const hi = st.readUInt32BE(this.start + 2);
      if (hi !== 0) this.wsError('payload length beyond 2^32');
      len = st.readUInt32BE(this.start + 6);
    }
    if (op >= OP_CLOSE) {
      if (op > OP_PONG) this.wsError(`opcode ${op}`);
      if (!fin || len > 125) this.wsError('a fragmented or long control frame');
    } else if (op > OP_BINARY) this.wsError(`opcode ${op}`);
    else if (op === OP_CONTINUATION ? !this.fragments : this.fragments) {
      this.wsError(
        op === OP_CONTINUATION ? 'a continuation of nothing' : 'a new message inside one',
      );
    }
    const total = op === OP_CONTINUATION ? this.fragmentsBytes + len : len;
    if (total > Limits.MAX_FRAME_BYTES) this.wsError('Max payload size exceeded');
    const mask = masked ? st.readUInt32BE(maskAt) : 0;

    // A DATA frame, unfragmented: its header now, its payload straight into the sink.
    if (
      this.sink &&
      op === OP_BINARY &&
      fin &&
      len > HeaderSize.DATA &&
      st[this.start + head] === FrameType.DATA
    ) {
      if (have < head + HeaderSize.DATA) return false;
      const header = Buffer.from(
        st.subarray(this.start + head, this.start + head + HeaderSize.DATA),
      );
      const h = decodeDataHeader(header, len);
      this.start += head + HeaderSize.DATA;
      this.pending = { header, h, into: null, inSink: false, got: 0, waited: false };
      this.streaming = true;
      return true;
    }
    this.streaming = false;
    this.start += head;
    if (have - head >= len) {
      const payload = st.subarray(this.start, this.start + len);
      this.start += len;
      if (masked) xorMask(payload, mask);
      this.message(op, fin, payload);
    } else {
      // A message is only valid during its delivery: up to the size of a huge page, the one
      // scratch buffer serves them all (a demand channel's 2 MiB pages would otherwise cost a
      // fresh 2 MiB each, which the dest's RSS showed).
      const buf =
        len <= LOWAT_MAX_BYTES ? this.scratch(len).subarray(0, len) : Buffer.allocUnsafe(len);
      const got = have - head;
      st.copy(buf, 0, this.start, this.end);
      this.start = this.end;
      this.body = { buf, got, op, fin, mask };
    }
    return true;
  }

  private wsError(message: string): never {
    throw new Fail({ code: this.role.ioCode, message: `invalid ws frame: ${message}` });
  }

  /** Receives the rest of a message's payload (into the scratch buffer, or one of its own). */
  private receiveBody(): boolean {
    const b = this.body!;
    if (b.got < b.buf.byteLength) {
      const ok = this.received(
        sys.tryRecv(this.fd, b.buf.subarray(b.got), MSG_DONTWAIT),
        (n) => (b.got += n),
      );
      if (!ok) return false;
      if (b.got < b.buf.byteLength) return true;
    }
    this.body = null;
    if (this.role.peerIsClient) xorMask(b.buf, b.mask);
    this.message(b.op, b.fin, b.buf);
    return true;
  }

  /**
   * A whole ws frame's payload (a view into staging or the scratch buffer, valid during the call
   * only).
   */
  private message(op: number, fin: boolean, payload: Buffer): void {
    switch (op) {
      case OP_PING:
        this.hooks.ping(Buffer.from(payload));
        return;
      case OP_PONG:
        this.hooks.pong();
        return;
      case OP_CLOSE: {
        const code = payload.byteLength >= 2 ? payload.readUInt16BE(0) : 1005;
        const reason = payload.subarray(2).toString();
        throw new Fail({ code: this.role.closedCode, message: `ws closed ${code} ${reason}` });
      }
    }
    if (!fin || this.fragments) {
      if (!this.fragments) {
        this.fragments = [];
        this.fragmentsOp = op;
        this.fragmentsBytes = 0;
      }
      this.fragments.push(Buffer.from(payload));
      this.fragmentsBytes += payload.byteLength;
      if (!fin) return;
      op = this.fragmentsOp;
      payload = Buffer.concat(this.fragments, this.fragmentsBytes);
      this.fragments = null;
    }
    this.hooks.message(payload, op !== OP_TEXT);
  }

  /** Receives a DATA payload; delivers it when complete and verified. */
  private receiveData(hangup: boolean): boolean {
    const p = this.pending!;
    const n = p.h.length;
    if (!p.into) {
      const staged = Math.min(n, this.end - this.start);
      const rest = n - staged;
      if (rest > 0 && sys.bytesReadable(this.fd) < rest) {
        if (hangup) {
          throw new Fail({
            code: this.role.closedCode,
            message: `${this.role.peerName} closed inside a frame`,
          });
        }
        if (!p.waited && rest <= LOWAT_MAX_BYTES) {
          // Wait until all of it is queued, then take the sink's room and fill it at once.
          p.waited = true;
          this.setLowat(rest);
          return false;
        }
        // Readable with less than the payload queued: the receive window is full (the kernel
        // reports that despite SO_RCVLOWAT), or the payload is too large to wait for. It is
        // read as it comes, into a buffer of our own.
        p.into = this.scratch(n);
      } else {
        p.into = this.sink!.reserve(n);
        p.inSink = p.into !== null;
        p.into ??= this.scratch(n);
      }
      this.setLowat(1);
      this.staging.copy(p.into, 0, this.start, this.start + staged);
      this.start += staged;
      p.got = staged;
    }
    while (p.got < n) {
      const ok = this.received(
        sys.tryRecv(this.fd, p.into.subarray(p.got, n), MSG_DONTWAIT),
        (k) => (p.got += k),
      );
      if (!ok) {
        if (p.inSink) {
          // Queued bytes that did not come (TCP does not do that): the sink's room is not held
          // while waiting.
          const room = p.into;
          p.into = this.scratch(n);
          room.copy(p.into, 0, 0, p.got);
          p.inSink = false;
        }
        return false;
      }
    }
    const receivedAt = performance.now();
    let payload = p.into.subarray(0, n);
    verifyDataPayload(p.header, p.h, payload);
    if (p.inSink) this.sink!.commit();
    else {
      // Read apart from the sink: moved into it now if there is room, or else copied out of
      // the scratch buffer, which the next frame reuses.
      const room = this.sink!.reserve(n);
      if (room) {
        room.set(payload);
        this.sink!.commit();
        payload = room;
      } else payload = Buffer.from(payload);
    }
    this.pending = null;
    const { flags, offset, checksum } = p.h;
    this.hooks.data(
      { type: FrameType.DATA, flags, offset, checksum, payload },
      payload,
      receivedAt,
    );
    return true;
  }

  /**
   * A buffer of at least `n` bytes, kept for the next payload read apart from the sink, or the
   * next message too large for staging.
   */
  private scratch(n: number): Buffer {
    if (!this.scratchBuf || this.scratchBuf.byteLength < n) {
      this.scratchBuf = Buffer.allocUnsafeSlow(n);
    }
    return this.scratchBuf;
  }

  private setLowat(bytes: number): void {
    if (this.lowat === bytes) return;
    sys.setRecvLowat(this.fd, bytes);
    this.lowat = bytes;
  }
}
