/**
 * `npm run bench:qemu`: the same guest migrated four ways on this machine, in the same run,
 * interleaved (a slow spell of a shared machine lands on every way alike):
 *
 *   postcopy       QEMU's own post-copy (postcopy-ram), baseline.ts
 *   preempt        QEMU's post-copy with postcopy-preempt (its urgent-page channel)
 *   yabusame       QEMU's migration of device state only (x-ignore-shared), RAM through
 *                  yabusame, driven by `yabusame migrate` (try-yabusame.ts): the first migration
 *                  of freshly started daemons, whose hot code V8 compiles while it runs
 *   yabusame-warm  the same through daemons that served migrations before (two 256 MiB vm-sim
 *                  migrations while the source guest boots), as long-running daemons have
 *
 * Each run boots its own source guest (TCG, the workload rewriting and verifying its memory),
 * migrates it on loopback and measures, all on this host's clock:
 *
 *  - source STOP → destination RESUME (QMP event times);
 *  - source STOP → all RAM present (QEMU: the destination's `completed`; yabusame: the dest's
 *    `complete`, which follows its last placement);
 *  - fault wait p50/p99: each of the destination's page faults on guest RAM as the faulting
 *    thread lived it, fault entry → woken by the placement, from the kernel (kfaults.ts: the same
 *    measure whoever serves the fault);
 *  - the handlers' own view: QEMU's trace (fault read by its fault thread → page placed) and
 *    postcopy-blocktime; yabusame's `yabusame_dest_fault_service_seconds` (fault read → placed);
 *  - the guest's slowest batch after resume (what it felt), and its verification.
 *
 * CLI: node dist/scripts/qemu/bench.js [--runs 3] [--modes postcopy,preempt,yabusame,yabusame-warm]
 *      [--mem 1024] [--workload-mib 512] [--json] [--keep]
 */
import * as fs from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { machineInfo } from '../bench/machine.js';
import { STAGE_METRICS } from '../bench/stages.js';
import { round, stat, type Stat } from '../bench/stats.js';
import { modeTable, runBaseline, type BaselineRun } from './baseline.js';
import { buildGuest } from './guest/build.js';
import { buildPreload } from './preload-build.js';
import { ensureQemu } from './qemu.js';
import { tryYabusame, type YabusameRun } from './try-yabusame.js';

/** yabusame: the first migration of fresh daemons; yabusame-warm: daemons that served some before. */
export type Mode = 'postcopy' | 'preempt' | 'yabusame' | 'yabusame-warm';
const MODES: readonly Mode[] = ['postcopy', 'preempt', 'yabusame', 'yabusame-warm'];

/** One run of one mode, reduced to the figures the table shows. */
export interface Figures {
  mode: Mode;
  ok: boolean;
  failure: string | null;
  stopToResumeMs: number;
  stopToAllRamMs: number;
  /** Kernel: fault entry → the faulting thread woken, for faults it slept on. */
  faultWaitP50Ms: number;
  faultWaitP99Ms: number;
  faultsWaited: number;
  /** The handler's own view: QEMU's trace, or the dest's histogram. */
  serviceP50Ms: number;
  serviceP99Ms: number;
  /**
   * Pages actually asked of the source, request → placed: QEMU's trace (postcopy_page_req_add →
   * _del; faults on a page already on its way are not requests); yabusame: its fault service
   * (every fault the dest reads is a request, unless the page is already present).
   */
  requestP50Ms: number;
  requestP99Ms: number;
  /** QEMU's postcopy-blocktime (all vCPUs blocked), ms; NaN for yabusame. */
  blocktimeMs: number;
  guestMaxBatchMs: number;
  guestErrors: number;
  wrongPages: number;
  /** yabusame: p50/p99 of each stage of a demand fault, µs (scripts/bench/stages.ts keys). */
  stagesUs: Record<string, number>;
}

function fromBaseline(r: BaselineRun): Figures {
  return {
    mode: r.mode,
    ok: r.guest.errors === 0 && r.guest.mismatchLines.length === 0,
    failure: null,
    stopToResumeMs: r.stopToResumeMs,
    stopToAllRamMs: r.stopToDestCompleteMs,
    faultWaitP50Ms: r.faultWaits?.p50Ms ?? NaN,
    faultWaitP99Ms: r.faultWaits?.p99Ms ?? NaN,
    faultsWaited: r.faultWaits?.waited ?? NaN,
    serviceP50Ms: r.faults.p50Ms,
    serviceP99Ms: r.faults.p99Ms,
    requestP50Ms: r.requests.p50Ms,
    requestP99Ms: r.requests.p99Ms,
    blocktimeMs: r.blocktimeMs ?? NaN,
    guestMaxBatchMs: r.guest.maxBatchMs,
    guestErrors: r.guest.errors,
    wrongPages: r.guest.mismatchLines.length,
    stagesUs: {},
  };
}

