/**
 * `yabusame dest`'s composition root: the handoff listener, one Session per VM, the metrics and
 * control HTTP endpoint, sd_notify. Sessions are independent: one failing never touches another.
 */
import { createServer, type Server } from 'node:http';
import { once } from 'node:events';
import { readdirSync } from 'node:fs';
import { ProtocolError } from '../../protocol/errors.js';
import {
  startHandoffListener,
  type HandoffListener,
  type ReceivedHandoff,
} from '../handoff/listener.js';
import { connectPageChannel } from '../transport/client.js';
import type { Logger, LogLevel } from '../ops/log.js';
import type { DestMetrics } from '../ops/metric-ports.js';
import * as sys from '../linux/sys.js';
import { Session, SessionError, type SessionConfig, type SessionStats } from './session.js';
import { BulkThread } from './bulk.js';

export interface DestDaemonOptions {
  /** Handoff socket path to create, unless `listenFd` (socket activation) is given. */
  socketPath?: string;
  listenFd?: number;
  /** host:port for /metrics, /healthz and /v1/sessions; null to disable. */
  http?: { host: string; port: number } | null;
  maxSessions: number;
  handoffTimeoutMs: number;
  session: SessionConfig;
  log: Logger;
  /** The bulk thread logs at this level (default info). */
  logLevel?: LogLevel;
  /** Nice value of the bulk thread, which places background pages (default 0). */
  bulkNice?: number;
  /** The bulk thread's entry (tests give a stand-in); default bulk-worker.js. */
  bulkWorkerUrl?: URL;
  metrics: DestMetrics;
  /** Returns the Prometheus exposition for /metrics. */
  metricsText?: () => Promise<{ contentType: string; body: string }>;
  /** Called when a session ends (tests, status). */
  onSessionEnd?: (s: SessionStats) => void;
}

export interface DestDaemon {
  readonly httpPort: number | null;
  sessions(): SessionStats[];
  /** Recently ended sessions, newest last (bounded). */
  ended(): SessionStats[];
  close(deadlineMs?: number): Promise<void>;
}

const ENDED_KEPT = 256;

/** What a leak would grow: open fds, live libuv resources by kind, resident memory. */
function processStats(): { fds: number; resources: Record<string, number>; rssBytes: number } {
  const resources: Record<string, number> = {};
  for (const kind of process.getActiveResourcesInfo()) resources[kind] = (resources[kind] ?? 0) + 1;
  return {
    fds: readdirSync('/proc/self/fd').length,
    resources,
    rssBytes: process.memoryUsage.rss(),
  };
}

export async function startDestDaemon(opts: DestDaemonOptions): Promise<DestDaemon> {
  const { log, metrics } = opts;
  const sessions = new Map<string, Session>();
  const ended: SessionStats[] = [];
  const bulk = new BulkThread({
    nice: opts.bulkNice ?? 0,
    logLevel: opts.logLevel ?? 'info',
    log,
    ...(opts.bulkWorkerUrl ? { workerUrl: opts.bulkWorkerUrl } : {}),
  });

  const accept = (h: ReceivedHandoff): void => {
    const id = h.request.migrationId;
    const previous = sessions.get(id);
    // An ended session may still be letting go of its uffd; a new one for the id may start.
    if (previous && previous.state !== 'done' && previous.state !== 'failed') {
      throw new ProtocolError('DUPLICATE_MIGRATION', `migration ${id} is already running here`);
    }
    if (!previous && sessions.size >= opts.maxSessions) {
      throw new ProtocolError('SESSION_LIMIT', `already serving ${opts.maxSessions} migrations`);
    }
    const session = new Session(h.request, h.uffd, h.conn, {
      config: opts.session,
      log,
      metrics,
      connect: connectPageChannel,
      bulk,
    });
    sessions.set(id, session);
    metrics.sessionsActive(sessions.size);
    log.info('handoff accepted', {
      migration: id,
      pid: h.conn.peer.pid,
      uid: h.conn.peer.uid,
      regions: h.request.regions.length,
    });
    session.start().then(
      () => metrics.handoff('ok'),
      // The session already told the VMM and closed the connection.
      (err: SessionError) => metrics.handoff(err.code),
    );
    void session.done.then((stats) => {
      if (sessions.get(id) === session) sessions.delete(id);
      metrics.sessionsActive(sessions.size);
      ended.push(stats);
      if (ended.length > ENDED_KEPT) ended.shift();
      opts.onSessionEnd?.(stats);
    });
  };

  const listener: HandoffListener = startHandoffListener({
    ...(opts.listenFd !== undefined ? { listenFd: opts.listenFd } : { path: opts.socketPath! }),
    timeoutMs: opts.handoffTimeoutMs,
    log,
    onHandoff: accept,
    onRefused: (code) => {
      metrics.handoff(code);
      metrics.error(code);
    },
  });

  let server: Server | null = null;
  if (opts.http) {
    server = createServer((req, res) => {
      const url = req.url ?? '/';
      if (url === '/metrics' && opts.metricsText) {
        opts.metricsText().then(
          ({ contentType, body }) => {
            res.writeHead(200, { 'content-type': contentType }).end(body);
          },
          (err: Error) => res.writeHead(500).end(err.message),
        );
      } else if (url === '/healthz') {
        res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
      } else if (url === '/v1/sessions') {
        res.writeHead(200, { 'content-type': 'application/json' }).end(
          JSON.stringify({
            active: [...sessions.values()].map((s) => s.stats()),
            ended,
            process: processStats(),
          }),
        );
      } else {
        res
          .writeHead(404, { 'content-type': 'application/json' })
          .end('{"error":{"code":"NOT_FOUND"}}');
      }
    });
    server.listen(opts.http.port, opts.http.host);
    await once(server, 'listening');
  }
  const address = server?.address();
  log.info('yabusame dest ready', {
    socket: opts.socketPath,
    http: address && typeof address === 'object' ? `${address.address}:${address.port}` : null,
    pid: sys.getpid(),
  });

  let closing: Promise<void> | null = null;
  return {
    httpPort: address && typeof address === 'object' ? address.port : null,
    sessions: () => [...sessions.values()].map((s) => s.stats()),
    ended: () => [...ended],
    close(deadlineMs = 5000) {
      closing ??= (async () => {
        listener.close();
        const all = [...sessions.values()];
        for (const s of all) s.stop();
        await Promise.race([
          Promise.all(all.map((s) => s.done)),
          new Promise((r) => setTimeout(r, deadlineMs).unref()),
        ]);
        if (server) {
          server.closeAllConnections();
          await new Promise<void>((r) => server!.close(() => r()));
        }
        await bulk.stop();
      })();
      return closing;
    },
  };
}
