/**
 * The bench scenarios. Each run starts fresh daemons (so CPU and peak RSS belong to that run),
 * drives vm-sim (in-process, or as child processes for many-vms) and returns its figures; the
 * runner (bench.ts) repeats runs and reports the median with the range.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startLocalHandler, type LocalHandler } from '../local-floor/local-handler.js';
import {
  runVmSim,
  runVmSimTouches,
  type HandoffFn,
  type LatencySummary,
  type VmSimPartialResult,
  type VmSimOptions,
  type VmSimResult,
} from '../vm-sim/vm-sim.js';
import { openGate } from '../vm-sim/start-gate.js';
import { runReference } from './c-ref.js';
import {
  ping,
  remoteFloorHandoff,
  startRemoteFloorServer,
  type HandleStats,
} from './remote-floor.js';
import { startDelayProxy } from './delay-proxy.js';
import { createLink, netnsUnavailable, type NetLink } from '../lib/netns.js';
import { runCVmm } from '../c-vmm/c-vmm.js';
import { FIRECRACKER_SCENARIOS } from './firecracker.js';
import { reserveHugePages } from '../lib/hugepages.js';
import { FakeSystemd } from '../lib/fake-systemd.js';
import { startDest, startSource, writeSourceConfig, type Daemon } from '../lib/daemons.js';
import {
  GiB,
  MiB,
  PAGE,
  run,
  withDaemons,
  type BenchContext,
  type DaemonPair,
  type DaemonPlacement,
  type ImageSpec,
} from './harness.js';
import { cpuSeconds } from './proc.js';
import { STAGE_METRICS, stageValues } from './stages.js';
import type { CpuMeter } from './proc.js';
import { median } from './stats.js';

export interface MetricDef {
  label: string;
  unit: string;
  /** Decimals shown in the table. */
  digits: number;
  /**
   * A ratio the runner computes against another row, when that row ran too:
   * `[row, its metric, this row's metric, 'over' (mine / theirs) | 'under' (theirs / mine)]`.
   * Run by run when the two rows ran interleaved (partners, plan.ts), else against the other
   * row's median.
   */
  derived?: [string, string, string, 'over' | 'under'];
}

/** Thrown by runOnce when the row cannot run here (not an error: the row is reported skipped). */
export class SkipScenario extends Error {}

export interface RunOutcome {
  /** Metric key → value (keys from the scenario's `metrics`). */
  values: Record<string, number>;
  verified: boolean;
  /** What a failed verification found, or other remarks about this run. */
  problems: string[];
}

export interface Scenario {
  /** Row name, e.g. `background/data-heavy`. */
  name: string;
  /** The `--only` name that selects it, e.g. `background`. */
  group: string;
  describe(ctx: BenchContext): string;
  /** What "verified" means for this row. */
  verification: string;
  metrics: Record<string, MetricDef>;
  /** Rows run interleaved with this one, run by run (plan.ts); selecting one selects all. */
  partners?: readonly string[];
  /** Rows selected with this one (a figure of its needs them), run in their own order. */
  requires?: readonly string[];
  /** Guest RAM the dest serves in one run, bytes (its RSS budget); absent: no dest. */
  guestRamBytes?(ctx: BenchContext): number;
  runOnce(ctx: BenchContext, index: number): Promise<RunOutcome>;
  /** Called after the last run (drops big images). */
  finish?(ctx: BenchContext): void;
}

export const GROUPS = [
  'demand-idle',
  'demand-huge',
  'demand-under-load',
  'background',
  'many-vcpus',
  'many-vms',
  'local-floor',
  'remote-floor',
  'upgrade',
  'firecracker',
  'link',
] as const;

// --- sizes ---

export function sizes(quick: boolean) {
  return {
    demandImage: { sizeBytes: quick ? 256 * MiB : GiB, seed: 1 } satisfies ImageSpec,
    demandTouches: quick ? 2000 : 20_000,
    vcpus: 8,
    vcpuTouches: quick ? 4000 : 32_000,
    backgroundBytes: quick ? 256 * MiB : 4 * GiB,
    cReferenceBytes: quick ? 256 * MiB : GiB,
    vms: 16,
    vmImage: { sizeBytes: quick ? 32 * MiB : 256 * MiB, seed: 5 } satisfies ImageSpec,
    vmTouches: quick ? 200 : 1000,
    /** First touches of the unmeasured migration that warms fresh daemons (see warmUp). */
    warmTouches: quick ? 1000 : 5000,
    hugeImage: { sizeBytes: quick ? 64 * MiB : 256 * MiB, seed: 3 } satisfies ImageSpec,
  };
}

const RUN_TIMEOUT_MS = 10 * 60_000;

// --- shared metric sets ---

const LATENCY: Record<string, MetricDef> = {
  faults: { label: 'faults timed', unit: '', digits: 0 },
  faultP50Us: { label: 'fault latency p50', unit: 'µs', digits: 1 },
  faultP99Us: { label: 'fault latency p99', unit: 'µs', digits: 1 },
  faultP999Us: { label: 'fault latency p99.9', unit: 'µs', digits: 1 },
  faultMaxUs: { label: 'fault latency max', unit: 'µs', digits: 1 },
};

/**
 * CPU per demand fault, for rows where every touch faulted (background held back): of warm
 * daemons (the measured migration), and of fresh ones (the warm-up migration before it).
 */
const CPU_PER_FAULT: Record<string, MetricDef> = {
  destCpuUsPerFault: { label: 'dest CPU per fault', unit: 'µs', digits: 1 },
  sourceCpuUsPerFault: { label: 'source CPU per fault', unit: 'µs', digits: 1 },
  freshDestCpuUsPerFault: {
    label: 'dest CPU per fault, fresh daemon (warm-up)',
    unit: 'µs',
    digits: 1,
  },
  freshSourceCpuUsPerFault: {
    label: 'source CPU per fault, fresh daemon (warm-up)',
    unit: 'µs',
    digits: 1,
  },
};

const DAEMONS: Record<string, MetricDef> = {
  destCpuSecPerGiB: { label: 'dest CPU per GiB placed', unit: 's/GiB', digits: 2 },
  sourceCpuSecPerGiB: { label: 'source CPU per GiB placed', unit: 's/GiB', digits: 2 },
  destPeakRssMiB: { label: 'dest peak RSS', unit: 'MiB', digits: 0 },
  sourcePeakRssMiB: { label: 'source peak RSS', unit: 'MiB', digits: 0 },
};

function latencyValues(l: LatencySummary): Record<string, number> {
  return {
    faults: l.count,
    faultP50Us: l.p50,
    faultP99Us: l.p99,
    faultP999Us: l.p999,
    faultMaxUs: l.max,
  };
}

function daemonValues(pair: DaemonPair, meter: CpuMeter, bytesPlaced: number) {
  const rss = pair.peakRss();
  const gib = Math.max(bytesPlaced, PAGE) / GiB;
  return {
    destCpuSecPerGiB: meter.seconds(0) / gib,
    sourceCpuSecPerGiB: meter.seconds(1) / gib,
    destPeakRssMiB: rss.dest / MiB,
    sourcePeakRssMiB: rss.source / MiB,
  };
}

