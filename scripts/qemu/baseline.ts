/**
 * QEMU's own post-copy, measured on loopback: the figures yabusame is compared with.
 *
 * Each run boots the test guest (TCG, `-m 1G`, the workload on 512 MiB) on a source QEMU, starts
 * a destination QEMU with `-incoming defer` and a new RAM file, turns on `postcopy-ram` (mode
 * `postcopy`) or `postcopy-ram` + `postcopy-preempt` (mode `preempt`, QEMU 7.1+) on both sides and
 * `postcopy-blocktime` on the destination, then `migrate` and at once `migrate-start-postcopy`, so
 * nearly all RAM moves after the source stops. RAM is a shared memory-backend-file as in the
 * yabusame runs, but without `x-ignore-shared`: QEMU moves it itself.
 *
 * Per run: source STOP → destination RESUME (QMP event timestamps, both on this host's clock),
 * STOP → `completed` on the source and on the destination (all RAM present), per-fault latency
 * p50/p99 from the destination's trace (fault request → placement of that page), QEMU's
 * blocktime (`query-migrate` on the destination), the guest's slowest batch after resume and its
 * error count.
 *
 * CLI: node dist/scripts/qemu/baseline.js [--runs 3] [--modes postcopy,preempt] [--json]
 *      [--mem 1024] [--workload-mib 512] [--keep] [--no-trace]
 */
import * as fs from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { round, stat, type Stat } from '../bench/stats.js';
import { buildGuest, type GuestFiles } from './guest/build.js';
import {
  EventLog,
  guestView,
  parseTrace,
  qemuFaultLatencies,
  qemuRequestLatencies,
  threadNames,
  type FaultLatencies,
  type RequestLatencies,
  type GuestView,
} from './measure.js';
import { faultWaits, mappingOf, threadsOf, UserFaultTrace, type FaultWaits } from './kfaults.js';
import {
  freePort,
  migrationCapabilities,
  nowMs,
  Qemu,
  setCapabilities,
  shmRamPath,
} from './qemu.js';

export type BaselineMode = 'postcopy' | 'preempt';

export interface BaselineOptions {
  mode: BaselineMode;
  guest: GuestFiles;
  workDir: string;
  memMiB: number;
  workloadMiB: number;
  /** Workload batches to wait for on the destination after completion (the guest's view). */
  batchesAfter?: number;
  /** Trace the destination's faults and placements (per-fault latency); default true. */
  trace?: boolean;
  /** Also each fault as the faulting thread waited for it, from the kernel (kfaults.ts; root). */
  kernelTrace?: boolean;
  log?: (msg: string) => void;
}

export interface BaselineRun {
  mode: BaselineMode;
  /** `migrate` command → source STOP, ms (the precopy pass before post-copy starts). */
  migrateToStopMs: number;
  stopToResumeMs: number;
  /** STOP → `completed` on the source, ms: every page sent. */
  stopToSourceCompleteMs: number;
  /** STOP → `completed` on the destination, ms: all RAM present. */
  stopToDestCompleteMs: number;
  /** RAM bytes the source had sent by STOP (precopy). */
  precopyBytes: number;
  /** `query-migrate` on the destination after completion (postcopy-blocktime), ms. */
  blocktimeMs: number | null;
  vcpuBlocktimeMs: number[] | null;
  faults: FaultLatencies;
  /** The page requests sent to the source, request → placement. */
  requests: RequestLatencies;
  /** Each fault as the faulting thread waited for it, from the kernel (with kernelTrace). */
  faultWaits: FaultWaits | null;
  guest: GuestView;
  /** Threads of the destination QEMU by tid: name (to read `faults.byThread`). */
  destThreads: Record<string, string>;
  capabilities: string[];
}

const DEST_TRACE = [
  'postcopy_ram_fault_thread_request',
  'postcopy_place_page',
  'postcopy_place_page_zero',
  'postcopy_page_req_add',
  'postcopy_page_req_del',
];

