/**
 * What the QEMU scripts measure in a migration of the test guest, shared by baseline.ts (QEMU's
 * own post-copy) and try-yabusame.ts: QMP event times, the guest's view (its slowest batch after
 * the destination resumed, its error count), and per-fault latencies from QEMU's trace log.
 */
import * as fs from 'node:fs';
import type { QmpClient, QmpEvent } from '../../daemon/qemu/qmp.js';
import { parseBatch, type BatchLine, type SerialLine } from './qemu.js';

/** The p-th percentile (0..100) by nearest rank; NaN for no values. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * s.length);
  return s[Math.min(s.length - 1, Math.max(0, rank - 1))]!;
}

/** Every QMP event of one connection, kept from the moment this is called. */
export class EventLog {
  readonly events: QmpEvent[] = [];
  constructor(qmp: QmpClient) {
    qmp.on('event', (ev) => this.events.push(ev));
  }
  /** The first event named `name` (and whose data matches `data`, if given). */
  find(name: string, data?: Record<string, unknown>): QmpEvent | undefined {
    return this.events.find(
      (e) => e.event === name && Object.entries(data ?? {}).every(([k, v]) => e.data[k] === v),
    );
  }
}

/** One event of QEMU's `log` trace backend with `-msg timestamp=on`. */
export interface TraceEvent {
  /** The thread that raised it (Linux tid). */
  tid: number;
  /** Host wall clock, ms. */
  atMs: number;
  name: string;
  /** The rest of the line: the event's formatted arguments. */
  args: string;
}

// "<tid>@<seconds>.<microseconds>:<event> <args>", e.g.
// 1234@1764433595.123456:postcopy_place_page host=0x7f3a1c000000
const TRACE_RE = /^(\d+)@(\d+)\.(\d{6}):(\w+) ?(.*)$/;

export function parseTrace(path: string): TraceEvent[] {
  if (!fs.existsSync(path)) return [];
  const out: TraceEvent[] = [];
  for (const line of fs.readFileSync(path, 'utf8').split('\n')) {
    const m = TRACE_RE.exec(line);
    if (!m) continue;
    out.push({
      tid: Number(m[1]),
      atMs: Number(m[2]) * 1000 + Number(m[3]) / 1000,
      name: m[4]!,
      args: m[5]!,
    });
  }
  return out;
}

/** The value of `key=` in a trace event's arguments (`key=0x1f` → 31), or undefined. */
export function traceArg(ev: TraceEvent, key: string): number | undefined {
  const m = new RegExp(`\\b${key}=(0x[0-9a-fA-F]+|\\d+)`).exec(ev.args);
  if (!m) return undefined;
  return Number(m[1]);
}

export interface FaultLatencies {
  /** Fault requests seen (page requests raised by the fault thread). */
  faults: number;
  /** Requests matched with the placement of their page. */
  matched: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** Faulting threads by tid, with the number of faults each raised. */
  byThread: Record<string, number>;
}

/**
 * Per-fault latency of QEMU's own post-copy, from its destination's trace: the fault thread's
 * `postcopy_ram_fault_thread_request` (the host address and the faulting thread's tid) to the
 * first `postcopy_place_page`/`postcopy_place_page_zero` of that page after it. It is the time a
 * faulting thread waited minus the fault thread's own wake-up (a few µs).
 */
