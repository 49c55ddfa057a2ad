/**
 * The source side of the transport: one HTTP server whose `/v1/pages` upgrades to ws page
 * connections (everything else goes to an injected request handler: control API, /metrics).
 * Each connection starts with a HELLO; the server answers WELCOME or a coded ERROR, then hands a
 * SourceChannel to whoever accepted the HELLO. Bad input closes that connection only.
 */
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import WebSocket, { WebSocketServer } from 'ws';
import { ProtocolError } from '../../protocol/errors.js';
import { decodeFrame, encodeError, encodeWelcome } from '../../protocol/page-codec.js';
import {
  FrameType,
  Limits,
  PROTOCOL_VERSION,
  type FrameOf,
  type RegionInfo,
} from '../../protocol/wire.js';
import type { Logger } from '../ops/log.js';
import { channelName, WsSourceChannel, type SourceChannel } from './source-channel.js';

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

export interface PageServerOptions {
  host: string;
  /** 0 picks an ephemeral port. */
  port: number;
  onHello: HelloHandler;
  /** Plain HTTP requests (anything but the ws upgrade); 404 when absent. */
  httpHandler?: http.RequestListener;
  /** ws ping interval; a connection that missed the previous pong is terminated. 0 disables. */
  heartbeatIntervalMs?: number;
  /** Connections that have not sent a HELLO within this time are closed. */
  helloTimeoutMs?: number;
  log: Logger;
  /** A coded error happened on some connection (metric hook). */
  onError?: (code: string) => void;
}

export interface PageServer {
  readonly port: number;
  readonly http: http.Server;
  /** Closes every connection and the listener. */
  close(): Promise<void>;
}

interface Conn {
  ws: WebSocket;
  alive: boolean;
  channel: WsSourceChannel | null;
}

export async function listenPageServer(opts: PageServerOptions): Promise<PageServer> {
  const { log } = opts;
  const heartbeatMs = opts.heartbeatIntervalMs ?? 15_000;
  const helloTimeoutMs = opts.helloTimeoutMs ?? 10_000;
  const onError = opts.onError ?? (() => {});
  const conns = new Set<Conn>();
  let serial = 0;

  const httpServer = http.createServer((req, res) => {
    if (opts.httpHandler) {
      opts.httpHandler(req, res);
      return;
    }
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: { code: 'NOT_FOUND', message: `no route for ${req.url}` } }));
  });
  const wss = new WebSocketServer({
    noServer: true,
    perMessageDeflate: false,
    maxPayload: Limits.MAX_FRAME_BYTES,
  });

  httpServer.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    const path = (req.url ?? '').split('?')[0];
    if (path !== PAGES_PATH) {
      socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => accept(ws, req));
  });

  function accept(ws: WebSocket, req: http.IncomingMessage): void {
    const id = ++serial;
    const remote = `${req.socket.remoteAddress ?? '?'}:${req.socket.remotePort ?? '?'}`;
    const conn: Conn = { ws, alive: true, channel: null };
    conns.add(conn);
    ws.binaryType = 'nodebuffer';
    const refuse = (code: string, message: string): void => {
      onError(code);
      log.warn('page connection refused', { conn: id, remote, code, reason: message });
      ws.send(encodeError(code, message));
      ws.close(1008, code);
      setTimeout(() => ws.terminate(), 2000).unref();
    };
    const helloTimer = setTimeout(
      () => refuse('BAD_STATE', `no HELLO within ${helloTimeoutMs} ms`),
      helloTimeoutMs,
    );
    helloTimer.unref();
    let sawHello = false;

    ws.on('pong', () => {
      conn.alive = true;
    });
    ws.on('error', (err: Error & { code?: string }) => {
      // ws closes the socket itself after an error (e.g. WS_ERR_UNSUPPORTED_MESSAGE_LENGTH).
      onError(err.code ?? 'WS_ERROR');
      log.warn('page connection error', { conn: id, remote, err });
    });
    ws.on('close', (code: number, reason: Buffer) => {
      clearTimeout(helloTimer);
      conns.delete(conn);
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
        if (hello.version !== PROTOCOL_VERSION) {
          throw new ProtocolError(
            'VERSION_UNSUPPORTED',
            `version ${hello.version} is not supported (this source speaks ${PROTOCOL_VERSION})`,
          );
        }
      } catch (err) {
        const code = err instanceof ProtocolError ? err.code : 'FRAME_BAD_VALUE';
        refuse(code, (err as Error).message);
        return;
      }
      const nonce = randomBytes(16);
      let acceptance: HelloAcceptance;
      try {
        acceptance = opts.onHello(hello, nonce);
      } catch (err) {
        if (!(err instanceof ProtocolError)) throw err;
        refuse(err.code, err.message);
        return;
      }
      ws.send(encodeWelcome(hello.channel, PROTOCOL_VERSION, nonce, acceptance.regions));
      const channel = new WsSourceChannel(ws, hello.channel, hello.migrationId, id, remote);
      conn.channel = channel;
      log.info('page connection accepted', {
        conn: id,
        remote,
        migration: hello.migrationId,
        channel: channelName(hello.channel),
      });
      acceptance.attach(channel);
    });
  }

  const heartbeat =
    heartbeatMs > 0
      ? setInterval(() => {
          for (const conn of conns) {
            if (!conn.alive) {
              log.warn('page connection missed a heartbeat', { conn: conn.channel?.serial });
              onError('HEARTBEAT_TIMEOUT');
              conn.ws.terminate();
              continue;
            }
            conn.alive = false;
            conn.ws.ping();
          }
        }, heartbeatMs)
      : null;
  heartbeat?.unref();

  await new Promise<void>((resolve, reject) => {
    httpServer.once('error', reject);
    httpServer.listen(opts.port, opts.host, () => {
      httpServer.off('error', reject);
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
        if (heartbeat) clearInterval(heartbeat);
        for (const conn of conns) {
          if (conn.channel) conn.channel.close('SHUTDOWN', 'the source is shutting down');
          else conn.ws.close(1001, 'SHUTDOWN');
          conn.ws.terminate();
        }
        wss.close();
        httpServer.close(() => resolve());
        httpServer.closeAllConnections();
      });
      return closing;
    },
  };
}