export async function runBaseline(o: BaselineOptions): Promise<BaselineRun> {
  const log = o.log ?? (() => {});
  const tag = `${o.mode}-${Date.now()}`;
  const srcRam = shmRamPath(`${tag}-src`);
  const dstRam = shmRamPath(`${tag}-dst`);
  const common = {
    workDir: o.workDir,
    memMiB: o.memMiB,
    kernel: o.guest.kernel,
    initramfs: o.guest.initramfs,
    workloadMiB: o.workloadMiB,
  };
  let src: Qemu | undefined;
  let dst: Qemu | undefined;
  let stopTrace: (() => void) | null = null;
  try {
    src = await Qemu.start({ ...common, name: 'src', ramPath: srcRam });
    const srcEvents = new EventLog(src.qmp);
    const first = await src.waitWorkload();
    log(`source workload running (${Math.round(first.atMs - src.startedAtMs)} ms after start)`);
    // Let the workload run a few batches so its working set is settled.
    const b0 = src.batches().length;
    await src.waitLine(() => src!.batches().length >= b0 + 3, 30_000);

    dst = await Qemu.start({
      ...common,
      name: 'dst',
      ramPath: dstRam,
      incoming: true,
      traceEvents: o.trace === false ? [] : DEST_TRACE,
    });
    const dstEvents = new EventLog(dst.qmp);
    let ktrace: UserFaultTrace | null = null;
    if (o.kernelTrace) {
      const map = mappingOf(dst.proc.pid!, dstRam);
      if (!map) throw new Error(`kernel trace: ${dstRam} is not mapped in the destination QEMU`);
      ktrace = UserFaultTrace.start(map.base, map.sizeBytes, threadsOf(dst.proc.pid!));
      stopTrace = () => ktrace?.stop();
    }
    const capabilities = await migrationCapabilities(src);
    const wanted = [
      'events',
      'postcopy-ram',
      ...(o.mode === 'preempt' ? ['postcopy-preempt'] : []),
    ];
    for (const c of [...wanted, 'postcopy-blocktime']) {
      if (!capabilities.includes(c)) throw new Error(`this QEMU has no migration capability ${c}`);
    }
    await setCapabilities(src, wanted);
    await setCapabilities(dst, [...wanted, 'postcopy-blocktime']);
    // The default max-bandwidth (32 MiB/s in 7.2) would pace the precopy pass; post-copy itself
    // runs under max-postcopy-bandwidth (0: unlimited).
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 1024 ** 3 });
    const port = await freePort();
    await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });

    const srcDone = src.qmp.waitEvent('MIGRATION', {
      match: (e) => e.data['status'] === 'completed' || e.data['status'] === 'failed',
      timeoutMs: 120_000,
    });
    const dstDone = dst.qmp.waitEvent('MIGRATION', {
      match: (e) => e.data['status'] === 'completed' || e.data['status'] === 'failed',
      timeoutMs: 120_000,
    });
    const stopped = src.qmp.waitEvent('STOP', { timeoutMs: 60_000 });
    const migrateAtMs = nowMs();
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    await src.qmp.execute('migrate-start-postcopy');
    const stop = await stopped;
    const precopy = await src.qmp
      .execute<{ ram?: { transferred?: number } }>('query-migrate')
      .catch(() => ({ ram: undefined }));
    log(`source stopped ${Math.round(stop.timestampMs - migrateAtMs)} ms after migrate`);
    const [srcEnd, dstEnd] = await Promise.all([srcDone, dstDone]);
    if (srcEnd.data['status'] !== 'completed' || dstEnd.data['status'] !== 'completed') {
      throw new Error(
        `migration failed: source ${srcEnd.data['status']}, dest ${dstEnd.data['status']}`,
      );
    }
    const resume = dstEvents.find('RESUME');
    const info = await dst.qmp.execute<{
      'postcopy-blocktime'?: number;
      'postcopy-vcpu-blocktime'?: number[];
    }>('query-migrate');
    const names = threadNames(dst.proc.pid!);
    // The guest's view: a few more batches on the destination after all RAM is present.
    const nAfter = dst.batches().length + (o.batchesAfter ?? 3);
    await dst.waitLine(() => dst!.batches().length >= nAfter, 60_000);
    const guest = guestView(src, dst);
    let waits: FaultWaits | null = null;
    if (ktrace) {
      const faults = ktrace.stop();
      waits = faultWaits(faults, ktrace.sched);
      ktrace = null;
    }
    const trace = parseTrace(dst.tracePath);
    const requests = qemuRequestLatencies(trace);
    const faults = qemuFaultLatencies(trace, 4096, (tid) =>
      names.has(tid) ? `${names.get(tid)}` : `tid ${tid}`,
    );
    void srcEvents;
    return {
      mode: o.mode,
      migrateToStopMs: stop.timestampMs - migrateAtMs,
      stopToResumeMs: (resume?.timestampMs ?? NaN) - stop.timestampMs,
      stopToSourceCompleteMs: srcEnd.timestampMs - stop.timestampMs,
      stopToDestCompleteMs: dstEnd.timestampMs - stop.timestampMs,
      precopyBytes: precopy.ram?.transferred ?? NaN,
      blocktimeMs: info['postcopy-blocktime'] ?? null,
      vcpuBlocktimeMs: info['postcopy-vcpu-blocktime'] ?? null,
      faults,
      requests,
      faultWaits: waits,
      guest,
      destThreads: Object.fromEntries([...names].map(([k, v]) => [String(k), v])),
      capabilities,
    };
  } finally {
    try {
      stopTrace?.();
    } catch {
      // stopped already
    }
    await Promise.all([src?.stop(), dst?.stop()]);
    fs.rmSync(srcRam, { force: true });
    fs.rmSync(dstRam, { force: true });
  }
}

