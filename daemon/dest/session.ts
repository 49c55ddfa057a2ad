/**
 * One VM's migration on the destination: the userfaultfd from its handoff, its page map, and its
 * two channels to the source. Faults are read in the event loop (uv_poll on the uffd), requested
 * once each on the demand channel, and placed when their data arrives; the background channel
 * fills in everything else under credit-based flow control, on the bulk thread (bulk.ts), which
 * shares the page map and holds back while faults await their pages.
 *
 * States (checked): connecting -> running -> completing -> done, and any -> failed.
 * Ordering written down here:
 *  - the uffd is watched from the start: faults that arrive before both channels are up are
 *    kept as REQUESTED pages and sent as soon as the demand channel opens;
 *  - a page is requested at most once per demand connection (the page map dedupes); every new
 *    demand connection re-requests every page still awaited;
 *  - every new background connection starts with a HAVE sync (what we hold) before its CREDIT,
 *    and a PROGRESS DONE while pages are still missing triggers another sync (bulk-worker.ts);
 *  - a lost connection never wakes a guest thread: blocked threads wait until their page is
 *    placed, the link reconnects with backoff, and only after reconnectTimeoutMs does the
 *    session fail (the VMM keeps its uffd, so its threads stay blocked, never zero-filled);
 *  - COMPLETE goes to the source only when every page is settled, and the VMM hears `complete`
 *    after the source acknowledged it (or the ack timed out: the source then keeps its image).
 */
import { performance } from 'node:perf_hooks';
import * as uffd from '../uffd/uffd.js';
import * as sys from '../linux/sys.js';
import { ERRNO } from '../linux/errors.js';
import { UFFD_IOCTL_BIT_COPY, UFFD_IOCTL_BIT_ZEROPAGE } from '../linux/abi.js';
import { encodeComplete, encodeRequest } from '../../protocol/page-codec.js';
import { ProtocolError } from '../../protocol/errors.js';
import type { HandoffRequest } from '../../protocol/handoff.js';
import {
  Channel,
  DataFlag,
  FrameType,
  Limits,
  ProgressFlag,
  type Frame,
  type PageRange,
} from '../../protocol/wire.js';
import type { ConnectOptions, PageChannel } from '../transport/client.js';
import type { HandoffConnection } from '../handoff/listener.js';
import type { Logger } from '../ops/log.js';
import type { DestMetrics, PagePath } from '../ops/metric-ports.js';
import { Gate, PageMap, PageState, frameRun, sourceMismatch, type RegionMap } from './page-map.js';
import { placeRun } from './placer.js';
import { Link } from './link.js';
import type { BulkCounts, BulkLane, BulkLaneFactory } from './bulk.js';

export type SessionState = 'connecting' | 'running' | 'completing' | 'done' | 'failed';

export class SessionError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SessionError';
    this.code = code;
  }
}

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
}

export interface SessionDeps {
  config: SessionConfig;
  log: Logger;
  metrics: DestMetrics;
  /** The demand channel's connections. */
  connect(opts: ConnectOptions): Promise<PageChannel>;
  /** The background channel (on the bulk thread). */
  bulk: BulkLaneFactory;
}

export interface SessionStats {
  migrationId: string;
  state: SessionState;
  totalPages: number;
  presentPages: number;
  demandPages: number;
  backgroundPages: number;
  zeroPages: number;
  faults: number;
  existed: number;
  retries: number;
  reconnects: number;
  startedAt: number;
  elapsedMs: number;
  error?: { code: string; message: string };
}

const EVENT_BATCH = 64; // uffd_msg per read(2)
const MAX_PLACE_RETRIES = 64;

