/**
 * Process counters from /proc: CPU time (utime + stime) of a process or one of its threads, and
 * peak resident set size (VmHWM). Linux only, like the rest of yabusame.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

let ticks: number | undefined;

/** Clock ticks per second of /proc/<pid>/stat times (getconf CLK_TCK, normally 100). */
export function clockTicks(): number {
  if (ticks === undefined) {
    try {
      ticks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticks = 100;
    }
  }
  return ticks;
}

/**
 * CPU seconds (user + system) used so far by process `pid` (all its threads), or by its thread
 * `tid` when given. Resolution: one clock tick (10 ms).
 */
export function cpuSeconds(pid: number, tid?: number): number {
  const path = tid === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${tid}/stat`;
  const text = readFileSync(path, 'utf8');
  // Fields after the parenthesised command name (which may contain spaces): state is field 3,
  // utime field 14 and stime field 15 (1-based), i.e. indices 11 and 12 after ") ".
  const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return (Number(rest[11]) + Number(rest[12])) / clockTicks();
}

/** Peak resident set size of process `pid`, bytes (VmHWM); 0 when unknown. */
export function peakRssBytes(pid: number): number {
  try {
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/** CPU seconds of a set of processes between start() and stop(). */
export class CpuMeter {
  private readonly before: number[];
  private after: number[] | undefined;
  constructor(private readonly pids: number[]) {
    this.before = pids.map((p) => cpuSeconds(p));
  }
  /** Takes the end reading (the first call wins; later calls keep it). */
  stop(): void {
    this.after ??= this.pids.map((p) => cpuSeconds(p));
  }
  /** CPU seconds of pids[i] in the window (stop() is implied). */
  seconds(i: number): number {
    this.stop();
    return this.after![i]! - this.before[i]!;
  }
}