export interface BaselineSummary {
  mode: BaselineMode;
  runs: number;
  stopToResumeMs: Stat;
  stopToDestCompleteMs: Stat;
  stopToSourceCompleteMs: Stat;
  faultP50Ms: Stat;
  faultP99Ms: Stat;
  faults: Stat;
  requestP50Ms: Stat;
  requestP99Ms: Stat;
  requests: Stat;
  blocktimeMs: Stat;
  guestMaxBatchMs: Stat;
  guestErrors: number;
  mismatchLines: number;
}

export function summarize(mode: BaselineMode, runs: BaselineRun[]): BaselineSummary {
  const s = (f: (r: BaselineRun) => number): Stat => stat(runs.map(f).map((x) => round(x, 2)));
  return {
    mode,
    runs: runs.length,
    stopToResumeMs: s((r) => r.stopToResumeMs),
    stopToDestCompleteMs: s((r) => r.stopToDestCompleteMs),
    stopToSourceCompleteMs: s((r) => r.stopToSourceCompleteMs),
    faultP50Ms: s((r) => r.faults.p50Ms),
    faultP99Ms: s((r) => r.faults.p99Ms),
    faults: s((r) => r.faults.faults),
    requestP50Ms: s((r) => r.requests.p50Ms),
    requestP99Ms: s((r) => r.requests.p99Ms),
    requests: s((r) => r.requests.requests),
    blocktimeMs: s((r) => r.blocktimeMs ?? NaN),
    guestMaxBatchMs: s((r) => r.guest.maxBatchMs),
    guestErrors: runs.reduce(
      (n, r) => n + (Number.isFinite(r.guest.errors) ? r.guest.errors : 1),
      0,
    ),
    mismatchLines: runs.reduce((n, r) => n + r.guest.mismatchLines.length, 0),
  };
}