export class Session {
  readonly migrationId: string;
  private stateValue: SessionState = 'connecting';
  private readonly map: PageMap;
  private demand: Link | null = null;
  private background: BulkLane | null = null;
  private backgroundReconnects = 0;
  /** drainEvents nesting (it holds the placement gate at depth 1). */
  private gateDepth = 0;
  private uffdWatch: sys.FdWatch | null = null;
  private readonly eventBuf = Buffer.alloc(32 * EVENT_BATCH);
  private readonly events: uffd.UffdEvent[] = [];
  /** Faults awaiting data: image offset of the page -> time the fault was read (ms). */
  private readonly inflight = new Map<number, number>();
  /** Pages to request at the next flush. */
  private pendingRequests: PageRange[] = [];
  private readonly windowBytes: number;
  private progressTimer: NodeJS.Timeout | null = null;
  private backgroundTimer: NodeJS.Timeout | null = null;
  private completeAck: (() => void) | null = null;
  private sourceDone = false;
  private readonly log: Logger;
  private readonly startedAt = Date.now();
  private finishedAt = 0;
  private error: { code: string; message: string } | undefined;
  private readonly counts = {
    demand: 0,
    background: 0,
    zero: 0,
    faults: 0,
    existed: 0,
    retries: 0,
  };
  private resolveDone!: (s: SessionStats) => void;
  /** Settles when the session ends, completed or failed. Never rejects. */
  readonly done: Promise<SessionStats>;

  constructor(
    private readonly request: HandoffRequest,
    private readonly uffdFd: number,
    private readonly conn: HandoffConnection,
    private readonly deps: SessionDeps,
  ) {
    this.migrationId = request.migrationId;
    this.map = new PageMap(request.regions);
    // The source sends a page only within credit, and we grant in quarters of the window: a
    // quarter must hold the largest page, or a huge-page region would stall for want of credit.
    const largestPage = Math.max(...this.map.regions.map((r) => r.pageSizeBytes));
    this.windowBytes = Math.max(deps.config.backgroundWindowBytes, 4 * largestPage);
    this.log = deps.log.child({ migration: request.migrationId });
    this.done = new Promise((resolve) => (this.resolveDone = resolve));
  }

  get state(): SessionState {
    return this.stateValue;
  }

  stats(): SessionStats {
    return {
      migrationId: this.migrationId,
      state: this.stateValue,
      totalPages: this.map.totalPages,
      presentPages: this.map.settledPages,
      demandPages: this.counts.demand,
      backgroundPages: this.counts.background,
      zeroPages: this.counts.zero,
      faults: this.counts.faults,
      existed: this.counts.existed,
      retries: this.counts.retries,
      reconnects: (this.demand?.reconnects ?? 0) + this.backgroundReconnects,
      startedAt: this.startedAt,
      elapsedMs: (this.finishedAt || Date.now()) - this.startedAt,
      ...(this.error ? { error: this.error } : {}),
    };
  }

