/**
 * The destination side of the transport: one ws connection to `yabusame source` per channel
 * (demand, background), HELLO sent and WELCOME awaited before the channel is handed out.
 * The rest of the daemon sees PageChannel, never ws.
 */
import type { LookupFunction } from 'node:net';
import WebSocket from 'ws';
import { helloProof, NONCE_HEADER, parseNonce } from '../../protocol/auth.js';
import { formatHostPort, pagesUrl, type SourceAddress } from '../../protocol/source-url.js';
import { performance } from 'node:perf_hooks';
import { decodeFrame, encodeError, encodeHello } from '../../protocol/page-codec.js';
import * as sys from '../linux/sys.js';
import { DirectSender } from './direct-send.js';
import { takeOverReading } from './internals.js';
import { RawReceiver, type PayloadSink } from './raw-receive.js';
import {
  CodedError,
  codeOf,
  HANDOFF_ERROR_CODES,
  PAGE_ERROR_CODES,
  type HandoffErrorCode,
  type PageErrorCode,
} from '../../protocol/errors.js';
import {
  channelName,
  FrameType,
  Limits,
  PROTOCOL_VERSION,
  type ChannelKind,
  type Frame,
  type FrameOf,
} from '../../protocol/wire.js';

/** The dest's transport boundary: connecting a channel failed, with the code the VMM hears. */
export class TransportError extends CodedError<HandoffErrorCode> {}

export interface CloseInfo {
  /**
   * Why: a transport code (SOURCE_CLOSED, HEARTBEAT_TIMEOUT, SOURCE_IO, FRAME_*), the code of
   * the source's ERROR frame, or the code the destination closed it with.
   */
  code: string;
  message: string;
}

export interface PageChannel {
  readonly kind: ChannelKind;
  readonly welcome: FrameOf<typeof FrameType.WELCOME>;
  /** Sends one frame; false when the channel is closed. */
  send(frame: Uint8Array): boolean;
  /**
   * Starts delivery: frames in order, each with the ws message it was decoded from (DATA
   * payloads are views into it), then one `onClose` when the channel closes for any reason.
   * Frames and a close that arrive before attach are kept and delivered by it, so nothing sent
   * right behind WELCOME is lost.
   */
  attach(
    onFrame: (frame: Frame, message: Buffer) => void,
    onClose: (info: CloseInfo) => void,
  ): void;
  close(code?: string, message?: string): void;
  /**
   * Stops reading from the connection (frames already received may still arrive) until resume():
   * the source's sends then block on full socket buffers. How the dest makes bulk data wait.
   */
  pause(): void;
  resume(): void;
  readonly isOpen: boolean;
  /**
   * performance.now() when the message of the frame being delivered was received, before it
   * was decoded (its checksum verified): the start of a fault's `verify` stage.
   */
  readonly receivedAt?: number;
}

/** TLS for wss sources: the CAs to verify the source with, and our client certificate. */
export interface ClientTls {
  /** PEM CAs (absent: the system's). */
  ca?: Buffer | undefined;
  cert?: Buffer | undefined;
  key?: Buffer | undefined;
}

export interface ConnectOptions {
  /** Where the source is (parsed from the handoff, never concatenated). */
  source: SourceAddress;
  migrationId: string;
  channel: ChannelKind;
  /** The migration's secret, proven in HELLO (null: the source asks for no proof). */
  secret: Uint8Array | null;
  tls?: ClientTls | undefined;
  /** Resolves the source's host; refuses addresses the dest may not connect to. */
  lookup?: LookupFunction | undefined;
  timeoutMs: number;
  /** Interval of ws pings; the channel closes with HEARTBEAT_TIMEOUT when a pong is missed. */
  heartbeatMs?: number;
  /**
   * How a plain (not TLS) channel is read after WELCOME. 'ws' (the default): by node's stream and
   * ws. 'raw': with recv(2) (raw-receive.ts), whole messages cut out of a staging buffer, for a
   * channel of small frames that are used during the delivery only (a view into the staging
   * buffer is valid that long). A sink in `payloads`: with recv(2), and each DATA payload
   * straight into the sink's room; delivered DATA frames then carry the payload as their
   * message. A TLS channel is always read by ws.
   */
  receive?: 'ws' | 'raw' | undefined;
  payloads?: PayloadSink | undefined;
}

