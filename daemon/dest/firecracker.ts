/**
 * The dest as Firecracker's page-fault handler: one slot per configured Firecracker socket, each
 * serving one Firecracker process at a time (a connection while one is served is refused,
 * HANDOFF_SOCKET_BUSY), from its own page source: a local snapshot memory file, or a migration
 * of a `yabusame source`. A handshake becomes an ordinary Session (same placement, same demand
 * and background machinery, same caps and peers policy), whose VMM connection is Firecracker's
 * socket, where nothing is ever written.
 *
 * Never vanish silently: Firecracker cannot read a reply, and a VM whose handler gave up hangs
 * at its next fault. So every refused handshake and every failed session is reported with the
 * Firecracker pid: a log line, the metric yabusame_dest_vms_unserved_total, and the slot's
 * status on /v1/sessions; and with killOnFailure the process is killed (SIGKILL through its
 * pidfd, never by pid number), as Firecracker's docs ask of a handler that gives up. A session
 * that ends because Firecracker itself is gone (VMM_GONE) is reported, not killed.
 */
import { ProtocolError } from '../../protocol/errors.js';
import type { FirecrackerFormat } from '../../protocol/firecracker.js';
import type { HandoffRegion } from '../../protocol/handoff.js';
import {
  FirecrackerConnection,
  startFirecrackerListener,
  type FirecrackerHandoff,
  type FirecrackerListener,
  type FirecrackerRefusal,
} from '../handoff/firecracker-listener.js';
import * as sys from '../linux/sys.js';
import type { PeerCred } from '../linux/sys.js';
import type { Logger } from '../ops/log.js';
import type { DestMetrics } from '../ops/metric-ports.js';
import { rateLimitedLog } from '../ops/rate-limit.js';
import type { ParkedFirecracker, SessionParking } from './fd-store.js';
import type { PageSourceFactory } from './page-source.js';
import type { Session, SessionDeps, SessionSpec, SessionStats, VmmConnection } from './session.js';

/** Where one Firecracker socket's pages come from. */
export type FirecrackerPages =
  | {
      kind: 'file';
      memFile: string;
      /** Prefetch: the working-set file (recorded, then replayed), or null (off). */
      workingSetFile: string | null;
    }
  | {
      kind: 'remote';
      /** ws:// or wss:// URL of `yabusame source`. */
      source: string;
      /** The migration's secret (hex), or undefined (a daemon that requires none). */
      secret: string | undefined;
    };

export interface FirecrackerSocketConfig {
  socket: string;
  /** Permission bits and group of the socket. */
  mode: number;
  gid?: number | undefined;
  /** The sessions' migration id (for a remote source: the source's migration). */
  migrationId: string;
  pages: FirecrackerPages;
  /** SIGKILL the Firecracker process of a refused handshake or a failed session. */
  killOnFailure: boolean;
}

/** How a VM's turn on a socket ended, as status shows it. */
export interface FirecrackerOutcome {
  outcome: 'complete' | 'failed' | 'refused';
  pid: number;
  code?: string;
  message?: string;
  /** killOnFailure sent SIGKILL to it. */
  killed?: boolean;
  at: string;
  elapsedMs?: number;
}

export interface FirecrackerSocketStatus {
  socket: string;
  /** The memory file, or the source URL. */
  pages: string;
  migrationId: string;
  killOnFailure: boolean;
  state: 'idle' | 'serving';
  /** The Firecracker process being served. */
  pid?: number;
  /** Which Firecracker releases send the handshake it sent. */
  format?: string;
  completed: number;
  failed: number;
  refused: number;
  /** The last VM whose turn ended (complete, failed or refused). */
  last?: FirecrackerOutcome;
}

export interface FirecrackerDeps {
  log: Logger;
  metrics: DestMetrics;
  handoffTimeoutMs: number;
  /** The daemon's peers policy (SO_PEERCRED allowlist). */
  admit(peer: PeerCred): ProtocolError | null;
  /** Starts a session (the daemon's caps apply: SESSION_LIMIT and HANDOFF_QUOTA are thrown). */
  runSession(
    spec: SessionSpec,
    uffdFd: number,
    conn: VmmConnection,
    peer: PeerCred,
    source: PageSourceFactory,
    parking?: Pick<SessionDeps, 'park' | 'unpark' | 'parked'>,
  ): Session;
  /** The page source of a socket. */
  pageSource(pages: FirecrackerPages, migrationId: string): PageSourceFactory;
  /** Where sessions park their descriptors at their ack, to outlive a restart (fd-store.ts). */
  parking?: SessionParking | undefined;
}

