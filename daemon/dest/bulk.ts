/**
 * The bulk lane of the destination, main-thread side. Every session's background connection
 * lives on one worker thread (bulk-worker.ts), which decodes and checks frames, keeps credit
 * and sends HAVE syncs; the main thread owns every uffd and page map and places every page
 * (placement.ts), so each page has one writer and no lock is needed. A session whose pages
 * come from a memory file on this host (local-source.ts) has a file lane there instead: the
 * thread reads the file into the same ring and sends the same runs, with the same credit.
 *
 * Verified runs arrive here in batches of messages (a frame's payload in the shared payload
 * ring, or, if it did not fit, in an ArrayBuffer transferred with it) and wait in one queue for
 * all sessions. The queue is placed one slice per event-loop turn, so faults and demand
 * answers, read in the loop's poll phase, are never queued behind more than one slice of a
 * background run; and while any fault in the daemon awaits its page, the queue waits (up to
 * FAULT_PRIORITY_MS): any VM's demand goes before every VM's background. Placed runs go back
 * to the bulk thread in batches too (PLACED_BATCH_BYTES), for their credit.
 *
 * A uffd is closed only after its session's lane is closed here and on the worker, so no run of
 * a closed session can reach a reused fd number.
 */
import { Worker } from 'node:worker_threads';
import type { HandoffErrorCode } from '../../protocol/errors.js';
import type { PageRange, RegionInfo } from '../../protocol/wire.js';
import type { SourceAddress } from '../../protocol/source-url.js';
import type { ClientTls } from '../transport/client.js';
import type { SourcePolicy } from './source-policy.js';
import type { Logger, LogLevel } from '../ops/log.js';
import { PayloadRing } from './payload-ring.js';

/** Everything the bulk thread needs to run one session's background channel. */
export interface BulkSessionInit {
  migrationId: string;
  /** The migration's secret (proven on every connection), or null. */
  secret: Uint8Array | null;
  tls: ClientTls | undefined;
  /** Which addresses the source's name may resolve to (the thread builds its own lookup). */
  policy: SourcePolicy;
  windowBytes: number;
  connectTimeoutMs: number;
  heartbeatMs: number;
  reconnectTimeoutMs: number;
  /** Retry the first connection (a resumed handoff); see LinkOptions.retryFirst. */
  retryFirst: boolean;
}

/** Everything the bulk thread needs to stream one session's memory file. */
export interface BulkFileInit {
  /** The file, open read-only; the session closes it only after the lane closed. */
  fd: number;
  /** For logs. */
  path: string;
  /** The file's regions (image offset = file offset), sorted, tiling [0, file size). */
  regions: RegionInfo[];
  /** Background bytes in flight (placed bytes are granted again), as for a connection. */
  windowBytes: number;
  /** Image offsets of pages to stream first, in this order (a recorded working set), or null. */
  first: Float64Array | null;
}

export type ToBulk =
  | { t: 'open'; key: number; init: BulkSessionInit; source: SourceAddress }
  | { t: 'openFile'; key: number; init: BulkFileInit }
  /** A file lane: these pages were read on demand (they need not be streamed; follow them). */
  | { t: 'demanded'; key: number; ranges: PageRange[] }
  /** Background connections go to `source` from now on (a restarted source moved them). */
  | { t: 'retarget'; key: number; source: SourceAddress }
  | { t: 'start'; key: number }
  | { t: 'window'; key: number }
  | { t: 'have'; key: number; serial: number; ranges: PageRange[] }
  /** Runs placed: (key, serial, credit bytes) per run, in the order they were placed. */
  | { t: 'placed'; credits: number[] }
  | { t: 'close'; key: number; code?: string; message?: string }
  /** The thread is about to be terminated: stop reading every socket now (see stop()). */
  | { t: 'shutdown' };

/**
 * A verified run of connection `serial`: DATA in the payload ring at `ring` (or, if it did not
 * fit, in `buf` from `at`), or ZERO (neither).
 */
export interface RunMessage {
  t: 'run';
  key: number;
  serial: number;
  offset: number;
  length: number;
  /** The frame's size on the wire (metrics). */
  bytes: number;
  /** What placing it gives back in credit (payload bytes, or a ZERO frame's header). */
  credit: number;
  /** Position of the payload in the payload ring, or -1. */
  ring: number;
  buf: ArrayBuffer | null;
  /** Where the payload starts in `buf`. */
  at: number;
  /** Page size of the run's region (a run is placed in slices of whole pages). */
  pageSizeBytes: number;
  /** Bytes of the run placed so far (main thread only). */
  done?: number;
}