/**
 * Verification of an in-process vm-sim run: full, or only the placed pages when it ended after
 * its touch phase (`endedEarly`: it was run with runVmSimTouches).
 */
function verdict(
  r: VmSimResult | VmSimPartialResult,
  endedEarly = false,
): { verified: boolean; problems: string[] } {
  const partial = endedEarly && (r as VmSimPartialResult).partial;
  const want = partial ? r.presentPages : r.totalPages;
  const verified =
    r.mismatchCount === 0 && r.pagesVerified === want && (partial || r.missingPages === 0);
  const problems = verified
    ? []
    : [
        `verification failed: ${r.pagesVerified}/${want} pages verified, ` +
          `${r.mismatchCount} mismatches, ${partial ? 0 : r.missingPages} missing`,
        ...r.mismatches.slice(0, 5).map((m) => `page ${m.page}: ${m.reason}`),
      ];
  if (endedEarly && !partial)
    problems.push('note: the migration completed before the touches ended');
  return { verified, problems };
}

/** A run fails when no page arrived for this long (a stalled migration, not a slow one). */
export const STALL_MS = 60_000;

/**
 * The vm-sim options every daemon-backed run shares: its image, the pair, the watch. `source`
 * is the URL handed to the dest (default the source's own: another for a proxy in the path).
 */
function vmAgainst(
  pair: DaemonPair,
  image: string,
  w: ReturnType<typeof watch>,
  source = pair.source.ws,
  migrationId = 'bench-vm',
): Pick<
  VmSimOptions,
  'signal' | 'onProgress' | 'image' | 'migrationId' | 'secret' | 'source' | 'destSocket'
> {
  return {
    signal: w.signal,
    onProgress: w.onProgress,
    image,
    migrationId,
    secret: pair.source.secretOf(migrationId),
    source,
    destSocket: pair.dest.socket,
  };
}

/**
 * Something put between the dest and the source for one run (the link's delay proxy): started
 * once both daemons run, it gives the URL the dest is handed; `stop` ends it after the run and
 * may add figures to the run's values.
 */
export type PathHook = (
  pair: DaemonPair,
) => Promise<{ url: string; stop(): Promise<Record<string, number>> }>;

/**
 * Where a daemon-backed run happens: the daemons' placement, the dest config, a path hook, and
 * how many first touches warm the daemons before the measured run (0: none, see warmUp).
 */
export interface RunSetting {
  destConfig?: string;
  where?: DaemonPlacement;
  path?: PathHook;
  warmTouches?: number;
}

/** The migration id of the warm-up migration (same image, registered beside bench-vm). */
const WARM_ID = 'bench-warm';

/**
 * Warms fresh daemons as a long-running pair is warm: one unmeasured migration of `touches`
 * random first touches, ended after them, before the measured one. V8 compiles the hot paths
 * of both daemons during their first few thousand faults (its optimizing compiler runs on
 * threads of the daemon, so it counts in the daemon's CPU), which a daemon pays once in its
 * life, not per fault. Returns the CPU per fault of that first migration (µs), so that the
 * fresh figure is reported beside the warm one.
 */
async function warmUp(
  ctx: BenchContext,
  pair: DaemonPair,
  image: string,
  url: string,
  touches: number,
): Promise<Record<string, number>> {
  const meter = pair.meter();
  const w = watch(ctx, 'warm-up', false);
  const r = await runVmSimTouches({
    ...vmAgainst(pair, image, w, url, WARM_ID),
    workers: 1,
    pattern: 'random',
    touches,
    opsAfterComplete: 0,
    timeoutMs: RUN_TIMEOUT_MS,
    onPhaseEnd: () => meter.stop(),
  }).finally(w.stop);
  const v = verdict(r, true);
  if (!v.verified) throw new Error(`the warm-up migration: ${v.problems.join('; ')}`);
  const faults = Math.max(1, r.workload.faults);
  return {
    freshDestCpuUsPerFault: (meter.seconds(0) * 1e6) / faults,
    freshSourceCpuUsPerFault: (meter.seconds(1) * 1e6) / faults,
  };
}

/** Runs `fn` with the pair of `setting`, the source URL to hand the dest, and the path's stop. */
async function withSetting<T>(
  ctx: BenchContext,
  image: string,
  setting: RunSetting,
  fn: (pair: DaemonPair, url: string) => Promise<T & { values: Record<string, number> }>,
): Promise<T & { values: Record<string, number> }> {
  const warm = setting.warmTouches ?? 0;
  return withDaemons(
    ctx,
    [{ id: 'bench-vm', image }, ...(warm > 0 ? [{ id: WARM_ID, image }] : [])],
    setting.destConfig,
    async (pair) => {
      const path = setting.path ? await setting.path(pair) : undefined;
      const url = path?.url ?? pair.source.ws;
      let out: T & { values: Record<string, number> };
      let fresh: Record<string, number> = {};
      try {
        if (warm > 0) fresh = await warmUp(ctx, pair, image, url, warm);
        out = await fn(pair, url);
      } catch (err) {
        await path?.stop().catch(() => undefined);
        throw err;
      }
      Object.assign(out.values, fresh);
      if (path) Object.assign(out.values, await path.stop());
      return out;
    },
    setting.where,
  );
}

/**
 * Progress and stall detection for one vm-sim run: `onProgress` prints a line on stderr every
 * 2 s (when `print`), and `signal` aborts the run when the present-page count has not changed
 * for STALL_MS. Call `stop()` when the run is over.
 */
function watch(ctx: BenchContext, label: string, print = true) {
  const t0 = performance.now();
  let lastLine = t0;
  let lastChange = t0;
  let lastPresent = -1;
  let lastPct = '0';
  const ac = new AbortController();
  const timer = setInterval(() => {
    if (performance.now() - lastChange < STALL_MS) return;
    const reason = `stalled: no page placed for ${STALL_MS / 1000} s at ${lastPct}% present`;
    ctx.say(`    ${label}: ${reason}`);
    ac.abort(reason);
  }, 1000);
  return {
    signal: ac.signal,
    stop: () => clearInterval(timer),
    onProgress: ({ presentPages, totalPages }: { presentPages: number; totalPages: number }) => {
      const now = performance.now();
      if (presentPages !== lastPresent) {
        lastPresent = presentPages;
        lastChange = now;
      }
      lastPct = ((100 * presentPages) / totalPages).toFixed(1);
      if (!print || now - lastLine < 2000 || presentPages >= totalPages) return;
      lastLine = now;
      ctx.say(`    ${label}: ${lastPct}% present after ${((now - t0) / 1000).toFixed(1)} s`);
    },
  };
}

// --- 1. demand-idle, 4. many-vcpus: touches with the background stream held back ---

/**
 * One run of first touches with the background held back (the dest config must hold it back):
 * `workers` threads touch `touches` random pages of `image` through a fresh pair placed as
 * `setting` says. Every touch faults, so the daemons' CPU is also given per fault.
 */
