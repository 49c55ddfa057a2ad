/**
 * Which threads of the destination QEMU fault on guest RAM, and when: the kernel's
 * `exceptions:page_fault_user` tracepoint in an ftrace instance of our own, filtered to the
 * handed-over range. The daemon reads the faults from the uffd; this sees them from the side of
 * the faulting threads without touching the uffd. Root only; kernels without tracefs or that
 * event make `start` throw.
 *
 * A thread woken after its page arrived runs the access again, which may fault again: a page can
 * appear more than once. The tracepoint fires on entry, before the uffd wait.
 *
 * Given the threads to watch, it also records their `sched:sched_switch` and `sched:sched_wakeup`
 * events, and `faultWaits` measures each fault the way the faulting thread lived it: from the
 * fault's entry, through its sleep (switched out, state S/D), to its wake-up by whoever placed
 * the page. The same measure for any handler (QEMU's own post-copy or yabusame), unlike each
 * handler's view of its own service time, which starts when it reads the fault.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { join } from 'node:path';
import { nowMs } from './qemu.js';

export interface UserFault {
  /** Host wall clock, ms. */
  atMs: number;
  tid: number;
  comm: string;
  address: number;
  /** x86 page fault error code: bit 1 set = write. */
  errorCode: number;
}

function tracefsRoot(): { root: string; mounted: boolean } {
  for (const p of ['/sys/kernel/tracing', '/sys/kernel/debug/tracing']) {
    if (fs.existsSync(join(p, 'instances'))) return { root: p, mounted: false };
  }
  const dir = fs.mkdtempSync('/tmp/yabusame-tracefs-');
  execFileSync('mount', ['-t', 'tracefs', 'nodev', dir]);
  return { root: dir, mounted: true };
}

// "CPU 0/TCG-12345 [001] ..... 1234.567890: page_fault_user: address=0x7f0000001000 ip=0x55… error_code=0x6"
const LINE_RE =
  /^\s*(.+)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): page_fault_user: address=(0x[0-9a-fA-F]+)\S*\s+ip=\S+\s+error_code=(0x[0-9a-fA-F]+)/;

/** A scheduler event of a watched thread: it went to sleep, or was woken. */
export interface SchedEvent {
  atMs: number;
  tid: number;
  kind: 'sleep' | 'wake';
}

// "... sched_switch: prev_comm=CPU 0/TCG prev_pid=1234 prev_prio=120 prev_state=S ==> next_comm=…"
const SWITCH_RE = /\s([\d.]+): sched_switch: .*?prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==>/;
// "... sched_wakeup: comm=CPU 0/TCG pid=1234 prio=120 target_cpu=001"
const WAKEUP_RE = /\s([\d.]+): sched_wakeup: .*?pid=(\d+) prio=/;

export class UserFaultTrace {
  /** The watched threads' scheduler events (when started with tids). */
  sched: SchedEvent[] = [];

  private constructor(
    private readonly root: string,
    private readonly mounted: boolean,
    private readonly instance: string,
    /** Wall clock minus the trace clock (CLOCK_MONOTONIC), ms. */
    private readonly offsetMs: number,
    private readonly events: string[],
  ) {}

