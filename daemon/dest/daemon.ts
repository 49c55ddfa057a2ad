/**
 * `yabusame dest`'s composition root: the handoff listener (who may hand over, how many at
 * once), one Session per VM, the metrics endpoint (TCP) and the sessions endpoint (a UNIX
 * socket: migration details only for its group). Sessions are independent: one failing never
 * touches another.
 */
import { readdirSync } from 'node:fs';
import { ProtocolError } from '../../protocol/errors.js';
import {
  startHandoffListener,
  type HandoffListener,
  type ReceivedHandoff,
} from '../handoff/listener.js';
import { connectPageChannel } from '../transport/client.js';
import type { Logger, LogLevel } from '../ops/log.js';
import { json, serveHttp, type HttpEndpoint, type HttpListen } from '../ops/http.js';
import type { DestMetrics } from '../ops/metric-ports.js';
import * as sys from '../linux/sys.js';
import type { PeerCred } from '../linux/sys.js';
import {
  Session,
  SessionError,
  type SessionConfig,
  type SessionDeps,
  type SessionSpec,
  type SessionStats,
  type VmmConnection,
} from './session.js';
import { BulkThread } from './bulk.js';
import type { Parked, SessionParking } from './fd-store.js';
import type { PageSourceFactory } from './page-source.js';
import { remotePageSource } from './remote-source.js';
import { localPageSource } from './local-source.js';
import {
  startFirecrackerSockets,
  type FirecrackerSocketConfig,
  type FirecrackerSocketStatus,
  type FirecrackerSockets,
} from './firecracker.js';

/** Who may hand over, and how much each may hold. */
export interface PeerPolicy {
  /** Peers (SO_PEERCRED) whose uid or primary gid is listed may hand over; nobody else. */
  allowedUids: readonly number[];
  allowedGids: readonly number[];
  /** Sessions (being set up or running) one uid may have at once. */
  maxSessionsPerUid: number;
  /** Connections waiting for their handoff line: overall, and per uid. */
  maxPending: number;
  maxPendingPerUid: number;
}

export interface DestDaemonOptions {
  /** Handoff socket path to create, unless `listenFd` (socket activation) is given. */
  socketPath?: string;
  /** Its permission bits (default 0660) and group. */
  socketMode?: number;
  socketGid?: number | undefined;
  listenFd?: number;
  /** Firecracker sockets (Firecracker's own handshake), each with its page source. */
  firecracker?: readonly FirecrackerSocketConfig[];
  /** Where /metrics and /healthz are served; null to disable. */
  http?: { host: string; port: number } | null;
  /** Where /v1/sessions (migration details) and /healthz are served; null to disable. */
  control?: Extract<HttpListen, { path: string }> | null;
  maxSessions: number;
  handoffTimeoutMs: number;
  peers: PeerPolicy;
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
  /** Where sessions park their descriptors at their ack (default: nowhere). */
  parking?: SessionParking;
  /** Sessions a previous daemon parked (fd-store.ts), resumed once the daemon is up. */
  parked?: Parked;
}

export interface DestDaemon {
  readonly httpPort: number | null;
  sessions(): SessionStats[];
  /** Recently ended sessions, newest last (bounded). */
  ended(): SessionStats[];
  /** Each Firecracker socket: its state and the last VM it served or refused. */
  firecracker(): FirecrackerSocketStatus[];
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
  const { log, metrics, peers } = opts;
  /** Every session not ended yet, being set up or running. */
  const live = new Set<Session>();
  /** The running session of each migration id (acked; at most one: see claim). */
  const running = new Map<string, Session>();
  const uidOf = new WeakMap<Session, number>();
  const ended: SessionStats[] = [];
  const bulk = new BulkThread({
    nice: opts.bulkNice ?? 0,
    logLevel: opts.logLevel ?? 'info',
    log,
    ...(opts.bulkWorkerUrl ? { workerUrl: opts.bulkWorkerUrl } : {}),
  });
  try {
    await bulk.ready();
  } catch (err) {
    await bulk.stop();
    throw err;
  }