/** One ws message as a frame, or why it is not one (a text message, an undecodable frame). */
function decodeMessage(
  data: Buffer,
  isBinary: boolean,
): Frame | { bad: { code: PageErrorCode; message: string } } {
  if (!isBinary) return { bad: { code: 'FRAME_TEXT', message: 'text message from source' } };
  try {
    return decodeFrame(data);
  } catch (err) {
    return {
      bad: {
        code: codeOf(err, PAGE_ERROR_CODES, 'FRAME_BAD_VALUE'),
        message: (err as Error).message,
      },
    };
  }
}

/** Bytes a channel may have unsent before its peer is judged not to read. */
const MAX_SEND_BUFFER_BYTES = 16 * 1024 * 1024;

/** Opens a channel: resolves after a valid WELCOME, rejects with a TransportError otherwise. */
export function connectPageChannel(opts: ConnectOptions): Promise<PageChannel> {
  return new Promise((resolve, reject) => {
    const where = formatHostPort(opts.source);
    const ws = new WebSocket(pagesUrl(opts.source, opts.channel), {
      perMessageDeflate: false,
      maxPayload: Limits.MAX_FRAME_BYTES,
      handshakeTimeout: opts.timeoutMs,
      ...(opts.tls?.ca ? { ca: opts.tls.ca } : {}),
      ...(opts.tls?.cert ? { cert: opts.tls.cert, key: opts.tls.key } : {}),
      ...(opts.lookup ? { lookup: opts.lookup } : {}),
    });
    ws.binaryType = 'nodebuffer';
    let settled = false;
    let channel: ChannelImpl | null = null;
    let nonce: Buffer | null = null;
    const timer = setTimeout(() => {
      fail(
        new TransportError(
          'SOURCE_TIMEOUT',
          `no WELCOME from ${where} within ${opts.timeoutMs} ms`,
        ),
      );
      ws.terminate();
    }, opts.timeoutMs);
    const fail = (err: TransportError): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      reject(err);
    };
    ws.on('upgrade', (res) => {
      nonce = parseNonce(res.headers[NONCE_HEADER]);
    });
    ws.on('open', () => {
      let auth: Uint8Array | undefined;
      if (opts.secret) {
        if (!nonce) {
          fail(
            new TransportError('AUTH_FAILED', `${where} sent no nonce to prove the secret over`),
          );
          ws.terminate();
          return;
        }
        auth = helloProof(opts.secret, nonce, opts.channel, opts.migrationId);
      }
      ws.send(encodeHello(opts.channel, PROTOCOL_VERSION, opts.migrationId, auth));
    });
    ws.on('error', (err: Error & { code?: string }) => {
      if (!settled) {
        // The allowlist's refusal keeps its code; anything else means unreachable.
        const code = err.code === 'SOURCE_DENIED' ? 'SOURCE_DENIED' : 'SOURCE_UNREACHABLE';
        fail(
          new TransportError(code, `cannot reach ${where}: ${err.message}`, {
            cause: err,
          }),
        );
      } else {
        channel?.closeWith({ code: 'SOURCE_IO', message: err.message });
      }
    });
    ws.on('close', (code, reason) => {
      if (!settled) {
        fail(
          new TransportError(
            'SOURCE_CLOSED',
            `source closed during hello (${code} ${reason.toString()})`,
          ),
        );
      }
      channel?.closeWith({
        code: 'SOURCE_CLOSED',
        message: `ws closed ${code} ${reason.toString()}`,
      });
    });
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      if (channel) {
        channel.deliver(data, isBinary);
        return;
      }
      const frame = decodeMessage(data, isBinary);
      if ('bad' in frame) {
        fail(new TransportError(frame.bad.code, `bad hello answer: ${frame.bad.message}`));
        ws.terminate();
        return;
      }
      if (frame.type === FrameType.ERROR) {
        // A code this version does not know (a newer source) still fails the handoff, coded.
        const code = codeOf(frame.code, HANDOFF_ERROR_CODES, 'SESSION_FAILED');
        fail(
          new TransportError(
            code,
            `source refused ${channelName(opts.channel)}: ${code === frame.code ? '' : `${frame.code}: `}${frame.message}`,
          ),
        );
        ws.close();
        return;
      }
      if (frame.type !== FrameType.WELCOME || frame.channel !== opts.channel) {
        fail(
          new TransportError(
            'BAD_STATE',
            'source answered HELLO with something other than WELCOME',
          ),
        );
        ws.terminate();
        return;
      }
      if (frame.version !== PROTOCOL_VERSION) {
        fail(new TransportError('VERSION_UNSUPPORTED', `source speaks version ${frame.version}`));
        ws.terminate();
        return;
      }
      if (nonce && !nonce.equals(frame.nonce)) {
        fail(new TransportError('BAD_STATE', 'WELCOME carries another nonce than the upgrade'));
        ws.terminate();
        return;
      }
      settled = true;
      clearTimeout(timer);
      const raw = opts.payloads !== undefined || opts.receive === 'raw';
      const fd = raw ? takeOverReading(ws) : null;
      channel =
        fd === null
          ? new ChannelImpl(ws, opts.channel, frame, opts.heartbeatMs ?? 0)
          : new RawChannel(ws, opts.channel, frame, opts.heartbeatMs ?? 0, fd, opts.payloads);
      resolve(channel);
    });
  });
}