function fromYabusame(r: YabusameRun, mode: Mode): Figures {
  return {
    mode,
    ok: r.ok,
    failure: r.failure,
    stopToResumeMs: r.stopToResumeMs,
    stopToAllRamMs: r.stopToCompleteMs,
    faultWaitP50Ms: r.faultWaits?.p50Ms ?? NaN,
    faultWaitP99Ms: r.faultWaits?.p99Ms ?? NaN,
    faultsWaited: r.faultWaits?.waited ?? NaN,
    serviceP50Ms: r.faultServiceMs?.p50 ?? NaN,
    serviceP99Ms: r.faultServiceMs?.p99 ?? NaN,
    requestP50Ms: r.faultServiceMs?.p50 ?? NaN,
    requestP99Ms: r.faultServiceMs?.p99 ?? NaN,
    blocktimeMs: NaN,
    guestMaxBatchMs: r.guest.maxBatchMs,
    guestErrors: r.guest.errors,
    wrongPages: r.guest.mismatchLines.length,
    stagesUs: r.faultStagesUs,
  };
}

function failedRun(mode: Mode, failure: string): Figures {
  return {
    mode,
    ok: false,
    failure,
    stopToResumeMs: NaN,
    stopToAllRamMs: NaN,
    faultWaitP50Ms: NaN,
    faultWaitP99Ms: NaN,
    faultsWaited: NaN,
    serviceP50Ms: NaN,
    serviceP99Ms: NaN,
    requestP50Ms: NaN,
    requestP99Ms: NaN,
    blocktimeMs: NaN,
    guestMaxBatchMs: NaN,
    guestErrors: NaN,
    wrongPages: 0,
    stagesUs: {},
  };
}

/** The median (range) of the finite values. */
function st(values: number[]): Stat {
  return stat(values.filter(Number.isFinite).map((v) => round(v, 3)));
}

export interface Summary {
  mode: Mode;
  runs: number;
  failed: number;
  stopToResumeMs: Stat;
  stopToAllRamMs: Stat;
  faultWaitP50Ms: Stat;
  faultWaitP99Ms: Stat;
  faultsWaited: Stat;
  serviceP50Ms: Stat;
  serviceP99Ms: Stat;
  requestP50Ms: Stat;
  requestP99Ms: Stat;
  blocktimeMs: Stat;
  guestMaxBatchMs: Stat;
  guestErrors: number;
  wrongPages: number;
  stagesUs: Record<string, Stat>;
}

export function summarize(mode: Mode, runs: Figures[]): Summary {
  const s = (f: (r: Figures) => number): Stat => st(runs.map(f));
  return {
    mode,
    runs: runs.length,
    failed: runs.filter((r) => !r.ok).length,
    stopToResumeMs: s((r) => r.stopToResumeMs),
    stopToAllRamMs: s((r) => r.stopToAllRamMs),
    faultWaitP50Ms: s((r) => r.faultWaitP50Ms),
    faultWaitP99Ms: s((r) => r.faultWaitP99Ms),
    faultsWaited: s((r) => r.faultsWaited),
    serviceP50Ms: s((r) => r.serviceP50Ms),
    serviceP99Ms: s((r) => r.serviceP99Ms),
    requestP50Ms: s((r) => r.requestP50Ms),
    requestP99Ms: s((r) => r.requestP99Ms),
    blocktimeMs: s((r) => r.blocktimeMs),
    guestMaxBatchMs: s((r) => r.guestMaxBatchMs),
    // A run that failed before the guest's verdict is counted in `failed`, not as a guest error.
    guestErrors: runs.reduce((n, r) => n + (Number.isFinite(r.guestErrors) ? r.guestErrors : 0), 0),
    wrongPages: runs.reduce((n, r) => n + r.wrongPages, 0),
    stagesUs: Object.fromEntries(
      Object.keys(STAGE_METRICS).map((k) => [k, s((r) => r.stagesUs[k] ?? NaN)]),
    ),
  };
}

