/**
 * vm-sim's types: its options, its result, and the handoff seam (how the uffd reaches whoever
 * serves its faults).
 */
import type { HandoffReply, HandoffRequest } from '../../protocol/handoff.js';
import { CodedError } from '../../protocol/errors.js';
import type { Pattern, WorkerStats } from './shared.js';

/** vm-sim's boundary error: `code` is the daemon's error code, or a VMSIM_* code. */
export class VmSimError extends CodedError {}

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
  /** The migration's secret (hex), handed to the daemon with the uffd. */
  secret?: string;
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
   * Called at the handoff's ack; the workload starts once the promise resolves (a rejection
   * fails the run). Benchmarks that start many VMMs at once use it to begin every VM's faults
   * together, after all the VMMs' own start-up.
   */
  startGate?: () => Promise<void>;
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
  /**
   * Pages not resident at `complete` that must hold data (or a stamp). Absent zero pages are not
   * missing: the daemon leaves zero pages nobody touched unplaced, and they read as zeros.
   */
  missingPages: number;
  writtenPages: number;
  /** First-touch access time of pages that were missing (faults felt by the guest), µs. */
  faultLatencyUs: LatencySummary;
  /** Handoff sent → `complete` received, ms. */
  elapsedMs: number;
  /** Final verification time, ms. */
  verifyMs: number;
  daemonReport: Extract<HandoffReply, { type: 'complete' }>;
  /** Pages resident when the run ended (absent zero pages are not). */
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