  /**
   * Checks the regions against the uffd, starts serving faults, opens both channels and acks the
   * VMM. On failure the session has already told the VMM (an error reply) and torn itself down,
   * and the returned promise rejects with that SessionError; after it resolves, the session ends
   * through `done`.
   */
  async start(): Promise<void> {
    this.conn.onClose(() => this.fail('VMM_GONE', 'the VMM closed its handoff connection'));
    try {
      this.registerRegions();
      this.uffdWatch = sys.watchReadable(this.uffdFd, (hangup) => this.onUffdReadable(hangup));
      if (this.request.resume) {
        // A previous daemon may have read faults and died: wake every range so the blocked
        // threads retry their access and fault again, to us.
        for (const r of this.map.regions) uffd.wake(this.uffdFd, r.base, r.sizeBytes);
      }
      const config = this.deps.config;
      this.demand = new Link(
        {
          connect: this.deps.connect,
          url: this.request.source,
          migrationId: this.migrationId,
          kind: Channel.DEMAND,
          connectTimeoutMs: config.connectTimeoutMs,
          heartbeatMs: config.heartbeatMs,
          reconnectTimeoutMs: config.reconnectTimeoutMs,
          retryFirst: this.request.resume === true,
          log: this.log,
        },
        {
          opened: (ch, reconnect) => this.onDemandOpened(ch, reconnect),
          frame: (ch, frame, bytes) => this.handleFrame(ch, frame, bytes),
          lost: (info) => {
            this.deps.metrics.reconnect('demand');
            this.deps.metrics.error(info.code);
          },
          gaveUp: (info) =>
            this.fail(
              info.code,
              `no working connection to the source for ${config.reconnectTimeoutMs} ms; last: ${info.message}`,
            ),
        },
      );
      this.background = this.deps.bulk.lane(
        {
          migrationId: this.migrationId,
          source: this.request.source,
          uffd: this.uffdFd,
          map: this.map.share(),
          windowBytes: this.windowBytes,
          connectTimeoutMs: config.connectTimeoutMs,
          heartbeatMs: config.heartbeatMs,
          reconnectTimeoutMs: config.reconnectTimeoutMs,
          retryFirst: this.request.resume === true,
        },
        {
          placed: (counts) => this.onBulkPlaced(counts),
          lost: (code) => {
            this.backgroundReconnects++;
            this.deps.metrics.reconnect('background');
            this.deps.metrics.error(code);
          },
          error: (code) => this.deps.metrics.error(code),
          sourceDone: () => (this.sourceDone = true),
          fail: (code, message) => this.fail(code, message),
        },
      );
      const [demand] = await Promise.all([this.demand.open(), this.background.open()]).catch(
        (err: unknown) => {
          const code = (err as { code?: string }).code ?? 'SOURCE_UNREACHABLE';
          throw new SessionError(code, (err as Error).message, { cause: err });
        },
      );
      if (this.stateValue !== 'connecting') {
        // The VMM went away while we were connecting.
        throw new SessionError(
          this.error?.code ?? 'SESSION_FAILED',
          this.error?.message ?? 'session ended',
        );
      }
      const why = sourceMismatch(this.map, demand.welcome.regions);
      if (why) throw new SessionError('SOURCE_MISMATCH', why);
    } catch (err) {
      const e =
        err instanceof SessionError
          ? err
          : new SessionError(
              (err as { code?: string }).code ?? 'SESSION_FAILED',
              (err as Error).message,
              { cause: err },
            );
      this.fail(e.code, e.message);
      throw e;
    }
    this.stateValue = 'running';
    this.conn.reply({
      type: 'ack',
      migrationId: this.migrationId,
      totalPages: this.map.totalPages,
    });
    this.log.info('migration started', {
      source: this.request.source,
      pages: this.map.totalPages,
      queuedFaults: this.inflight.size,
      resume: this.request.resume ?? false,
    });
    this.progressTimer = setInterval(
      () => this.reportProgress(),
      this.deps.config.progressIntervalMs,
    );
    this.progressTimer.unref();
    const delayMs = this.deps.config.backgroundDelayMs ?? 0;
    if (delayMs > 0) {
      this.backgroundTimer = setTimeout(() => this.background?.openWindow(), delayMs);
    } else {
      this.background!.openWindow();
    }
    this.demand!.start();
    this.background!.start();
    this.checkComplete();
  }

  /**
   * A demand connection is up (first or restored): ask again for every page still awaited (the
   * old connection may have swallowed the requests or their answers).
   */
  private onDemandOpened(ch: PageChannel, reconnect: boolean): void {
    if (this.stateValue === 'done' || this.stateValue === 'failed') return;
    if (reconnect) {
      const why = sourceMismatch(this.map, ch.welcome.regions);
      if (why) {
        this.fail('SOURCE_MISMATCH', why);
        return;
      }
      this.pendingRequests = [];
      for (const off of this.inflight.keys()) this.queueRequest(off, this.pageSizeAt(off));
    }
    this.flushRequests();
    if (this.stateValue === 'completing') this.sendComplete();
  }

  /** The bulk thread placed background pages: account for them, settle faults they served. */
  private onBulkPlaced(c: BulkCounts): void {
    if (this.stateValue !== 'running' && this.stateValue !== 'completing') return;
    const m = this.deps.metrics;
    m.bytesReceived('background', c.bytes);
    this.counts.background += c.dataPages;
    this.counts.zero += c.zeroPages;
    if (c.dataPages) m.pagesPlaced('background', 'data', c.dataPages);
    if (c.zeroPages) m.pagesPlaced('background', 'zero', c.zeroPages);
    this.counts.existed += c.existed;
    for (let i = 0; i < c.existed; i++) m.placeExists();
    this.counts.retries += c.retries;
    for (let i = 0; i < c.retries; i++) m.placeRetry();
    this.settleInflight();
    this.checkComplete();
  }

  /** Re-registers each region (idempotent for this uffd) to prove it is mapped and can take UFFDIO_COPY. */
  private registerRegions(): void {
    for (const r of this.map.regions) {
      let ioctls: number;
      try {
        ioctls = uffd.registerMissing(this.uffdFd, r.base, r.sizeBytes);
      } catch (err) {
        throw new SessionError(
          'HANDOFF_REGISTER_FAILED',
          `region ${r.name}: ${(err as Error).message}`,
          { cause: err },
        );
      }
      const needed = UFFD_IOCTL_BIT_COPY | (r.pageSizeBytes === 4096 ? UFFD_IOCTL_BIT_ZEROPAGE : 0);
      if ((ioctls & needed) !== needed) {
        throw new SessionError(
          'HANDOFF_REGISTER_FAILED',
          `region ${r.name}: UFFDIO_COPY/ZEROPAGE unavailable (ioctls 0x${ioctls.toString(16)})`,
        );
      }
    }
  }