/** Payload bytes the bulk thread may have in flight to the main thread without transfers. */
export const PAYLOAD_RING_BYTES = 16 * 1024 * 1024;

/** PROGRESS DONE: queued behind the session's runs, so it is heard after they are placed. */
export interface SourceDoneMessage {
  t: 'sourceDone';
  key: number;
}

export type FromBulk =
  /** The thread is up (its nice value set): sent once, first. */
  | { t: 'ready' }
  | { t: 'opened'; key: number; regions: RegionInfo[] }
  | { t: 'openFailed'; key: number; code: HandoffErrorCode; message: string }
  | {
      t: 'connected';
      key: number;
      serial: number;
      regions: readonly RegionInfo[];
      reconnect: boolean;
    }
  | RunMessage
  | { t: 'lost'; key: number; code: string }
  | { t: 'error'; key: number; code: string }
  | SourceDoneMessage
  | { t: 'fail'; key: number; code: HandoffErrorCode; message: string }
  | { t: 'closed'; key: number }
  /** The answer to shutdown: no socket is read any more. */
  | { t: 'down' }
  /** Several of the above, in order (the bulk thread posts once per event-loop turn). */
  | { t: 'batch'; messages: FromBulk[] };

/** A background run for the session to place (payload a view, no copy). */
export interface BackgroundRun {
  offset: number;
  length: number;
  data: Buffer | null;
  /** The frame's size on the wire. */
  bytes: number;
}

/** What a session hears from its bulk lane. */
export interface BulkHooks {
  /** A (new) background connection with these regions: answer with have() (its HAVE sync). */
  connected(serial: number, regions: readonly RegionInfo[], reconnect: boolean): void;
  /** Place this run now (called from the daemon-wide queue, one run per turn). */
  run(run: BackgroundRun): void;
  /** The background connection was lost (it reconnects by itself). */
  lost(code: string): void;
  /** A frame was refused with `code` (the connection was reset). */
  error(code: string): void;
  /** The source says it sent every page (PROGRESS DONE), and every run before it is placed. */
  sourceDone(): void;
  /** The lane cannot go on (no source for reconnectTimeoutMs, the thread died). */
  fail(code: HandoffErrorCode, message: string): void;
}

/** One session's background channel, seen from the main thread. */
export interface BulkLane {
  /** Connects to `source`; resolves with the source's regions, rejects with a coded error. */
  open(source: SourceAddress): Promise<RegionInfo[]>;
  /** Background connections go to `source` from now on. */
  retarget(source: SourceAddress): void;
  /** Starts taking frames (after the session is running). */
  start(): void;
  /** Grants the first CREDIT (the background stream may start). */
  openWindow(): void;
  /** The HAVE sync for connection `serial` (after connected(), or to resync). */
  have(serial: number, ranges: PageRange[]): void;
  /** Closes the channel; resolves once no run of it can reach the session any more. */
  close(code?: string, message?: string): Promise<void>;
}

/** One session's memory file streamed by the bulk thread, seen from the main thread. */
export interface FileLane {
  /** Starts streaming (after the session is running). */
  start(): void;
  /** The window opens (the stream may start). */
  openWindow(): void;
  /** These pages were read on demand: skip them, and continue after them. */
  demanded(ranges: PageRange[]): void;
  /** Streams again every page not in `ranges` (what the session holds). */
  have(ranges: PageRange[]): void;
  /** Stops; resolves once no run of it can reach the session and the file is not read. */
  close(): Promise<void>;
}

export interface BulkLaneFactory {
  lane(init: BulkSessionInit, hooks: BulkHooks): BulkLane;
  /** A file lane: its runs reach `hooks.run`, then `hooks.sourceDone` once every page was sent. */
  fileLane(
    init: BulkFileInit,
    hooks: Pick<BulkHooks, 'run' | 'sourceDone' | 'fail'>,
    transfer?: ArrayBuffer[],
  ): FileLane;
  /** Faults awaiting their page, daemon-wide, went up or down by `delta`. */
  faultsAwaited(delta: number): void;
}

