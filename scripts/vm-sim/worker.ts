/**
 * vm-sim workload thread: plays a guest vCPU. Guest memory is touched only through
 * sys.readMemory / sys.writeMemory (a memcpy through koffi), so a first touch of a missing page
 * faults in *this* thread and blocks until the daemon places the page, exactly like a vCPU.
 *
 * Worker w only touches pages with `page % workers === w`, so no two workers race on a page and
 * each one knows the exact expected content of its pages: the image page, with this worker's
 * last 16-byte stamp at offset 0 if it ever wrote the page. Reads are checked online; writes are
 * recorded in the shared `stamps` array for the final verification in the main thread.
 *
 * With a touch budget (`cfg.touches`), the worker first performs exactly that many first touches
 * of distinct pages, reports `touched`, and waits for `complete` before any other operation.
 */
import * as fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import * as sys from '../../daemon/linux/sys.js';
import { mincore } from '../../daemon/linux/vmm-extra.js';
import { Prng } from '../image/gen-image.js';
import {
  CONTROL_GO,
  CONTROL_PHASE,
  CONTROL_STOP,
  PHASE_COMPLETE,
  STAMP_BYTES,
  type WorkerConfig,
  type WorkerMessage,
  type WorkerStats,
  writeStamp,
} from './shared.js';

const cfg = workerData as WorkerConfig;
const port = parentPort!;
const post = (m: WorkerMessage, transfer?: ArrayBuffer[]): void => port.postMessage(m, transfer);

const P = cfg.pageSizeBytes;
const totalPages = cfg.sizeBytes / P;
/** Pages this worker owns: index, index + workers, ... */
const ownPages = Math.max(0, Math.ceil((totalPages - cfg.index) / cfg.workers));
const stamps = new Uint32Array(cfg.stamps);
const control = new Int32Array(cfg.control);
const rng = new Prng((cfg.seed * 0x9e3779b1 + cfg.index * 0x85ebca6b) >>> 0);

const touched = new Uint8Array(ownPages);
const hotCount = Math.max(1, Math.floor(ownPages / 10));
const hotStart = rng.below(Math.max(1, ownPages));
let sweep = 0;

/** Bounded uniform sample of fault latencies, microseconds (reservoir sampling, Algorithm R). */
const latencies = new Float64Array(cfg.latencyCapacity);
let latencyCount = 0;
let latencyMaxUs = 0;

function recordFault(us: number): void {
  if (us > latencyMaxUs) latencyMaxUs = us;
  if (latencyCount < latencies.length) latencies[latencyCount] = us;
  else {
    const j = rng.below(latencyCount + 1);
    if (j < latencies.length) latencies[j] = us;
  }
  latencyCount++;
}

function nextLocal(): number {
  let kind = cfg.pattern;
  if (kind === 'mixed') {
    const r = rng.float();
    kind = r < 0.34 ? 'sequential' : r < 0.67 ? 'random' : 'hotset';
  }
  switch (kind) {
    case 'sequential': {
      const i = sweep;
      sweep = sweep + 1 === ownPages ? 0 : sweep + 1;
      return i;
    }
    case 'hotset':
      // 80% of accesses go to a contiguous 10% of this worker's pages.
      if (rng.float() < 0.8) return (hotStart + rng.below(hotCount)) % ownPages;
      return rng.below(ownPages);
    default:
      return rng.below(ownPages);
  }
}

const image = fs.openSync(cfg.imagePath, 'r');
const pageBuf = Buffer.alloc(P);
const expected = Buffer.alloc(P);
const stamp = Buffer.alloc(STAMP_BYTES);
const residency = new Uint8Array(1);
const reported = new Set<number>();
const stats: WorkerStats = {
  worker: cfg.index,
  ops: 0,
  reads: 0,
  writes: 0,
  firstTouches: 0,
  faults: 0,
  prePlaced: 0,
  mismatches: 0,
  opsAfterComplete: 0,
};

function readImagePage(page: number, into: Buffer): void {
  let got = 0;
  while (got < P) {
    const n = fs.readSync(image, into, got, P - got, page * P + got);
    if (n === 0) {
      into.fill(0, got);
      break;
    }
    got += n;
  }
}

