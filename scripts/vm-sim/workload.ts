/**
 * vm-sim's vCPUs: the worker threads that play the guest (worker.ts), their control words and
 * what they report. Loaded before the handoff, so they start the instant the daemon acks.
 */
import { Worker } from 'node:worker_threads';
import {
  CONTROL_GO,
  CONTROL_PHASE,
  CONTROL_STOP,
  CONTROL_WORDS,
  PHASE_COMPLETE,
  type Pattern,
  type WorkerConfig,
  type WorkerMessage,
  type WorkerStats,
} from './shared.js';
import { VmSimError, type Mismatch } from './types.js';

export interface WorkloadOptions {
  workers: number;
  base: number;
  sizeBytes: number;
  pageSizeBytes: number;
  imagePath: string;
  pattern: Pattern;
  writeFraction: number;
  seed: number;
  opsAfterComplete: number;
  /** Touch phase: first touches in all (split evenly), or undefined for the ordinary workload. */
  touches: number | undefined;
  latencyCapacity: number;
  maxMismatches: number;
}

type Done = Extract<WorkerMessage, { type: 'done' }>;

interface Handle {
  worker: Worker;
  ready: Promise<void>;
  done: Promise<Done>;
}

export class Workload {
  private readonly handles: Handle[] = [];
  private readonly control = new Int32Array(new SharedArrayBuffer(4 * CONTROL_WORDS));
  /** Last stamp version written to each page (the final verification needs it). */
  readonly stamps: Uint32Array;
  /** Mismatches the workers saw online (bounded), and how many in all. */
  readonly online: Mismatch[] = [];
  onlineCount = 0;
  /** Rejects when a worker fails (an exception, or an exit before it reported `done`). */
  readonly failed: Promise<never>;
  private fail!: (err: Error) => void;
  private touchedWorkers = 0;
  private goAt = 0;
  /** Workload start (go) → the last worker ended its touch phase, ms (touch phase only). */
  touchPhaseMs: number | undefined;
  /** Called once every worker ended its touch phase. */
  onAllTouched: () => void = () => undefined;

  constructor(private readonly o: WorkloadOptions) {
    const totalPages = o.sizeBytes / o.pageSizeBytes;
    this.stamps = new Uint32Array(new SharedArrayBuffer(4 * totalPages));
    this.failed = new Promise<never>((_, reject) => (this.fail = reject));
    this.failed.catch(() => undefined);
    for (let index = 0; index < o.workers; index++) this.handles.push(this.spawn(index));
  }

  private spawn(index: number): Handle {
    const o = this.o;
    const config: WorkerConfig = {
      index,
      workers: o.workers,
      base: o.base,
      sizeBytes: o.sizeBytes,
      pageSizeBytes: o.pageSizeBytes,
      imagePath: o.imagePath,
      pattern: o.pattern,
      writeFraction: o.writeFraction,
      seed: o.seed,
      opsAfterComplete: o.opsAfterComplete,
      touches:
        o.touches === undefined
          ? null
          : Math.floor(o.touches / o.workers) + (index < o.touches % o.workers ? 1 : 0),
      stamps: this.stamps.buffer as SharedArrayBuffer,
      control: this.control.buffer as SharedArrayBuffer,
      latencyCapacity: Math.ceil(o.latencyCapacity / o.workers),
      maxMismatches: o.maxMismatches,
    };
    const worker = new Worker(new URL('./worker.js', import.meta.url), {
      workerData: config,
      // Not the parent's --import/--loader hooks (a test runner's TypeScript and coverage
      // loaders cost seconds per worker and serve no purpose for compiled JS).
      execArgv: process.execArgv.filter((a) => a === '--enable-source-maps'),
    });
    let readyResolve!: () => void;
    let doneResolve!: (m: Done) => void;
    const ready = new Promise<void>((r) => (readyResolve = r));
    const done = new Promise<Done>((r, reject) => {
      doneResolve = r;
      worker.once('exit', (code) =>
        reject(new VmSimError('VMSIM_WORKER_FAILED', `worker ${index} exited (${code})`)),
      );
    });
    done.catch(() => undefined);
    worker.on('message', (m: WorkerMessage) => {
      if (m.type === 'ready') readyResolve();
      else if (m.type === 'touched') this.touched();
      else if (m.type === 'done') doneResolve(m);
      else if (m.type === 'mismatch') {
        this.onlineCount++;
        if (this.online.length < o.maxMismatches) {
          this.online.push({ page: m.page, reason: m.reason, worker: m.worker });
        }
      }
    });
    worker.on('error', (err) =>
      this.fail(
        new VmSimError('VMSIM_WORKER_FAILED', `worker ${index}: ${err.message}`, { cause: err }),
      ),
    );
    return { worker, ready, done };
  }

  private touched(): void {
    if (++this.touchedWorkers < this.o.workers) return;
    this.touchPhaseMs = Math.round((performance.now() - this.goAt) * 10) / 10;
    this.onAllTouched();
  }

  /** Resolves once every worker is loaded (rejects if one fails first). */
  async ready(): Promise<void> {
    await Promise.race([Promise.all(this.handles.map((h) => h.ready)), this.failed]);
  }

  /** The daemon acked: the vCPUs run. */
  go(): void {
    this.goAt = performance.now();
    this.wake(CONTROL_GO);
  }

  /** The migration is complete: each worker does its last operations, then reports. */
  complete(): Promise<Done[]> {
    Atomics.store(this.control, CONTROL_PHASE, PHASE_COMPLETE);
    return this.results();
  }

  /** Stops the workers where they are (they report what they did). */
  halt(): Promise<Done[]> {
    Atomics.store(this.control, CONTROL_STOP, 1);
    return this.results();
  }

  private results(): Promise<Done[]> {
    return Promise.race([Promise.all(this.handles.map((h) => h.done)), this.failed]);
  }

  /** Ends every thread, whatever its state (cleanup). */
  async stop(): Promise<void> {
    Atomics.store(this.control, CONTROL_STOP, 1);
    this.wake(CONTROL_GO);
    await Promise.allSettled(this.handles.map((h) => h.done));
    await Promise.allSettled(this.handles.map((h) => h.worker.terminate()));
  }

  private wake(word: number): void {
    Atomics.store(this.control, word, 1);
    Atomics.notify(this.control, word);
  }

  /** Sums a counter over the workers' reports. */
  static sum(stats: readonly WorkerStats[], key: keyof WorkerStats): number {
    return stats.reduce((n, s) => n + s[key], 0);
  }
}
