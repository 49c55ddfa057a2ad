/**
 * Which threads of the destination QEMU fault on guest RAM, and when: the kernel's
 * `exceptions:page_fault_user` tracepoint in an ftrace instance of our own, filtered to the
 * handed-over range. The daemon reads the faults from the uffd; this sees them from the side of
 * the faulting threads without touching the uffd. Root only; kernels without tracefs or that
 * event make `start` throw.
 *
 * A thread woken after its page arrived runs the access again, which may fault again: a page can
 * appear more than once. The tracepoint fires on entry, before the uffd wait.
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

export class UserFaultTrace {
  private constructor(
    private readonly root: string,
    private readonly mounted: boolean,
    private readonly instance: string,
    /** Wall clock minus the trace clock (CLOCK_MONOTONIC), ms. */
    private readonly offsetMs: number,
  ) {}

  /** Records user page faults in [base, base + sizeBytes) from now on. */
  static start(base: number, sizeBytes: number): UserFaultTrace {
    const { root, mounted } = tracefsRoot();
    const instance = join(root, 'instances', `yabusame-${process.pid}`);
    try {
      fs.mkdirSync(instance);
      fs.writeFileSync(join(instance, 'trace_clock'), 'mono');
      fs.writeFileSync(join(instance, 'buffer_size_kb'), '16384');
      const ev = join(instance, 'events', 'exceptions', 'page_fault_user');
      const end = base + sizeBytes;
      fs.writeFileSync(
        join(ev, 'filter'),
        `address >= 0x${base.toString(16)} && address < 0x${end.toString(16)}`,
      );
      fs.writeFileSync(join(ev, 'enable'), '1');
    } catch (err) {
      if (fs.existsSync(instance)) fs.rmdirSync(instance);
      if (mounted) execFileSync('umount', [root]);
      throw err;
    }
    // process.hrtime reads CLOCK_MONOTONIC, the `mono` trace clock.
    const offsetMs = nowMs() - Number(process.hrtime.bigint()) / 1e6;
    return new UserFaultTrace(root, mounted, instance, offsetMs);
  }

  /** Stops, returns the faults and removes the instance. */
  stop(): UserFault[] {
    const ev = join(this.instance, 'events', 'exceptions', 'page_fault_user');
    fs.writeFileSync(join(ev, 'enable'), '0');
    const text = fs.readFileSync(join(this.instance, 'trace'), 'utf8');
    fs.rmdirSync(this.instance);
    if (this.mounted) {
      execFileSync('umount', [this.root]);
      fs.rmdirSync(this.root);
    }
    const out: UserFault[] = [];
    for (const line of text.split('\n')) {
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