  private pageSizeAt(imageOffset: number): number {
    return this.map.regionAtOffset(imageOffset)?.pageSizeBytes ?? 4096;
  }

  // --- faults ---

  private onUffdReadable(hangup: boolean): void {
    if (this.stateValue === 'done' || this.stateValue === 'failed') return;
    const status = this.drainEvents();
    this.flushRequests();
    if (status === 'gone' || (hangup && this.events.length === 0)) {
      this.fail('VMM_GONE', 'the userfaultfd reports the address space is gone');
    }
  }

  /**
   * Reads every queued uffd event and acts on it; returns 'gone' if the mm went away. Holds the
   * placement gate throughout (page-map.ts): no bulk placement between reading a REMOVE and
   * marking its range. Re-entered from place() on EAGAIN (a fault on a discarded page is placed
   * at once), which already holds it.
   */
  private drainEvents(): 'ok' | 'gone' {
    const nested = this.gateDepth++ > 0;
    if (!nested) this.map.enterGate(Gate.EVENTS);
    try {
      // A nested call must not reuse the array the outer one is walking.
      const events = nested ? [] : this.events;
      events.length = 0;
      const status = uffd.drainEvents(this.uffdFd, this.eventBuf, events);
      const now = performance.now();
      for (const e of events) {
        if (e.kind === 'pagefault') this.onFault(e.address, now);
        else if (e.kind === 'remove' || e.kind === 'unmap') this.onDiscard(e.start, e.end);
      }
      return status;
    } finally {
      if (--this.gateDepth === 0) this.map.leaveGate();
    }
  }

  private onFault(address: number, now: number): void {
    this.counts.faults++;
    this.deps.metrics.fault();
    const r = this.map.regionAt(address);
    if (!r) {
      this.log.error('fault outside every handed-off region', { address });
      this.deps.metrics.error('FAULT_OUTSIDE_REGIONS');
      return;
    }
    const page = Math.floor((address - r.base) / r.pageSizeBytes);
    // A claim, not a plain write: the bulk thread may be placing this very page.
    switch (this.map.claim(r, page, PageState.REQUESTED)) {
      case PageState.MISSING: {
        const off = r.imageOffset(page);
        this.inflight.set(off, now);
        this.deps.bulk.faultsAwaited(1);
        this.queueRequest(off, r.pageSizeBytes);
        break;
      }
      case PageState.REQUESTED:
        break; // already asked; its placement wakes every waiter on the page
      case PageState.PRESENT:
        // Placed between the fault and this read: the placement already woke it; waking again is harmless.
        uffd.wake(this.uffdFd, r.address(page), r.pageSizeBytes);
        break;
      case PageState.DISCARDED:
        // The guest freed this page and touches it again: it reads as zeros, never as source
        // data. (The placer only writes unsettled pages, so it becomes MISSING for the moment.)
        this.map.mark(r, page, 1, PageState.MISSING);
        this.place(r, page, 1, null, 'demand');
        break;
    }
  }

  private onDiscard(start: number, end: number): void {
    for (let addr = start; addr < end;) {
      const r = this.map.regionAt(addr);
      if (!r) break;
      const first = Math.floor((addr - r.base) / r.pageSizeBytes);
      const last = Math.min(
        r.pages,
        Math.ceil((Math.min(end, r.base + r.sizeBytes) - r.base) / r.pageSizeBytes),
      );
      this.map.mark(r, first, last - first, PageState.DISCARDED);
      addr = r.base + last * r.pageSizeBytes;
    }
    this.checkComplete();
  }

