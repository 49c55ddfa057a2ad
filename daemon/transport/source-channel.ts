/**
 * The source side of one page connection after its HELLO was accepted: what the source core sees
 * instead of a ws socket. Frames arrive decoded and already checked to be legal for the channel
 * kind (read by ws, or with recv(2) once readRaw() took a plain demand connection over); frames
 * go out as whole buffers, without a copy (ws writes an unmasked server frame as its header
 * followed by our buffer).
 */
import WebSocket from 'ws';
import * as sys from '../linux/sys.js';
import { wsSocket } from './internals.js';
import { DirectSender } from './direct-send.js';
import { RawReceiver, READING_DEST } from './raw-receive.js';
import {
  codeOf,
  PAGE_ERROR_CODES,
  ProtocolError,
  type PageErrorCode,
} from '../../protocol/errors.js';
import { decodeFrame, encodeError } from '../../protocol/page-codec.js';
import {
  channelName,
  Channel,
  FrameType,
  type ChannelKind,
  type Frame,
} from '../../protocol/wire.js';

export interface ChannelCloseInfo {
  /** Why: CLOSED (peer or normal close), REPLACED, an ERROR code we sent, or the peer's ERROR code. */
  code: string;
  message: string;
}

export interface SourceChannel {
  readonly kind: ChannelKind;
  readonly migrationId: string;
  /** Connection serial, for logs. */
  readonly serial: number;
  readonly remoteAddress: string;
  readonly isOpen: boolean;
  /** Bytes handed to send() whose socket write has not completed yet. */
  readonly bufferedBytes: number;
  /**
   * Sends one frame; false when the channel is closed (then `onWritten` is not called). Do not
   * modify `frame` until `onWritten` ran: it runs once the bytes are in the kernel.
   */
  send(frame: Uint8Array, onWritten?: () => void): boolean;
  /** Runs `fn`, whose sends leave in one socket write (the socket is corked meanwhile). */
  batch(fn: () => void): void;
  /** Calls `fn` once, as soon as bufferedBytes <= `bytes` (at once if it already is). */
  whenBufferedBelow(bytes: number, fn: () => void): void;
  /** Frames from the peer, in order, legal for this channel kind. Set by the owner. */
  onFrame: (frame: Frame, bytes: number) => void;
  /** Called once when the channel closes for any reason. Set by the owner. */
  onClose: (info: ChannelCloseInfo) => void;
  /** Sends an ERROR frame with `code` and closes. */
  fail(code: PageErrorCode, message: string): void;
  /** Closes normally (ws 1000), after the frames already sent. */
  close(code?: string, message?: string): void;
}

/** Why a connection ends: a close (COMPLETE, SHUTDOWN) or an error sent to the peer. */
export type EndCode = PageErrorCode | 'COMPLETE' | 'SHUTDOWN';

/**
 * Ends `ch`, if it is open, for `code`: COMPLETE and SHUTDOWN close it normally, any other code
 * goes to the peer as an ERROR frame first.
 */
export function endChannel(
  ch: SourceChannel | null | undefined,
  code: EndCode,
  message: string,
): void {
  if (!ch?.isOpen) return;
  if (code === 'COMPLETE' || code === 'SHUTDOWN') ch.close(code, message);
  else ch.fail(code, message);
}

/**
 * A newer connection of the same migration and channel passed its HELLO: the older one, if still
 * open, is closed with REPLACED (the dest reconnected, and its old connection may linger).
 */
export function supersede(
  old: SourceChannel | null | undefined,
  next: SourceChannel,
  log: { info(msg: string, fields?: Record<string, unknown>): void },
): void {
  if (!old || old === next) return;
  log.info('connection replaced', {
    channel: channelName(next.kind),
    old: old.serial,
    new: next.serial,
  });
  old.close('REPLACED', 'replaced by a newer connection');
}