function firstDifference(a: Buffer, b: Buffer): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

function checkRead(page: number): void {
  readImagePage(page, expected);
  const version = Atomics.load(stamps, page);
  if (version !== 0) writeStamp(expected, 0, page, version);
  if (pageBuf.equals(expected)) return;
  stats.mismatches++;
  if (reported.has(page) || reported.size >= cfg.maxMismatches) return;
  reported.add(page);
  const at = firstDifference(pageBuf, expected);
  post({
    type: 'mismatch',
    worker: cfg.index,
    page,
    reason:
      `read by worker ${cfg.index}: byte ${at} is 0x${pageBuf[at]!.toString(16)}, ` +
      `expected 0x${expected[at]!.toString(16)}${version ? ` (stamp v${version})` : ''}`,
  });
}

function step(): void {
  access(nextLocal());
}

/** One operation (a read or a stamp write) on this worker's page `local`. */
function access(local: number): void {
  const page = cfg.index + local * cfg.workers;
  const addr = cfg.base + page * P;
  const first = touched[local] === 0;
  let willFault = false;
  if (first) {
    // mincore never faults: it tells whether this access will block on the uffd, so only real
    // faults (not pages the background stream already placed) land in the latency sample.
    mincore(addr, P, residency);
    willFault = (residency[0]! & 1) === 0;
  }
  const isWrite = rng.float() < cfg.writeFraction;
  const t0 = performance.now();
  if (isWrite) {
    const version = stamps[page]! + 1;
    writeStamp(stamp, 0, page, version);
    sys.writeMemory(addr, stamp);
    Atomics.store(stamps, page, version);
  } else {
    sys.readMemory(addr, pageBuf);
  }
  const us = (performance.now() - t0) * 1000;
  if (first) {
    touched[local] = 1;
    stats.firstTouches++;
    if (willFault) {
      stats.faults++;
      recordFault(us);
    } else stats.prePlaced++;
  }
  if (isWrite) stats.writes++;
  else {
    stats.reads++;
    checkRead(page);
  }
  stats.ops++;
}

const stopped = (): boolean => Atomics.load(control, CONTROL_STOP) !== 0;
const complete = (): boolean => Atomics.load(control, CONTROL_PHASE) === PHASE_COMPLETE;

/**
 * First-touches `budget` distinct pages of this worker (a partial Fisher-Yates shuffle, or in
 * order for the sequential pattern), stopping early at `complete` or stop; reports `touched`,
 * then waits for `complete` or stop.
 */
function touchPhase(budget: number): void {
  const n = Math.min(budget, ownPages);
  const order = cfg.pattern === 'sequential' ? null : new Int32Array(ownPages);
  if (order) for (let i = 0; i < ownPages; i++) order[i] = i;
  let done = 0;
  for (; done < n && !stopped() && !complete(); done++) {
    let local = done;
    if (order) {
      const j = done + rng.below(ownPages - done);
      local = order[j]!;
      order[j] = order[done]!;
      order[done] = local;
    }
    access(local);
  }
  post({ type: 'touched', worker: cfg.index, touches: done });
  while (!stopped() && !complete()) Atomics.wait(control, CONTROL_PHASE, 0, 20);
}

function run(): void {
  post({ type: 'ready', worker: cfg.index });
  while (Atomics.load(control, CONTROL_GO) === 0) Atomics.wait(control, CONTROL_GO, 0);
  if (cfg.touches !== null) touchPhase(cfg.touches);
  if (ownPages > 0) {
    while (Atomics.load(control, CONTROL_STOP) === 0) {
      if (Atomics.load(control, CONTROL_PHASE) === PHASE_COMPLETE) {
        if (stats.opsAfterComplete >= cfg.opsAfterComplete) break;
        stats.opsAfterComplete++;
      }
      step();
    }
  }
  fs.closeSync(image);
  const sample = latencies.slice(0, Math.min(latencyCount, latencies.length));
  post({ type: 'done', stats, latencies: sample, latencyCount, latencyMaxUs }, [
    sample.buffer as ArrayBuffer,
  ]);
}

run();
