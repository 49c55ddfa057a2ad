/**
 * What vm-sim's main thread and its workload threads share: the worker configuration, the
 * messages workers post, the control words (an Int32Array over a SharedArrayBuffer), and the
 * 16-byte write stamp.
 */

export type Pattern = 'mixed' | 'sequential' | 'random' | 'hotset';
export const PATTERNS: readonly Pattern[] = ['mixed', 'sequential', 'random', 'hotset'];

/** Index of the control word set to 1 when the workload may start (after the daemon's ack). */
export const CONTROL_GO = 0;
/** Index of the migration phase word: 0 while pages arrive, PHASE_COMPLETE after `complete`. */
export const CONTROL_PHASE = 1;
/** Index of the word set to 1 to stop the workload at once. */
export const CONTROL_STOP = 2;
export const CONTROL_WORDS = 4;
export const PHASE_COMPLETE = 1;

/** Stamp layout at page offset 0: u32 magic, u32 page, u32 version, u32 ~page (little-endian). */
export const STAMP_MAGIC = 0x59425357; // "WSBY" in memory order
export const STAMP_BYTES = 16;

export function writeStamp(buf: Buffer, off: number, page: number, version: number): void {
  buf.writeUInt32LE(STAMP_MAGIC, off);
  buf.writeUInt32LE(page >>> 0, off + 4);
  buf.writeUInt32LE(version >>> 0, off + 8);
  buf.writeUInt32LE(~page >>> 0, off + 12);
}

export interface WorkerConfig {
  index: number;
  workers: number;
  /** Host address of guest RAM in this process. */
  base: number;
  sizeBytes: number;
  pageSizeBytes: number;
  imagePath: string;
  pattern: Pattern;
  /** Share of operations that are writes, 0..1. */
  writeFraction: number;
  seed: number;
  /** Operations each worker performs after the daemon reported `complete`. */
  opsAfterComplete: number;
  /**
   * Touch phase: when not null, the worker first-touches exactly this many distinct pages of its
   * own (random order; in order for `sequential`), as fast as it can, posts `touched`, then waits
   * for `complete` (or stop) before its `opsAfterComplete` operations. null: the ordinary
   * workload (operations until `complete`).
   */
  touches: number | null;
  /** Uint32Array(pages): last stamp version written to each page, 0 = never written. */
  stamps: SharedArrayBuffer;
  /** Int32Array(CONTROL_WORDS). */
  control: SharedArrayBuffer;
  /** Size of the fault-latency reservoir, samples. */
  latencyCapacity: number;
  /** Mismatches a worker reports individually (it still counts the rest). */
  maxMismatches: number;
}

export interface WorkerStats {
  worker: number;
  ops: number;
  reads: number;
  writes: number;
  /** First accesses to a page by this worker. */
  firstTouches: number;
  /** First accesses that found the page missing (they blocked on the uffd). */
  faults: number;
  /** First accesses that found the page already placed (by the background stream). */
  prePlaced: number;
  /** Reads whose content was wrong (counted every time). */
  mismatches: number;
  opsAfterComplete: number;
}

export type WorkerMessage =
  | { type: 'ready'; worker: number }
  /** The touch phase ended: `touches` first touches done (fewer if `complete` or stop came first). */
  | { type: 'touched'; worker: number; touches: number }
  | { type: 'mismatch'; worker: number; page: number; reason: string }
  | {
      type: 'done';
      stats: WorkerStats;
      /** Reservoir sample of fault latencies, microseconds. */
      latencies: Float64Array;
      /** Faults measured in total (the sample holds at most latencyCapacity of them). */
      latencyCount: number;
      latencyMaxUs: number;
    };