interface Entry {
  hooks: BulkHooks;
  opened: { resolve(regions: RegionInfo[]): void; reject(err: Error): void } | null;
  closing: boolean;
  closed: Promise<void>;
  resolveClosed(): void;
}

export interface BulkThreadOptions {
  /** Nice value of the bulk thread (0 = same as the main thread, 19 = lowest). */
  nice: number;
  logLevel: LogLevel;
  log: Logger;
  /** The worker's entry (tests give a stand-in); default bulk-worker.js next to this file. */
  workerUrl?: URL;
}

/** Longest the background queue waits for awaited faults before placing anyway, ms. */
const FAULT_PRIORITY_MS = 2;
/**
 * What one event-loop turn places of a background run, bytes (at least one page): a fault read,
 * or a demand answer that arrives, waits behind one slice at most. Zeros cost far less to place
 * than data (UFFDIO_ZEROPAGE maps the shared zero page), so their slices are larger.
 */
const DATA_SLICE_BYTES = 64 * 1024;
const ZERO_SLICE_BYTES = 2 * 1024 * 1024;
/**
 * A vCPU whose fault was just served is likely to fault again within microseconds: for this
 * long after the last awaited fault was served, data slices are NEAR_FAULT_SLICE_BYTES, so
 * that next fault waits behind a few microseconds of copying at most. Measured with
 * `npm run bench` (demand-under-load): fault p50 about 400 µs with 64 KiB slices throughout,
 * about 200 µs with this; the stream, placed between faults, finished sooner too.
 */
const NEAR_FAULT_MS = 0.5;
const NEAR_FAULT_SLICE_BYTES = 16 * 1024;
/**
 * Placed runs are reported to the bulk thread (which grants their credit again) once this many
 * bytes or runs were placed, or when the queue is empty: a report per run was a postMessage per
 * run (about 19,000 for 4 GiB), and credit goes out in steps of a quarter share anyway.
 */
const PLACED_BATCH_BYTES = 1024 * 1024;
const PLACED_BATCH_RUNS = 64;

/**
 * The worker thread, the routing of its messages to sessions, and the daemon-wide queue of
 * background runs. Started at once (a thread that cannot start fails the daemon at startup); a
 * thread that dies fails the sessions it carried and is replaced for the next session.
 */
export class BulkThread implements BulkLaneFactory {
  private worker: Worker | null = null;
  private readonly entries = new Map<number, Entry>();
  private nextKey = 1;
  private stopped = false;
  /** [0]: faults awaited in all sessions (shared with the bulk thread). */
  private readonly faults = new Int32Array(new SharedArrayBuffer(4));
  /** Runs to place, and each session's PROGRESS DONE behind the runs that came before it. */
  private readonly queue: Array<RunMessage | SourceDoneMessage> = [];
  private readonly ring = new PayloadRing(PAYLOAD_RING_BYTES);
  private queueHead = 0;
  /** Runs placed and not reported to the bulk thread yet: (key, serial, credit) each. */
  private placed: number[] = [];
  private placedBytes = 0;
  private scheduled: NodeJS.Immediate | null = null;
  private deferTimer: NodeJS.Timeout | null = null;
  private deferredSince = 0;
  /** When the last awaited fault was served (performance.now()). */
  private lastServed = 0;
  /** Settles when the current thread reports it is up, or fails if it exits before. */
  private started!: Promise<void>;

  constructor(private readonly opts: BulkThreadOptions) {
    this.spawn();
  }

  /** Resolves once the thread runs (the daemon waits for it before it accepts handoffs). */
  ready(): Promise<void> {
    return this.started;
  }