function fmt(s: Stat, digits = 0): string {
  if (s.values.length === 0) return '–';
  const f = (x: number): string => x.toFixed(digits);
  return `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
}

export function table(summaries: Summary[]): string {
  const rows: [string, (s: Summary) => string][] = [
    ['runs (failed)', (s) => `${s.runs} (${s.failed})`],
    ['STOP → RESUME, ms', (s) => fmt(s.stopToResumeMs, 1)],
    ['STOP → all RAM present, ms', (s) => fmt(s.stopToAllRamMs)],
    ['fault wait p50, ms (kernel)', (s) => fmt(s.faultWaitP50Ms, 3)],
    ['fault wait p99, ms (kernel)', (s) => fmt(s.faultWaitP99Ms, 2)],
    ['faults waited on per run', (s) => fmt(s.faultsWaited)],
    ['fault service p50, ms (handler)', (s) => fmt(s.serviceP50Ms, 3)],
    ['fault service p99, ms (handler)', (s) => fmt(s.serviceP99Ms, 2)],
    ['page request p50, ms (asked of the source)', (s) => fmt(s.requestP50Ms, 3)],
    ['page request p99, ms (asked of the source)', (s) => fmt(s.requestP99Ms, 2)],
    ['QEMU postcopy-blocktime, ms', (s) => fmt(s.blocktimeMs)],
    ['guest: slowest batch after resume, ms', (s) => fmt(s.guestMaxBatchMs)],
    ['guest: verification errors / wrong pages', (s) => `${s.guestErrors} / ${s.wrongPages}`],
    // Where a yabusame fault's service time goes (the dest's stage histogram; QEMU has none).
    ...Object.entries(STAGE_METRICS).map(([k, def]): [string, (s: Summary) => string] => [
      `${def.label}, µs`,
      (s) => fmt(s.stagesUs[k] ?? stat([]), 1),
    ]),
  ];
  return modeTable(rows, summaries);
}

export interface TargetCheck {
  target: string;
  yabusame: number;
  reference: number;
  ratio: number;
  limit: number;
  met: boolean;
}

/** The targets, from the medians of this run. */
export function targets(by: Partial<Record<Mode, Summary>>): TargetCheck[] {
  const out: TargetCheck[] = [];
  for (const mode of ['yabusame', 'yabusame-warm'] as const) {
    const y = by[mode];
    if (y) out.push(...targetsOf(y, by, mode === 'yabusame-warm' ? ' [warm daemons]' : ''));
  }
  return out;
}

function targetsOf(y: Summary, by: Partial<Record<Mode, Summary>>, suffix: string): TargetCheck[] {
  const out: TargetCheck[] = [];
  const check = (target: string, yv: number, ref: number, limit: number): void => {
    const ratio = yv / ref;
    out.push({
      target: target + suffix,
      yabusame: yv,
      reference: ref,
      ratio,
      limit,
      met: ratio <= limit,
    });
  };
  if (by.postcopy) {
    check(
      'STOP → all RAM present ≤ 0.6 × QEMU post-copy',
      y.stopToAllRamMs.median,
      by.postcopy.stopToAllRamMs.median,
      0.6,
    );
  }
  if (by.preempt) {
    check(
      'fault wait p50 ≤ 1/4 of post-copy-preempt',
      y.faultWaitP50Ms.median,
      by.preempt.faultWaitP50Ms.median,
      0.25,
    );
    check(
      'fault wait p99 ≤ 1/4 of post-copy-preempt',
      y.faultWaitP99Ms.median,
      by.preempt.faultWaitP99Ms.median,
      0.25,
    );
    // The issue's own reading of "per-fault latency": QEMU's page requests (its trace) against
    // the dest's fault service (its metrics). QEMU serves most faults from pages already on
    // their way and never requests them; the kernel's fault wait above counts those too.
    check(
      'page request p50 ≤ 1/4 of post-copy-preempt (handlers’ view)',
      y.requestP50Ms.median,
      by.preempt.requestP50Ms.median,
      0.25,
    );
    check(
      'page request p99 ≤ 1/4 of post-copy-preempt (handlers’ view)',
      y.requestP99Ms.median,
      by.preempt.requestP99Ms.median,
      0.25,
    );
  }
  const qemuStall = Math.min(
    by.postcopy?.guestMaxBatchMs.median ?? Infinity,
    by.preempt?.guestMaxBatchMs.median ?? Infinity,
  );
  if (Number.isFinite(qemuStall)) {
    check('guest stall ≤ QEMU’s (the better mode)', y.guestMaxBatchMs.median, qemuStall, 1);
  }
  out.push({
    target: 'zero verification errors in every run' + suffix,
    yabusame: y.guestErrors + y.wrongPages,
    reference: 0,
    ratio: NaN,
    limit: 0,
    met: y.guestErrors + y.wrongPages === 0 && y.failed === 0,
  });
  return out;
}

const USAGE = `Usage: npm run bench:qemu -- [options]

  --runs N             runs of each way (default 3), interleaved
  --modes LIST         postcopy,preempt,yabusame,yabusame-warm (default all four; yabusame-warm:
                       daemons that served two 256 MiB migrations before, as long-running ones have)
  --mem MiB            guest RAM (default 1024)
  --workload-mib N     memory the workload rewrites and verifies (default 512)
  --json               one JSON document (every run, the summaries, the targets) on stdout;
                       the table then goes to stderr
  --keep               keep the work folders
  -h, --help

Runs as root (RAM files on /dev/shm, the kernel's trace of faults, apt-get for what is missing).
`;

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: 'string', default: '3' },
      modes: { type: 'string', default: MODES.join(',') },
      mem: { type: 'string', default: '1024' },
      'workload-mib': { type: 'string', default: '512' },
      json: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const modes = values.modes.split(',') as Mode[];
  if (modes.some((m) => !MODES.includes(m))) {
    process.stderr.write(`bench:qemu: --modes takes ${MODES.join(', ')}\n`);
    return 2;
  }
  ensureQemu();
  const guest = buildGuest();
  const preload = buildPreload();
  const root = fs.mkdtempSync('/tmp/yabusame-bench-qemu-');
  const log = (msg: string): void => void process.stderr.write(`bench:qemu: ${msg}\n`);
  const memMiB = Number(values.mem);
  const workloadMiB = Number(values['workload-mib']);
  const all: Record<Mode, Figures[]> = {
    postcopy: [],
    preempt: [],
    yabusame: [],
    'yabusame-warm': [],
  };
  const raw: Record<Mode, unknown[]> = {
    postcopy: [],
    preempt: [],
    yabusame: [],
    'yabusame-warm': [],
  };
  const runs = Number(values.runs);
  for (let i = 0; i < runs; i++) {
    // Interleaved, and the order turns each round: no way always runs first or last.
    const order = modes.map((_, k) => modes[(k + i) % modes.length]!);
    for (const mode of order) {
      const workDir = join(root, `${mode}-${i + 1}`);
      fs.mkdirSync(workDir, { recursive: true });
      log(`run ${i + 1}/${runs}: ${mode}`);
      let fig: Figures;
      try {
        if (mode === 'yabusame' || mode === 'yabusame-warm') {
          const r = await tryYabusame({
            guest,
            preload,
            workDir,
            memMiB,
            workloadMiB,
            dest: 'qmp',
            kernelTrace: true,
            warm: mode === 'yabusame-warm',
            log: (m) => log(`  ${m}`),
          });
          raw[mode].push(r);
          fig = fromYabusame(r, mode);
        } else {
          const r = await runBaseline({
            mode,
            guest,
            workDir,
            memMiB,
            workloadMiB,
            kernelTrace: true,
            log: (m) => log(`  ${m}`),
          });
          raw[mode].push(r);
          fig = fromBaseline(r);
        }
      } catch (err) {
        log(`  FAILED: ${(err as Error).message}`);
        fig = failedRun(mode, (err as Error).message);
      }
      all[mode].push(fig);
      log(
        `  STOP→RESUME ${fig.stopToResumeMs.toFixed(1)} ms, STOP→all RAM ${fig.stopToAllRamMs.toFixed(0)} ms, ` +
          `fault wait p50 ${fig.faultWaitP50Ms.toFixed(3)} p99 ${fig.faultWaitP99Ms.toFixed(2)} ms ` +
          `(${fig.faultsWaited} faults), stall ${fig.guestMaxBatchMs} ms, errors ${fig.guestErrors}`,
      );
      if (!values.keep) fs.rmSync(workDir, { recursive: true, force: true });
    }
  }
  if (!values.keep) fs.rmSync(root, { recursive: true, force: true });
  const summaries = modes.map((m) => summarize(m, all[m]));
  const by = Object.fromEntries(summaries.map((s) => [s.mode, s])) as Partial<
    Record<Mode, Summary>
  >;
  const checks = targets(by);
  const m = machineInfo();
  const text =
    `${m.cpuModel}, ${m.cores} cores, ${m.kernel}, node ${m.node}; guest ${memMiB} MiB, ` +
    `workload ${workloadMiB} MiB, TCG\n\n${table(summaries)}\n\n` +
    checks
      .map(
        (c) =>
          `${c.met ? 'met    ' : 'MISSED '} ${c.target}` +
          (Number.isFinite(c.ratio)
            ? `: ${c.yabusame.toFixed(3)} vs ${c.reference.toFixed(3)} (×${c.ratio.toFixed(2)})`
            : ''),
      )
      .join('\n') +
    '\n';
  if (values.json) {
    // The table too, on stderr: one run gives both.
    process.stderr.write(`\n${text}`);
    process.stdout.write(
      `${JSON.stringify(
        { machine: m, memMiB, workloadMiB, summaries, targets: checks, figures: all, runs: raw },
        null,
        2,
      )}\n`,
    );
  } else process.stdout.write(text);
  return summaries.every((s) => s.guestErrors === 0 && s.wrongPages === 0 && s.failed === 0)
    ? 0
    : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (err: unknown) => {
      process.stderr.write(`bench:qemu: ${err instanceof Error ? err.stack : String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