  /**
   * Records user page faults in [base, base + sizeBytes) from now on, and the scheduler events
   * of threads `tids` (if any).
   */
  static start(base: number, sizeBytes: number, tids: number[] = []): UserFaultTrace {
    const { root, mounted } = tracefsRoot();
    const instance = join(root, 'instances', `yabusame-${process.pid}`);
    const events = ['exceptions/page_fault_user'];
    try {
      fs.mkdirSync(instance);
      fs.writeFileSync(join(instance, 'trace_clock'), 'mono');
      fs.writeFileSync(join(instance, 'buffer_size_kb'), '16384');
      const filter = (event: string, f: string): void => {
        fs.writeFileSync(join(instance, 'events', event, 'filter'), f);
        fs.writeFileSync(join(instance, 'events', event, 'enable'), '1');
      };
      const end = base + sizeBytes;
      filter(
        'exceptions/page_fault_user',
        `address >= 0x${base.toString(16)} && address < 0x${end.toString(16)}`,
      );
      if (tids.length > 0) {
        filter('sched/sched_switch', tids.map((t) => `prev_pid == ${t}`).join(' || '));
        filter('sched/sched_wakeup', tids.map((t) => `pid == ${t}`).join(' || '));
        events.push('sched/sched_switch', 'sched/sched_wakeup');
      }
    } catch (err) {
      if (fs.existsSync(instance)) fs.rmdirSync(instance);
      if (mounted) execFileSync('umount', [root]);
      throw err;
    }
    // process.hrtime reads CLOCK_MONOTONIC, the `mono` trace clock.
    const offsetMs = nowMs() - Number(process.hrtime.bigint()) / 1e6;
    return new UserFaultTrace(root, mounted, instance, offsetMs, events);
  }

  /** Stops, returns the faults (and keeps the scheduler events in `sched`), removes the instance. */
  stop(): UserFault[] {
    for (const e of this.events) {
      fs.writeFileSync(join(this.instance, 'events', e, 'enable'), '0');
    }
    const text = fs.readFileSync(join(this.instance, 'trace'), 'utf8');
    fs.rmdirSync(this.instance);
    if (this.mounted) {
      execFileSync('umount', [this.root]);
      fs.rmdirSync(this.root);
    }
    const out: UserFault[] = [];
    for (const line of text.split('\n')) {
      const sw = SWITCH_RE.exec(line);
      if (sw) {
        // Only a sleep matters (S, D, …); a preempted thread (R, R+) is still runnable.
        if (!sw[3]!.startsWith('R')) {
          this.sched.push({
            atMs: Number(sw[1]) * 1000 + this.offsetMs,
            tid: Number(sw[2]),
            kind: 'sleep',
          });
        }
        continue;
      }
      const wk = WAKEUP_RE.exec(line);
      if (wk) {
        this.sched.push({
          atMs: Number(wk[1]) * 1000 + this.offsetMs,
          tid: Number(wk[2]),
          kind: 'wake',
        });
        continue;
      }
      const m = LINE_RE.exec(line);
      if (!m) continue;
      out.push({
        comm: m[1]!.trim(),
        tid: Number(m[2]),
        atMs: Number(m[3]) * 1000 + this.offsetMs,
        address: Number(m[4]),
        errorCode: Number(m[5]),
      });
    }
    return out;
  }
}

export interface FaultSummary {
  faults: number;
  distinctPages: number;
  /** Per thread name: faults, distinct pages, first and last fault relative to `zeroMs`. */
  byThread: Record<string, { faults: number; pages: number; firstMs: number; lastMs: number }>;
  /** Faults before `resumeMs` (while the destination had not resumed yet). */
  beforeResume: { comm: string; offset: number; atMs: number }[];
}

/** Summarises faults: times relative to `zeroMs` (the source's STOP), page offsets in the range. */
export function summarizeFaults(
  faults: UserFault[],
  base: number,
  zeroMs: number,
  resumeMs: number,
): FaultSummary {
  const pages = new Set<number>();
  const byThread: FaultSummary['byThread'] = {};
  const pagesBy = new Map<string, Set<number>>();
  for (const f of faults) {
    const page = Math.floor((f.address - base) / 4096);
    pages.add(page);
    const t = (byThread[f.comm] ??= { faults: 0, pages: 0, firstMs: Infinity, lastMs: -Infinity });
    t.faults++;
    t.firstMs = Math.min(t.firstMs, f.atMs - zeroMs);
    t.lastMs = Math.max(t.lastMs, f.atMs - zeroMs);
    const s = pagesBy.get(f.comm) ?? new Set<number>();
    s.add(page);
    pagesBy.set(f.comm, s);
  }
  for (const [comm, s] of pagesBy) byThread[comm]!.pages = s.size;
  return {
    faults: faults.length,
    distinctPages: pages.size,
    byThread,
    beforeResume: faults
      .filter((f) => f.atMs < resumeMs)
      .map((f) => ({
        comm: f.comm,
        offset: Math.floor((f.address - base) / 4096) * 4096,
        atMs: f.atMs - zeroMs,
      })),
  };
}

