/**
 * The source side of the transport: one HTTP or HTTPS server whose `/v1/pages` upgrades to ws
 * page connections (anything else is 404). The upgrade response carries the connection's nonce
 * (protocol/auth.ts); each connection then starts with a HELLO, which the server answers with
 * WELCOME or a coded ERROR, and hands a SourceChannel to whoever accepted the HELLO. Bad input
 * closes that connection only. Plaintext background connections can be handed to another thread
 * before their handshake (handOver, then PageConnections.adopt there): the threads share the fd
 * table, so a dup of the fd moves it. A TLS connection cannot move (its session lives in this
 * thread), so with TLS the other thread listens on a port of its own, which WELCOME names.
 */
import { listenError } from '../ops/unix-socket.js';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import net, { type AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import WebSocket, { WebSocketServer } from 'ws';
import {
  codeOf,
  PAGE_ERROR_CODES,
  ProtocolError,
  type PageErrorCode,
} from '../../protocol/errors.js';
import { decodeFrame, encodeError, encodeWelcome } from '../../protocol/page-codec.js';
import { NONCE_BYTES, NONCE_HEADER } from '../../protocol/auth.js';
import {
  Channel,
  channelName,
  FrameType,
  Limits,
  PROTOCOL_VERSION,
  type FrameOf,
  type RegionInfo,
} from '../../protocol/wire.js';
import * as sys from '../linux/sys.js';
import type { Logger } from '../ops/log.js';
import { rateLimitedLog, type RateLimitedLog } from '../ops/rate-limit.js';
import { socketFd, takeOverReading } from './internals.js';
import { WsSourceChannel, type SourceChannel } from './source-channel.js';

export const PAGES_PATH = '/v1/pages';

export type HelloFrame = FrameOf<typeof FrameType.HELLO>;

export interface HelloAcceptance {
  regions: readonly RegionInfo[];
  /** Called right after the WELCOME went out; the owner sets the channel's handlers here. */
  attach(channel: SourceChannel): void;
}

/**
 * Decides on a HELLO of the supported version: returns the region table and the attach hook, or
 * throws a ProtocolError (UNKNOWN_MIGRATION, BAD_STATE, ...) whose code goes back in an ERROR frame.
 */
export type HelloHandler = (hello: HelloFrame, nonce: Uint8Array) => HelloAcceptance;

/** How one thread serves page connections (see PageConnections). */
export interface PageConnectionOptions {
  onHello: HelloHandler;
  /** WELCOME's backgroundPort: where background connections go (0: the same port). */
  backgroundPort?: () => number;
  /** ws ping interval; a connection that missed the previous pong is terminated. 0 disables. */
  heartbeatIntervalMs?: number;
  /** Connections that have not sent a HELLO within this time are closed. */
  helloTimeoutMs?: number;
  log: Logger;
  /** Refusals (bad frames, failed proofs...) are logged through it: a peer can cause them at will. */
  refusalLog?: RateLimitedLog;
  /** A coded error happened on some connection (metric hook). */
  onError?: (code: string) => void;
}

export interface PageServerOptions extends PageConnectionOptions {
  host: string;
  /** 0 picks an ephemeral port. */
  port: number;
  /** Serve wss: certificate, key, and the client CAs when client certificates are required. */
  tls?: https.ServerOptions | undefined;
  /**
   * Background connections (`/v1/pages?channel=background`) are handed over here, before the ws
   * handshake, to be served by another thread; absent: served here like the others.
   */
  background?: (socket: HandedSocket) => void;
}

export interface PageServer {
  readonly port: number;
  readonly http: http.Server | https.Server;
  /** Closes every connection and the listener. */
  close(): Promise<void>;
}

/**
 * An upgrade request whose socket moves to another thread: a duplicate of the socket's fd (the
 * threads share the fd table) and what the ws handshake needs. Structured-cloneable.
 */
export interface HandedSocket {
  fd: number;
  url: string;
  headers: http.IncomingHttpHeaders;
  head: Uint8Array;
  remote: string;
}

/** The channel a connection asks for in its URL (`?channel=demand|background`), if any. */
export function requestedChannel(url: string): string | null {
  const q = url.indexOf('?');
  return q < 0 ? null : new URLSearchParams(url.slice(q + 1)).get('channel');
}

const remoteOf = (socket: { remoteAddress?: string; remotePort?: number }): string =>
  `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? '?'}`;

/**
 * Takes `socket` away from this thread for PageConnections.adopt on another: duplicates its fd
 * and destroys this side (the duplicate keeps the connection open). Nothing was read past the
 * request but `head`: a ws client sends no frame before the handshake's answer.
 */
export function handOver(req: http.IncomingMessage, socket: Duplex, head: Buffer): HandedSocket {
  const handed: HandedSocket = {
    fd: sys.dup(socketFd(socket)),
    url: req.url ?? '',
    headers: req.headers,
    head: new Uint8Array(head),
    remote: remoteOf(req.socket),
  };
  socket.destroy();
  return handed;
}

interface Conn {
  ws: WebSocket;
  alive: boolean;
  channel: WsSourceChannel | null;
}

/**
 * The page connections one thread serves: each starts with a HELLO, answered with WELCOME or a
 * coded ERROR; an accepted one becomes a SourceChannel handed to whoever accepted the HELLO.
 * Bad input closes that connection only. Heartbeats ping every connection.
 */
export class PageConnections {
  private readonly conns = new Set<Conn>();
  private serial = 0;
  private readonly wss = new WebSocketServer({
    noServer: true,
    perMessageDeflate: false,
    maxPayload: Limits.MAX_FRAME_BYTES,
  });
  private readonly heartbeat: NodeJS.Timeout | null;
  private readonly helloTimeoutMs: number;
  private readonly onError: (code: string) => void;
  /** The nonce each upgrade response carried, by request. */
  private readonly nonces = new WeakMap<object, Buffer>();
  private readonly refusalLog: RateLimitedLog;

  constructor(
    private readonly opts: PageConnectionOptions,
    /** Connection numbers in logs: `${prefix}${n}` ('' on the main thread). */
    private readonly prefix = '',
  ) {
    const heartbeatMs = opts.heartbeatIntervalMs ?? 15_000;
    this.helloTimeoutMs = opts.helloTimeoutMs ?? 10_000;
    this.onError = opts.onError ?? (() => {});
    this.refusalLog = opts.refusalLog ?? rateLimitedLog(opts.log);
    this.heartbeat = heartbeatMs > 0 ? setInterval(() => this.ping(), heartbeatMs) : null;
    this.heartbeat?.unref();
    // A fresh nonce in every upgrade response: what the HELLO's proof is computed over.
    this.wss.on('headers', (headers: string[], req: http.IncomingMessage) => {
      const nonce = randomBytes(NONCE_BYTES);
      this.nonces.set(req, nonce);
      headers.push(`${NONCE_HEADER}: ${nonce.toString('hex')}`);
    });
  }

  /** Completes the ws handshake of an upgrade request of this thread, then serves it. */
  upgrade(req: http.IncomingMessage, socket: Duplex, head: Buffer): void {
    const remote = remoteOf(req.socket);
    this.wss.handleUpgrade(req, socket, head, (ws) => this.accept(ws, remote, this.nonceOf(req)));
  }

  private nonceOf(req: object): Buffer {
    const nonce = this.nonces.get(req);
    if (!nonce) throw new Error('an upgrade without a nonce');
    return nonce;
  }

  /** Serves a socket another thread handed over (see handOver). */
  adopt(h: HandedSocket): void {
    const socket = new net.Socket({ fd: h.fd, readable: true, writable: true });
    // What ws's handshake reads of a request: its method, URL and headers.
    const req = { method: 'GET', url: h.url, headers: h.headers, socket };
    this.wss.handleUpgrade(
      req as unknown as http.IncomingMessage,
      socket,
      Buffer.from(h.head),
      (ws) => this.accept(ws, h.remote, this.nonceOf(req)),
    );
  }

  /** Closes every connection (SHUTDOWN). */
  close(): void {
    if (this.heartbeat) clearInterval(this.heartbeat);
    for (const conn of this.conns) {
      if (conn.channel) conn.channel.close('SHUTDOWN', 'the source is shutting down');
      else conn.ws.close(1001, 'SHUTDOWN');
      conn.ws.terminate();
    }
    this.wss.close();
  }

  private ping(): void {
    for (const conn of this.conns) {
      if (!conn.alive) {
        this.opts.log.warn('page connection missed a heartbeat', { conn: conn.channel?.serial });
        this.onError('HEARTBEAT_TIMEOUT');
        conn.ws.terminate();
        continue;
      }
      conn.alive = false;
      conn.ws.ping();
    }
  }

  private accept(ws: WebSocket, remote: string, nonce: Buffer): void {
    const { log } = this.opts;
    const onError = this.onError;
    const id = ++this.serial;
    const connName = `${this.prefix}${id}`;
    const conn: Conn = { ws, alive: true, channel: null };
    this.conns.add(conn);
    ws.binaryType = 'nodebuffer';
    const refuse = (code: PageErrorCode, message: string): void => {
      onError(code);
      this.refusalLog('warn', code, 'page connection refused', {
        conn: connName,
        remote,
        code,
        reason: message,
      });
      ws.send(encodeError(code, message));
      ws.close(1008, code);
      setTimeout(() => ws.terminate(), 2000).unref();
    };
    const helloTimer = setTimeout(
      () => refuse('BAD_STATE', `no HELLO within ${this.helloTimeoutMs} ms`),
      this.helloTimeoutMs,
    );
    helloTimer.unref();
    let sawHello = false;

    ws.on('pong', () => {
      conn.alive = true;
    });
    ws.on('error', (err: Error & { code?: string }) => {
      // ws closes the socket itself after an error (e.g. WS_ERR_UNSUPPORTED_MESSAGE_LENGTH).
      onError(err.code ?? 'WS_ERROR');
      log.warn('page connection error', { conn: connName, remote, err });
    });
    ws.on('close', (code: number, reason: Buffer) => {
      clearTimeout(helloTimer);
      this.conns.delete(conn);
      conn.channel?.closed({ code: 'CLOSED', message: `ws closed ${code} ${reason.toString()}` });
    });
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      conn.alive = true;
      if (conn.channel) {
        conn.channel.deliver(data, isBinary);
        return;
      }
      if (sawHello) return; // refused already; ignore what the peer sends before closing
      sawHello = true;
      clearTimeout(helloTimer);
      let hello: HelloFrame;
      try {
        if (!isBinary)
          throw new ProtocolError('FRAME_TEXT', 'text messages are not part of the protocol');
        const frame = decodeFrame(data);
        if (frame.type !== FrameType.HELLO) {
          throw new ProtocolError(
            'BAD_STATE',
            `first frame must be HELLO, got type 0x${frame.type.toString(16)}`,
          );
        }
        hello = frame;
        // HELLO names the highest version the dest speaks; this source speaks one.
        if (hello.version < PROTOCOL_VERSION) {
          throw new ProtocolError(
            'VERSION_UNSUPPORTED',
            `version ${hello.version} is not supported (this source speaks ${PROTOCOL_VERSION})`,
          );
        }
      } catch (err) {
        refuse(codeOf(err, PAGE_ERROR_CODES, 'FRAME_BAD_VALUE'), (err as Error).message);
        return;
      }
      let acceptance: HelloAcceptance;
      try {
        acceptance = this.opts.onHello(hello, nonce);
      } catch (err) {
        if (!(err instanceof ProtocolError)) throw err;
        refuse(codeOf(err, PAGE_ERROR_CODES, 'BAD_STATE'), err.message);
        return;
      }
      ws.send(
        encodeWelcome(
          hello.channel,
          PROTOCOL_VERSION,
          nonce,
          acceptance.regions,
          this.opts.backgroundPort?.() ?? 0,
        ),
      );
      const channel = new WsSourceChannel(ws, hello.channel, hello.migrationId, id, remote);
      conn.channel = channel;
      // A plain demand connection is read with recv(2) from here on (null: TLS, or ws already
      // holds bytes after HELLO, and keeps reading). A background one carries a few CREDIT and
      // HAVE frames only, and may live on the bulk thread, which a koffi poll must not outlive.
      const fd = hello.channel === Channel.DEMAND ? takeOverReading(ws) : null;
      if (fd !== null) {
        channel.readRaw(fd, {
          activity: () => {
            conn.alive = true;
          },
          broken: (info) => {
            onError(info.code);
            log.warn('page connection error', { conn: connName, remote, reason: info.message });
          },
        });
      }
      log.info('page connection accepted', {
        conn: connName,
        remote,
        migrationId: hello.migrationId,
        channel: channelName(hello.channel),
      });
      acceptance.attach(channel);
    });
  }
}