export interface FirecrackerSockets {
  status(): FirecrackerSocketStatus[];
  /**
   * Serves the sessions a previous daemon parked, each by the slot of its socket. One whose
   * socket is no longer configured, or that is refused, is reported like any VM that cannot be
   * served (a log line with its pid, the metric), and never killed.
   */
  resume(parked: readonly ParkedFirecracker[]): void;
  /** Stops accepting (sessions are the daemon's to stop). */
  close(): void;
}

class Slot {
  private listener: FirecrackerListener | null = null;
  private session: Session | null = null;
  private current: { pid: number; format: string } | null = null;
  private completed = 0;
  private failed = 0;
  private refused = 0;
  private last: FirecrackerOutcome | undefined;
  private readonly limited: ReturnType<typeof rateLimitedLog>;

  constructor(
    private readonly config: FirecrackerSocketConfig,
    private readonly deps: FirecrackerDeps,
  ) {
    this.limited = rateLimitedLog(deps.log);
  }

  async start(): Promise<void> {
    this.listener = await startFirecrackerListener({
      path: this.config.socket,
      mode: this.config.mode,
      gid: this.config.gid,
      timeoutMs: this.deps.handoffTimeoutMs,
      log: this.deps.log,
      admit: (peer) => this.deps.admit(peer),
      busy: () =>
        this.session
          ? new ProtocolError(
              'HANDOFF_SOCKET_BUSY',
              `this socket serves Firecracker pid ${this.current?.pid} until its memory is restored`,
            )
          : null,
      onHandshake: (h) => this.accept(h),
      onRefused: (r) => this.refusedBy(r),
    });
  }

  close(): void {
    this.listener?.close();
    this.listener = null;
  }

  private get pagesLabel(): string {
    const p = this.config.pages;
    return p.kind === 'file' ? p.memFile : p.source;
  }

  status(): FirecrackerSocketStatus {
    return {
      socket: this.config.socket,
      pages: this.pagesLabel,
      migrationId: this.config.migrationId,
      killOnFailure: this.config.killOnFailure,
      state: this.session ? 'serving' : 'idle',
      ...(this.current ? { pid: this.current.pid, format: this.current.format } : {}),
      completed: this.completed,
      failed: this.failed,
      refused: this.refused,
      ...(this.last ? { last: this.last } : {}),
    };
  }

  /** A complete handshake: the VM is served by a session (or refused with a thrown code). */
  private accept(h: FirecrackerHandoff): void {
    this.serve(h.format, h.regions, h.uffd, h.conn);
  }

  /**
   * A session a previous daemon parked on this socket: served again from where it stopped (its
   * faults woken, so those that waited through the restart come back). Thrown: refused.
   */
  resume(p: ParkedFirecracker): void {
    const conn = new FirecrackerConnection(p.conn, p.state.peer, p.pidfd);
    try {
      const refusal = this.deps.admit(p.state.peer);
      if (refusal) throw refusal;
      if (this.session) {
        throw new ProtocolError('HANDOFF_SOCKET_BUSY', `${this.config.socket} already serves a VM`);
      }
      conn.follow(p.state.format);
      this.serve(p.state.format, p.state.regions, p.uffd, conn, p.name);
    } catch (err) {
      // Nothing was started: the session's descriptors are closed here, none twice.
      conn.release();
      sys.close(p.uffd);
      throw err;
    }
  }

  private serve(
    format: FirecrackerFormat,
    regions: HandoffRegion[],
    uffd: number,
    conn: FirecrackerConnection,
    parked?: string,
  ): void {
    const pid = conn.peer.pid;
    const { migrationId, socket } = this.config;
    const store = this.deps.parking;
    const session = this.deps.runSession(
      {
        migrationId,
        regions,
        ...(parked ? { resume: true } : {}),
        vmm: { kind: 'firecracker', pid, socket, format },
      },
      uffd,
      conn,
      conn.peer,
      this.deps.pageSource(this.config.pages, migrationId),
      {
        ...(store
          ? {
              park: () => {
                const { socket: fd, pidfd } = conn.descriptors();
                // Without a pidfd a resumed session could not tell whether Firecracker lives.
                if (pidfd < 0) return null;
                const state = { kind: 'firecracker' as const, socket, migrationId, format };
                return store.parkFirecracker(
                  { ...state, regions, peer: conn.peer },
                  uffd,
                  pidfd,
                  fd,
                );
              },
              unpark: (name: string) => store.unpark(name),
            }
          : {}),
        ...(parked ? { parked } : {}),
      },
    );
    this.session = session;
    this.current = { pid, format };
    void session.done.then((stats) => this.ended(stats, conn, session.parked));
  }

