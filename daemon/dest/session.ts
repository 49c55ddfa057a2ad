/**
 * One VM's migration on the destination: its state, and the wiring of the parts that do the work
 * (each a hop from here):
 *   placement.ts      the uffd and the page map: events, faults, every placement, discards
 *   faults.ts         faults awaiting their page: requests and fault-to-placed latency
 *   page-source.ts    where pages come from (a port): remote-source.ts, a `yabusame source`
 *                     (demand channel here, background channel on the bulk thread), or
 *                     local-source.ts, a memory file on this host (a Firecracker snapshot)
 *
 * States (checked): connecting -> running -> completing -> done, and any -> failed.
 *  - connecting: the regions are checked (placement.check) and the uffd is watched from the
 *    start, so faults that arrive before the source is open are kept and requested when it is;
 *    the VMM is acked only once the source is open (a remote one: both channels answered HELLO);
 *  - running: faults are requested, runs placed; a lost connection never wakes a guest thread
 *    (blocked threads wait until their page is placed; after reconnectTimeoutMs without a
 *    source the session fails, and the VMM, which kept its uffd, keeps them blocked);
 *  - completing: every page is settled; COMPLETE goes to the source, and the VMM hears
 *    `complete` after the source acknowledged it (or the acknowledgement timed out: the source
 *    then keeps its image).
 */
import { performance } from 'node:perf_hooks';
import * as sys from '../linux/sys.js';
import { ERRNO } from '../linux/errors.js';
import type { HandoffErrorCode } from '../../protocol/errors.js';
import { codeOf, HANDOFF_ERROR_CODES } from '../../protocol/errors.js';
import type { HandoffRegion, HandoffReply } from '../../protocol/handoff.js';
import type { Logger } from '../ops/log.js';
import type { DestMetrics, DestMigrationSample } from '../ops/metric-ports.js';
import type { BulkLaneFactory } from './bulk.js';
import { FaultTracker, type AwaitedFault } from './faults.js';
import { sourceReadSeconds, sourceSendSeconds } from '../../protocol/page-codec.js';
import type { LinkStatus, PageSource, PageSourceFactory } from './page-source.js';
import { Placement, type Run } from './placement.js';
import { RegionTable, type GuestRegion } from './regions.js';
import { PageState } from './page-map.js';
import { StreamDetector, windowBytes } from './prefetch.js';
import { SessionError } from './session-error.js';
import type { SourcePolicy } from './source-policy.js';
import type { ClientTls } from '../transport/client.js';

/** Progress log lines of one session come at most this often (the VMM's replies more often). */
const PROGRESS_LOG_MS = 10_000;

export { SessionError } from './session-error.js';

export type SessionState = 'connecting' | 'running' | 'completing' | 'done' | 'failed';

export interface SessionConfig {
  connectTimeoutMs: number;
  completeTimeoutMs: number;
  backgroundWindowBytes: number;
  progressIntervalMs: number;
  heartbeatMs: number;
  /** How long a lost channel may stay down before the session fails. */
  reconnectTimeoutMs: number;
  /** Withhold the background channel's first CREDIT this long (0: at once). */
  backgroundDelayMs?: number;
  /**
   * A fault that continues a sweep (prefetch.ts) asks also for the missing pages right after
   * it, up to this many bytes, in the same REQUEST (answered after every faulting page). 0: off.
   */
  demandPrefetchBytes?: number;
  /** A handoff must carry the migration's secret (false only for --insecure-no-auth). */
  requireSecret: boolean;
  /** Which sources this daemon may connect to. */
  sourcePolicy: SourcePolicy;
  /** CAs and client certificate for wss sources. */
  tls?: ClientTls | undefined;
}

/** What a session serves: one VM's regions, under a migration id. */
export interface SessionSpec {
  migrationId: string;
  regions: readonly HandoffRegion[];
  /** The uffd was handed to a daemon before, which died (see protocol/README.md, Resuming). */
  resume?: boolean | undefined;
  /** Who handed it over, for status (e.g. a Firecracker process and its socket). */
  vmm?: VmmInfo | undefined;
}

/** The VMM behind a session, as status shows it. */
export interface VmmInfo {
  kind: 'firecracker';
  pid: number;
  socket: string;
  /** Which Firecracker releases send the handshake it sent (v1.1, v1.7 or v1.12). */
  format: string;
}

/**
 * The VMM's end of a session: reply lines go there (a handoff connection), or nowhere
 * (Firecracker reads nothing); `onClose` fires when the VMM is gone.
 */