class ChannelImpl implements PageChannel {
  private onFrame: ((frame: Frame, message: Buffer) => void) | null = null;
  private onClose: ((info: CloseInfo) => void) | null = null;
  private early: Array<[Frame, Buffer]> = [];
  private earlyClose: CloseInfo | null = null;
  private open = true;
  private heartbeat: NodeJS.Timeout | null = null;
  protected awaitingPong = false;

  constructor(
    protected readonly ws: WebSocket,
    readonly kind: ChannelKind,
    readonly welcome: FrameOf<typeof FrameType.WELCOME>,
    heartbeatMs: number,
  ) {
    if (heartbeatMs > 0) {
      ws.on('pong', () => {
        this.awaitingPong = false;
      });
      this.heartbeat = setInterval(() => {
        if (this.awaitingPong) {
          this.closeWith({
            code: 'HEARTBEAT_TIMEOUT',
            message: `no pong within ${heartbeatMs} ms`,
          });
          ws.terminate();
          return;
        }
        this.awaitingPong = true;
        ws.ping();
      }, heartbeatMs);
      this.heartbeat.unref();
    }
  }

  get isOpen(): boolean {
    return this.open;
  }

  receivedAt = 0;

  deliver(data: Buffer, isBinary: boolean): void {
    if (!this.open) return;
    this.receivedAt = performance.now();
    const frame = decodeMessage(data, isBinary);
    if ('bad' in frame) {
      this.closeWith(frame.bad);
      this.ws.terminate();
      return;
    }
    this.deliverFrame(frame, data);
  }

  protected deliverFrame(frame: Frame, data: Buffer): void {
    if (frame.type === FrameType.ERROR) {
      this.closeWith({ code: frame.code, message: frame.message });
      this.ws.close();
      return;
    }
    if (this.onFrame) this.onFrame(frame, data);
    else this.early.push([frame, data]);
  }

  attach(
    onFrame: (frame: Frame, message: Buffer) => void,
    onClose: (info: CloseInfo) => void,
  ): void {
    this.onFrame = onFrame;
    this.onClose = onClose;
    for (const [frame, message] of this.early.splice(0)) onFrame(frame, message);
    if (this.earlyClose) onClose(this.earlyClose);
  }

  pause(): void {
    this.ws.pause();
  }

  resume(): void {
    this.ws.resume();
  }

  send(frame: Uint8Array): boolean {
    if (!this.open || this.ws.readyState !== WebSocket.OPEN) return false;
    // A source that stops reading must not make the dest buffer without end: past the limit
    // the connection is dropped (and reconnected), as if it had stalled.
    if (this.ws.bufferedAmount + frame.byteLength > MAX_SEND_BUFFER_BYTES) {
      this.closeWith({
        code: 'SOURCE_IO',
        message: `the source does not read (${this.ws.bufferedAmount} bytes unsent)`,
      });
      this.ws.terminate();
      return false;
    }
    if (!this.sendOwn(frame)) this.ws.send(frame);
    return true;
  }

  /** Sends `frame` without ws, if this channel can (RawChannel); false: ws sends it. */
  protected sendOwn(_frame: Uint8Array): boolean {
    return false;
  }

