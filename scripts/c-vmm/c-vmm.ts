/**
 * Builds and runs c-vmm (`scripts/c-vmm/c-vmm.c`), a VMM written in C from protocol/README.md
 * alone, so that the daemon is also driven by a program that shares none of vm-sim's code or
 * assumptions. `buildCVmm` compiles it with `cc` into `dist/c-vmm/c-vmm` when that is missing or
 * older than the source; `runCVmm` runs one migration and returns its JSON result, validated.
 */
import { spawn, spawnSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { z } from 'zod';
import { buildCProgram } from '../lib/build-c.js';

/** Compiles c-vmm when needed; resolves with the binary's path. */
export function buildCVmm(): Promise<string> {
  return buildCProgram('c-vmm');
}

export interface CVmmRegion {
  /** Image offset, bytes (the same offset in the image file). */
  offset: number;
  sizeBytes: number;
  page?: '4k' | '2m';
  /** anon (default for 4k), hugetlb (default for 2m), shm (a shared memfd). */
  backing?: 'anon' | 'hugetlb' | 'shm';
}

export interface CVmmOptions {
  socket: string;
  id: string;
  /** ws:// URL of `yabusame source`. */
  source: string;
  /** The memory image the source serves: c-vmm's oracle. */
  image: string;
  /** Regions in CLI order; c-vmm maps region 0 highest in memory, each next one lower. */
  regions?: CVmmRegion[];
  order?: 'image' | 'reverse' | 'shuffle';
  vcpus?: number;
  touchFraction?: number;
  writeFraction?: number;
  balloon?: number;
  wp?: 'before' | 'after';
  wpWaitMs?: number;
  unmapTailBytes?: number;
  secret?: string;
  resumeTimeoutMs?: number;
  timeoutMs?: number;
  seed?: number;
  /** Each stderr line as it arrives (c-vmm announces `c-vmm: event NAME ...` there). */
  onStderrLine?: (line: string) => void;
}

const count = z.number().int().nonnegative();

const CVmmReportSchema = z.strictObject({
  ok: z.boolean(),
  outcome: z.enum(['complete', 'refused', 'failed', 'timeout']),
  /** The daemon's error code, or c-vmm's own (CVMM_TIMEOUT, CVMM_CONNECTION_CLOSED, ...). */
  code: z.string().optional(),
  message: z.string().optional(),
  ack: z.strictObject({ totalPages: count }).optional(),
  /** The daemon's `complete` reply. */
  complete: z
    .strictObject({
      totalPages: count,
      demandPages: count,
      backgroundPages: count,
      zeroPages: count,
      existedPages: count,
      discardedPages: count,
    })
    .optional(),
  totalPages: count,
  pagesVerified: count,
  missingPages: count,
  mismatchCount: count,
  /** The first 20 bad pages, missing ones included (their reason starts with "missing"). */
  mismatches: z.array(z.strictObject({ region: z.string(), page: count, reason: z.string() })),
  writtenPages: count,
  /** Distinct pages the balloon discarded. */
  discardedPages: count,
  balloonRuns: count,
  /** First-touch latency of pages that were not present yet, as the vCPUs felt it. */
  faults: z.strictObject({ count, p50Us: count, p99Us: count, maxUs: count }),
  elapsedMs: count,
  resumes: count,
  /** Guest threads still blocked in a fault 2 s after `complete` (nothing would wake them). */
  strandedThreads: count,
  wp: z.strictObject({ writeCompleted: z.boolean() }).optional(),
  /** Region names in the order the handoff listed them. */
  handoffOrder: z.array(z.string()),
  regions: z.array(
    z.strictObject({
      name: z.string(),
      base: count,
      sizeBytes: count,
      mappedBytes: count,
      offset: count,
      pageSizeBytes: count,
      backing: z.enum(['anon', 'hugetlb', 'shm']),
    }),
  ),
});
export type CVmmReport = z.infer<typeof CVmmReportSchema>;

export interface CVmmResult extends CVmmReport {
  /**
   * 0 verified, 1 mismatch, missing page or stranded thread, 2 usage or setup error,
   * 3 refused/failed/timeout.
   */
  exitCode: number;
  stderr: string;
}

function args(o: CVmmOptions): string[] {
  const a = ['--socket', o.socket, '--id', o.id, '--source', o.source, '--image', o.image];
  for (const r of o.regions ?? []) {
    let spec = `${r.offset}:${r.sizeBytes}`;
    if (r.page || r.backing) spec += `:${r.page ?? '4k'}`;
    if (r.backing) spec += `:${r.backing}`;
    a.push('--region', spec);
  }
  const flags: Array<[string, string | number | undefined]> = [
    ['--order', o.order],
    ['--vcpus', o.vcpus],
    ['--touch-fraction', o.touchFraction],
    ['--write-fraction', o.writeFraction],
    ['--balloon', o.balloon],
    ['--wp', o.wp],
    ['--wp-wait-ms', o.wpWaitMs],
    ['--unmap-tail', o.unmapTailBytes],
    ['--secret', o.secret],
    ['--resume-timeout', o.resumeTimeoutMs],
    ['--timeout', o.timeoutMs],
    ['--seed', o.seed],
  ];
  for (const [flag, value] of flags) if (value !== undefined) a.push(flag, String(value));
  return [...a, '--json'];
}

/** c-vmm's own default --timeout. */
const DEFAULT_TIMEOUT_MS = 60_000;
/** How long past its own --timeout c-vmm may take to stop its guest and verify every page. */
const EXIT_GRACE_MS = 20_000;

function readProc(path: string): string {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch (err) {
    return `(${(err as NodeJS.ErrnoException).code ?? 'unreadable'})`;
  }
}

/**
 * Where each thread of a stuck process waits: its kernel stack and syscall from /proc, and the
 * user-space backtraces when gdb is installed.
 */
function describeStuckProcess(pid: number): string {
  const lines: string[] = [];
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch (err) {
    return `(no /proc/${pid}/task: ${(err as Error).message})`;
  }
  for (const tid of tids) {
    const task = `/proc/${pid}/task/${tid}`;
    const state = /^State:\s*(.*)$/m.exec(readProc(`${task}/status`))?.[1] ?? '?';
    lines.push(
      `thread ${tid} (${readProc(`${task}/comm`)}): ${state}, wchan ${readProc(`${task}/wchan`)}`,
    );
    lines.push(`  syscall: ${readProc(`${task}/syscall`)}`);
    for (const frame of readProc(`${task}/stack`).split('\n')) lines.push(`  ${frame}`);
  }
  const gdb = spawnSync('gdb', ['-p', String(pid), '-batch', '-ex', 'thread apply all bt'], {
    encoding: 'utf8',
    timeout: 15_000,
  });
  if (!gdb.error) lines.push(gdb.stdout.trim());
  return lines.join('\n');
}

/**
 * Runs c-vmm once; rejects only when it printed no valid result (its stderr says why). A c-vmm
 * still running well past its own timeout is stuck: where its threads wait goes to stderr, then it
 * is killed, so the caller fails at once instead of hanging.
 */
export async function runCVmm(o: CVmmOptions): Promise<CVmmResult> {
  const binary = await buildCVmm();
  const child = spawn(binary, args(o), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let partial = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => {
    stderr += s;
    partial += s;
    for (let nl = partial.indexOf('\n'); nl >= 0; nl = partial.indexOf('\n')) {
      o.onStderrLine?.(partial.slice(0, nl));
      partial = partial.slice(nl + 1);
    }
  });
  const limitMs = (o.timeoutMs ?? DEFAULT_TIMEOUT_MS) + EXIT_GRACE_MS;
  const watchdog = setTimeout(() => {
    const pid = child.pid;
    if (pid === undefined) return;
    stderr += `\nc-vmm was still running ${limitMs} ms after it started; killed. Its threads:\n`;
    stderr += describeStuckProcess(pid) + '\n';
    child.kill('SIGKILL');
  }, limitMs);
  const exitCode = await new Promise<number>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) =>
      resolve(code ?? 128 + (signal ? constants.signals[signal] : 0)),
    );
  }).finally(() => clearTimeout(watchdog));
  const line = stdout.trim().split('\n').pop() ?? '';
  let report: CVmmReport;
  try {
    report = CVmmReportSchema.parse(JSON.parse(line));
  } catch (err) {
    throw new Error(`c-vmm exited with ${exitCode} without a valid result; stderr:\n${stderr}`, {
      cause: err,
    });
  }
  return { ...report, exitCode, stderr };
}