export async function listenPageServer(opts: PageServerOptions): Promise<PageServer> {
  const conns = new PageConnections(opts);
  const notFound: http.RequestListener = (req, res) => {
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(
      JSON.stringify({ error: { code: 'NOT_FOUND', message: 'this port serves /v1/pages only' } }),
    );
  };
  const httpServer = opts.tls
    ? https.createServer(opts.tls, notFound)
    : http.createServer(notFound);

  httpServer.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    const url = req.url ?? '';
    const path = url.split('?')[0];
    if (path !== PAGES_PATH) {
      socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    if (opts.background && !opts.tls && requestedChannel(url) === 'background') {
      let handed: HandedSocket;
      try {
        handed = handOver(req, socket, head);
      } catch (err) {
        opts.log.error('cannot hand a background connection over', { err });
        socket.end(
          'HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 0\r\n\r\n',
        );
        return;
      }
      opts.background(handed);
      return;
    }
    conns.upgrade(req, socket, head);
  });

  await new Promise<void>((resolve, reject) => {
    const failed = (err: Error): void =>
      reject(listenError('listen', `${opts.host}:${opts.port}`, err));
    httpServer.once('error', failed);
    httpServer.listen(opts.port, opts.host, () => {
      httpServer.off('error', failed);
      resolve();
    });
  });
  const port = (httpServer.address() as AddressInfo).port;

  let closing: Promise<void> | null = null;
  return {
    port,
    http: httpServer,
    close() {
      closing ??= new Promise<void>((resolve) => {
        conns.close();
        httpServer.close(() => resolve());
        httpServer.closeAllConnections();
      });
      return closing;
    },
  };
}