  close(code = 'CLOSED', message = 'closed by the destination'): void {
    if (!this.open) return;
    this.closeWith({ code, message });
    // Tell the source why, unless this is an ordinary close; a session code the page protocol
    // does not carry (SOURCE_MISMATCH...) travels as SESSION_FAILED, named in the message.
    if (code !== 'CLOSED' && this.ws.readyState === WebSocket.OPEN) {
      const wire = codeOf(code, PAGE_ERROR_CODES, 'SESSION_FAILED');
      this.ws.send(encodeError(wire, wire === code ? message : `${code}: ${message}`));
    }
    this.ws.close(1000);
    // A peer that never answers the close handshake must not keep the socket alive.
    setTimeout(() => this.ws.terminate(), 2000).unref();
  }

  closeWith(info: CloseInfo): void {
    if (!this.open) return;
    this.open = false;
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.onClose) this.onClose(info);
    else this.earlyClose = info;
  }
}

/**
 * A channel whose receiving half is read with recv(2) (raw-receive.ts) from the moment it is
 * attached; short frames are sent with send(2) (direct-send.ts) while nothing waits in ws, the
 * rest by ws, which also pongs the source's pings.
 */
class RawChannel extends ChannelImpl {
  private receiver: RawReceiver | null = null;
  private paused = false;

  constructor(
    ws: WebSocket,
    kind: ChannelKind,
    welcome: FrameOf<typeof FrameType.WELCOME>,
    heartbeatMs: number,
    socketFd: number,
    /** Where DATA payloads go; none: DATA frames are whole messages too. */
    private readonly sink: PayloadSink | undefined,
  ) {
    super(ws, kind, welcome, heartbeatMs);
    this.fd = sys.dupCloexec(socketFd);
    // The socket's own fd is valid while ws is OPEN (send checks that): ws destroys it after.
    this.direct = new DirectSender(ws, socketFd, true);
  }

  private readonly direct: DirectSender;

  /** A short frame (a REQUEST, a CREDIT) with one send(2), while nothing waits in ws or node. */
  protected override sendOwn(frame: Uint8Array): boolean {
    return this.direct.send(frame) >= 0;
  }

  /** Our descriptor of the socket, until the receiver takes it (-1 once closed). */
  private fd: number;

  override attach(
    onFrame: (frame: Frame, message: Buffer) => void,
    onClose: (info: CloseInfo) => void,
  ): void {
    super.attach(onFrame, onClose);
    if (!this.isOpen || this.fd < 0) return;
    this.receiver = new RawReceiver(this.fd, this.sink, {
      // Decoded, checked and delivered as ws's messages are; a bad one closes the channel.
      message: (data, isBinary) => this.deliver(data, isBinary),
      // A DATA frame read apart comes with its payload as its message.
      data: (frame, payload, at) => {
        this.receivedAt = at;
        this.deliverFrame(frame, payload);
      },
      ping: (data) => {
        if (this.ws.readyState === WebSocket.OPEN) this.ws.pong(data);
      },
      pong: () => {
        this.awaitingPong = false;
      },
      closed: (info) => {
        this.closeWith(info);
        this.ws.terminate();
      },
    });
    this.fd = -1;
    if (this.paused) this.receiver.pause();
  }

  override pause(): void {
    this.paused = true;
    this.receiver?.pause();
  }

  override resume(): void {
    this.paused = false;
    this.receiver?.resume();
  }

  /** The close is a handshake (ours, or the source's ERROR), not a cut. */
  private orderly = false;

  override close(code?: string, message?: string): void {
    this.orderly = true;
    super.close(code, message);
  }

  protected override deliverFrame(frame: Frame, data: Buffer): void {
    if (frame.type === FrameType.ERROR) this.orderly = true;
    super.deliverFrame(frame, data);
  }

  override closeWith(info: CloseInfo): void {
    if (!this.isOpen) return;
    super.closeWith(info);
    if (this.fd >= 0) sys.close(this.fd);
    this.fd = -1;
    const receiver = this.receiver;
    if (!receiver) return;
    if (!this.orderly) {
      // A cut (heartbeat missed, bad frame, EOF): the connection goes at once, as ws.terminate().
      receiver.close();
      return;
    }
    // What the source sends until it answers the close handshake is read and dropped (a socket
    // closed with unread bytes would reset the connection); a source that keeps sending is cut
    // off after 2 s, as ChannelImpl.close does.
    const end = (): void => {
      receiver.close();
      this.ws.terminate();
    };
    receiver.drain(end);
    setTimeout(end, 2000).unref();
  }
}
