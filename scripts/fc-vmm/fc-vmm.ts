/**
 * Builds and runs fc-vmm (`scripts/fc-vmm/fc-vmm.c`), which stands in for Firecracker restoring
 * a snapshot through a Uffd memory backend: it sends Firecracker's exact handshake (a fixture's
 * bytes, or what a release family sends for its regions), faults from vCPU threads while pages
 * arrive, and verifies every page against the memory file. `buildFcVmm` compiles it with `cc`
 * into `dist/fc-vmm/fc-vmm` when that is missing or older than the source; `startFcVmm` runs one
 * restore and gives the child (tests kill it) and its validated JSON result.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { constants } from 'node:os';
import { z } from 'zod';
import { buildCProgram } from '../lib/build-c.js';

/** Compiles fc-vmm when needed; resolves with the binary's path. */
export function buildFcVmm(): Promise<string> {
  return buildCProgram('fc-vmm');
}

export interface FcVmmOptions {
  /** The Firecracker socket of the dest. */
  socket: string;
  /** The snapshot memory file: what the dest serves, and fc-vmm's oracle. */
  memFile: string;
  /** Send these bytes exactly (a fixture) and map the regions it names where it names them. */
  handshake?: string;
  /** Otherwise: the release family whose handshake to send, for regions fc-vmm maps itself. */
  format?: 'v1.1' | 'v1.7' | 'v1.12';
  /** Two regions, split at this byte of the memory file (else one region). */
  split?: number;
  page?: '4k' | '2m';
  vcpus?: number;
  touchFraction?: number;
  writeFraction?: number;
  /** Balloon discards (MADV_DONTNEED runs) while the guest faults. */
  balloon?: number;
  /** A working set touched in order, the restore's "first useful work" (see fc-vmm.c). */
  workingSet?: {
    pages: number;
    cluster?: number;
    seed?: number;
    jitter?: number;
    jitterSeed?: number;
  };
  /** Unmap this many bytes at the end of the last region once registered (a bad handshake). */
  unmapTail?: number;
  /** Start the guest only on SIGUSR1 (after the handshake; see `atStart` in the result). */
  startOnSignal?: boolean;
  /** Do not wait for every page: report after the touches (and holdMs). */
  noWait?: boolean;
  holdMs?: number;
  /** Close the socket this long after the handshake (the process stays). */
  closeSocketAfterMs?: number;
  timeoutMs?: number;
  seed?: number;
  /** Each stderr line as it arrives (`fc-vmm: event NAME ...` marks steps). */
  onStderrLine?: (line: string) => void;
}

const count = z.number().int().nonnegative();

const FcVmmReportSchema = z.strictObject({
  ok: z.boolean(),
  outcome: z.enum(['complete', 'touched', 'timeout', 'failed']),
  code: z.string().optional(),
  message: z.string().optional(),
  format: z.enum(['v1.1', 'v1.7', 'v1.12']),
  handshakeBytes: count,
  totalPages: count,
  /** Pages verified after every page was present (0 with noWait). */
  pagesVerified: count,
  /** First touches whose page was verified right after (by the vCPU that touched it). */
  touchesVerified: count,
  missingPages: count,
  mismatchCount: count,
  mismatches: z.array(z.strictObject({ region: count, page: count, reason: z.string() })),
  /** First touches of pages that were not present, as the vCPUs felt them. */
  faults: z.strictObject({ count, p50Us: count, p99Us: count, maxUs: count }),
  /** From the handshake until every page was present (or the end of the run). */
  elapsedMs: count,
  /** The working set: touches, how many found their page absent, when the last one was done. */
  work: z.strictObject({ touches: count, faults: count, ms: count }),
  /** When the guest started: pages present, the working set's distinct pages, those present. */
  atStart: z.strictObject({ present: count, wsPages: count, wsPresent: count }),
  discardedPages: count,
  balloonRuns: count,
  /** Bytes the handler wrote on the socket (Firecracker reads none: must be 0). */
  unexpectedBytes: count,
  handlerClosedSocket: z.boolean(),
  regions: z.array(z.strictObject({ base: count, size: count, offset: count, pageSize: count })),
});
export type FcVmmReport = z.infer<typeof FcVmmReportSchema>;