export interface VmmConnection {
  /** Sends one reply; false when it was not delivered. */
  reply(msg: HandoffReply): boolean;
  /** `handler` runs once the VMM is gone; `why` says how it was noticed. */
  onClose(handler: (why?: string) => void): void;
  close(): void;
}

export interface SessionDeps {
  config: SessionConfig;
  log: Logger;
  metrics: DestMetrics;
  /** Makes the session's page source (a remote `yabusame source`, or a local file). */
  source: PageSourceFactory;
  /** Fault accounting shared with the bulk thread (background placement waits for faults). */
  bulk: Pick<BulkLaneFactory, 'faultsAwaited'>;
  /**
   * Called right before the ack: null, or why this session may not run (another one of the
   * same migration id already does).
   */
  claim?: () => SessionError | null;
  /**
   * Parks the session's descriptors at its ack (a native handoff, in systemd's fd store;
   * fd-store.ts): the name they are parked under, or null.
   */
  park?: () => string | null;
  /** Drops the parked descriptors (the session ended for good). */
  unpark?: (name: string) => void;
  /**
   * The fd-store name of a session a previous daemon parked: it resumes without an ack (its VMM
   * was acked already and never saw the restart) and stays parked under that name.
   */
  parked?: string;
}

export interface SessionStats {
  migrationId: string;
  state: SessionState;
  totalPages: number;
  presentPages: number;
  demandPages: number;
  backgroundPages: number;
  zeroPages: number;
  existedPages: number;
  discardedPages: number;
  faults: number;
  /** Faults whose page has not arrived yet. */
  faultsWaiting: number;
  /** Pages asked for as faults' neighbours (only with demandPrefetchBytes). */
  prefetchedPages?: number;
  reconnects: number;
  /** Each channel to the source: connecting, up, reconnecting or closed, and since when. */
  links: { demand: LinkStatus; background: LinkStatus };
  /** Bytes of the guest memory handed over (every region). */
  totalBytes: number;
  /** Frame bytes received from the source, both channels. */
  receivedBytes: number;
  /** Where pages come from: the source URL, or the memory file, and what it says of itself. */
  source?: string;
  sourceInfo?: Record<string, unknown>;
  vmm?: VmmInfo;
  startedAt: number;
  elapsedMs: number;
  error?: { code: string; message: string };
}

export class Session {
  readonly migrationId: string;
  private stateValue: SessionState = 'connecting';
  private readonly placement: Placement;
  private readonly faults = new FaultTracker();
  /** Made at start (the factory may refuse the handoff). */
  private source: PageSource | null = null;
  private readonly table: RegionTable;
  private faultCount = 0;
  /** demandPrefetchBytes, once a source that prefetches is made (0: off). */
  private prefetchBytes = 0;
  /** Pages asked for as a fault's neighbours. */
  private prefetchedPages = 0;
  /** Which faults continue a stream (only those prefetch). */
  private readonly streams = new StreamDetector();
  /** A channel's status before the source exists. */
  private readonly notYet: LinkStatus = { state: 'connecting', since: Date.now() };
  private progressTimer: NodeJS.Timeout | null = null;
  private lastProgressLog = Date.now();
  /** This session's name in the fd store, once parked (or handed back parked). */
  private parkedName: string | null = null;
  private backgroundTimer: NodeJS.Timeout | null = null;
  private readonly log: Logger;
  private readonly startedAt = Date.now();
  private finishedAt = 0;
  private error: { code: string; message: string } | undefined;
  private readonly totalBytes: number;
  /** Ends this session's per-migration series (set while it runs). */
  private untrackMetrics: (() => void) | null = null;
  private resolveDone!: (s: SessionStats) => void;
  /** Settles when the session ends, completed or failed. Never rejects. */
  readonly done: Promise<SessionStats>;

