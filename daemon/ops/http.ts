/**
 * The daemons' read-only HTTP endpoints: /metrics and /healthz on TCP (loopback by default, for
 * Prometheus), and migration details on a UNIX socket whose mode and group decide who may read
 * them. GET only (405 otherwise); JSON errors `{error: {code, message}}`.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { claimSocketPath, listenError, ownSocketPath, releaseSocketPath } from './unix-socket.js';

export type HttpListen =
  | { host: string; port: number }
  /** A UNIX socket, its permission bits and (optionally) its group. */
  | { path: string; mode: number; gid?: number | undefined };

/** What a GET route answers: a status, a content type and a body. */
export type Route = () =>
  | { status?: number; type: string; body: string }
  | Promise<{ status?: number; type: string; body: string }>;

export interface HttpEndpoint {
  /** The TCP port (0 for a UNIX socket). */
  readonly port: number;
  close(): Promise<void>;
}

function sendError(res: http.ServerResponse, status: number, code: string, message: string): void {
  const body = JSON.stringify({ error: { code, message } });
  res.writeHead(status, { 'content-type': 'application/json' }).end(body);
}

/** Serves `routes` (exact paths, GET only) on `listen`; `what` names the option in errors. */
export async function serveHttp(
  listen: HttpListen,
  routes: Record<string, Route>,
  what = 'listen',
): Promise<HttpEndpoint> {
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0]!;
    const route = routes[path];
    if (!route) return sendError(res, 404, 'NOT_FOUND', `no route for ${path}`);
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('allow', 'GET, HEAD');
      return sendError(res, 405, 'METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${path}`);
    }
    Promise.resolve()
      .then(route)
      .then(
        ({ status, type, body }) =>
          res.writeHead(status ?? 200, { 'content-type': type }).end(body),
        (err: Error) => sendError(res, 500, 'INTERNAL', err.message),
      );
  });
  const isUnix = 'path' in listen;
  if (isUnix) await claimSocketPath(listen.path);
  const where = isUnix ? listen.path : `${listen.host}:${listen.port}`;
  await new Promise<void>((resolve, reject) => {
    const failed = (err: Error): void => reject(listenError(what, where, err));
    server.once('error', failed);
    const done = (): void => {
      server.off('error', failed);
      resolve();
    };
    if (isUnix) server.listen(listen.path, done);
    else server.listen(listen.port, listen.host, done);
  });
  const ino = isUnix ? ownSocketPath(listen.path, listen.mode, listen.gid) : 0;
  return {
    port: isUnix ? 0 : (server.address() as AddressInfo).port,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
      if (isUnix) releaseSocketPath(listen.path, ino);
    },
  };
}

/** A JSON route answer. */
export const json = (value: unknown): { type: string; body: string } => ({
  type: 'application/json',
  body: JSON.stringify(value),
});