export async function runDemandTouches(
  ctx: BenchContext,
  index: number,
  o: {
    image: string;
    workers: number;
    touches: number;
    withRate: boolean;
    setting: RunSetting;
    /** Read the fault stages from the dest's /metrics (reachable only from here). */
    stages?: boolean;
    /** Which pages the thread touches first (default random). */
    pattern?: 'random' | 'sequential';
  },
): Promise<RunOutcome> {
  return withSetting(ctx, o.image, o.setting, async (pair, url) => {
    // The dest's stage histogram counts every migration: the warm-up's faults are taken out.
    const metricsText = async (): Promise<string> =>
      (await fetch(`${pair.dest.http}/metrics`)).text();
    const stagesBefore = o.stages ? await metricsText() : '';
    const meter = pair.meter();
    const w = watch(ctx, `run ${index + 1}`, false);
    const r = await runVmSimTouches({
      ...vmAgainst(pair, o.image, w, url),
      workers: o.workers,
      pattern: o.pattern ?? 'random',
      touches: o.touches,
      opsAfterComplete: 0,
      timeoutMs: RUN_TIMEOUT_MS,
      onPhaseEnd: () => meter.stop(),
    }).finally(w.stop);
    const v = verdict(r, true);
    const touchSec = (r.touchPhaseMs ?? r.elapsedMs) / 1000;
    const faults = Math.max(1, r.workload.faults);
    const stages = o.stages ? stageValues(await metricsText(), stagesBefore) : {};
    return {
      values: {
        ...latencyValues(r.faultLatencyUs),
        ...(o.withRate
          ? { pagesPerSec: r.workload.faults / touchSec, touchPhaseMs: touchSec * 1000 }
          : {}),
        destCpuUsPerFault: (meter.seconds(0) * 1e6) / faults,
        sourceCpuUsPerFault: (meter.seconds(1) * 1e6) / faults,
        ...stages,
        ...daemonValues(pair, meter, r.presentPages * PAGE),
      },
      ...v,
    };
  });
}

const DEMAND_VERIFICATION =
  'every page placed byte-for-byte; the migration is ended after the touches (unplaced ' +
  'pages are not verified)';

function demandNoBackground(o: {
  name: string;
  workers: (ctx: BenchContext) => number;
  touches: (ctx: BenchContext) => number;
  withRate: boolean;
  partners?: string[];
  extraMetrics?: Record<string, MetricDef>;
  /** Report the stages of the faults (the dest's fault stage histogram). */
  stages?: boolean;
}): Scenario {
  return {
    name: o.name,
    group: o.name,
    describe: (ctx) => {
      const s = sizes(ctx.quick);
      const w = o.workers(ctx);
      return (
        `${fmtBytes(s.demandImage.sizeBytes)} image, ${w} thread${w > 1 ? 's' : ''} ` +
        `first-touching ${o.touches(ctx)} random pages at once, background held back ` +
        `(dest backgroundDelayMs 600000), after a warm-up migration of ` +
        `${sizes(ctx.quick).warmTouches} first touches on the same daemons`
      );
    },
    verification: DEMAND_VERIFICATION,
    metrics: {
      ...LATENCY,
      ...(o.withRate
        ? {
            pagesPerSec: { label: 'faults served per second', unit: 'pages/s', digits: 0 },
            touchPhaseMs: { label: 'touch phase', unit: 'ms', digits: 0 },
          }
        : {}),
      ...(o.extraMetrics ?? {}),
      ...CPU_PER_FAULT,
      ...(o.stages ? STAGE_METRICS : {}),
      ...DAEMONS,
    },
    ...(o.partners ? { partners: o.partners } : {}),
    guestRamBytes: (ctx) => sizes(ctx.quick).demandImage.sizeBytes,
    async runOnce(ctx, index) {
      const image = await ctx.image(sizes(ctx.quick).demandImage);
      return runDemandTouches(ctx, index, {
        image: image.path,
        workers: o.workers(ctx),
        touches: o.touches(ctx),
        withRate: o.withRate,
        setting: {
          destConfig: ctx.noBackgroundConfig,
          warmTouches: sizes(ctx.quick).warmTouches,
        },
        stages: o.stages,
      });
    },
  };
}

const demandIdle = demandNoBackground({
  name: 'demand-idle',
  workers: () => 1,
  touches: (ctx) => sizes(ctx.quick).demandTouches,
  withRate: false,
  // The floors and under-load run interleaved with it: their ratios are taken run by run.
  partners: ['local-floor', 'remote-floor', 'demand-under-load'],
  stages: true,
  extraMetrics: {
    vsLocalFloor: {
      label: 'p50 / local floor p50',
      unit: '×',
      digits: 2,
      derived: ['local-floor', 'faultP50Us', 'faultP50Us', 'over'],
    },
    vsRemoteFloor: {
      label: 'p50 / remote floor p50',
      unit: '×',
      digits: 2,
      derived: ['remote-floor', 'faultP50Us', 'faultP50Us', 'over'],
    },
  },
});

const manyVcpus = demandNoBackground({
  name: 'many-vcpus',
  workers: (ctx) => sizes(ctx.quick).vcpus,
  touches: (ctx) => sizes(ctx.quick).vcpuTouches,
  withRate: true,
});

// --- 1b. demand-huge: 2 MiB pages, through c-vmm's hugetlbfs guest ---

const HUGE_PAGE = 2 * MiB;
/** How long the dest holds the background back in demand-huge, ms. */
const HUGE_HOLD_MS = 3000;

const demandHuge: Scenario = {
  name: 'demand-huge',
  group: 'demand-huge',
  describe: (ctx) =>
    `${fmtBytes(sizes(ctx.quick).hugeImage.sizeBytes)} image served in 2 MiB pages to c-vmm ` +
    `(hugetlbfs guest RAM, 1 vCPU first-touching half its pages) while the dest holds the ` +
    `background back for ${HUGE_HOLD_MS / 1000} s; c-vmm times each fault`,
  verification: 'every page byte-for-byte after complete (c-vmm)',
  metrics: { ...LATENCY, ...DAEMONS },
  guestRamBytes: (ctx) => sizes(ctx.quick).hugeImage.sizeBytes,
  async runOnce(ctx) {
    const spec = sizes(ctx.quick).hugeImage;
    const pages = spec.sizeBytes / HUGE_PAGE;
    const pool = reserveHugePages(pages + 8, pages);
    if ('skip' in pool) throw new SkipScenario(`no huge pages: ${pool.skip}`);
    try {
      const image = await ctx.image(spec);
      const config = join(ctx.dir, 'dest-huge.json');
      writeFileSync(config, JSON.stringify({ backgroundDelayMs: HUGE_HOLD_MS }) + '\n');
      return await withDaemons(
        ctx,
        [{ id: 'bench-huge', image: image.path, pageSizeBytes: HUGE_PAGE }],
        config,
        async (pair) => {
          const meter = pair.meter();
          const r = await runCVmm({
            socket: pair.dest.socket,
            id: 'bench-huge',
            secret: pair.source.secretOf('bench-huge'),
            source: pair.source.ws,
            image: image.path,
            regions: [{ offset: 0, sizeBytes: spec.sizeBytes, page: '2m' }],
            vcpus: 1,
            touchFraction: 0.5,
            writeFraction: 0,
            timeoutMs: RUN_TIMEOUT_MS,
          });
          meter.stop();
          const verified = r.ok && r.pagesVerified === r.totalPages;
          return {
            values: {
              faults: r.faults.count,
              faultP50Us: r.faults.p50Us,
              faultP99Us: r.faults.p99Us,
              faultMaxUs: r.faults.maxUs,
              ...daemonValues(pair, meter, spec.sizeBytes),
            },
            verified,
            problems: verified
              ? []
              : [
                  `c-vmm: ${r.outcome} ${r.code ?? ''}: ${r.pagesVerified}/${r.totalPages} ` +
                    `verified, ${r.mismatchCount} mismatches`,
                ],
          };
        },
      );
    } finally {
      pool.release();
    }
  },
};