  private spawn(): Worker {
    let up: () => void = () => {};
    let down: (err: Error) => void = () => {};
    this.started = new Promise<void>((resolve, reject) => {
      up = resolve;
      down = reject;
    });
    this.started.catch(() => undefined); // awaited by ready(); a late failure is logged below
    const worker = new Worker(this.opts.workerUrl ?? new URL('./bulk-worker.js', import.meta.url), {
      workerData: {
        nice: this.opts.nice,
        logLevel: this.opts.logLevel,
        faults: this.faults,
        ring: this.ring.share(),
      },
      stdout: false,
      stderr: false,
    });
    worker.unref();
    const receive = (m: FromBulk): void => {
      if (m.t === 'batch') for (const b of m.messages) receive(b);
      else if (m.t === 'ready') up();
      else if (m.t === 'down') this.down?.();
      else this.onMessage(m);
    };
    worker.on('message', receive);
    worker.on('error', (err) => this.opts.log.error('the bulk thread failed', { err }));
    worker.on('exit', (code) => {
      down(
        Object.assign(new Error(`the bulk thread exited with code ${code}`), {
          code: 'INTERNAL_ERROR',
        }),
      );
      if (this.worker === worker) this.worker = null;
      if (!this.stopped) this.opts.log.error('the bulk thread exited', { exitCode: code });
      // Nothing of a dead thread is placed; the next one starts with an empty ring.
      this.queue.length = 0;
      this.queueHead = 0;
      this.placed = [];
      this.placedBytes = 0;
      this.ring.reset();
      for (const [key, e] of this.entries) {
        this.entries.delete(key);
        if (!this.stopped && !e.closing) {
          e.opened?.reject(
            Object.assign(new Error('the bulk thread exited'), { code: 'INTERNAL_ERROR' }),
          );
          e.hooks.fail('INTERNAL_ERROR', `the bulk thread exited with code ${code}`);
        }
        e.resolveClosed();
      }
    });
    this.worker = worker;
    return worker;
  }

  private post(m: ToBulk, transfer: ArrayBuffer[] = []): void {
    this.flushPlaced(); // credits go before anything said after them
    (this.worker ?? this.spawn()).postMessage(m, transfer);
  }

  /** Tells the bulk thread which runs were placed since the last time (see PLACED_BATCH_BYTES). */
  private flushPlaced(): void {
    if (this.placed.length === 0) return;
    const credits = this.placed;
    this.placed = [];
    this.placedBytes = 0;
    (this.worker ?? this.spawn()).postMessage({ t: 'placed', credits } satisfies ToBulk);
  }

  private onMessage(m: Exclude<FromBulk, { t: 'ready' | 'batch' | 'down' }>): void {
    const e = this.entries.get(m.key);
    if (!e || (e.closing && m.t !== 'closed')) return;
    switch (m.t) {
      case 'opened':
        e.opened?.resolve(m.regions);
        e.opened = null;
        break;
      case 'openFailed':
        e.opened?.reject(Object.assign(new Error(m.message), { code: m.code }));
        e.opened = null;
        break;
      case 'connected':
        e.hooks.connected(m.serial, m.regions, m.reconnect);
        break;
      case 'run':
      case 'sourceDone':
        this.queue.push(m);
        this.schedule();
        break;
      case 'lost':
        e.hooks.lost(m.code);
        break;
      case 'error':
        e.hooks.error(m.code);
        break;
      case 'fail':
        e.hooks.fail(m.code, m.message);
        break;
      case 'closed':
        this.entries.delete(m.key);
        e.resolveClosed();
        break;
    }
  }

  faultsAwaited(delta: number): void {
    if (delta === 0) return;
    if (Atomics.add(this.faults, 0, delta) + delta === 0) {
      this.lastServed = performance.now();
      Atomics.notify(this.faults, 0);
      if (this.deferTimer) {
        clearTimeout(this.deferTimer);
        this.deferTimer = null;
        this.schedule();
      }
    }
  }

  /** Places the next queued run in a later turn (or after awaited faults, see the top). */
  private schedule(): void {
    if (this.scheduled || this.deferTimer || this.queueHead >= this.queue.length) return;
    this.scheduled = setImmediate(() => {
      this.scheduled = null;
      if (Atomics.load(this.faults, 0) > 0) {
        const now = performance.now();
        this.deferredSince ||= now;
        const left = FAULT_PRIORITY_MS - (now - this.deferredSince);
        if (left > 0) {
          this.deferTimer = setTimeout(() => {
            this.deferTimer = null;
            this.schedule();
          }, left);
          return;
        }
      }
      this.deferredSince = 0;
      this.placeNext(performance.now() - this.lastServed < NEAR_FAULT_MS);
      if (
        this.queueHead >= this.queue.length ||
        this.placedBytes >= PLACED_BATCH_BYTES ||
        this.placed.length >= 3 * PLACED_BATCH_RUNS
      ) {
        this.flushPlaced();
      }
      this.schedule();
    });
  }