export function qemuFaultLatencies(
  trace: TraceEvent[],
  pageSizeBytes = 4096,
  threadName: (tid: number) => string = String,
): FaultLatencies {
  const waiting = new Map<number, number[]>();
  const latencies: number[] = [];
  const byThread: Record<string, number> = {};
  let faults = 0;
  const page = (addr: number): number => Math.floor(addr / pageSizeBytes);
  for (const ev of trace) {
    if (ev.name === 'postcopy_ram_fault_thread_request') {
      const hva = traceArg(ev, 'HVA');
      if (hva === undefined) continue;
      faults++;
      const who = threadName(traceArg(ev, 'pid') ?? ev.tid);
      byThread[who] = (byThread[who] ?? 0) + 1;
      const list = waiting.get(page(hva)) ?? [];
      list.push(ev.atMs);
      waiting.set(page(hva), list);
    } else if (ev.name === 'postcopy_place_page' || ev.name === 'postcopy_place_page_zero') {
      const host = traceArg(ev, 'host');
      if (host === undefined) continue;
      const list = waiting.get(page(host));
      if (!list) continue;
      waiting.delete(page(host));
      for (const t of list) latencies.push(ev.atMs - t);
    }
  }
  return {
    faults,
    matched: latencies.length,
    p50Ms: percentile(latencies, 50),
    p99Ms: percentile(latencies, 99),
    maxMs: latencies.length ? Math.max(...latencies) : NaN,
    byThread,
  };
}

export interface RequestLatencies {
  /** Page requests QEMU sent to its source (`postcopy_page_req_add`). */
  requests: number;
  matched: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

/**
 * Latency of the page requests QEMU's destination actually sent to its source: from
 * `postcopy_page_req_add` (the page was not received yet and is now asked for) to
 * `postcopy_page_req_del` (its placement). Faults on a page already on its way are not requests.
 */
export function qemuRequestLatencies(trace: TraceEvent[]): RequestLatencies {
  const added = new Map<string, number>();
  const latencies: number[] = [];
  let requests = 0;
  // Both print the page's host address first: "new page req 0x7f73466a3000 total 1",
  // "resolved page req 0x7f73466a3000 total 1".
  const addr = (ev: TraceEvent): string | undefined => /0x[0-9a-fA-F]+/.exec(ev.args)?.[0];
  for (const ev of trace) {
    if (ev.name === 'postcopy_page_req_add') {
      const a = addr(ev);
      if (a === undefined) continue;
      requests++;
      if (!added.has(a)) added.set(a, ev.atMs);
    } else if (ev.name === 'postcopy_page_req_del') {
      const a = addr(ev);
      const t = a === undefined ? undefined : added.get(a);
      if (t === undefined) continue;
      added.delete(a!);
      latencies.push(ev.atMs - t);
    }
  }
  return {
    requests,
    matched: latencies.length,
    p50Ms: percentile(latencies, 50),
    p99Ms: percentile(latencies, 99),
    maxMs: latencies.length ? Math.max(...latencies) : NaN,
  };
}

/** Linux thread names of a process (`/proc/PID/task/TID/comm`), by tid. */
export function threadNames(pid: number): Map<number, string> {
  const names = new Map<number, string>();
  try {
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      try {
        names.set(Number(tid), fs.readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim());
      } catch {
        // The thread ended between the listing and the read.
      }
    }
  } catch {
    // The process is gone.
  }
  return names;
}

export interface GuestView {
  /** Workload lines the destination printed after it resumed, up to the end of the window. */
  batches: number;
  /** The slowest batch the destination reported (`batch_ms`): the stall the guest felt. */
  maxBatchMs: number;
  /** The first batch after resume, ms (it holds the first faults). */
  firstBatchMs: number;
  /** The workload's cumulative error count in its last line. */
  errors: number;
  /** MISMATCH lines (page named) anywhere on either console. */
  mismatchLines: string[];
}

/** A guest's console: a Qemu's serial lines, or a LogTail of a QEMU's log file. */
export interface Console {
  readonly lines: readonly SerialLine[];
}

export function guestView(src: Console, dst: Console): GuestView {
  const after = dst.lines.map(parseBatch).filter((b): b is BatchLine => b !== null);
  const mismatch = (lines: readonly SerialLine[]): string[] =>
    lines.filter((l) => l.text.includes('MISMATCH')).map((l) => l.text);
  return {
    batches: after.length,
    maxBatchMs: after.length ? Math.max(...after.map((b) => b.batchMs)) : NaN,
    firstBatchMs: after[0]?.batchMs ?? NaN,
    errors: after.at(-1)?.errors ?? NaN,
    mismatchLines: [...mismatch(src.lines), ...mismatch(dst.lines)],
  };
}