// --- 2. demand-under-load ---

const demandUnderLoad: Scenario = {
  name: 'demand-under-load',
  group: 'demand-under-load',
  describe: (ctx) => {
    const s = sizes(ctx.quick);
    return (
      `as demand-idle (${fmtBytes(s.demandImage.sizeBytes)}, 1 thread, up to ` +
      `${s.demandTouches} first touches, after a warm-up migration) while the background ` +
      `stream runs at full speed; only touches that found their page missing are timed`
    );
  },
  verification: 'every page byte-for-byte after complete',
  metrics: {
    ...LATENCY,
    p50VsIdle: {
      label: 'fault p50 / demand-idle p50',
      unit: '×',
      digits: 2,
      derived: ['demand-idle', 'faultP50Us', 'faultP50Us', 'over'],
    },
    prePlaced: { label: 'touches already placed', unit: '', digits: 0 },
    migrationSec: { label: 'migration time', unit: 's', digits: 2 },
    ...DAEMONS,
  },
  guestRamBytes: (ctx) => sizes(ctx.quick).demandImage.sizeBytes,
  async runOnce(ctx, index) {
    const s = sizes(ctx.quick);
    const image = await ctx.image(s.demandImage);
    return withSetting(ctx, image.path, { warmTouches: s.warmTouches }, async (pair) => {
      const meter = pair.meter();
      const w = watch(ctx, `run ${index + 1}`);
      const r = await runVmSim({
        ...vmAgainst(pair, image.path, w),
        workers: 1,
        pattern: 'random',
        touches: s.demandTouches,
        opsAfterComplete: 0,
        timeoutMs: RUN_TIMEOUT_MS,
        onPhaseEnd: () => meter.stop(),
      }).finally(w.stop);
      return {
        values: {
          ...latencyValues(r.faultLatencyUs),
          prePlaced: r.workload.prePlaced,
          migrationSec: r.elapsedMs / 1000,
          ...daemonValues(pair, meter, r.totalPages * PAGE),
        },
        ...verdict(r),
      };
    });
  },
};

// --- 3. background ---

const BACKGROUND_IMAGES: ReadonlyArray<{
  variant: string;
  seed: number;
  what: string;
  image: Partial<ImageSpec>;
}> = [
  { variant: 'mixed', seed: 2, what: '40% zero (half of them holes), 30% text', image: {} },
  {
    variant: 'data-heavy',
    seed: 3,
    what: '10% zero (half of them holes), 30% text, 60% random',
    image: { zeroFraction: 0.1 },
  },
  {
    variant: 'mostly-empty',
    seed: 4,
    what: '90% zero (half of them holes), 5% text, 5% random',
    image: { zeroFraction: 0.9, textFraction: 0.05 },
  },
];

/** One run of the background stream alone (no workload) until every page is present. */
export async function runBackgroundFill(
  ctx: BenchContext,
  index: number,
  image: { path: string; sizeBytes: number; zeroPages: number },
  setting: RunSetting,
): Promise<RunOutcome> {
  return withSetting(ctx, image.path, setting, async (pair, url) => {
    const meter = pair.meter();
    const w = watch(ctx, `run ${index + 1}`);
    const r = await runVmSim({
      ...vmAgainst(pair, image.path, w, url),
      workers: 0,
      timeoutMs: RUN_TIMEOUT_MS,
      onPhaseEnd: () => meter.stop(),
    }).finally(w.stop);
    const sec = r.elapsedMs / 1000;
    const dataBytes = (r.totalPages - image.zeroPages) * PAGE;
    return {
      values: {
        seconds: sec,
        placedGBs: image.sizeBytes / sec / 1e9,
        dataGBs: dataBytes / sec / 1e9,
        ...daemonValues(pair, meter, r.totalPages * PAGE),
      },
      ...verdict(r),
    };
  });
}

const BACKGROUND_METRICS: Record<string, MetricDef> = {
  seconds: { label: 'time to all pages present', unit: 's', digits: 2 },
  placedGBs: { label: 'placed (all pages)', unit: 'GB/s', digits: 2 },
  dataGBs: { label: 'non-zero data placed', unit: 'GB/s', digits: 2 },
};

function backgroundScenario(b: (typeof BACKGROUND_IMAGES)[number]): Scenario {
  const spec = (ctx: BenchContext): ImageSpec => ({
    sizeBytes: sizes(ctx.quick).backgroundBytes,
    seed: b.seed,
    ...b.image,
  });
  return {
    name: `background/${b.variant}`,
    group: 'background',
    describe: (ctx) =>
      `${fmtBytes(spec(ctx).sizeBytes)} image, ${b.what}, no workload: handoff until every ` +
      `page is present (background stream only, no faults)`,
    verification: 'every page byte-for-byte after complete',
    metrics: {
      ...BACKGROUND_METRICS,
      vsCCopy: {
        label: 'placed / C UFFDIO_COPY ceiling',
        unit: '×',
        digits: 2,
        derived: ['background/c-reference', 'copyGBs', 'placedGBs', 'over'],
      },
      vsCDistinct: {
        label: 'data placed / C copy of new data',
        unit: '×',
        digits: 2,
        derived: ['background/c-reference', 'copyDistinctGBs', 'dataGBs', 'over'],
      },
      ...(b.variant === 'mostly-empty'
        ? {
            vsDataHeavy: {
              label: 'placed / data-heavy placed',
              unit: '×',
              digits: 2,
              derived: ['background/data-heavy', 'placedGBs', 'placedGBs', 'over'],
            } satisfies MetricDef,
          }
        : {}),
      ...DAEMONS,
    },
    // data-heavy and mostly-empty run interleaved with the C loop (their targets are ratios).
    ...(b.variant === 'mixed' ? {} : { partners: ['background/c-reference'] }),
    guestRamBytes: (ctx) => spec(ctx).sizeBytes,
    async runOnce(ctx, index) {
      const image = await ctx.image(spec(ctx));
      return runBackgroundFill(
        ctx,
        index,
        { path: image.path, sizeBytes: image.sizeBytes, zeroPages: image.pages.zero },
        {},
      );
    },
    finish: (ctx) => ctx.dropImage(spec(ctx)),
  };
}

