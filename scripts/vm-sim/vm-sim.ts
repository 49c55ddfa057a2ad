/**
 * vm-sim: the reference VMM, and the oracle of every test and benchmark.
 *
 * 1. maps anonymous guest RAM, creates a userfaultfd and registers the RAM in MISSING mode;
 * 2. hands the uffd to `yabusame dest` (handoff line + SCM_RIGHTS over its UNIX socket) and keeps
 *    its own copy of the fd;
 * 3. starts the workload on worker threads as soon as the daemon acks (pages still arriving), so
 *    first touches fault in those threads exactly like vCPUs;
 * 4. after `complete`, stops the workload and verifies every page byte for byte: a page the
 *    workload wrote holds its last stamp over the image page; every other page equals the image.
 *
 * With `resumeOnDaemonDeath` (CLI --resume-timeout) a daemon that dies before `complete` is not
 * a failure: vm-sim keeps its uffd, so the workers stay blocked on their faults, reconnects to
 * the same socket with exponential backoff and hands the uffd over again with `"resume": true`
 * (protocol/README.md, Resuming); `resumes` in the result counts the daemons that took over.
 *
 * The main thread never touches guest RAM before `complete` (a fault there would block the event
 * loop that reads the daemon's replies). After `complete` it checks residency with mincore, then
 * unregisters the RAM so that a page the daemon never placed reads as zeros instead of hanging.
 *
 * Benchmarks use `touches` (a fixed number of first touches, then wait: faults measured in that
 * phase only), `workers: 0` (no workload: the background stream alone) and runVmSimTouches (end
 * after the touch phase, verifying only the pages placed so far).
 *
 * CLI: node dist/scripts/vm-sim/vm-sim.js --size 256M --image /path --source ws://127.0.0.1:7070 \
 *        --socket /run/yabusame/dest.sock --id vm1 [--workers 4] [--pattern mixed] [--touches N]
 *        [--resume-timeout MS] [--json]
 * exit 0: every page verified; 1: mismatch; 2: usage, handoff or migration error.
 */
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import * as abi from '../../daemon/linux/abi.js';
import * as sys from '../../daemon/linux/sys.js';
import { mincore } from '../../daemon/linux/vmm-extra.js';
import * as uffd from '../../daemon/uffd/uffd.js';
import {
  HANDOFF_VERSION,
  encodeHandoff,
  type HandoffReply,
  type HandoffRequest,
} from '../../protocol/handoff.js';
import { connectHandoff, type HandoffClient } from '../lib/handoff-client.js';
import { IMAGE_PAGE_SIZE_BYTES, parseSize } from '../image/gen-image.js';
import { singleHandoffRegion } from '../image/regions.js';
import {
  CONTROL_GO,
  CONTROL_PHASE,
  CONTROL_STOP,
  CONTROL_WORDS,
  PATTERNS,
  PHASE_COMPLETE,
  STAMP_BYTES,
  type Pattern,
  type WorkerConfig,
  type WorkerMessage,
  type WorkerStats,
  writeStamp,
} from './shared.js';

export type { Pattern } from './shared.js';

/** vm-sim's boundary error: `code` is the daemon's error code, or a VMSIM_* code. */
export class VmSimError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VmSimError';
    this.code = code;
  }
}

/** Where a handoff delivers the daemon's replies. */
export interface HandoffSink {
  reply(reply: HandoffReply): void;
  /** The connection ended (with the reason when it failed). */
  closed(err?: Error): void;
}

export interface HandoffSession {
  /** Ends the connection; called once, after verification or on failure. */
  close(): void;
}

/**
 * Delivers the handoff request and the uffd to whoever serves the faults. The default sends them
 * to `yabusame dest` over its UNIX socket; tests pass a function that serves the uffd in-process.
 * The fd stays owned by vm-sim: a handoff must not close it (vm-sim closes it after close()).
 */
export type HandoffFn = (
  request: HandoffRequest,
  uffdFd: number,
  sink: HandoffSink,
) => HandoffSession | Promise<HandoffSession>;