  constructor(
    private readonly request: SessionSpec,
    private readonly uffdFd: number,
    private readonly conn: VmmConnection,
    private readonly deps: SessionDeps,
  ) {
    this.migrationId = request.migrationId;
    this.parkedName = deps.parked ?? null;
    this.log = deps.log.child({ migrationId: request.migrationId });
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
    const table = (this.table = new RegionTable(request.regions));
    this.totalBytes = request.regions.reduce((n, r) => n + r.sizeBytes, 0);
    this.placement = new Placement(
      uffdFd,
      table,
      {
        missing: (r, page, at) => {
          this.faultCount++;
          this.faults.add(r, page, at);
          this.deps.bulk.faultsAwaited(1);
          if (this.prefetchBytes >= r.pageSizeBytes) {
            const windows = this.streams.continues(r.index, page);
            if (windows > 0) this.prefetchAfter(r, page, windowBytes(windows, this.prefetchBytes));
          }
        },
        inFlight: (r, page, at) => {
          this.faultCount++;
          if (this.faults.addInFlight(r, page, at)) this.deps.bulk.faultsAwaited(1);
        },
        settled: () => this.onSettled(),
        drained: () => this.flushRequests(),
        fail: (code, message) => this.fail(code, message),
      },
      this.log,
      deps.metrics,
      // Firecracker hears no `complete` (placement.ts: zeros).
      request.vmm?.kind !== 'firecracker',
    );
  }

  /**
   * The missing pages right after a faulting one that continues a stream (prefetch.ts), up to
   * `bytes` (the stream's window: demandPrefetchBytes, doubled as the stream goes on): ask for
   * them too.
   */
  private prefetchAfter(r: GuestRegion, page: number, bytes: number): void {
    const map = this.placement.map;
    const end = Math.min(r.pages, page + 1 + Math.floor(bytes / r.pageSizeBytes));
    let p = page + 1;
    while (p < end && map.request(r, p) === PageState.MISSING) p++;
    if (p > page + 1) {
      this.faults.prefetch(map, r, page + 1, p - page - 1);
      this.prefetchedPages += p - page - 1;
      this.streams.extend(r.index, page, p);
    }
  }

  /** Makes the page source; a refusal (source denied, no secret) throws its SessionError. */
  private makeSource(): PageSource {
    const table = this.table;
    return this.deps.source(
      {
        run: (run) => this.place(run),
        demandOpened: () => {
          this.faults.requeueAll(this.placement.map);
          this.flushRequests();
        },
        mismatch: (regions) => table.sourceMismatch(regions),
        settledRanges: () => this.placement.map.settledRanges(),
        complete: () => this.placement.map.complete,
        fail: (code, message) => this.fail(code, message),
      },
      { table, log: this.log },
    );
  }

  /** Its descriptors are in the fd store (a stopping daemon leaves them for the next one). */
  get parked(): boolean {
    return this.parkedName !== null;
  }

  get state(): SessionState {
    return this.stateValue;
  }

  stats(): SessionStats {
    const map = this.placement.map;
    const c = map.counts();
    return {
      migrationId: this.migrationId,
      state: this.stateValue,
      totalPages: map.totalPages,
      presentPages: map.settledPages,
      demandPages: c.demand,
      backgroundPages: c.background,
      zeroPages: c.zero,
      existedPages: c.existed,
      discardedPages: c.discarded,
      faults: this.faultCount,
      faultsWaiting: this.faults.size,
      ...(this.prefetchBytes > 0 ? { prefetchedPages: this.prefetchedPages } : {}),
      reconnects: this.source?.reconnects ?? 0,
      links: this.source
        ? { ...this.source.links }
        : { demand: this.notYet, background: this.notYet },
      totalBytes: this.totalBytes,
      receivedBytes: this.source?.receivedBytes ?? 0,
      ...(this.source ? { source: this.source.label } : {}),
      ...(this.source?.info ? { sourceInfo: this.source.info() } : {}),
      ...(this.request.vmm ? { vmm: this.request.vmm } : {}),
      startedAt: this.startedAt,
      elapsedMs: (this.finishedAt || Date.now()) - this.startedAt,
      ...(this.error ? { error: this.error } : {}),
    };
  }