const cReference: Scenario = {
  name: 'background/c-reference',
  group: 'background',
  describe: (ctx) =>
    `C program (scripts/bench/c/uffd-fill.c, cc -O2): ${fmtBytes(sizes(ctx.quick).cReferenceBytes)} ` +
    `of anonymous memory filled by UFFDIO_COPY in 256 KiB chunks from one buffer, one thread, ` +
    `no faults, no network (then UFFDIO_ZEROPAGE): the placement ceiling; then the same copy ` +
    `with every page new data (a source as large as the memory), as pages are in a migration`,
  verification: 'the filled memory compared with the buffer (and zero) by the C program',
  metrics: {
    copyGBs: { label: 'UFFDIO_COPY 256 KiB', unit: 'GB/s', digits: 2 },
    zeropageGBs: { label: 'UFFDIO_ZEROPAGE 256 KiB', unit: 'GB/s', digits: 1 },
    copyDistinctGBs: { label: 'UFFDIO_COPY 256 KiB, every page new', unit: 'GB/s', digits: 2 },
  },
  async runOnce(ctx) {
    const r = await runReference(ctx, sizes(ctx.quick).cReferenceBytes);
    return {
      values: {
        copyGBs: r.copyGBs,
        zeropageGBs: r.zeropageGBs,
        copyDistinctGBs: r.copyDistinctGBs,
      },
      verified: r.verified,
      problems: r.verified ? [] : ['the C reference read back wrong bytes'],
    };
  },
};

// --- 5. many-vms ---

interface VmSimCliResult {
  ok: boolean;
  totalPages: number;
  pagesVerified: number;
  mismatchCount: number;
  elapsedMs: number;
  startedAtMs: number;
  faultLatencyUs: LatencySummary;
}

const VM_SIM_CLI = fileURLToPath(new URL('../vm-sim/vm-sim.js', import.meta.url));

const manyVms: Scenario = {
  name: 'many-vms',
  group: 'many-vms',
  describe: (ctx) => {
    const s = sizes(ctx.quick);
    return (
      `${s.vms} VMs of ${fmtBytes(s.vmImage.sizeBytes)} migrating at once through one dest and ` +
      `one source (each VM a vm-sim process with 1 thread first-touching ${s.vmTouches} random ` +
      `pages, then waiting; all serve the same image file). The touches start together, once ` +
      `every VM's handoff was acked: the VMMs' own start-up is not in the fault figures`
    );
  },
  verification: 'every page of every VM byte-for-byte after its complete',
  metrics: {
    vmSecMedian: { label: 'VM migration time, median VM', unit: 's', digits: 2 },
    vmSecMax: { label: 'VM migration time, slowest VM', unit: 's', digits: 2 },
    aggregateGBs: {
      label: 'all VMs placed (first handoff → last complete)',
      unit: 'GB/s',
      digits: 2,
    },
    faultP50Us: { label: 'fault p50, median VM', unit: 'µs', digits: 1 },
    faultP50UsMax: { label: 'fault p50, slowest VM', unit: 'µs', digits: 1 },
    faultP50SpreadX: { label: 'slowest VM p50 / median VM p50', unit: '×', digits: 2 },
    faultP99Us: { label: 'fault p99, worst VM', unit: 'µs', digits: 1 },
    p50VsUnderLoad: {
      label: 'fault p50 / demand-under-load p50',
      unit: '×',
      digits: 2,
      derived: ['demand-under-load', 'faultP50Us', 'faultP50Us', 'over'],
    },
    ...DAEMONS,
  },
  // Its target compares it with single-VM under-load (not interleaved: 16 VMs at once).
  requires: ['demand-under-load'],
  guestRamBytes: (ctx) => sizes(ctx.quick).vms * sizes(ctx.quick).vmImage.sizeBytes,
  async runOnce(ctx, index) {
    const s = sizes(ctx.quick);
    const image = await ctx.image(s.vmImage);
    const ids = Array.from({ length: s.vms }, (_, i) => `bench-vm-${i}`);
    const gate = join(ctx.dir, `many-vms-gate-${index}`);
    mkdirSync(gate);
    return withDaemons(
      ctx,
      ids.map((id) => ({ id, image: image.path })),
      undefined,
      async (pair) => {
        const meter = pair.meter();
        let done = 0;
        const finished = openGate(gate, ids, () => done);
        const results = await Promise.all(
          ids.map(async (id) => {
            const args = [
              '--enable-source-maps',
              VM_SIM_CLI,
              ...['--image', image.path, '--source', pair.source.ws, '--socket', pair.dest.socket],
              ...['--id', id, '--workers', '1', '--pattern', 'random'],
              // withDaemons wrote each migration's secret file there.
              ...['--secret-file', join(ctx.dir, `${id}.secret`)],
              ...['--touches', String(s.vmTouches), '--ops-after-complete', '0'],
              ...['--start-gate', gate, '--timeout', '300', '--json'],
            ];
            try {
              const { stdout } = await run(ctx, process.execPath, args);
              return JSON.parse(stdout.trim()) as VmSimCliResult;
            } catch (err) {
              const out = (err as { stdout?: string }).stdout?.trim();
              if (out) return JSON.parse(out) as VmSimCliResult; // exit 1: a mismatch
              return { error: (err as Error).message, id };
            } finally {
              if (++done % 4 === 0) ctx.say(`    run ${index + 1}: ${done}/${ids.length} VMs done`);
            }
          }),
        );
        meter.stop();
        await finished;
        const problems: string[] = [];
        const oks: VmSimCliResult[] = [];
        results.forEach((r, i) => {
          if ('error' in r) problems.push(`${ids[i]}: ${r.error}`);
          else if (!r.ok || r.pagesVerified !== r.totalPages || r.mismatchCount !== 0) {
            problems.push(
              `${ids[i]}: ${r.pagesVerified}/${r.totalPages} verified, ${r.mismatchCount} mismatches`,
            );
          } else oks.push(r);
        });
        const all = results.filter((r): r is VmSimCliResult => !('error' in r));
        const secs = all.map((r) => r.elapsedMs / 1000);
        const start = Math.min(...all.map((r) => r.startedAtMs));
        const end = Math.max(...all.map((r) => r.startedAtMs + r.elapsedMs));
        return {
          values: {
            vmSecMedian: median(secs),
            vmSecMax: Math.max(...secs),
            aggregateGBs: (all.length * image.sizeBytes) / ((end - start) / 1000) / 1e9,
            faultP50Us: median(all.map((r) => r.faultLatencyUs.p50)),
            faultP50UsMax: Math.max(...all.map((r) => r.faultLatencyUs.p50)),
            faultP50SpreadX:
              Math.max(...all.map((r) => r.faultLatencyUs.p50)) /
              median(all.map((r) => r.faultLatencyUs.p50)),
            faultP99Us: Math.max(...all.map((r) => r.faultLatencyUs.p99)),
            ...daemonValues(pair, meter, all.length * image.sizeBytes),
          },
          verified: problems.length === 0 && oks.length === ids.length,
          problems,
        };
      },
    );
  },
};