  /** Places one slice of the run at the head of the queue (see DATA_SLICE_BYTES). */
  private placeNext(nearFault: boolean): void {
    const m = this.queue[this.queueHead];
    if (!m) return;
    // A closed session's runs are skipped here, in order, so the ring is freed in order too.
    const e = this.entries.get(m.key);
    const live = e !== undefined && !e.closing;
    let finished = true;
    if (live && m.t === 'sourceDone') e.hooks.sourceDone();
    else if (live && m.t === 'run') {
      const done = m.done ?? 0;
      const data = m.ring >= 0 || m.buf !== null;
      const want = !data ? ZERO_SLICE_BYTES : nearFault ? NEAR_FAULT_SLICE_BYTES : DATA_SLICE_BYTES;
      const slice = Math.min(
        m.length - done,
        Math.max(m.pageSizeBytes, want - (want % m.pageSizeBytes)),
      );
      e.hooks.run({
        offset: m.offset + done,
        length: slice,
        data:
          m.ring >= 0
            ? this.ring.view(m.ring + done, slice)
            : m.buf
              ? Buffer.from(m.buf, m.at + done, slice)
              : null,
        bytes: done === 0 ? m.bytes : 0,
      });
      m.done = done + slice;
      finished = m.done >= m.length;
      if (finished) {
        this.placed.push(m.key, m.serial, m.credit);
        this.placedBytes += m.credit;
      }
    }
    if (!finished) return;
    if (m.t === 'run' && m.ring >= 0) this.ring.release(m.ring + m.length);
    this.queueHead++;
    if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue.splice(0, this.queueHead);
      this.queueHead = 0;
    }
  }

  private entry(hooks: BulkHooks): { key: number; entry: Entry; close: BulkLane['close'] } {
    const key = this.nextKey++;
    let resolveClosed!: () => void;
    const entry: Entry = {
      hooks,
      opened: null,
      closing: false,
      closed: new Promise<void>((r) => (resolveClosed = r)),
      resolveClosed: () => resolveClosed(),
    };
    this.entries.set(key, entry);
    const close: BulkLane['close'] = (code, message) => {
      if (!entry.closing && this.entries.has(key)) {
        entry.closing = true;
        this.post({
          t: 'close',
          key,
          ...(code !== undefined ? { code } : {}),
          ...(message !== undefined ? { message } : {}),
        });
      }
      return entry.closed;
    };
    return { key, entry, close };
  }

  fileLane(
    init: BulkFileInit,
    hooks: Pick<BulkHooks, 'run' | 'sourceDone' | 'fail'>,
    transfer: ArrayBuffer[] = [],
  ): FileLane {
    const none = (): void => {};
    const { key, close } = this.entry({ ...hooks, connected: none, lost: none, error: none });
    this.post({ t: 'openFile', key, init }, transfer);
    return {
      start: () => this.post({ t: 'start', key }),
      openWindow: () => this.post({ t: 'window', key }),
      demanded: (ranges) => this.post({ t: 'demanded', key, ranges }),
      have: (ranges) => this.post({ t: 'have', key, serial: 1, ranges }),
      close: () => close(),
    };
  }

  lane(init: BulkSessionInit, hooks: BulkHooks): BulkLane {
    const { key, entry, close } = this.entry(hooks);
    return {
      open: (source) =>
        new Promise<RegionInfo[]>((resolve, reject) => {
          entry.opened = { resolve, reject };
          this.post({ t: 'open', key, init, source });
        }),
      retarget: (source) => this.post({ t: 'retarget', key, source }),
      start: () => this.post({ t: 'start', key }),
      openWindow: () => this.post({ t: 'window', key }),
      have: (serial, ranges) => this.post({ t: 'have', key, serial, ranges }),
      close,
    };
  }

  /** Called when the thread answers shutdown. */
  private down: (() => void) | null = null;

  /**
   * Stops the thread (daemon shutdown, after the sessions closed). It first stops reading its
   * sockets (the raw receivers' uv_poll handles, transport/raw-receive.ts): an event on one of
   * them while node tears the thread down would call into JavaScript that no longer runs, and
   * node aborts the process. A thread that does not answer within a second is terminated.
   */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.scheduled) clearImmediate(this.scheduled);
    if (this.deferTimer) clearTimeout(this.deferTimer);
    this.queue.length = 0;
    this.placed = [];
    const w = this.worker;
    if (!w) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 1000);
      this.down = () => {
        clearTimeout(timer);
        resolve();
      };
      w.postMessage({ t: 'shutdown' } satisfies ToBulk);
    });
    this.down = null;
    this.worker = null;
    await w.terminate();
  }
}