  /**
   * Checks the regions, starts serving faults, opens both channels and acks the VMM. On failure
   * the session has already told the VMM (an error reply) and torn itself down, and the
   * returned promise rejects with that SessionError; after it resolves, the session ends
   * through `done`.
   */
  async start(): Promise<void> {
    this.conn.onClose((why) =>
      this.fail('VMM_GONE', why ?? 'the VMM closed its handoff connection'),
    );
    let source: PageSource;
    try {
      source = this.source = this.makeSource();
      if (source.prefetches) this.prefetchBytes = this.deps.config.demandPrefetchBytes ?? 0;
      this.placement.check();
      this.placement.start(() =>
        this.fail('VMM_GONE', 'the userfaultfd reports the address space is gone'),
      );
      // A previous daemon may have read faults and died: wake every range so the blocked
      // threads retry their access and fault again, to us.
      if (this.request.resume) this.placement.wakeAll();
      await source.open();
    } catch (err) {
      const e =
        err instanceof SessionError
          ? err
          : new SessionError(codeOf(err, HANDOFF_ERROR_CODES, 'SESSION_FAILED'), String(err));
      this.fail(e.code, e.message);
      throw e;
    }
    if (this.stateValue !== 'connecting') {
      // The VMM left (or a fault failed the session) while we were connecting.
      throw new SessionError(
        (this.error?.code as HandoffErrorCode | undefined) ?? 'VMM_GONE',
        this.error?.message ?? 'the session ended while connecting',
      );
    }
    const taken = this.deps.claim?.() ?? null;
    if (taken) {
      this.fail(taken.code, taken.message);
      throw taken;
    }
    this.stateValue = 'running';
    this.untrackMetrics = this.deps.metrics.trackMigration(this.migrationId, () =>
      this.metricsSample(),
    );
    if (this.parkedName === null) {
      this.conn.reply({
        type: 'ack',
        migrationId: this.migrationId,
        totalPages: this.placement.map.totalPages,
      });
      this.parkedName = this.deps.park?.() ?? null;
    }
    this.log.info(this.deps.parked ? 'migration resumed from the fd store' : 'migration started', {
      source: source.label,
      pages: this.placement.map.totalPages,
      queuedFaults: this.faults.size,
      resume: this.request.resume ?? false,
      parked: this.parkedName !== null,
    });
    source.start();
    this.flushRequests();
    const config = this.deps.config;
    this.progressTimer = setInterval(() => this.reportProgress(), config.progressIntervalMs);
    this.progressTimer.unref();
    const delayMs = config.backgroundDelayMs ?? 0;
    if (delayMs > 0) {
      this.backgroundTimer = setTimeout(() => source.openWindow(), delayMs);
      this.backgroundTimer.unref();
    } else {
      source.openWindow();
    }
    this.checkComplete();
  }

  private place(run: Run): void {
    if (this.stateValue !== 'running' && this.stateValue !== 'completing') return;
    this.placement.place(run);
  }

  /** Sends the queued requests (kept while the demand channel is down or not yet open). */
  private flushRequests(): void {
    if (this.stateValue !== 'running') return;
    // While the demand channel is down these are dropped: the next connection asks again for
    // every awaited page (requeueAll).
    const batches = this.faults.takeRequests();
    if (batches.length > 0 && this.source?.request(batches)) {
      this.faults.requested(performance.now());
    }
  }

  /** Placement settled pages: time the faults they answer, send new requests, maybe complete. */
  private onSettled(): void {
    if (this.faults.size > 0) {
      const served = this.faults.sweep(this.placement.map, performance.now(), this.served);
      this.deps.bulk.faultsAwaited(-served);
    }
    this.flushRequests();
    this.checkComplete();
  }

  /**
   * A fault's page is settled: how long its vCPU waited and, when a DEMAND answer of the
   * connection that carried its REQUEST placed it, the time of each stage (FaultStage).
   */
  private readonly served = (f: AwaitedFault, now: number): void => {
    const m = this.deps.metrics;
    m.faultServiceSeconds((now - f.at) / 1000);
    const a = this.source?.answer;
    // A file's pages (no wire), or a fault on a page already in flight (no request of its own).
    if (!a || f.sentAt <= 0 || a.message === null) return;
    if (f.offset < a.offset || f.offset >= a.end) return;
    if (a.receivedAt < f.sentAt) return; // answers a REQUEST sent before (a reconnect's)
    m.faultStage('request', (f.sentAt - f.at) / 1000);
    m.faultStage('wire', (a.receivedAt - f.sentAt) / 1000);
    m.faultStage('source_read', sourceReadSeconds(a.message));
    m.faultStage('source_send', sourceSendSeconds(a.message));
    m.faultStage('verify', (a.verifiedAt - a.receivedAt) / 1000);
    m.faultStage('place', (now - a.verifiedAt) / 1000);
  };

  private checkComplete(): void {
    if (this.stateValue !== 'running' || !this.placement.map.complete) return;
    this.stateValue = 'completing';
    void this.complete();
  }