export interface FaultWaits {
  /** Faults of the watched threads on the range. */
  faults: number;
  /** Those the thread slept on (the handler had to place the page). */
  waited: number;
  /** Fault entry → the thread woken, ms, for the faults it slept on. */
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** The waits, ms, in order (for pooling several runs). */
  waitsMs: number[];
}

/**
 * Each fault as its thread lived it: from the fault's entry to the wake-up that ended the sleep
 * it caused (a fault whose thread never slept before its next fault was resolved without a
 * wait). A thread that faults again on the same page and sleeps again (woken for another reason)
 * is still waiting for that page: the two count as one wait. `from`: only faults at or after this
 * time (e.g. the destination's RESUME).
 */
export function faultWaits(faults: UserFault[], sched: SchedEvent[], from = -Infinity): FaultWaits {
  const tids = new Set(sched.map((e) => e.tid));
  type Ev =
    | { atMs: number; tid: number; kind: 'fault'; page: number }
    | { atMs: number; tid: number; kind: 'sleep' | 'wake' };
  const all: Ev[] = [
    ...faults
      .filter((f) => tids.has(f.tid))
      .map((f) => ({
        atMs: f.atMs,
        tid: f.tid,
        kind: 'fault' as const,
        page: Math.floor(f.address / 4096),
      })),
    ...sched,
  ].sort((a, b) => a.atMs - b.atMs);
  /** Per thread: the fault being waited for (start, page, slept yet, index of its wait if any). */
  const open = new Map<number, { atMs: number; page: number; slept: boolean; index: number }>();
  const waits: number[] = [];
  let n = 0;
  for (const e of all) {
    const o = open.get(e.tid);
    if (e.kind === 'fault') {
      if (e.atMs < from) {
        open.delete(e.tid);
        continue;
      }
      if (o && o.page === e.page && o.index >= 0) {
        // The same page again after a wake: a continuation if it sleeps again.
        open.set(e.tid, { ...o, slept: false });
        continue;
      }
      n++;
      open.set(e.tid, { atMs: e.atMs, page: e.page, slept: false, index: -1 });
    } else if (e.kind === 'sleep') {
      if (o) o.slept = true;
    } else if (o?.slept) {
      if (o.index >= 0) waits[o.index] = e.atMs - o.atMs;
      else o.index = waits.push(e.atMs - o.atMs) - 1;
      o.slept = false;
    }
  }
  const sorted = [...waits].sort((a, b) => a - b);
  const q = (p: number): number =>
    sorted.length
      ? sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!
      : NaN;
  return {
    faults: n,
    waited: waits.length,
    p50Ms: q(50),
    p99Ms: q(99),
    maxMs: sorted.at(-1) ?? NaN,
    waitsMs: waits,
  };
}

/** Where a process maps `path` (its first mapping of it): the RAM of a QEMU, from its maps. */
export function mappingOf(pid: number, path: string): { base: number; sizeBytes: number } | null {
  const real = fs.realpathSync(path);
  for (const line of fs.readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s+(.*)$/.exec(line);
    if (m && (m[3] === real || m[3] === path)) {
      const base = parseInt(m[1]!, 16);
      return { base, sizeBytes: parseInt(m[2]!, 16) - base };
    }
  }
  return null;
}

/** The threads of a process, by tid. */
export function threadsOf(pid: number): number[] {
  return fs.readdirSync(`/proc/${pid}/task`).map(Number);
}