// --- 6. local-floor ---

const localFloor: Scenario = {
  name: 'local-floor',
  group: 'local-floor',
  describe: (ctx) => {
    const s = sizes(ctx.quick);
    return (
      `demand-idle's fault pattern (${fmtBytes(s.demandImage.sizeBytes)}, 1 thread, ` +
      `${s.demandTouches} random first touches, no background) served by the in-process ` +
      `reference handler (scripts/local-floor): no daemon, no network`
    );
  },
  verification:
    'every page placed byte-for-byte; the run is ended after the touches (unplaced pages are ' +
    'not verified)',
  metrics: {
    ...LATENCY,
    handlerServiceP50Us: { label: 'handler service p50 (event → placed)', unit: 'µs', digits: 1 },
    handlerCpuSecPerGiB: {
      label: 'handler thread CPU per GiB placed',
      unit: 's/GiB',
      digits: 2,
    },
  },
  async runOnce(ctx) {
    const s = sizes(ctx.quick);
    const image = await ctx.image(s.demandImage);
    let handler: LocalHandler | undefined;
    // The handler runs on this (main) thread: its CPU is the main thread's, counted from the
    // handoff to the end of the touch phase (vm-sim's own main-thread work is idle meanwhile).
    let cpuStart = 0;
    let cpuEnd = 0;
    const mainCpu = (): number => cpuSeconds(process.pid, process.pid);
    const handoff: HandoffFn = (request, uffdFd, sink) => {
      cpuStart = mainCpu();
      handler = startLocalHandler({
        uffdFd,
        request,
        imagePath: image.path,
        backgroundAfterFaults: Number.MAX_SAFE_INTEGER,
        onReply: (r) => sink.reply(r),
      });
      return { close: () => handler!.close() };
    };
    const r = await runVmSimTouches({
      image: image.path,
      migrationId: 'local-floor',
      source: 'ws://127.0.0.1:1',
      workers: 1,
      pattern: 'random',
      touches: s.demandTouches,
      opsAfterComplete: 0,
      timeoutMs: RUN_TIMEOUT_MS,
      handoff,
      onPhaseEnd: () => (cpuEnd = mainCpu()),
    });
    const service = handler!.stats.serviceUs;
    return {
      values: {
        ...latencyValues(r.faultLatencyUs),
        handlerServiceP50Us: median(service),
        handlerCpuSecPerGiB: (cpuEnd - cpuStart) / ((r.presentPages * PAGE) / GiB),
      },
      ...verdict(r, true),
    };
  },
};

// --- remote-floor: a C handler fetching each page from a C server over TCP loopback ---

const remoteFloor: Scenario = {
  name: 'remote-floor',
  group: 'remote-floor',
  describe: (ctx) => {
    const s = sizes(ctx.quick);
    return (
      `demand-idle's fault pattern (${fmtBytes(s.demandImage.sizeBytes)}, 1 thread, ` +
      `${s.demandTouches} random first touches) served by a C fault handler fetching each page ` +
      `from a C page server over one TCP loopback connection (scripts/bench/c/remote-floor.c): ` +
      `the least a remote fault costs here; then the C round trip alone (32 B request, 4 KiB ` +
      `answer)`
    );
  },
  verification:
    'every page placed byte-for-byte; the run is ended after the touches (unplaced pages are ' +
    'not verified)',
  metrics: {
    ...LATENCY,
    handlerServiceP50Us: { label: 'handler service p50 (event → placed)', unit: 'µs', digits: 1 },
    handlerCpuUsPerFault: { label: 'handler CPU per fault', unit: 'µs', digits: 1 },
    serverCpuUsPerRequest: { label: 'server CPU per request', unit: 'µs', digits: 1 },
    rttP50Us: { label: 'C round trip p50 (no uffd)', unit: 'µs', digits: 1 },
  },
  async runOnce(ctx) {
    const s = sizes(ctx.quick);
    const image = await ctx.image(s.demandImage);
    const server = await startRemoteFloorServer(ctx, { image: image.path });
    try {
      const rf = await remoteFloorHandoff(ctx, { server: server.address });
      let handled: HandleStats;
      let r: VmSimPartialResult | VmSimResult;
      try {
        r = await runVmSimTouches({
          image: image.path,
          migrationId: 'remote-floor',
          source: 'ws://127.0.0.1:1',
          workers: 1,
          pattern: 'random',
          touches: s.demandTouches,
          opsAfterComplete: 0,
          timeoutMs: RUN_TIMEOUT_MS,
          handoff: rf.handoff,
        });
        handled = await rf.stats();
      } catch (err) {
        rf.kill();
        throw err;
      }
      const rtt = await ping(ctx, {
        server: server.address,
        pages: s.demandImage.sizeBytes / PAGE,
        count: 2000,
      });
      const served = await server.stop();
      return {
        values: {
          ...latencyValues(r.faultLatencyUs),
          handlerServiceP50Us: handled.serviceP50Us,
          handlerCpuUsPerFault: handled.cpuNsPerFault / 1000,
          serverCpuUsPerRequest: served.cpuNsPerRequest / 1000,
          rttP50Us: rtt.p50Us,
        },
        ...verdict(r, true),
      };
    } finally {
      server.kill();
    }
  },
};

// --- link: the daemons in two network namespaces joined by a veth pair (tbf, delay proxy) ---

/** One-way delays of the emulated link, µs (round trips 0, 100 and 500 µs plus the link's own). */
export const LINK_DELAYS_US = [0, 50, 250] as const;

const links = new Map<string, NetLink>();

/** The bench's link (created on first use, removed at the end of the bench); skips without root. */
function benchLink(ctx: BenchContext): NetLink {
  let link = links.get(ctx.dir);
  if (!link) {
    const why = netnsUnavailable();
    if (why) throw new SkipScenario(why);
    link = createLink({ rate: LINK_RATE });
    links.set(ctx.dir, link);
    ctx.onCleanup(() => link!.close());
  }
  return link;
}

const LINK_RATE = '2gbit';

/**
 * The placement over the link: the dest (and the proxy) in namespace a, the source in b
 * listening on b's address; the dest is handed the proxy's URL (127.0.0.1 in a), the proxy
 * forwards to the source across the veth with `delayUs` added each way.
 */
function linkSetting(ctx: BenchContext, delayUs: number, destConfig?: string): RunSetting {
  const link = benchLink(ctx);
  return {
    destConfig,
    where: {
      source: { netns: link.b.netns, host: link.b.address, args: ['--allow-plaintext'] },
      dest: { netns: link.a.netns },
    },
    path: async (pair) => {
      const proxy = await startDelayProxy(ctx, {
        delayUs,
        netns: link.a.netns,
        maps: [{ listen: '127.0.0.1:0', target: `${link.b.address}:${pair.source.port}` }],
      });
      return {
        url: `ws://127.0.0.1:${proxy.ports[0]}`,
        async stop() {
          const st = await proxy.stop();
          return { proxyLateP50Us: st.lateP50Us, proxyLateP99Us: st.lateP99Us };
        },
      };
    },
  };
}