export interface VmSimOptions {
  /** Guest RAM size, bytes; default the image size. */
  sizeBytes?: number;
  /** Path of the memory image the source serves: the oracle. */
  image: string;
  migrationId: string;
  /** ws URL of `yabusame source`. */
  source: string;
  /** UNIX socket path of `yabusame dest` (used by the default handoff). */
  destSocket?: string;
  workers?: number;
  pattern?: Pattern;
  /** Share of workload operations that write a stamp, 0..1. */
  writeFraction?: number;
  /** Operations each worker performs after `complete`, before verification. */
  opsAfterComplete?: number;
  /** Workload PRNG seed. */
  seed?: number;
  /** Fail with VMSIM_TIMEOUT if the migration is not complete after this long; 0 = never. */
  timeoutMs?: number;
  /** Mismatches listed individually (all are counted). */
  maxMismatches?: number;
  onProgress?: (p: { presentPages: number; totalPages: number }) => void;
  handoff?: HandoffFn;
  /**
   * Touch phase (benchmarks): the workers first-touch this many distinct pages in all (split
   * evenly; random order, in order for `sequential`) as fast as they can, then wait for
   * `complete`; no other operations before it. Default: the ordinary workload.
   */
  touches?: number;
  /**
   * Called synchronously when the measured phase ends, before verification: at `complete`, or
   * (runVmSimTouches) when the touch phase ended first. Benchmarks read CPU counters here.
   */
  onPhaseEnd?: (why: 'complete' | 'touched') => void;
  /** Aborting fails the run with VMSIM_ABORTED (the reason in the message), like a timeout. */
  signal?: AbortSignal;
  /**
   * Survive the daemon's death: when the handoff connection closes or errors before `complete`,
   * keep the uffd and the workers (blocked on their faults, never reading zeros), reconnect with
   * exponential backoff and hand the same regions and fd over again with `"resume": true`.
   * Fails with VMSIM_RESUME_TIMEOUT when no daemon acks a resumed handoff within `timeoutMs` of
   * the loss. An `error` reply is never resumed. Without it, a lost connection fails the run
   * (VMSIM_CLOSED).
   */
  resumeOnDaemonDeath?: { timeoutMs: number };
}

export interface Mismatch {
  page: number;
  reason: string;
  /** Set when a worker saw it online (a read), absent for the final verification. */
  worker?: number;
}

export interface LatencySummary {
  count: number;
  p50: number;
  p99: number;
  p999: number;
  max: number;
}

export interface VmSimResult {
  totalPages: number;
  /** Pages whose final content matched the expectation. */
  pagesVerified: number;
  /** Bounded list: final-verification mismatches first, then online ones. */
  mismatches: Mismatch[];
  /** Every mismatch counted: final verification plus online reads. */
  mismatchCount: number;
  /** Pages the daemon never placed (not resident at `complete`). */
  missingPages: number;
  writtenPages: number;
  /** First-touch access time of pages that were missing (faults felt by the guest), µs. */
  faultLatencyUs: LatencySummary;
  /** Handoff sent → `complete` received, ms. */
  elapsedMs: number;
  /** Final verification time, ms. */
  verifyMs: number;
  daemonReport: Extract<HandoffReply, { type: 'complete' }>;
  /** Pages resident when the run ended (totalPages - missingPages). */
  presentPages: number;
  /** Wall clock (epoch ms) when the handoff was sent. */
  startedAtMs: number;
  /** With `touches`: workload start (ack) → the last worker ended its touch phase, ms. */
  touchPhaseMs?: number;
  /** Resumed handoffs a restarted daemon acked (resumeOnDaemonDeath); 0 without a daemon death. */
  resumes: number;
  workload: {
    ops: number;
    reads: number;
    writes: number;
    firstTouches: number;
    faults: number;
    prePlaced: number;
    perWorker: WorkerStats[];
  };
}

/**
 * A run that may end after its touch phase (runVmSimTouches). `partial` is true when it ended
 * before `complete`: the daemon was left with the migration unfinished, only the pages it had
 * placed were verified, and `missingPages` counts the others (expected, not an error).
 */
export interface VmSimPartialResult extends Omit<VmSimResult, 'daemonReport'> {
  partial: boolean;
  /** Present when the migration completed (partial false). */
  daemonReport?: VmSimResult['daemonReport'];
}

const DEFAULTS = {
  workers: 4,
  pattern: 'mixed' as Pattern,
  writeFraction: 0.2,
  opsAfterComplete: 1000,
  seed: 1,
  maxMismatches: 100,
  latencyCapacity: 1 << 17,
};