  private async complete(): Promise<void> {
    const acked = await this.source!.complete(
      this.placement.map.totalPages,
      this.deps.config.completeTimeoutMs,
    );
    if (this.stateValue !== 'completing') return;
    if (!acked) {
      this.log.warn('the source did not acknowledge COMPLETE; it keeps its image until told', {
        timeoutMs: this.deps.config.completeTimeoutMs,
      });
    }
    this.placement.unregisterAll();
    this.stateValue = 'done';
    const s = this.stats();
    this.conn.reply({
      type: 'complete',
      totalPages: s.totalPages,
      demandPages: s.demandPages,
      backgroundPages: s.backgroundPages,
      zeroPages: s.zeroPages,
      existedPages: s.existedPages,
      discardedPages: s.discardedPages,
    });
    this.log.info('migration complete', {
      ...s,
      sourceAcked: acked,
      sourceDone: this.source!.sourceDone,
    });
    this.deps.metrics.sessionEnded('complete');
    this.teardown();
  }

  /**
   * Ends the session with a coded error. Blocked guest threads are not woken with bad data:
   * the VMM keeps its own reference to the uffd, so they stay blocked until it acts.
   */
  fail(code: HandoffErrorCode, message: string): void {
    if (this.stateValue === 'done' || this.stateValue === 'failed') return;
    this.stateValue = 'failed';
    this.error = { code, message };
    const map = this.placement.map;
    this.log.error('migration failed', {
      code,
      message,
      present: map.settledPages,
      total: map.totalPages,
    });
    this.deps.metrics.sessionEnded(code);
    this.deps.metrics.error(code);
    // A stopping daemon hangs up without an error: to the VMM that is a lost daemon, and it
    // hands its uffd (which it kept) to the next one with `resume`. Anything else is final.
    if (code !== 'DAEMON_STOPPING') this.conn.reply({ type: 'error', code, message });
    this.teardown();
  }

  /**
   * Stops the session (daemon shutdown or restart). The VMM sees the connection close and can
   * resume with the next daemon; the source is told why and keeps its image.
   */
  stop(reason = 'the daemon is shutting down'): void {
    this.fail('DAEMON_STOPPING', reason);
  }

  /** What the per-migration series show at a scrape. */
  private metricsSample(): DestMigrationSample {
    const map = this.placement.map;
    const links: DestMigrationSample['links'] = {};
    for (const channel of ['demand', 'background'] as const) {
      const { state } = this.source!.links[channel];
      if (state !== 'closed') links[channel] = state === 'up';
    }
    return {
      totalPages: map.totalPages,
      presentPages: map.settledPages,
      faultsWaiting: this.faults.size,
      receivedBytes: this.source!.receivedBytes,
      reconnects: this.source!.reconnects,
      links,
      startedAtMs: this.startedAt,
    };
  }

  private teardown(): void {
    this.finishedAt = Date.now();
    // A stopping daemon leaves the session parked: the next one resumes it. Any other end is final.
    if (this.parkedName !== null && this.error?.code !== 'DAEMON_STOPPING') {
      this.deps.unpark?.(this.parkedName);
    }
    this.untrackMetrics?.();
    this.untrackMetrics = null;
    if (this.progressTimer) clearInterval(this.progressTimer);
    if (this.backgroundTimer) clearTimeout(this.backgroundTimer);
    this.deps.bulk.faultsAwaited(-this.faults.clear());
    this.placement.stop();
    this.conn.close();
    // A failed session tells the source why (VMM_GONE, DAEMON_STOPPING...); it keeps its image.
    // The uffd is closed once no background run can reach it (its number could be reused).
    const closed = this.source?.close(this.error?.code, this.error?.message) ?? Promise.resolve();
    void closed.then(() => {
      try {
        sys.close(this.uffdFd);
      } catch (err) {
        if ((err as { errno?: number }).errno !== ERRNO.EBADF) throw err;
      }
      this.resolveDone(this.stats());
    });
  }

  private reportProgress(): void {
    if (this.stateValue !== 'running') return;
    const map = this.placement.map;
    this.conn.reply({
      type: 'progress',
      presentPages: map.settledPages,
      totalPages: map.totalPages,
    });
    // A log line too, at most every PROGRESS_LOG_MS: 64 sessions must not write 64 lines a second.
    const now = Date.now();
    if (now - this.lastProgressLog < PROGRESS_LOG_MS) return;
    this.lastProgressLog = now;
    const c = map.counts();
    this.log.info('migration progress', {
      present: map.settledPages,
      total: map.totalPages,
      demand: c.demand,
      background: c.background,
      faultsWaiting: this.faults.size,
      ...(this.prefetchBytes > 0 ? { prefetchedPages: this.prefetchedPages } : {}),
      reconnects: this.source?.reconnects ?? 0,
    });
  }
}