const PROXY_LATENESS: Record<string, MetricDef> = {
  proxyLateP50Us: { label: 'proxy lateness p50 (chunk left after due)', unit: 'µs', digits: 1 },
  proxyLateP99Us: { label: 'proxy lateness p99', unit: 'µs', digits: 1 },
};

const linkCalibration: Scenario = {
  name: 'link/calibration',
  group: 'link',
  describe: () =>
    `the emulated link alone: two network namespaces joined by a veth pair, tbf ${LINK_RATE} ` +
    `each way, C round trips (32 B request, 4 KiB answer; scripts/bench/c/remote-floor.c ping) ` +
    `straight across the veth, then through the delay proxy (scripts/bench/c/delay-proxy.c) at ` +
    `each one-way delay (${LINK_DELAYS_US.join(', ')} µs); the proxy's own cost is its zero-delay ` +
    `round trip minus the direct one. Needs root and iproute2`,
  verification: 'none (no pages are placed)',
  metrics: {
    directP50Us: { label: 'round trip p50, direct', unit: 'µs', digits: 1 },
    ...Object.fromEntries(
      LINK_DELAYS_US.flatMap((d) => [
        [
          `rtt${2 * d}P50Us`,
          { label: `round trip p50, proxy at ${d} µs each way`, unit: 'µs', digits: 1 },
        ],
        [
          `rtt${2 * d}P99Us`,
          { label: `round trip p99, proxy at ${d} µs each way`, unit: 'µs', digits: 1 },
        ],
      ]),
    ),
    proxyAddedP50Us: { label: 'proxy added at zero delay, p50', unit: 'µs', digits: 1 },
    streamGBs: { label: 'stream across the link (depth 16, 256 KiB)', unit: 'GB/s', digits: 2 },
  },
  async runOnce(ctx) {
    const link = benchLink(ctx);
    const image = await ctx.image(sizes(ctx.quick).demandImage);
    const pages = image.sizeBytes / PAGE;
    const server = await startRemoteFloorServer(ctx, {
      image: image.path,
      host: link.b.address,
      netns: link.b.netns,
    });
    try {
      const count = ctx.quick ? 2000 : 10_000;
      const a = link.a.netns;
      const direct = await ping(ctx, { server: server.address, pages, count, netns: a });
      const stream = await ping(ctx, {
        server: server.address,
        pages,
        count: ctx.quick ? 1000 : 4000,
        length: 256 * 1024,
        depth: 16,
        netns: a,
      });
      const values: Record<string, number> = {
        directP50Us: direct.p50Us,
        streamGBs: stream.bytesPerSec / 1e9,
      };
      for (const d of LINK_DELAYS_US) {
        const proxy = await startDelayProxy(ctx, {
          delayUs: d,
          netns: a,
          maps: [{ listen: '127.0.0.1:0', target: server.address }],
        });
        try {
          const p = await ping(ctx, {
            server: `127.0.0.1:${proxy.ports[0]}`,
            pages,
            count: d ? count / 4 : count,
            netns: a,
          });
          values[`rtt${2 * d}P50Us`] = p.p50Us;
          values[`rtt${2 * d}P99Us`] = p.p99Us;
        } finally {
          await proxy.stop().catch(() => proxy.kill());
        }
      }
      values['proxyAddedP50Us'] = values['rtt0P50Us']! - direct.p50Us;
      await server.stop();
      return { values, verified: true, problems: [] };
    } finally {
      server.kill();
    }
  },
};

function linkDemand(delayUs: number): Scenario {
  const name = `link/rtt${2 * delayUs}/demand-idle`;
  return {
    name,
    group: 'link',
    describe: (ctx) =>
      `demand-idle (${fmtBytes(sizes(ctx.quick).demandImage.sizeBytes)}, 1 thread, ` +
      `${sizes(ctx.quick).demandTouches} random first touches, background held back, after a ` +
      `warm-up migration) with the dest and the source in two namespaces, through the delay ` +
      `proxy at ${delayUs} µs each way`,
    verification: DEMAND_VERIFICATION,
    metrics: { ...LATENCY, ...CPU_PER_FAULT, ...PROXY_LATENESS, ...DAEMONS },
    partners: ['link/calibration'],
    requires: ['local-floor'],
    guestRamBytes: (ctx) => sizes(ctx.quick).demandImage.sizeBytes,
    async runOnce(ctx, index) {
      const s = sizes(ctx.quick);
      const setting = linkSetting(ctx, delayUs, ctx.noBackgroundConfig);
      const image = await ctx.image(s.demandImage);
      return runDemandTouches(ctx, index, {
        image: image.path,
        workers: 1,
        touches: s.demandTouches,
        withRate: false,
        setting: { ...setting, warmTouches: s.warmTouches },
      });
    },
  };
}

/** What the prefetch rows ask for after each faulting page (the dest's demandPrefetchBytes). */
const PREFETCH_BYTES = 64 * 1024;

/**
 * Prefetch on the demand channel, off and on, across the link: 1 thread first-touching random
 * pages (where neighbours are rarely wanted) and sweeping pages in order (where they always are),
 * background held back. Each run measures all four, in an order that alternates between runs.
 */
function linkPrefetch(delayUs: number): Scenario {
  const name = `link/rtt${2 * delayUs}/prefetch`;
  const touches = (ctx: BenchContext): number => sizes(ctx.quick).demandTouches / 4;
  const metrics: Record<string, MetricDef> = {};
  for (const p of ['random', 'sequential'] as const) {
    for (const m of ['off', 'on'] as const) {
      metrics[`${p}${m}P50Us`] = { label: `${p}, prefetch ${m}: fault p50`, unit: 'µs', digits: 1 };
      metrics[`${p}${m}Faults`] = { label: `${p}, prefetch ${m}: faults`, unit: '', digits: 0 };
      metrics[`${p}${m}Ms`] = { label: `${p}, prefetch ${m}: touch phase`, unit: 'ms', digits: 0 };
    }
    metrics[`${p}Speedup`] = {
      label: `${p}: touch phase off / on (>1: prefetch wins)`,
      unit: '×',
      digits: 2,
    };
  }
  return {
    name,
    group: 'link',
    describe: (ctx) =>
      `demand prefetch off and on (${PREFETCH_BYTES / 1024} KiB after each faulting page): 1 ` +
      `thread first-touching ${touches(ctx)} random pages, then sweeping ${touches(ctx)} pages in ` +
      `order, of ${fmtBytes(sizes(ctx.quick).demandImage.sizeBytes)}, background held back, ` +
      `across the link through the delay proxy at ${delayUs} µs each way`,
    verification: DEMAND_VERIFICATION,
    metrics,
    partners: ['link/calibration'],
    guestRamBytes: (ctx) => sizes(ctx.quick).demandImage.sizeBytes,
    async runOnce(ctx, index) {
      const s = sizes(ctx.quick);
      const config = { off: '', on: '' };
      for (const m of ['off', 'on'] as const) {
        config[m] = join(ctx.dir, `dest-prefetch-${m}.json`);
        const bytes = m === 'on' ? PREFETCH_BYTES : 0;
        writeFileSync(
          config[m],
          JSON.stringify({ backgroundDelayMs: 600_000, demandPrefetchBytes: bytes }) + '\n',
        );
      }
      const image = await ctx.image(s.demandImage);
      const values: Record<string, number> = {};
      const problems: string[] = [];
      let verified = true;
      const modes = index % 2 === 0 ? (['off', 'on'] as const) : (['on', 'off'] as const);
      for (const pattern of ['random', 'sequential'] as const) {
        for (const m of modes) {
          const r = await runDemandTouches(ctx, index, {
            image: image.path,
            workers: 1,
            touches: touches(ctx),
            withRate: true,
            pattern,
            setting: linkSetting(ctx, delayUs, config[m]),
          });
          values[`${pattern}${m}P50Us`] = r.values['faultP50Us']!;
          values[`${pattern}${m}Faults`] = r.values['faults']!;
          values[`${pattern}${m}Ms`] = r.values['touchPhaseMs']!;
          verified &&= r.verified;
          problems.push(...r.problems.map((x) => `${pattern}, prefetch ${m}: ${x}`));
        }
        values[`${pattern}Speedup`] = values[`${pattern}offMs`]! / values[`${pattern}onMs`]!;
      }
      return { values, verified, problems };
    },
  };
}