function fmt(s: Stat, digits = 0): string {
  const f = (x: number): string => (Number.isFinite(x) ? x.toFixed(digits) : '–');
  return `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
}

export function table(summaries: BaselineSummary[]): string {
  const rows: [string, (s: BaselineSummary) => string][] = [
    ['runs', (s) => String(s.runs)],
    ['STOP → RESUME, ms', (s) => fmt(s.stopToResumeMs, 1)],
    ['STOP → all RAM present (dest completed), ms', (s) => fmt(s.stopToDestCompleteMs)],
    ['STOP → source completed, ms', (s) => fmt(s.stopToSourceCompleteMs)],
    ['fault → placed p50, ms', (s) => fmt(s.faultP50Ms, 2)],
    ['fault → placed p99, ms', (s) => fmt(s.faultP99Ms, 2)],
    ['faults per run', (s) => fmt(s.faults)],
    ['page request latency p50, ms', (s) => fmt(s.requestP50Ms, 2)],
    ['page request latency p99, ms', (s) => fmt(s.requestP99Ms, 2)],
    ['page requests sent per run', (s) => fmt(s.requests)],
    ['postcopy-blocktime, ms', (s) => fmt(s.blocktimeMs)],
    ['guest: slowest batch after resume, ms', (s) => fmt(s.guestMaxBatchMs)],
    ['guest: errors / MISMATCH lines', (s) => `${s.guestErrors} / ${s.mismatchLines}`],
  ];
  return modeTable(rows, summaries);
}

/** One column per mode, one row per figure, right-aligned: the medians (ranges) of the runs. */
export function modeTable<S extends { mode: string }>(
  rows: [string, (s: S) => string][],
  summaries: S[],
): string {
  const w0 = Math.max(...rows.map((r) => r[0].length), 'median (range)'.length);
  const cols = summaries.map((s) => Math.max(s.mode.length, ...rows.map((r) => r[1](s).length)));
  const line = (a: string, cells: string[]): string =>
    `${a.padEnd(w0)}  ${cells.map((c, i) => c.padStart(cols[i]!)).join('  ')}`;
  return [
    line(
      'median (range)',
      summaries.map((s) => s.mode),
    ),
    ...rows.map(([name, f]) => line(name, summaries.map(f))),
  ].join('\n');
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: 'string', default: '3' },
      modes: { type: 'string', default: 'postcopy,preempt' },
      mem: { type: 'string', default: '1024' },
      'workload-mib': { type: 'string', default: '512' },
      json: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      'no-trace': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(
      'usage: baseline.js [--runs N] [--modes postcopy,preempt] [--mem MiB] [--workload-mib N] [--json] [--keep] [--no-trace]\n',
    );
    return 0;
  }
  const guest = buildGuest();
  const modes = values.modes.split(',') as BaselineMode[];
  const workRoot = fs.mkdtempSync('/tmp/yabusame-qemu-baseline-');
  const log = (msg: string): void => void process.stderr.write(`baseline: ${msg}\n`);
  const all: Record<string, BaselineRun[]> = {};
  for (let i = 0; i < Number(values.runs); i++) {
    // Modes alternate, so a slow spell of the machine does not land on one mode only.
    for (const mode of modes) {
      const workDir = join(workRoot, `${mode}-${i + 1}`);
      log(`run ${i + 1} ${mode}`);
      const run = await runBaseline({
        mode,
        guest,
        workDir,
        memMiB: Number(values.mem),
        workloadMiB: Number(values['workload-mib']),
        trace: !values['no-trace'],
        log,
      });
      log(
        `  STOP→RESUME ${run.stopToResumeMs.toFixed(1)} ms, STOP→dest completed ` +
          `${run.stopToDestCompleteMs.toFixed(0)} ms, faults ${run.faults.faults} p50 ` +
          `${run.faults.p50Ms.toFixed(2)} p99 ${run.faults.p99Ms.toFixed(2)} ms, requests ` +
          `${run.requests.requests} p50 ${run.requests.p50Ms.toFixed(2)} p99 ` +
          `${run.requests.p99Ms.toFixed(2)} ms, guest max batch ` +
          `${run.guest.maxBatchMs} ms, errors ${run.guest.errors}`,
      );
      (all[mode] ??= []).push(run);
    }
  }
  if (!values.keep) fs.rmSync(workRoot, { recursive: true, force: true });
  const summaries = modes.map((m) => summarize(m, all[m] ?? []));
  if (values.json) {
    process.stdout.write(`${JSON.stringify({ summaries, runs: all }, null, 2)}\n`);
  } else {
    process.stdout.write(`${table(summaries)}\n`);
  }
  return summaries.every((s) => s.guestErrors === 0 && s.mismatchLines === 0) ? 0 : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (err: unknown) => {
      process.stderr.write(`baseline: ${err instanceof Error ? err.stack : String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