  const admit = (peer: PeerCred): ProtocolError | null =>
    peers.allowedUids.includes(peer.uid) || peers.allowedGids.includes(peer.gid)
      ? null
      : new ProtocolError(
          'HANDOFF_PEER_DENIED',
          `uid ${peer.uid} (gid ${peer.gid}) may not hand over to this daemon`,
        );

  /**
   * Runs a session for a VM whose uffd arrived, and tracks it until it ends. The caps are checked
   * first: SESSION_LIMIT and HANDOFF_QUOTA are thrown before anything starts.
   */
  const runSession = (
    spec: SessionSpec,
    uffdFd: number,
    conn: VmmConnection,
    peer: PeerCred,
    source: PageSourceFactory,
    parking: Pick<SessionDeps, 'park' | 'unpark' | 'parked'> = {},
  ): Session => {
    const id = spec.migrationId;
    const uid = peer.uid;
    if (live.size >= opts.maxSessions) {
      throw new ProtocolError('SESSION_LIMIT', `already serving ${opts.maxSessions} migrations`);
    }
    const mine = [...live].filter((s) => uidOf.get(s) === uid).length;
    if (mine >= peers.maxSessionsPerUid) {
      throw new ProtocolError(
        'HANDOFF_QUOTA',
        `uid ${uid} already has ${peers.maxSessionsPerUid} migrations here`,
      );
    }
    const session = new Session(spec, uffdFd, conn, {
      config: opts.session,
      log,
      metrics,
      source,
      bulk,
      ...parking,
      // Decided at the ack, not at the handoff: a handoff that names a migration it cannot prove
      // the secret of never gets that far, so squatting an id gains nothing.
      claim: () => {
        const other = running.get(id);
        if (other && other !== session && other.state !== 'done' && other.state !== 'failed') {
          return new SessionError('DUPLICATE_MIGRATION', `migration ${id} is already running here`);
        }
        running.set(id, session);
        return null;
      },
    });
    live.add(session);
    uidOf.set(session, uid);
    metrics.sessionsActive(live.size);
    log.info('handoff accepted', {
      migrationId: id,
      pid: peer.pid,
      uid,
      regions: spec.regions.length,
      resume: spec.resume ?? false,
      ...(spec.vmm ? { vmm: spec.vmm.kind, socket: spec.vmm.socket } : {}),
    });
    session.start().then(
      () => metrics.handoff('ok'),
      // The session already told the VMM and closed the connection.
      (err: SessionError) => metrics.handoff(err.code),
    );
    void session.done.then((stats) => {
      live.delete(session);
      if (running.get(id) === session) running.delete(id);
      metrics.sessionsActive(live.size);
      ended.push(stats);
      if (ended.length > ENDED_KEPT) ended.shift();
      opts.onSessionEnd?.(stats);
    });
    return session;
  };

  const remote = {
    connectTimeoutMs: opts.session.connectTimeoutMs,
    heartbeatMs: opts.session.heartbeatMs,
    reconnectTimeoutMs: opts.session.reconnectTimeoutMs,
    backgroundWindowBytes: opts.session.backgroundWindowBytes,
    requireSecret: opts.session.requireSecret,
    policy: opts.session.sourcePolicy,
    tls: opts.session.tls,
  };
  const accept = (h: ReceivedHandoff, parked?: string): void => {
    const store = opts.parking;
    runSession(
      { migrationId: h.request.migrationId, regions: h.request.regions, resume: h.request.resume },
      h.uffd,
      h.conn,
      h.conn.peer,
      remotePageSource(h.request, remote, { connect: connectPageChannel, bulk, metrics }),
      {
        ...(store
          ? {
              park: () => store.park(h.request, h.uffd, h.conn.fd),
              unpark: (name: string) => store.unpark(name),
            }
          : {}),
        ...(parked ? { parked } : {}),
      },
    );
  };