function linkDataHeavy(delayUs: number): Scenario {
  const name = `link/rtt${2 * delayUs}/data-heavy`;
  const spec = (ctx: BenchContext): ImageSpec => ({
    sizeBytes: ctx.quick ? 256 * MiB : GiB,
    seed: 3,
    zeroFraction: 0.1,
  });
  return {
    name,
    group: 'link',
    describe: (ctx) =>
      `background/data-heavy's image (${fmtBytes(spec(ctx).sizeBytes)}) streamed to the dest ` +
      `across the link, through the delay proxy at ${delayUs} µs each way`,
    verification: 'every page byte-for-byte after complete',
    metrics: { ...BACKGROUND_METRICS, ...PROXY_LATENESS, ...DAEMONS },
    partners: ['link/calibration'],
    guestRamBytes: (ctx) => spec(ctx).sizeBytes,
    async runOnce(ctx, index) {
      const setting = linkSetting(ctx, delayUs);
      const image = await ctx.image(spec(ctx));
      return runBackgroundFill(
        ctx,
        index,
        { path: image.path, sizeBytes: image.sizeBytes, zeroPages: image.pages.zero },
        setting,
      );
    },
    finish: (ctx) => ctx.dropImage(spec(ctx)),
  };
}

// --- upgrade: the dest restarted mid-migration, resuming from systemd's fd store ---

const upgrade: Scenario = {
  name: 'upgrade',
  group: 'upgrade',
  describe: (ctx) =>
    `a ${fmtBytes(sizes(ctx.quick).demandImage.sizeBytes)} VM migrating under a 2-thread mixed ` +
    `workload; at 30% present the dest is stopped (SIGTERM) and a new one started as systemd ` +
    `would, with the fd store (scripts/lib/fake-systemd.ts); the VMM does nothing`,
  verification: 'every page byte-for-byte after complete; the VMM never re-handed its uffd',
  metrics: {
    downMs: { label: 'dest down (SIGTERM → new daemon ready)', unit: 'ms', digits: 0 },
    pauseMs: { label: 'guest-visible pause (longest fault wait)', unit: 'ms', digits: 0 },
    faultP99Us: { label: 'fault latency p99', unit: 'µs', digits: 1 },
    migrationSec: { label: 'migration time', unit: 's', digits: 2 },
  },
  async runOnce(ctx, index) {
    const image = await ctx.image(sizes(ctx.quick).demandImage);
    const id = `bench-upgrade-${index}`;
    const systemd = new FakeSystemd(ctx.dir);
    const daemons: Daemon[] = [];
    try {
      const config = writeSourceConfig(ctx.dir, `source-upgrade-${index}`, [
        { id, image: image.path, frozen: true },
      ]);
      const source = await startSource(ctx.dir, ['--config', config.path], `source-up-${index}`, {
        secrets: config.secrets,
      });
      daemons.push(source);
      const first = await startDest(ctx.dir, [], `dest-up-${index}-0`, { systemd });
      daemons.push(first);
      const w = watch(ctx, `run ${index + 1}`);
      let restarted = false;
      let downMs = 0;
      const vm = runVmSim({
        image: image.path,
        migrationId: id,
        secret: source.secretOf(id),
        source: source.ws,
        destSocket: first.socket,
        signal: w.signal,
        workers: 2,
        pattern: 'mixed',
        timeoutMs: RUN_TIMEOUT_MS,
        onProgress: (p) => {
          w.onProgress(p);
          if (restarted || p.presentPages < 0.3 * p.totalPages) return;
          restarted = true;
          const t0 = performance.now();
          const readies = systemd.messages.filter((m) => m['READY'] === '1').length;
          first.child.once('exit', () => {
            void startDest(ctx.dir, [], `dest-up-${index}-1`, {
              systemd,
              socket: first.socket,
              port: first.port,
            }).then(async (second) => {
              daemons.push(second);
              await systemd.until(
                () => systemd.messages.filter((m) => m['READY'] === '1').length > readies,
              );
              downMs = performance.now() - t0;
            });
          });
          first.child.kill('SIGTERM');
        },
      }).finally(w.stop);
      const r = await vm;
      const problems = verdict(r);
      if (r.resumes !== 0) problems.problems.push(`the VMM re-handed its uffd ${r.resumes} times`);
      if (!restarted) problems.problems.push('the migration ended before the restart');
      return {
        values: {
          downMs,
          pauseMs: r.faultLatencyUs.max / 1000,
          faultP99Us: r.faultLatencyUs.p99,
          migrationSec: r.elapsedMs / 1000,
        },
        verified: problems.verified && r.resumes === 0 && restarted,
        problems: problems.problems,
      };
    } finally {
      await Promise.all(daemons.map((d) => d.stop()));
      systemd.close();
    }
  },
};

export const SCENARIOS: Scenario[] = [
  demandIdle,
  demandHuge,
  demandUnderLoad,
  cReference,
  ...BACKGROUND_IMAGES.map(backgroundScenario),
  manyVcpus,
  manyVms,
  localFloor,
  remoteFloor,
  upgrade,
  ...FIRECRACKER_SCENARIOS,
  linkCalibration,
  ...LINK_DELAYS_US.map(linkDemand),
  ...LINK_DELAYS_US.map(linkPrefetch),
  ...LINK_DELAYS_US.map(linkDataHeavy),
];

export function fmtBytes(n: number): string {
  return n >= GiB ? `${+(n / GiB).toFixed(2)} GiB` : `${+(n / MiB).toFixed(1)} MiB`;
}