export interface FcVmmResult extends FcVmmReport {
  /** 0 verified, 1 mismatch or missing page, 2 usage or setup error, 3 timeout. */
  exitCode: number;
  stderr: string;
}

function args(o: FcVmmOptions): string[] {
  const a = ['--socket', o.socket, '--mem-file', o.memFile];
  const flags: Array<[string, string | number | undefined]> = [
    ['--handshake', o.handshake],
    ['--format', o.format],
    ['--split', o.split],
    ['--page', o.page],
    ['--vcpus', o.vcpus],
    ['--touch-fraction', o.touchFraction],
    ['--write-fraction', o.writeFraction],
    ['--balloon', o.balloon],
    ['--ws-pages', o.workingSet?.pages],
    ['--ws-cluster', o.workingSet?.cluster],
    ['--ws-seed', o.workingSet?.seed],
    ['--ws-jitter', o.workingSet?.jitter],
    ['--ws-jitter-seed', o.workingSet?.jitterSeed],
    ['--hold-ms', o.holdMs],
    ['--close-socket-after-ms', o.closeSocketAfterMs],
    ['--timeout', o.timeoutMs],
    ['--seed', o.seed],
    ['--unmap-tail', o.unmapTail],
  ];
  for (const [flag, value] of flags) if (value !== undefined) a.push(flag, String(value));
  if (o.noWait) a.push('--no-wait');
  if (o.startOnSignal) a.push('--start-on-sigusr1');
  return [...a, '--json'];
}

export interface FcVmmRun {
  child: ChildProcess;
  /** Resolves once the handshake was sent (rejects if fc-vmm exits first). */
  handshakeSent: Promise<void>;
  /** The result; rejects only when fc-vmm printed none (killed, or a crash: see stderr). */
  result: Promise<FcVmmResult>;
}

/** Starts one restore. */
export async function startFcVmm(o: FcVmmOptions): Promise<FcVmmRun> {
  const binary = await buildFcVmm();
  const child = spawn(binary, args(o), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let partial = '';
  let sent!: () => void;
  let notSent!: (err: Error) => void;
  const handshakeSent = new Promise<void>((resolve, reject) => {
    sent = resolve;
    notSent = reject;
  });
  handshakeSent.catch(() => {});
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => {
    stderr += s;
    partial += s;
    for (let nl = partial.indexOf('\n'); nl >= 0; nl = partial.indexOf('\n')) {
      const line = partial.slice(0, nl);
      if (line.includes('event handshake-sent')) sent();
      o.onStderrLine?.(line);
      partial = partial.slice(nl + 1);
    }
  });
  const result = (async (): Promise<FcVmmResult> => {
    const exitCode = await new Promise<number>((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (code, signal) =>
        resolve(code ?? 128 + (signal ? constants.signals[signal] : 0)),
      );
    });
    notSent(new Error(`fc-vmm exited (${exitCode}) before its handshake; stderr:\n${stderr}`));
    const line = stdout.trim().split('\n').pop() ?? '';
    let report: FcVmmReport;
    try {
      report = FcVmmReportSchema.parse(JSON.parse(line));
    } catch (err) {
      throw new Error(`fc-vmm exited with ${exitCode} without a valid result; stderr:\n${stderr}`, {
        cause: err,
      });
    }
    return { ...report, exitCode, stderr };
  })();
  return { child, handshakeSent, result };
}

/** Runs one restore to its end. */
export async function runFcVmm(o: FcVmmOptions): Promise<FcVmmResult> {
  return (await startFcVmm(o)).result;
}