/** Connect/send failures that mean "no daemon listening yet" while one restarts. */
const RESUME_RETRY_CODES = new Set([
  'ECONNREFUSED',
  'ENOENT',
  'ECONNRESET',
  'EPIPE',
  'EAGAIN',
  'ENOTCONN',
]);
const RESUME_BACKOFF_FIRST_MS = 10;
const RESUME_BACKOFF_MAX_MS = 500;

/** Whether a handoff that failed to connect may be retried while waiting for a restarted daemon. */
function isRetryableHandoffError(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e && depth < 4; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && RESUME_RETRY_CODES.has(code)) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}

/** The default handoff: `yabusame dest` on a UNIX socket. */
export function socketHandoff(path: string): HandoffFn {
  return (request, uffdFd, sink) => {
    let client: HandoffClient;
    try {
      client = connectHandoff(path);
    } catch (err) {
      throw new VmSimError('VMSIM_HANDOFF_FAILED', `connect ${path}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    // The fd travels with the first bytes of the line (protocol/README.md).
    const line = encodeHandoff(request);
    try {
      const sent = client.send(line, [uffdFd]);
      if (sent < line.length) client.send(line.subarray(sent));
    } catch (err) {
      client.close();
      throw new VmSimError('VMSIM_HANDOFF_FAILED', `sendmsg to ${path}`, { cause: err });
    }
    client.onReply(
      (reply) => sink.reply(reply),
      (err) => sink.closed(err),
    );
    return { close: () => client.close() };
  };
}

function summarize(samples: Float64Array[], count: number, max: number): LatencySummary {
  let n = 0;
  for (const s of samples) n += s.length;
  const all = new Float64Array(n);
  let off = 0;
  for (const s of samples) {
    all.set(s, off);
    off += s.length;
  }
  all.sort();
  const q = (p: number): number =>
    all.length ? all[Math.min(all.length - 1, Math.floor(p * all.length))]! : 0;
  const round = (x: number): number => Math.round(x * 10) / 10;
  return { count, p50: round(q(0.5)), p99: round(q(0.99)), p999: round(q(0.999)), max: round(max) };
}

interface WorkerHandle {
  worker: Worker;
  ready: Promise<void>;
  done: Promise<Extract<WorkerMessage, { type: 'done' }>>;
}

export async function runVmSim(opts: VmSimOptions): Promise<VmSimResult> {
  const r = await runCore(opts, false);
  return r as VmSimResult; // never partial: it waited for complete
}

/**
 * Like runVmSim with a touch phase (`touches` is required), but ends the run as soon as every
 * worker finished its touches, without waiting for `complete` (benchmarks of demand faults with
 * the background stream held back). If the migration completes first, this is a full run.
 */
export async function runVmSimTouches(
  opts: VmSimOptions & { touches: number },
): Promise<VmSimPartialResult> {
  if (!(opts.touches >= 0) || (opts.workers ?? DEFAULTS.workers) < 1) {
    throw new VmSimError('VMSIM_USAGE', 'runVmSimTouches needs touches >= 0 and workers >= 1');
  }
  return runCore(opts, true);
}

async function runCore(opts: VmSimOptions, endAfterTouches: boolean): Promise<VmSimPartialResult> {
  const o = { ...DEFAULTS, ...stripUndefined(opts) };
  const imageSize = fs.statSync(o.image).size;
  const sizeBytes = o.sizeBytes ?? imageSize;
  const P = IMAGE_PAGE_SIZE_BYTES;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % P) {
    throw new VmSimError('VMSIM_USAGE', `RAM size ${sizeBytes} is not a positive multiple of ${P}`);
  }
  if (sizeBytes > imageSize) {
    throw new VmSimError('VMSIM_USAGE', `RAM size ${sizeBytes} exceeds the image (${imageSize})`);
  }
  if (!PATTERNS.includes(o.pattern)) throw new VmSimError('VMSIM_USAGE', `pattern ${o.pattern}`);
  if (!(o.workers >= 0 && Number.isInteger(o.workers)))
    throw new VmSimError('VMSIM_USAGE', 'workers must be a non-negative integer');
  if (o.touches !== undefined && !(o.touches >= 0 && Number.isSafeInteger(o.touches)))
    throw new VmSimError('VMSIM_USAGE', 'touches must be a non-negative integer');
  if (o.resumeOnDaemonDeath && !(o.resumeOnDaemonDeath.timeoutMs >= 0)) {
    throw new VmSimError('VMSIM_USAGE', 'resumeOnDaemonDeath.timeoutMs must be >= 0');
  }
  const handoff = o.handoff ?? (o.destSocket ? socketHandoff(o.destSocket) : undefined);
  if (!handoff) throw new VmSimError('VMSIM_USAGE', 'destSocket or handoff is required');
  const totalPages = sizeBytes / P;

  // --- guest RAM and its userfaultfd ---
  const base = sys.mmap(
    sizeBytes,
    abi.PROT_READ | abi.PROT_WRITE,
    abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_NORESERVE,
  );
  let uffdFd = -1;
  let registered = false;
  const workers: WorkerHandle[] = [];
  const stamps = new SharedArrayBuffer(4 * totalPages);
  const control = new Int32Array(new SharedArrayBuffer(4 * CONTROL_WORDS));
  let session: HandoffSession | undefined;
  let timer: NodeJS.Timeout | undefined;
  let abortCleanup = (): void => undefined;
  let stopBackoff = (): void => undefined;
  /** The running resume loop (it never rejects): the uffd stays open until it has stopped. */
  let resuming: Promise<void> | undefined;

  const release = (): void => {
    // Unregistering wakes every thread blocked on a fault; they then see ordinary anonymous
    // memory, so no worker can hang on a page the daemon will never place.
    if (registered) {
      uffd.unregister(uffdFd, base, sizeBytes);
      registered = false;
    }
  };
  const stopWorkers = async (): Promise<void> => {
    Atomics.store(control, CONTROL_STOP, 1);
    Atomics.store(control, CONTROL_GO, 1);
    Atomics.notify(control, CONTROL_GO);
    await Promise.allSettled(workers.map((w) => w.done));
    await Promise.allSettled(workers.map((w) => w.worker.terminate()));
  };

  try {
    // No non-cooperative events (REMOVE/UNMAP): they would make our own munmap wait for a daemon
    // that may already have stopped reading. THREAD_ID lets a handler see which thread faulted.
    uffdFd = uffd.create(abi.UFFD_FEATURE_THREAD_ID).fd;
    uffd.registerMissing(uffdFd, base, sizeBytes);
    registered = true;

    // --- workload threads, loaded before the handoff so they start the instant the ack lands ---
    const online: Mismatch[] = [];
    let onlineCount = 0;
    let workerFailure: ((err: Error) => void) | undefined;
    const workerFailed = new Promise<never>((_, reject) => {
      workerFailure = reject;
    });
    workerFailed.catch(() => undefined);
    let touchedWorkers = 0;
    let goAt = 0;
    let touchPhaseMs: number | undefined;
    let onAllTouched = (): void => undefined;
    const onTouched = (_n: number): void => {
      if (++touchedWorkers < o.workers) return;
      touchPhaseMs = Math.round((performance.now() - goAt) * 10) / 10;
      onAllTouched();
    };
    for (let index = 0; index < o.workers; index++) {
      const config: WorkerConfig = {
        index,
        workers: o.workers,
        base,
        sizeBytes,
        pageSizeBytes: P,
        imagePath: o.image,
        pattern: o.pattern,
        writeFraction: o.writeFraction,
        seed: o.seed,
        opsAfterComplete: o.opsAfterComplete,
        touches:
          o.touches === undefined
            ? null
            : Math.floor(o.touches / o.workers) + (index < o.touches % o.workers ? 1 : 0),
        stamps,
        control: control.buffer as SharedArrayBuffer,
        latencyCapacity: Math.ceil(DEFAULTS.latencyCapacity / o.workers),
        maxMismatches: o.maxMismatches,
      };
      const worker = new Worker(new URL('./worker.js', import.meta.url), {
        workerData: config,
        // Not the parent's --import/--loader hooks (a test runner's TypeScript and coverage
        // loaders cost seconds per worker and serve no purpose for compiled JS).
        execArgv: process.execArgv.filter((a) => a === '--enable-source-maps'),
      });
      let readyResolve!: () => void;
      let doneResolve!: (m: Extract<WorkerMessage, { type: 'done' }>) => void;
      const ready = new Promise<void>((r) => (readyResolve = r));
      const done = new Promise<Extract<WorkerMessage, { type: 'done' }>>((r, reject) => {
        doneResolve = r;
        worker.once('exit', (code) =>
          reject(new VmSimError('VMSIM_WORKER_FAILED', `worker ${index} exited (${code})`)),
        );
      });
      done.catch(() => undefined);
      worker.on('message', (m: WorkerMessage) => {
        if (m.type === 'ready') readyResolve();
        else if (m.type === 'touched') onTouched(m.touches);
        else if (m.type === 'done') doneResolve(m);
        else if (m.type === 'mismatch') {
          onlineCount++;
          if (online.length < o.maxMismatches)
            online.push({ page: m.page, reason: m.reason, worker: m.worker });
        }
      });
      worker.on('error', (err) =>
        workerFailure!(
          new VmSimError('VMSIM_WORKER_FAILED', `worker ${index}: ${err.message}`, { cause: err }),
        ),
      );
      workers.push({ worker, ready, done });
    }
    await Promise.race([Promise.all(workers.map((w) => w.ready)), workerFailed]);

    // --- handoff: replies drive a small state machine ---
    type State = 'handoff' | 'running' | 'complete' | 'touched' | 'failed';
    let state: State = 'handoff';
    let report!: Extract<HandoffReply, { type: 'complete' }>;
    let settle!: { resolve: () => void; reject: (err: Error) => void };
    const finished = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
    finished.catch(() => undefined); // awaited below; this only keeps an early failure handled
    const ended = (): boolean => state === 'complete' || state === 'touched' || state === 'failed';
    const failWith = (err: Error): void => {
      if (ended()) return;
      state = 'failed';
      settle.reject(err);
    };
    if (endAfterTouches) {
      onAllTouched = () => {
        if (state !== 'running') return;
        state = 'touched';
        o.onPhaseEnd?.('touched');
        settle.resolve();
      };
    }
    // Every handoff attempt gets its own sink; events from a superseded attempt (a dead
    // daemon's connection) are ignored. `acked`: the current attempt's daemon acked.
    let attempt = 0;
    let acked = false;
    let resumes = 0;
    /** When the connection was lost with no ack since (the resume deadline runs from there). */
    let lostAt: number | undefined;
    let backoffTimer: NodeJS.Timeout | undefined;
    let backoffWake = (): void => undefined;
    const makeSink = (serial: number): HandoffSink => ({
      reply(r) {
        if (ended() || serial !== attempt) return;
        switch (r.type) {
          case 'ack':
            if (acked) return failWith(new VmSimError('VMSIM_PROTOCOL', 'a second ack'));
            if (r.totalPages !== totalPages) {
              return failWith(
                new VmSimError(
                  'VMSIM_PROTOCOL',
                  `ack for ${r.totalPages} pages, the guest has ${totalPages}`,
                ),
              );
            }
            acked = true;
            lostAt = undefined;
            if (serial > 1) resumes++; // a restarted daemon took the resumed handoff
            if (state === 'running') return; // the workers never stopped
            state = 'running';
            goAt = performance.now();
            Atomics.store(control, CONTROL_GO, 1);
            Atomics.notify(control, CONTROL_GO);
            return;
          case 'progress':
            if (!acked) return failWith(new VmSimError('VMSIM_PROTOCOL', 'progress before ack'));
            o.onProgress?.({ presentPages: r.presentPages, totalPages: r.totalPages });
            return;
          case 'complete':
            if (!acked) return failWith(new VmSimError('VMSIM_PROTOCOL', 'complete before ack'));
            state = 'complete';
            report = r;
            o.onPhaseEnd?.('complete');
            o.onProgress?.({ presentPages: r.totalPages, totalPages: r.totalPages });
            settle.resolve();
            return;
          case 'error':
            return failWith(new VmSimError(r.code, `daemon error ${r.code}: ${r.message}`));
        }
      },
      closed(err) {
        if (ended() || serial !== attempt) return;
        const why = `the daemon closed the handoff connection before complete${err ? `: ${err.message}` : ''}`;
        if (!o.resumeOnDaemonDeath) {
          return failWith(new VmSimError('VMSIM_CLOSED', why, { cause: err }));
        }
        resuming = resume(why);
      },
    });

    /**
     * The daemon is gone: keep the uffd (faulting threads stay blocked in the kernel) and hand it
     * over again, with `resume: true`, to whichever daemon listens next on the same path.
     */
    const resume = async (why: string): Promise<void> => {
      const serial = ++attempt;
      acked = false;
      lostAt ??= performance.now();
      const limitMs = o.resumeOnDaemonDeath!.timeoutMs;
      const deadline = lostAt + limitMs;
      const old = session;
      session = undefined;
      old?.close();
      let last: string;
      for (let delayMs = RESUME_BACKOFF_FIRST_MS; ;) {
        if (ended() || serial !== attempt) return;
        try {
          const s = await handoff({ ...request, resume: true }, uffdFd, makeSink(serial));
          if (ended() || serial !== attempt) s.close();
          else session = s;
          return;
        } catch (err) {
          if (!isRetryableHandoffError(err)) {
            return failWith(
              err instanceof Error ? err : new VmSimError('VMSIM_HANDOFF_FAILED', String(err)),
            );
          }
          last = (err as Error).message;
        }
        const leftMs = deadline - performance.now();
        if (leftMs <= 0) {
          return failWith(
            new VmSimError(
              'VMSIM_RESUME_TIMEOUT',
              `no daemon took the resumed handoff within ${limitMs} ms (${why}); last: ${last}`,
            ),
          );
        }
        await new Promise<void>((r) => {
          backoffWake = r;
          backoffTimer = setTimeout(r, Math.min(delayMs, leftMs));
        });
        backoffTimer = undefined;
        delayMs = Math.min(delayMs * 2, RESUME_BACKOFF_MAX_MS);
      }
    };
    stopBackoff = () => {
      if (backoffTimer) clearTimeout(backoffTimer);
      backoffTimer = undefined;
      backoffWake();
    };
    workerFailed.catch(failWith);
    if (o.timeoutMs && o.timeoutMs > 0) {
      timer = setTimeout(
        () => failWith(new VmSimError('VMSIM_TIMEOUT', `not complete after ${o.timeoutMs} ms`)),
        o.timeoutMs,
      );
    }

    const onAbort = (): void =>
      failWith(new VmSimError('VMSIM_ABORTED', `aborted: ${String(o.signal?.reason ?? '')}`));
    if (o.signal?.aborted) onAbort();
    o.signal?.addEventListener('abort', onAbort, { once: true });
    abortCleanup = () => o.signal?.removeEventListener('abort', onAbort);

    const request: HandoffRequest = {
      type: 'handoff',
      version: HANDOFF_VERSION,
      migrationId: o.migrationId,
      source: o.source,
      regions: singleHandoffRegion(base, sizeBytes),
    };
    const started = performance.now();
    const startedAtMs = Date.now();
    const first = await handoff(request, uffdFd, makeSink(++attempt));
    // A connection lost before this line already started a resume, which owns the session.
    if (attempt === 1) session = first;
    else first.close();
    await finished;
    const elapsedMs = performance.now() - started;
    if (timer) clearTimeout(timer);
    const partial = (state as State) === 'touched';

    // --- complete: residency first (never block on a page the daemon did not place) ---
    // Ended after the touch phase: unregister first, so the daemon can place nothing more and
    // residency is final; the workers are all waiting, none is blocked on a fault.
    if (partial) release();
    const residency = new Uint8Array(totalPages);
    mincore(base, sizeBytes, residency);
    let missingPages = 0;
    for (let i = 0; i < totalPages; i++) if ((residency[i]! & 1) === 0) missingPages++;
    if (missingPages > 0) release();
    if (partial) Atomics.store(control, CONTROL_STOP, 1);
    else Atomics.store(control, CONTROL_PHASE, PHASE_COMPLETE);
    const results = await Promise.race([Promise.all(workers.map((w) => w.done)), workerFailed]);
    release();

    // --- final verification, 4 MiB at a time ---
    const verifyStart = performance.now();
    const verify = verifyPages(
      base,
      sizeBytes,
      o.image,
      new Uint32Array(stamps),
      residency,
      partial,
      o,
    );
    const verifyMs = performance.now() - verifyStart;

    const perWorker = results.map((r) => r.stats);
    const sum = (k: keyof WorkerStats): number => perWorker.reduce((n, s) => n + s[k], 0);
    const latency = summarize(
      results.map((r) => r.latencies),
      results.reduce((n, r) => n + r.latencyCount, 0),
      results.reduce((n, r) => Math.max(n, r.latencyMaxUs), 0),
    );
    const mismatches = [...verify.mismatches, ...online].slice(0, o.maxMismatches);
    return {
      totalPages,
      pagesVerified: verify.verified,
      mismatches,
      mismatchCount: verify.count + onlineCount,
      missingPages,
      writtenPages: verify.writtenPages,
      faultLatencyUs: latency,
      elapsedMs: Math.round(elapsedMs),
      verifyMs: Math.round(verifyMs),
      partial,
      ...(partial ? {} : { daemonReport: report }),
      presentPages: totalPages - missingPages,
      startedAtMs,
      ...(touchPhaseMs === undefined ? {} : { touchPhaseMs }),
      resumes,
      workload: {
        ops: sum('ops'),
        reads: sum('reads'),
        writes: sum('writes'),
        firstTouches: sum('firstTouches'),
        faults: sum('faults'),
        prePlaced: sum('prePlaced'),
        perWorker,
      },
    };
  } finally {
    if (timer) clearTimeout(timer);
    abortCleanup();
    stopBackoff();
    // A handoff still connecting would send the uffd's number after we close it.
    await resuming;
    if (uffdFd >= 0) release();
    await stopWorkers();
    session?.close();
    if (uffdFd >= 0) sys.close(uffdFd);
    sys.munmap(base, sizeBytes);
  }
}

function stripUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

/**
 * Compares every page of guest RAM with the image (and the stamps). RAM must be unregistered.
 * `partial` (a run ended before complete): pages never placed are skipped, not mismatches.
 */
function verifyPages(
  base: number,
  sizeBytes: number,
  imagePath: string,
  stamps: Uint32Array,
  residency: Uint8Array,
  partial: boolean,
  o: { maxMismatches: number },
): { verified: number; count: number; writtenPages: number; mismatches: Mismatch[] } {
  const P = IMAGE_PAGE_SIZE_BYTES;
  const totalPages = sizeBytes / P;
  const chunkPages = 1024;
  const mem = Buffer.alloc(chunkPages * P);
  const img = Buffer.alloc(chunkPages * P);
  const stamp = Buffer.alloc(STAMP_BYTES);
  const mismatches: Mismatch[] = [];
  let verified = 0;
  let count = 0;
  let writtenPages = 0;
  const note = (page: number, reason: string): void => {
    count++;
    if (mismatches.length < o.maxMismatches) mismatches.push({ page, reason });
  };
  const fd = fs.openSync(imagePath, 'r');
  try {
    for (let first = 0; first < totalPages; first += chunkPages) {
      const pages = Math.min(chunkPages, totalPages - first);
      const len = pages * P;
      sys.readMemory(base + first * P, mem, len);
      let got = 0;
      while (got < len) {
        const n = fs.readSync(fd, img, got, len - got, first * P + got);
        if (n === 0) throw new VmSimError('VMSIM_IMAGE', `image shorter than ${sizeBytes} bytes`);
        got += n;
      }
      for (let i = 0; i < pages; i++) {
        const page = first + i;
        const m = mem.subarray(i * P, (i + 1) * P);
        const e = img.subarray(i * P, (i + 1) * P);
        const version = stamps[page]!;
        if (version) {
          writtenPages++;
          writeStamp(stamp, 0, page, version);
        }
        if ((residency[page]! & 1) === 0) {
          if (!partial) note(page, 'missing: never placed by the daemon');
          continue;
        }
        const headOk = version
          ? m.subarray(0, STAMP_BYTES).equals(stamp)
          : m.subarray(0, STAMP_BYTES).equals(e.subarray(0, STAMP_BYTES));
        if (headOk && m.subarray(STAMP_BYTES).equals(e.subarray(STAMP_BYTES))) {
          verified++;
          continue;
        }
        const want = version ? Buffer.concat([stamp, e.subarray(STAMP_BYTES)]) : e;
        let at = 0;
        while (at < P && m[at] === want[at]) at++;
        note(
          page,
          `differs at byte ${at}: 0x${m[at]!.toString(16)}, expected 0x${want[at]!.toString(16)}` +
            (version ? ` (stamp v${version})` : ''),
        );
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return { verified, count, writtenPages, mismatches };
}

// --- CLI ---

const USAGE = `usage: vm-sim --image <path> --source <ws-url> --socket <path> --id <migration-id> [options]

The reference VMM: maps guest RAM, hands its userfaultfd to \`yabusame dest\`, runs a workload on
worker threads while pages arrive, then verifies every page against the image.

  --image <path>     memory image the source serves (the oracle)
  --size <n>         guest RAM size (e.g. 256M); default the image size
  --source <url>     ws URL of \`yabusame source\`
  --socket <path>    UNIX socket of \`yabusame dest\`
  --id <id>          migration id
  --workers <n>      workload threads (default 4; 0: no workload, background only)
  --touches <n>      touch phase: first-touch n distinct pages in all, then wait for complete
  --pattern <p>      mixed | sequential | random | hotset (default mixed)
  --write-fraction <f>  share of writes (default 0.2)
  --ops-after-complete <n>  operations per worker after complete (default 1000)
  --seed <n>         workload seed (default 1)
  --timeout <s>      fail if not complete after this many seconds (default: none)
  --resume-timeout <ms>  survive the daemon's death: if the handoff connection is lost before
                     complete, hand the uffd over again (resume) to the daemon restarted on the
                     same socket, waiting up to this long for it (default: a loss fails the run)
  --json             print the result as JSON on stdout
  -h, --help         this text

exit status: 0 every page verified, 1 mismatch, 2 usage, handoff or migration error
`;

async function main(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseArgs({
      args: argv,
      options: {
        image: { type: 'string' },
        size: { type: 'string' },
        source: { type: 'string' },
        socket: { type: 'string' },
        id: { type: 'string' },
        workers: { type: 'string' },
        touches: { type: 'string' },
        pattern: { type: 'string' },
        'write-fraction': { type: 'string' },
        'ops-after-complete': { type: 'string' },
        seed: { type: 'string' },
        timeout: { type: 'string' },
        'resume-timeout': { type: 'string' },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }).values;
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const missing = (['image', 'source', 'socket', 'id'] as const).filter((k) => !args[k]);
  if (missing.length) {
    process.stderr.write(`missing ${missing.map((k) => `--${k}`).join(', ')}\n${USAGE}`);
    return 2;
  }
  const num = (s: string | undefined): number | undefined =>
    s === undefined ? undefined : Number(s);
  const tty = process.stderr.isTTY;
  let lastPct = -1;
  let result: VmSimResult;
  try {
    result = await runVmSim({
      image: args.image!,
      sizeBytes: args.size ? parseSize(args.size) : undefined,
      source: args.source!,
      destSocket: args.socket!,
      migrationId: args.id!,
      workers: num(args.workers),
      touches: num(args.touches),
      pattern: args.pattern as Pattern | undefined,
      writeFraction: num(args['write-fraction']),
      opsAfterComplete: num(args['ops-after-complete']),
      seed: num(args.seed),
      timeoutMs: args.timeout ? Number(args.timeout) * 1000 : undefined,
      resumeOnDaemonDeath:
        args['resume-timeout'] === undefined
          ? undefined
          : { timeoutMs: Number(args['resume-timeout']) },
      onProgress: ({ presentPages, totalPages }) => {
        const pct = Math.floor((100 * presentPages) / totalPages);
        if (pct === lastPct) return;
        lastPct = pct;
        const text = `vm-sim: ${presentPages}/${totalPages} pages present (${pct}%)`;
        process.stderr.write(tty ? `\r${text}` : `${text}\n`);
      },
    });
  } catch (err) {
    if (tty && lastPct >= 0) process.stderr.write('\n');
    const code = (err as { code?: string }).code ?? 'VMSIM_FAILED';
    process.stderr.write(`vm-sim: ${code}: ${(err as Error).message}\n`);
    return 2;
  }
  if (tty) process.stderr.write('\n');
  const ok = result.mismatchCount === 0 && result.pagesVerified === result.totalPages;
  if (args.json) {
    const { perWorker: _perWorker, ...workload } = result.workload;
    process.stdout.write(`${JSON.stringify({ ok, ...result, workload })}\n`);
  } else {
    const l = result.faultLatencyUs;
    process.stdout.write(
      `${ok ? 'OK' : 'MISMATCH'}: ${result.pagesVerified}/${result.totalPages} pages verified, ` +
        `${result.mismatchCount} mismatches, ${result.writtenPages} pages written; ` +
        `migration ${result.elapsedMs} ms, verify ${result.verifyMs} ms; faults ${l.count} ` +
        `p50 ${l.p50} µs p99 ${l.p99} µs p99.9 ${l.p999} µs max ${l.max} µs\n`,
    );
    for (const m of result.mismatches.slice(0, 20)) {
      process.stdout.write(`  page ${m.page}: ${m.reason}\n`);
    }
  }
  return ok ? 0 : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then((code) => (process.exitCode = code));
}