  private ended(stats: SessionStats, conn: FirecrackerConnection, parked: boolean): void {
    const pid = conn.peer.pid;
    const at = new Date().toISOString();
    if (parked && stats.error?.code === 'DAEMON_STOPPING') {
      // Not an end: the next daemon takes the VM over from the fd store.
      this.deps.log.info('Firecracker VM left in the fd store for the next daemon', {
        pid,
        socket: this.config.socket,
        migrationId: this.config.migrationId,
      });
    } else if (stats.state === 'done') {
      this.completed++;
      this.last = { outcome: 'complete', pid, at, elapsedMs: stats.elapsedMs };
    } else {
      this.failed++;
      const code = stats.error?.code ?? 'SESSION_FAILED';
      const message = stats.error?.message ?? 'the session failed';
      // Firecracker itself is gone: nothing to kill, nothing left blocked.
      const gone = code === 'VMM_GONE' || !conn.alive;
      const killed = !gone && this.config.killOnFailure && conn.kill();
      this.deps.log.error('Firecracker VM cannot be served', {
        pid,
        socket: this.config.socket,
        migrationId: this.config.migrationId,
        code,
        message,
        killed,
        ...(gone ? {} : { remedy: killed ? 'killed' : 'its vCPUs stay blocked at their faults' }),
      });
      if (!gone) this.deps.metrics.vmUnserved(code, killed);
      this.last = { outcome: 'failed', pid, code, message, killed, at, elapsedMs: stats.elapsedMs };
    }
    conn.release();
    this.session = null;
    this.current = null;
  }

  private refusedBy(r: FirecrackerRefusal): void {
    this.refused++;
    // A refused Firecracker hangs at its first fault; one that is gone, or that the peers policy
    // refused (not ours to signal), is only reported.
    const gone = r.code === 'VMM_GONE';
    const killed = r.admitted && !gone && this.config.killOnFailure && r.kill();
    this.limited('warn', `firecracker:${r.code}`, 'Firecracker handshake refused', {
      code: r.code,
      message: r.message,
      pid: r.peer.pid,
      uid: r.peer.uid,
      socket: this.config.socket,
      killed,
    });
    this.deps.metrics.handoff(r.code);
    this.deps.metrics.error(r.code);
    if (r.admitted && !gone) this.deps.metrics.vmUnserved(r.code, killed);
    this.last = {
      outcome: 'refused',
      pid: r.peer.pid,
      code: r.code,
      message: r.message,
      killed,
      at: new Date().toISOString(),
    };
  }
}

/** Starts every configured Firecracker socket; a socket that cannot be created fails them all. */
export async function startFirecrackerSockets(
  configs: readonly FirecrackerSocketConfig[],
  deps: FirecrackerDeps,
): Promise<FirecrackerSockets> {
  const slots: Slot[] = [];
  try {
    for (const c of configs) {
      const slot = new Slot(c, deps);
      await slot.start();
      slots.push(slot);
    }
  } catch (err) {
    for (const s of slots) s.close();
    throw err;
  }
  return {
    status: () => slots.map((s) => s.status()),
    resume: (parked) => {
      for (const p of parked) {
        const index = configs.findIndex((c) => c.socket === p.state.socket);
        try {
          if (index < 0) {
            for (const fd of [p.uffd, p.conn, p.pidfd]) if (fd >= 0) sys.close(fd);
            throw new ProtocolError(
              'HANDOFF_INVALID',
              `its Firecracker socket ${p.state.socket} is no longer configured`,
            );
          }
          slots[index]!.resume(p); // closes its descriptors if it throws
        } catch (err) {
          const e = err as ProtocolError;
          deps.log.error('Firecracker VM cannot be served', {
            pid: p.state.peer.pid,
            socket: p.state.socket,
            migrationId: p.state.migrationId,
            code: e.code,
            message: `a parked session was not resumed: ${e.message}`,
            remedy: 'its vCPUs stay blocked at their faults',
          });
          deps.metrics.vmUnserved(e.code ?? 'HANDOFF_INVALID', false);
          deps.parking?.unpark(p.name);
        }
      }
    },
    close: () => {
      for (const s of slots) s.close();
    },
  };
}