/** Frames a destination may send after HELLO, by channel kind (protocol/README.md). */
const LEGAL: Record<ChannelKind, ReadonlySet<number>> = {
  [Channel.DEMAND]: new Set([FrameType.REQUEST, FrameType.COMPLETE, FrameType.ERROR]),
  [Channel.BACKGROUND]: new Set([FrameType.CREDIT, FrameType.HAVE, FrameType.ERROR]),
};

/** A peer that never answers our close frame must not keep the socket open. */
const CLOSE_GRACE_MS = 2000;
/** Unsent bytes above which the peer's frames are no longer read; reading resumes below the second. */
const READ_PAUSE_BYTES = 32 * 1024 * 1024;
const READ_RESUME_BYTES = 8 * 1024 * 1024;

interface Waiter {
  bytes: number;
  fn: () => void;
}

/** What the page server hears from a channel it reads with recv(2). */
export interface RawReadHooks {
  /** Anything arrived from the peer (a frame, a ping or a pong): it is alive. */
  activity(): void;
  /** The peer broke the ws protocol, or the socket failed (the channel closes). */
  broken(info: ChannelCloseInfo): void;
}

export class WsSourceChannel implements SourceChannel {
  onFrame: (frame: Frame, bytes: number) => void = () => {};
  onClose: (info: ChannelCloseInfo) => void = () => {};
  private open = true;
  private buffered = 0;
  private paused = false;
  private waiters: Waiter[] = [];
  /** Reads the peer's frames once readRaw() took the socket over from ws. */
  private receiver: RawReceiver | null = null;
  /** Small frames' own sends (readRaw), or null: everything goes through ws. */
  private direct: DirectSender | null = null;
  private batching = 0;

  constructor(
    private readonly ws: WebSocket,
    readonly kind: ChannelKind,
    readonly migrationId: string,
    readonly serial: number,
    readonly remoteAddress: string,
  ) {}

  get isOpen(): boolean {
    return this.open;
  }

  get bufferedBytes(): number {
    return this.buffered;
  }

  send(frame: Uint8Array, onWritten?: () => void): boolean {
    if (!this.open || this.ws.readyState !== WebSocket.OPEN) return false;
    const len = frame.byteLength;
    if (this.direct && this.batching === 0) {
      // A small frame, no batch corked: one send(2) of our own (direct-send.ts). Its bytes
      // were copied, so onWritten runs at once; what the kernel did not take is still counted.
      const queued = this.direct.send(frame, (n) => this.written(n));
      if (queued >= 0) {
        this.buffered += queued;
        onWritten?.();
        return true;
      }
    }
    this.buffered += len;
    // The callback runs once the socket write completed (or failed: the close path handles it).
    this.ws.send(frame, { binary: true, compress: false }, () => this.written(len, onWritten));
    return true;
  }

  private written(len: number, onWritten?: () => void): void {
    this.buffered -= len;
    onWritten?.();
    if (this.waiters.length === 0) return;
    const ready = this.waiters.filter((w) => this.buffered <= w.bytes);
    if (ready.length === 0) return;
    this.waiters = this.waiters.filter((w) => this.buffered > w.bytes);
    for (const w of ready) w.fn();
  }

  batch(fn: () => void): void {
    // ws corks and uncorks per message, which nests inside ours.
    const socket = wsSocket(this.ws);
    socket.cork();
    this.batching++;
    try {
      fn();
    } finally {
      this.batching--;
      socket.uncork();
    }
  }

  whenBufferedBelow(bytes: number, fn: () => void): void {
    if (this.buffered <= bytes) fn();
    else this.waiters.push({ bytes, fn });
  }