  const endpoints: HttpEndpoint[] = [];
  let listener: HandoffListener | null = null;
  let firecracker: FirecrackerSockets | null = null;
  try {
    listener = await startHandoffListener({
      ...(opts.listenFd !== undefined
        ? { listenFd: opts.listenFd }
        : { path: opts.socketPath!, mode: opts.socketMode ?? 0o660, gid: opts.socketGid }),
      timeoutMs: opts.handoffTimeoutMs,
      log,
      maxPending: peers.maxPending,
      maxPendingPerUid: peers.maxPendingPerUid,
      admit,
      onHandoff: accept,
      onRefused: (code) => {
        metrics.handoff(code);
        metrics.error(code);
      },
    });
    firecracker = await startFirecrackerSockets(opts.firecracker ?? [], {
      log,
      metrics,
      handoffTimeoutMs: opts.handoffTimeoutMs,
      admit,
      runSession,
      parking: opts.parking,
      pageSource: (pages, migrationId) =>
        pages.kind === 'file'
          ? localPageSource(
              {
                path: pages.memFile,
                windowBytes: opts.session.backgroundWindowBytes,
                workingSetFile: pages.workingSetFile,
              },
              { bulk },
            )
          : remotePageSource({ source: pages.source, secret: pages.secret, migrationId }, remote, {
              connect: connectPageChannel,
              bulk,
              metrics,
            }),
    });
    const healthz = (): { type: string; body: string } => ({ type: 'text/plain', body: 'ok\n' });
    if (opts.http) {
      const metricsText = opts.metricsText;
      endpoints.push(
        await serveHttp(
          opts.http,
          {
            '/healthz': healthz,
            ...(metricsText
              ? {
                  '/metrics': async () => {
                    const m = await metricsText();
                    return { type: m.contentType, body: m.body };
                  },
                }
              : {}),
          },
          'metricsListen',
        ),
      );
    }
    if (opts.control) {
      endpoints.push(
        await serveHttp(
          opts.control,
          {
            '/healthz': healthz,
            '/v1/sessions': () =>
              json({
                active: [...live].map((s) => s.stats()),
                ended,
                firecracker: firecracker?.status() ?? [],
                process: processStats(),
              }),
          },
          'controlSocket',
        ),
      );
    }
  } catch (err) {
    listener?.close();
    firecracker?.close();
    await Promise.all(endpoints.map((e) => e.close()));
    await bulk.stop();
    throw err;
  }
  // Sessions a previous daemon parked go through the same checks as a handoff, as `resume`.
  for (const p of opts.parked?.handoffs ?? []) {
    try {
      const refusal = admit(p.conn.peer);
      if (refusal) throw refusal;
      accept(p, p.name);
    } catch (err) {
      const e = err as ProtocolError;
      log.warn('a parked session is refused', { name: p.name, code: e.code, message: e.message });
      p.conn.reply({ type: 'error', code: e.code, message: e.message });
      p.conn.close();
      sys.close(p.uffd);
      opts.parking?.unpark(p.name);
    }
  }
  firecracker.resume(opts.parked?.firecracker ?? []);
  const httpPort = opts.http ? endpoints[0]!.port : null;
  log.info('yabusame dest ready', {
    socket: opts.socketPath,
    http: opts.http ? `${opts.http.host}:${httpPort}` : null,
    control: opts.control?.path ?? null,
    firecracker: (opts.firecracker ?? []).map((f) => f.socket),
    pid: sys.getpid(),
  });

  let closing: Promise<void> | null = null;
  return {
    httpPort,
    sessions: () => [...live].map((s) => s.stats()),
    ended: () => [...ended],
    firecracker: () => firecracker!.status(),
    close(deadlineMs = 5000) {
      closing ??= (async () => {
        listener!.close();
        firecracker!.close();
        const all = [...live];
        for (const s of all) s.stop();
        await Promise.race([
          Promise.all(all.map((s) => s.done)),
          new Promise((r) => setTimeout(r, deadlineMs).unref()),
        ]);
        await Promise.all(endpoints.map((e) => e.close()));
        await bulk.stop();
      })();
      return closing;
    },
  };
}