  private queueRequest(offset: number, length: number): void {
    const last = this.pendingRequests[this.pendingRequests.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else this.pendingRequests.push({ offset, length });
  }

  private flushRequests(): void {
    if (this.pendingRequests.length === 0 || !this.demand?.isOpen || this.stateValue !== 'running')
      return;
    const reqs = this.pendingRequests;
    this.pendingRequests = [];
    for (let i = 0; i < reqs.length; i += Limits.MAX_REQUEST_ENTRIES) {
      this.demand.send(encodeRequest(reqs.slice(i, i + Limits.MAX_REQUEST_ENTRIES)));
    }
  }

  // --- frames ---

  /** A frame on the demand channel (the background channel's go to the bulk thread). */
  private handleFrame(ch: PageChannel, frame: Frame, bytes: number): void {
    if (this.stateValue !== 'running' && this.stateValue !== 'completing') return;
    this.deps.metrics.bytesReceived('demand', bytes);
    try {
      switch (frame.type) {
        case FrameType.DATA:
        case FrameType.ZERO: {
          const { r, first, count, data } = frameRun(this.map, frame);
          const path: PagePath = frame.flags & DataFlag.DEMAND ? 'demand' : 'background';
          this.place(r, first, count, data, path);
          this.demand?.healthy(ch);
          break;
        }
        case FrameType.PROGRESS:
          if (frame.flags & ProgressFlag.DONE) this.sourceDone = true;
          break;
        case FrameType.COMPLETE:
          if (this.stateValue !== 'completing') {
            throw new ProtocolError('BAD_STATE', 'COMPLETE before we sent ours');
          }
          this.completeAck?.();
          break;
        default:
          throw new ProtocolError(
            'BAD_STATE',
            `frame type ${frame.type} is not legal from the source`,
          );
      }
    } catch (err) {
      // Well-formed but wrong (outside the image, misaligned, illegal here): drop this
      // connection and reconnect; a source that keeps doing it fails the session when the
      // link gives up, with this code.
      const code = (err as { code?: string }).code ?? 'SESSION_FAILED';
      this.deps.metrics.error(code);
      this.demand?.reset({ code, message: (err as Error).message });
    }
  }

  /** Places a run and accounts for it; on EAGAIN drains uffd events (REMOVE) and retries. */
  private place(
    r: RegionMap,
    first: number,
    count: number,
    data: Buffer | null,
    path: PagePath,
  ): void {
    const end = first + count;
    let at = first;
    for (let attempt = 0; ; attempt++) {
      const out = placeRun(
        this.uffdFd,
        this.map,
        r,
        at,
        end - at,
        data ? data.subarray((at - first) * r.pageSizeBytes) : null,
      );
      if (out.kind === 'gone') {
        this.fail(
          'VMM_GONE',
          `placement failed with ${out.errno} (${out.what}): the VMM's memory is gone`,
        );
        return;
      }
      this.account(path, data === null, out.placed, out.existed);
      if (out.kind === 'done') break;
      this.counts.retries++;
      this.deps.metrics.placeRetry();
      if (attempt >= MAX_PLACE_RETRIES) {
        // Still EAGAIN after draining: the event may need the VMM to progress. Try again shortly.
        const resumeAt = out.resumeAt;
        setImmediate(() => {
          if (this.stateValue === 'running' || this.stateValue === 'completing') {
            this.place(
              r,
              resumeAt,
              end - resumeAt,
              data ? data.subarray((resumeAt - first) * r.pageSizeBytes) : null,
              path,
            );
          }
        });
        return;
      }
      at = out.resumeAt;
      if (this.drainEvents() === 'gone') {
        this.fail('VMM_GONE', 'the userfaultfd reports the address space is gone');
        return;
      }
    }
    this.settleInflight();
    this.checkComplete();
  }

  private account(path: PagePath, zero: boolean, placed: number, existed: number): void {
    if (existed) {
      this.counts.existed += existed;
      for (let i = 0; i < existed; i++) this.deps.metrics.placeExists();
    }
    if (placed === 0) return;
    if (zero) this.counts.zero += placed;
    else if (path === 'demand') this.counts.demand += placed;
    else this.counts.background += placed;
    this.deps.metrics.pagesPlaced(path, zero ? 'zero' : 'data', placed);
  }

  /**
   * Awaited pages that are settled now (placed by either thread) were served: record how long
   * each vCPU waited. Walks the awaited faults, a handful, not the pages just placed.
   */
  private settleInflight(): void {
    if (this.inflight.size === 0) return;
    const now = performance.now();
    for (const [off, t0] of this.inflight) {
      const r = this.map.regionAtOffset(off);
      if (r && r.state[(off - r.offset) / r.pageSizeBytes]! >= PageState.PRESENT) {
        this.inflight.delete(off);
        this.deps.bulk.faultsAwaited(-1);
        this.deps.metrics.faultServiceSeconds((now - t0) / 1000);
      }
    }
  }

  // --- completion and failure ---

  private checkComplete(): void {
    if (this.stateValue !== 'running' || !this.map.complete) return;
    this.stateValue = 'completing';
    void this.complete();
  }

  /**
   * Every page is settled. COMPLETE goes out now and again on every restored connection until
   * the source acknowledges it or completeTimeoutMs passes; then the VMM hears `complete`.
   */
  private async complete(): Promise<void> {
    // Every page is settled: the background channel has nothing left to bring. Close it before
    // COMPLETE goes out, so the source's close after its ack never looks like a lost connection
    // to the bulk thread; its last counts arrive before it confirms, so the reply is exact.
    await this.background?.close();
    if (this.stateValue !== 'completing') return;
    const acked = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), this.deps.config.completeTimeoutMs);
      this.completeAck = () => {
        clearTimeout(timer);
        resolve(true);
      };
      this.sendComplete();
    });
    if (this.stateValue !== 'completing') return;
    if (!acked) {
      this.log.warn('the source did not acknowledge COMPLETE; it keeps its image until told', {
        timeoutMs: this.deps.config.completeTimeoutMs,
      });
    }
    // The source closes the demand channel after its ack: ours goes first, so no loss is logged.
    this.demand?.close();
    for (const r of this.map.regions) uffd.unregister(this.uffdFd, r.base, r.sizeBytes);
    this.stateValue = 'done';
    const s = this.stats();
    let discarded = 0;
    for (const r of this.map.regions) {
      for (let p = 0; p < r.pages; p++) if (r.state[p] === PageState.DISCARDED) discarded++;
    }
    this.conn.reply({
      type: 'complete',
      totalPages: s.totalPages,
      demandPages: s.demandPages,
      backgroundPages: s.backgroundPages,
      zeroPages: s.zeroPages,
      existedPages: s.existed,
      discardedPages: discarded,
    });
    this.log.info('migration complete', { ...s, sourceAcked: acked, sourceDone: this.sourceDone });
    this.deps.metrics.sessionEnded('complete');
    this.teardown();
  }

  private sendComplete(): void {
    // On the demand channel: its answers never wait behind bulk data. A lost demand connection
    // sends it again when restored (onDemandOpened).
    this.demand?.send(encodeComplete(this.map.totalPages));
  }

  /**
   * Ends the session with a coded error. Blocked guest threads are not woken with bad data:
   * the VMM keeps its own reference to the uffd, so they stay blocked until it acts.
   */
  fail(code: string, message: string): void {
    if (this.stateValue === 'done' || this.stateValue === 'failed') return;
    this.stateValue = 'failed';
    this.error = { code, message };
    this.log.error('migration failed', {
      code,
      message,
      present: this.map.settledPages,
      total: this.map.totalPages,
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

  private teardown(): void {
    this.finishedAt = Date.now();
    if (this.progressTimer) clearInterval(this.progressTimer);
    if (this.backgroundTimer) clearTimeout(this.backgroundTimer);
    this.deps.bulk.faultsAwaited(-this.inflight.size);
    this.inflight.clear();
    this.uffdWatch?.stop();
    this.uffdWatch = null;
    // A failed session tells the source why (VMM_GONE, DAEMON_STOPPING...); it keeps its image.
    this.demand?.close(this.error?.code, this.error?.message);
    this.conn.close();
    // The uffd is closed only once the bulk thread let go of it (its number could be reused).
    const bulkClosed = this.background?.close(this.error?.code, this.error?.message);
    const closeUffd = (): void => {
      try {
        sys.close(this.uffdFd);
      } catch (err) {
        if ((err as { errno?: number }).errno !== ERRNO.EBADF) throw err;
      }
      this.resolveDone(this.stats());
    };
    if (bulkClosed) void bulkClosed.then(closeUffd);
    else closeUffd();
  }

  private reportProgress(): void {
    if (this.stateValue !== 'running') return;
    this.conn.reply({
      type: 'progress',
      presentPages: this.map.settledPages,
      totalPages: this.map.totalPages,
    });
  }
}