  /**
   * From now on the peer's frames are read with recv(2) from `fd`, the socket's (see
   * takeOverReading), not by node's stream and ws; and small frames are sent with send(2) when
   * nothing else waits to be written (direct-send.ts), the rest by ws. A demand connection carries
   * one small REQUEST and one small answer per fault: this saves the stream machinery on each.
   */
  readRaw(fd: number, hooks: RawReadHooks): void {
    // The fd is valid while ws is OPEN (send checks that): ws destroys the socket only after.
    this.direct = new DirectSender(this.ws, fd, false);
    this.receiver = new RawReceiver(
      sys.dupCloexec(fd),
      undefined,
      {
        message: (data, isBinary) => {
          hooks.activity();
          this.deliver(data, isBinary);
        },
        // Only with a payload sink, which the source never gives.
        data: () => {},
        ping: (data) => {
          hooks.activity();
          if (this.ws.readyState === WebSocket.OPEN) this.ws.pong(data);
        },
        pong: () => hooks.activity(),
        closed: (info) => {
          this.receiver = null;
          // The peer closed: its close frame is answered (unless ours went first), as ws does.
          // A frame that breaks RFC 6455, or a failed socket: a close with 1002, as ws does.
          // Then the socket goes; a peer sends nothing after its close frame, so that is a FIN.
          const broken = info.code !== READING_DEST.closedCode;
          if (broken) hooks.broken(info);
          if (this.ws.readyState === WebSocket.OPEN) {
            if (broken) this.ws.close(1002, info.code);
            else this.ws.close(1000);
          }
          this.finish(info);
          setImmediate(() => this.ws.terminate());
        },
      },
      READING_DEST,
    );
  }

  private pauseReading(): void {
    if (this.receiver) this.receiver.pause();
    else this.ws.pause();
  }

  private resumeReading(): void {
    if (this.receiver) this.receiver.resume();
    else this.ws.resume();
  }

  /** A ws message from the peer: decode, check legality, deliver or fail the channel. */
  deliver(data: Buffer, isBinary: boolean): void {
    if (!this.open) return;
    let frame: Frame;
    try {
      if (!isBinary)
        throw new ProtocolError('FRAME_TEXT', 'text messages are not part of the protocol');
      frame = decodeFrame(data);
    } catch (err) {
      this.fail(codeOf(err, PAGE_ERROR_CODES, 'FRAME_BAD_VALUE'), (err as Error).message);
      return;
    }
    if (!LEGAL[this.kind].has(frame.type)) {
      this.fail(
        'BAD_STATE',
        `frame type 0x${frame.type.toString(16)} is not legal on a ${channelName(this.kind)} channel`,
      );
      return;
    }
    if (frame.type === FrameType.ERROR) {
      this.end({ code: frame.code, message: `peer: ${frame.message}` }, 1000);
      return;
    }
    this.onFrame(frame, data.length);
    // Backpressure on a peer that asks faster than it reads (REQUESTs whose answers it leaves
    // in our send buffer): stop reading its frames until the buffer drains.
    if (this.buffered > READ_PAUSE_BYTES && !this.paused && this.open) {
      this.paused = true;
      this.pauseReading();
      this.whenBufferedBelow(READ_RESUME_BYTES, () => {
        this.paused = false;
        if (this.open) this.resumeReading();
      });
    }
  }

  fail(code: PageErrorCode, message: string): void {
    if (!this.open) return;
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(encodeError(code, message));
    this.end({ code, message }, 1008);
  }

  close(code = 'CLOSED', message = 'closed by the source'): void {
    this.end({ code, message }, 1000);
  }

  /** The socket closed under us (peer close, error, heartbeat timeout). */
  closed(info: ChannelCloseInfo): void {
    // Our duplicate of the socket's fd would keep the connection open.
    this.receiver?.close();
    this.receiver = null;
    this.finish(info);
  }

  private end(info: ChannelCloseInfo, wsCode: number): void {
    if (!this.open) return;
    this.finish(info);
    this.ws.close(wsCode, info.code.slice(0, 100));
    setTimeout(() => this.ws.terminate(), CLOSE_GRACE_MS).unref();
  }

  private finish(info: ChannelCloseInfo): void {
    if (!this.open) return;
    this.open = false;
    this.waiters = [];
    this.onClose(info);
  }
}
