/**
 * The bulk lane of the destination: every session's background channel lives on one worker
 * thread (bulk-worker.ts); the main thread keeps faults and demand pages. Measured on these
 * 2-core machines, a single thread doing both let a fault wait behind background frames and the
 * garbage collection their buffers cause (fault p99 17 ms under load, 5.6 ms with the split).
 * The bulk thread's nice value is configurable (bulkThreadNice; 0 by default: higher values let
 * busy vCPUs starve the stream). While any fault is awaited, it stops reading for up to 2 ms
 * after each frame, so faults go first. The threads share each session's page map
 * (SharedArrayBuffers, see page-map.ts) and its uffd, and talk through the messages below.
 *
 * A uffd is closed only after the bulk thread confirmed it let go of it: a closed fd number can
 * be reused at once, and a late UFFDIO_COPY into someone else's uffd would place one VM's pages
 * in another.
 */
import { Worker } from 'node:worker_threads';
import type { Logger, LogLevel } from '../ops/log.js';
import type { SharedPageMap } from './page-map.js';

/** Everything the bulk thread needs to run one session's background channel. */
export interface BulkSessionInit {
  migrationId: string;
  source: string;
  uffd: number;
  map: SharedPageMap;
  windowBytes: number;
  connectTimeoutMs: number;
  heartbeatMs: number;
  reconnectTimeoutMs: number;
  /** Retry the first connection (a resumed handoff); see LinkOptions.retryFirst. */
  retryFirst: boolean;
}

export type ToBulk =
  | { t: 'open'; key: number; init: BulkSessionInit }
  | { t: 'start'; key: number }
  | { t: 'window'; key: number }
  | { t: 'close'; key: number; code?: string; message?: string };

/** Placement counts since the last report (one report per bulk event-loop turn at most). */
export interface BulkCounts {
  dataPages: number;
  zeroPages: number;
  existed: number;
  retries: number;
  bytes: number;
}

export type FromBulk =
  | { t: 'opened'; key: number }
  | { t: 'openFailed'; key: number; code: string; message: string }
  | { t: 'placed'; key: number; counts: BulkCounts }
  | { t: 'lost'; key: number; code: string }
  | { t: 'error'; key: number; code: string }
  | { t: 'sourceDone'; key: number }
  | { t: 'fail'; key: number; code: string; message: string }
  | { t: 'closed'; key: number };

/** What a session hears from its bulk lane. */
export interface BulkHooks {
  placed(counts: BulkCounts): void;
  /** The background connection was lost (it reconnects by itself). */
  lost(code: string): void;
  /** A frame was refused with `code` (the connection was reset). */
  error(code: string): void;
  sourceDone(): void;
  /** The lane cannot go on (no source for reconnectTimeoutMs, VMM memory gone, thread died). */
  fail(code: string, message: string): void;
}

/** One session's background channel, seen from the main thread. */
export interface BulkLane {
  /** Connects; rejects with a coded error when the first connection fails. */
  open(): Promise<void>;
  /** Starts taking frames (after the session is running). */
  start(): void;
  /** Grants the first CREDIT (the background stream may start). */
  openWindow(): void;
  /** Closes the channel; resolves once the bulk thread no longer touches the uffd. */
  close(code?: string, message?: string): Promise<void>;
}

export interface BulkLaneFactory {
  lane(init: BulkSessionInit, hooks: BulkHooks): BulkLane;
  /**
   * Faults awaiting their page, daemon-wide, went up or down by `delta`. While any is awaited
   * the bulk thread stops reading after each frame (up to FAULT_PRIORITY_MS each time).
   */
  faultsAwaited(delta: number): void;
}

interface Entry {
  hooks: BulkHooks;
  opened: { resolve(): void; reject(err: Error): void } | null;
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

/**
 * The worker thread and the routing of its messages to sessions. Started at once (so a thread
 * that cannot start fails the daemon at startup); a thread that dies fails the sessions it
 * carried and is replaced for the next session.
 */
export class BulkThread implements BulkLaneFactory {
  private worker: Worker | null = null;
  private readonly entries = new Map<number, Entry>();
  private nextKey = 1;
  private stopped = false;
  /** [0]: faults awaited in all sessions (shared with the bulk thread). */
  private readonly faults = new Int32Array(new SharedArrayBuffer(4));

  constructor(private readonly opts: BulkThreadOptions) {
    this.spawn();
  }

  private spawn(): Worker {
    const worker = new Worker(this.opts.workerUrl ?? new URL('./bulk-worker.js', import.meta.url), {
      workerData: {
        nice: this.opts.nice,
        logLevel: this.opts.logLevel,
        faults: this.faults,
      },
      stdout: false,
      stderr: false,
    });
    worker.unref();
    worker.on('message', (m: FromBulk) => this.onMessage(m));
    worker.on('error', (err) => {
      this.opts.log.error('the bulk thread failed', { err });
    });
    worker.on('exit', (code) => {
      if (this.worker === worker) this.worker = null;
      if (!this.stopped) this.opts.log.error('the bulk thread exited', { exitCode: code });
      // A dead thread touches no uffd: every session it carried may close its fd.
      for (const [key, e] of this.entries) {
        this.entries.delete(key);
        if (!this.stopped) {
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

  private post(m: ToBulk): void {
    (this.worker ?? this.spawn()).postMessage(m);
  }

  private onMessage(m: FromBulk): void {
    const e = this.entries.get(m.key);
    if (!e) return;
    switch (m.t) {
      case 'opened':
        e.opened?.resolve();
        e.opened = null;
        break;
      case 'openFailed':
        e.opened?.reject(Object.assign(new Error(m.message), { code: m.code }));
        e.opened = null;
        break;
      case 'placed':
        e.hooks.placed(m.counts);
        break;
      case 'lost':
        e.hooks.lost(m.code);
        break;
      case 'error':
        e.hooks.error(m.code);
        break;
      case 'sourceDone':
        e.hooks.sourceDone();
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
    if (delta !== 0 && Atomics.add(this.faults, 0, delta) + delta === 0) {
      Atomics.notify(this.faults, 0);
    }
  }

  lane(init: BulkSessionInit, hooks: BulkHooks): BulkLane {
    const key = this.nextKey++;
    let resolveClosed!: () => void;
    const entry: Entry = {
      hooks,
      opened: null,
      closed: new Promise<void>((r) => (resolveClosed = r)),
      resolveClosed: () => resolveClosed(),
    };
    this.entries.set(key, entry);
    let closing = false;
    return {
      open: () =>
        new Promise<void>((resolve, reject) => {
          entry.opened = { resolve, reject };
          this.post({ t: 'open', key, init });
        }),
      start: () => this.post({ t: 'start', key }),
      openWindow: () => this.post({ t: 'window', key }),
      close: (code, message) => {
        if (!closing && this.entries.has(key)) {
          closing = true;
          this.post({
            t: 'close',
            key,
            ...(code !== undefined ? { code } : {}),
            ...(message !== undefined ? { message } : {}),
          });
        }
        return entry.closed;
      },
    };
  }

  /** Stops the thread (daemon shutdown, after the sessions closed). */
  async stop(): Promise<void> {
    this.stopped = true;
    const w = this.worker;
    this.worker = null;
    if (w) await w.terminate();
  }
}
