/**
 * A live migration of a real, stock QEMU VM through yabusame, end to end on loopback, driven
 * by `yabusame migrate` and measured: what the demo, the end-to-end test and the bench run.
 *
 *  1. `yabusame source` (images beneath /dev/shm, where QEMU's RAM files are) and `yabusame
 *     dest` (scripts/lib/daemons.ts: control sockets in the work folder, metrics on loopback).
 *     With `cutAfterMs`, a ChaosProxy (scripts/chaos/proxy.ts) stands between the dest and the
 *     source's page port.
 *  2. The source QEMU boots the test guest (TCG), with two more QMP sockets: one that the source
 *     daemon follows for the freeze, one for `yabusame migrate`.
 *  3. `yabusame migrate --json` does the rest. The destination QEMU is either started by it
 *     (`dest: 'command'`: its command line after `--`, its output in a log file read here), or
 *     started here with the preload and a secret file (`dest: 'qmp'`: this process keeps its
 *     serial console and stderr with their arrival times; it waits in the preload until
 *     migrate registers the migration).
 *  4. Measured: source STOP → destination RESUME (QMP event times), STOP → all RAM present
 *     (the preload's `complete` line when this process reads QEMU's stderr, else migrate's
 *     figure), the guest's slowest batch after resume and its verification, the dest's fault
 *     service time from its metrics, and optionally the destination's page faults as the
 *     kernel sees them.
 *
 * With `restartDestAfterMs` the dest daemon is killed (SIGKILL) that long after RESUME and a new
 * one started on the same socket: the preload hands the uffd over again with "resume":true.
 * With `cutAfterMs` every page connection is cut that long after RESUME; the dest reconnects.
 *
 * CLI: node dist/scripts/qemu/try-yabusame.js [--mem 1024] [--workload-mib 512] [--runs 1]
 *      [--dest command|qmp] [--kernel-trace] [--restart-dest-after-ms MS] [--cut-after-ms MS]
 *      [--json] [--keep]
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { basename, join } from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { connectQmp } from '../../daemon/qemu/qmp.js';
import { ChaosProxy } from '../chaos/proxy.js';
import {
  CLI,
  registerMigration,
  secretFile,
  startDest,
  startSource,
  type Daemon,
  type SourceDaemon,
} from '../lib/daemons.js';
import { generateImage } from '../image/gen-image.js';
import { runVmSim } from '../vm-sim/vm-sim.js';
import { buildGuest, type GuestFiles } from './guest/build.js';
import {
  faultWaits,
  mappingOf,
  summarizeFaults,
  threadsOf,
  UserFaultTrace,
  type FaultSummary,
  type FaultWaits,
} from './kfaults.js';
import { guestView, type GuestView } from './measure.js';
import { bucketQuantile, stageValues } from '../bench/stages.js';
import { buildPreload } from './preload-build.js';
import {
  LogTail,
  nowMs,
  Qemu,
  QEMU_BINARY,
  qemuArgs,
  shmRamPath,
  type QemuOptions,
  type SerialLine,
} from './qemu.js';

export interface Step {
  step: string;
  ms: number;
}

export interface YabusameRun {
  ok: boolean;
  /** What failed, if anything: the first error seen, with codes. */
  failure: string | null;
  /** `yabusame migrate`'s exit code. */
  migrateExit: number | null;
  steps: Step[];
  stopToResumeMs: number;
  /** STOP → all RAM present, ms (the preload's `complete` line, or migrate's own figure). */
  stopToCompleteMs: number;
  /** migrate's own STOP → complete (it polls the source: at its --interval's resolution). */
  migrateStopToCompleteMs: number;
  /** The `complete` reply line the preload printed, parsed (dest: 'qmp'). */
  complete: Record<string, unknown> | null;
  /** The dest's fault service time from its metrics (the last dest's, after a restart). */
  faultServiceMs: { count: number; p50: number; p99: number } | null;
  /**
   * Where a demand fault's time went, p50 and p99 of each stage in µs (the dest's
   * yabusame_dest_fault_stage_seconds, scripts/bench/stages.ts keys; the last dest's only).
   */
  faultStagesUs: Record<string, number>;
  guest: GuestView;
  /** The destination QEMU reached `running` (query-status after the migration). */
  destRunning: boolean;
  /** The destination QEMU's user page faults on guest RAM (with kernelTrace). */
  kernelFaults: FaultSummary | null;
  /** Each fault as the faulting thread waited for it, from the kernel (with kernelTrace). */
  faultWaits: FaultWaits | null;
  destRestartedAfterMs: number | null;
  /** Page connections cut, and when (ms after RESUME). */
  cuts: { afterMs: number; connections: number } | null;
  /** Lines `yabusame migrate` printed (JSON). */
  migrateLines: Record<string, unknown>[];
  /** What the preload printed on the destination QEMU's stderr. */
  preloadLines: string[];
  /** Log lines of the daemons at warn or error level. */
  daemonProblems: string[];
}

export interface TryOptions {
  guest: GuestFiles;
  preload: string;
  workDir: string;
  memMiB: number;
  workloadMiB: number;
  /** Who starts the destination QEMU: `yabusame migrate` (command) or this process (qmp). */
  dest: 'command' | 'qmp';
  /**
   * Trace the destination's page faults and its threads' sleeps and wake-ups in the kernel
   * (root, tracefs; dest: 'qmp').
   */
  kernelTrace?: boolean;
  /** Kill the dest daemon this long after RESUME and start a new one on the same socket. */
  restartDestAfterMs?: number;
  /** Cut every page connection this long after RESUME (through a ChaosProxy). */
  cutAfterMs?: number;
  /**
   * Warm the daemons first: while the source guest boots, two migrations of a 256 MiB image
   * (random and zero pages, vm-sim's workload on 4 threads) go through the same dest and source,
   * so the measured one finds their code compiled, as a long-running daemon's is. Default false:
   * the daemons' first migration.
   */
  warm?: boolean;
  /** Extra arguments for `yabusame dest` and `yabusame source`. */
  destArgs?: string[];
  sourceArgs?: string[];
  /** Workload batches to wait for on the destination after completion. Default 3. */
  batchesAfter?: number;
  log: (msg: string) => void;
  /** Every line as it comes: the guests' consoles and migrate's JSON lines. */
  onLine?: (who: 'src' | 'dst' | 'migrate', line: SerialLine) => void;
  /** The arguments `yabusame migrate` runs with. */
  onMigrate?: (argv: string[]) => void;
}

/** Bucket counts of the dest's fault service histogram, from its /metrics text. */
export function faultBuckets(text: string): [number, number][] {
  const buckets: [number, number][] = [];
  for (const m of text.matchAll(
    /^yabusame_dest_fault_service_seconds_bucket\{le="([^"]+)"\} (\d+)/gm,
  )) {
    buckets.push([m[1] === '+Inf' ? Infinity : Number(m[1]), Number(m[2])]);
  }
  return buckets;
}

const MiB = 1024 * 1024;

/** Warm-up migrations before a warm run. */
const WARM_UP_MIGRATIONS = 2;

/**
 * Migrations of a 256 MiB image through the daemons (vm-sim as the VMM, every page verified), so
 * that the next one runs code V8 has already optimized. One migration with one vm-sim thread was
 * not enough: V8's code log showed about 70 of the daemons' functions, most of the fault path
 * among them, first optimized during the measured migration. After two with 4 threads, about 10.
 * Throws if one is not verified.
 */
async function warmUp(source: SourceDaemon, dest: { socket: string }, dir: string): Promise<void> {
  for (let i = 1; i <= WARM_UP_MIGRATIONS; i++) await warmUpOnce(source, dest, `${dir}-${i}`);
}

async function warmUpOnce(
  source: SourceDaemon,
  dest: { socket: string },
  dir: string,
): Promise<void> {
  // The source serves images beneath /dev/shm (startSource's imageRoot below).
  const image = join('/dev/shm', `yb-warm-${process.pid}-${Date.now()}.img`);
  try {
    await generateImage({ path: image, sizeBytes: 256 * MiB, seed: 0x5eed });
    const id = `warm-${basename(dir)}`;
    const secret = await registerMigration(source, { id, image, frozen: true });
    const r = await runVmSim({
      image,
      migrationId: id,
      secret,
      source: source.ws,
      destSocket: dest.socket,
      workers: 4,
      pattern: 'mixed',
      timeoutMs: 120_000,
    });
    if (r.mismatchCount > 0 || r.missingPages > 0 || r.pagesVerified !== r.totalPages) {
      throw new Error(
        `the warm-up migration was not verified: ${r.mismatchCount} mismatched, ${r.missingPages} missing`,
      );
    }
  } finally {
    fs.rmSync(image, { force: true });
  }
}

/** A dest's /metrics text; empty if it cannot be fetched (its figures are then missing). */
async function metricsText(http: string): Promise<string> {
  try {
    return await (await fetch(`${http}/metrics`)).text();
  } catch {
    return '';
  }
}

function serviceFromBuckets(buckets: [number, number][]): YabusameRun['faultServiceMs'] {
  if (buckets.length === 0) return null;
  return {
    count: buckets.at(-1)![1],
    p50: bucketQuantile(buckets, 0.5) * 1000,
    p99: bucketQuantile(buckets, 0.99) * 1000,
  };
}

/**
 * Adds two cumulative histograms (same buckets): two lives of the dest, or (`sign` -1) takes
 * out what an earlier reading of the same life counted.
 */
function addBuckets(
  a: [number, number][],
  b: [number, number][],
  sign: 1 | -1 = 1,
): [number, number][] {
  if (a.length === 0) return sign === 1 ? b : a;
  return a.map(([le, n], i) => [le, n + sign * (b[i]?.[1] ?? 0)]);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function tryYabusame(o: TryOptions): Promise<YabusameRun> {
  const steps: Step[] = [];
  let last = nowMs();
  const step = (name: string): void => {
    const t = nowMs();
    steps.push({ step: name, ms: Math.round(t - last) });
    o.log(`${name}: ${Math.round(t - last)} ms`);
    last = t;
  };
  const id = `qemu-${process.pid}-${Date.now()}`;
  const srcRam = shmRamPath('yb-src');
  const dstRam = shmRamPath('yb-dst');
  const common = {
    workDir: o.workDir,
    memMiB: o.memMiB,
    kernel: o.guest.kernel,
    initramfs: o.guest.initramfs,
    workloadMiB: o.workloadMiB,
  };
  const followQmp = join(o.workDir, 'src-follow.qmp');
  const migrateQmp = join(o.workDir, 'src-migrate.qmp');
  const destMigrateQmp = join(o.workDir, 'dst-migrate.qmp');
  // dest: 'qmp': QEMU listens here; migrate is given destMigrateQmp, a link made once this
  // process is ready (its kernel trace running): migrate retries until it can connect.
  const destMigrateQmpReal = join(o.workDir, 'dst-migrate.real.qmp');
  let src: Qemu | undefined;
  let dst: Qemu | undefined;
  let dstLog: LogTail | undefined;
  let proxy: ChaosProxy | undefined;
  const daemons: Daemon[] = [];
  let failure: string | null = null;
  let migrateExit: number | null = null;
  let stopAtMs = NaN;
  let resumeAtMs = NaN;
  let completeAtMs = NaN;
  let complete: Record<string, unknown> | null = null;
  let buckets: [number, number][] = [];
  /** The dest's /metrics after the warm-up migrations: their faults are not this run's. */
  let warmMetrics = '';
  /** The fault service buckets of a /metrics text of this dest's life, less the warm-up's. */
  const ownBuckets = (text: string): [number, number][] =>
    addBuckets(faultBuckets(text), faultBuckets(warmMetrics), -1);
  let faultStagesUs: Record<string, number> = {};
  let kernelFaults: FaultSummary | null = null;
  let ktrace: { trace: UserFaultTrace; base: number; startedAtMs: number } | null = null;
  let waits: FaultWaits | null = null;
  let destRestartedAfterMs: number | null = null;
  let cuts: YabusameRun['cuts'] = null;
  let destRunning = false;
  const migrateLines: Record<string, unknown>[] = [];
  let migrateStderr = '';
  const dstOptions: QemuOptions = {
    ...common,
    name: 'dst',
    ramPath: dstRam,
    incoming: true,
    extraQmp: [o.dest === 'qmp' ? destMigrateQmpReal : destMigrateQmp],
  };
  try {
    const source = await startSource(o.workDir, o.sourceArgs ?? [], 'source', {
      imageRoot: '/dev/shm',
    });
    daemons.push(source);
    let dest = await startDest(o.workDir, o.destArgs ?? []);
    daemons.push(dest);
    let pageUrl = source.ws;
    if (o.cutAfterMs !== undefined) {
      proxy = await ChaosProxy.start({ target: { port: source.port } });
      pageUrl = proxy.url;
    }
    step('daemons up');
    // Runs beside the guest's boot; awaited before the migration starts.
    const warming = o.warm ? warmUp(source, dest, o.workDir) : Promise.resolve();
    warming.catch(() => {});

    src = await Qemu.start({
      ...common,
      name: 'src',
      ramPath: srcRam,
      extraQmp: [followQmp, migrateQmp],
    });
    const srcVm = src;
    src.on('line', (l) => o.onLine?.('src', l));
    for (const l of src.lines) o.onLine?.('src', l);
    await src.waitWorkload();
    // A few batches, so the workload's working set is settled (as baseline.ts does).
    const b0 = src.batches().length;
    await src.waitLine(() => srcVm.batches().length >= b0 + 3, 60_000);
    step('source guest booted to its workload');
    if (o.warm) {
      await warming;
      warmMetrics = await metricsText(dest.http);
      step(`daemons warmed by ${WARM_UP_MIGRATIONS} migrations of vm-sim (256 MiB each)`);
    }

    const stopped = src.qmp.waitEvent('STOP', { timeoutMs: 180_000 });
    stopped.catch(() => {});
    const args = [
      'migrate',
      '--json',
      '--id',
      id,
      '--source-qmp',
      migrateQmp,
      '--follow-qmp',
      followQmp,
      '--control',
      source.control,
      '--page-url',
      pageUrl,
      '--dest-socket',
      dest.socket,
      '--dest-control',
      dest.control,
      '--interval',
      '100',
    ];
    let secret: string | undefined;
    if (o.dest === 'qmp') {
      const key = secretFile(o.workDir, id);
      secret = key.secret;
      args.push('--dest-qmp', destMigrateQmp, '--secret-file', key.path);
    } else {
      const logPath = join(o.workDir, 'dst.log');
      args.push('--preload', o.preload, '--dest-log', logPath, '--');
      args.push(
        QEMU_BINARY,
        ...qemuArgs(dstOptions, join(o.workDir, 'dst.qmp'), join(o.workDir, 'dst.trace')),
      );
      dstLog = new LogTail(logPath, 'dst');
      dstLog.on('line', (l) => o.onLine?.('dst', l));
    }
    o.onMigrate?.(args);
    const nodeArgs = (process.env['YABUSAME_DAEMON_NODE_ARGS'] ?? '').split(' ').filter(Boolean);
    const migrate = spawn(process.execPath, ['--enable-source-maps', ...nodeArgs, CLI, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const migrateDone = new Promise<number | null>((r) => migrate.on('exit', (code) => r(code)));
    process.on('exit', () => migrate.kill('SIGKILL'));
    let registered!: () => void;
    const registeredP = new Promise<void>((r) => (registered = r));
    const resumeSeen = new Promise<number>((resolve) => {
      createInterface({ input: migrate.stdout! }).on('line', (text) => {
        const line = { atMs: nowMs(), text };
        o.onLine?.('migrate', line);
        try {
          const j = JSON.parse(text) as Record<string, unknown>;
          migrateLines.push(j);
          if (j['step'] === 'register') registered();
          if (j['step'] === 'switch-over' && typeof j['resumeAtMs'] === 'number') {
            resolve(j['resumeAtMs']);
          }
        } catch {
          migrateLines.push({ text });
        }
      });
    });
    migrate.stderr!.setEncoding('utf8').on('data', (s: string) => (migrateStderr += s));

    if (o.dest === 'qmp') {
      // Started once migrate registered the migration (the preload would wait for it anyway,
      // retrying its handoff while the source answers UNKNOWN_MIGRATION).
      const early = await Promise.race([
        registeredP.then(() => null),
        migrateDone.then((code) => ({ code })),
      ]);
      if (early) {
        migrateExit = early.code;
        throw new Error(`yabusame migrate exited (${early.code}): ${migrateStderr.trim()}`);
      }
      dst = await Qemu.start({
        ...dstOptions,
        qmpTimeoutMs: 60_000,
        env: {
          LD_PRELOAD: o.preload,
          YABUSAME_RAM_PATH: dstRam,
          YABUSAME_SOCKET: dest.socket,
          YABUSAME_MIGRATION_ID: id,
          YABUSAME_SOURCE: pageUrl,
          YABUSAME_SECRET: secret!,
        },
      });
      const dstVm = dst;
      dst.on('line', (l) => o.onLine?.('dst', l));
      step('destination QEMU up (RAM handed to the dest daemon, ack received)');
      if (o.kernelTrace) {
        const map = mappingOf(dst.proc.pid!, dstRam);
        if (!map) throw new Error(`kernel trace: ${dstRam} is not mapped in the destination QEMU`);
        ktrace = {
          trace: UserFaultTrace.start(map.base, map.sizeBytes, threadsOf(dst.proc.pid!)),
          base: map.base,
          startedAtMs: nowMs(),
        };
      }
      fs.symlinkSync(destMigrateQmpReal, destMigrateQmp);
      const completeLine = new Promise<SerialLine>((resolve) => {
        const seen = dstVm.stderr.find((l) => l.text.includes('yabusame-preload: complete'));
        if (seen) resolve(seen);
        dstVm.on('stderr', (l) => {
          if (l.text.includes('yabusame-preload: complete')) resolve(l);
        });
      });
      void completeLine.then((l) => {
        completeAtMs = l.atMs;
        try {
          complete = JSON.parse(l.text.slice(l.text.indexOf('{'))) as Record<string, unknown>;
        } catch {
          complete = { raw: l.text };
        }
      });
    }

    const first = await Promise.race([
      resumeSeen.then((at) => ({ at })),
      migrateDone.then((code) => ({ code })),
    ]);
    if ('code' in first) {
      migrateExit = first.code;
      throw new Error(
        `yabusame migrate exited (${first.code}) before the switch-over: ${migrateStderr.trim()}`,
      );
    }
    resumeAtMs = first.at;
    stopAtMs = (await stopped).timestampMs;
    step('migrate → destination RESUME');

    const afterResume = async (ms: number): Promise<void> => {
      const waitMs = resumeAtMs + ms - nowMs();
      if (waitMs > 0) await sleep(waitMs);
    };
    if (o.restartDestAfterMs !== undefined) {
      await afterResume(o.restartDestAfterMs);
      const killedAtMs = nowMs();
      buckets = ownBuckets(await metricsText(dest.http));
      warmMetrics = ''; // the restarted dest counts from zero
      const exited = new Promise<void>((r) => dest.child.once('exit', () => r()));
      dest.child.kill('SIGKILL');
      await exited;
      dest = await startDest(o.workDir, o.destArgs ?? [], 'dest-restarted', {
        socket: dest.socket,
        port: dest.port,
      });
      daemons.push(dest);
      destRestartedAfterMs = Math.round(killedAtMs - resumeAtMs);
      step(`dest daemon killed (SIGKILL) ${destRestartedAfterMs} ms after RESUME and restarted`);
    }
    if (o.cutAfterMs !== undefined && proxy) {
      await afterResume(o.cutAfterMs);
      const n = proxy.cutAll();
      cuts = { afterMs: Math.round(nowMs() - resumeAtMs), connections: n };
      step(`${n} page connections cut ${cuts.afterMs} ms after RESUME`);
    }

    migrateExit = await migrateDone;
    if (migrateExit !== 0) {
      throw new Error(`yabusame migrate exited with ${migrateExit}: ${migrateStderr.trim()}`);
    }
    step('RESUME → migrate done (all RAM present, image released)');
    const metrics = await metricsText(dest.http);
    buckets = addBuckets(buckets, ownBuckets(metrics));
    faultStagesUs = stageValues(metrics, warmMetrics);
    const dstConsole = dst ?? dstLog!;
    const batches = (): number =>
      dstConsole.lines.filter((l) => /yb-workload batch=/.test(l.text)).length;
    const n = batches() + (o.batchesAfter ?? 3);
    await dstConsole.waitLine(() => batches() >= n, 120_000, true);
    step(`${o.batchesAfter ?? 3} more workload batches on the destination`);
    if (ktrace) {
      const faults = ktrace.trace.stop();
      kernelFaults = summarizeFaults(faults, ktrace.base, stopAtMs, resumeAtMs);
      // A trace that started after the STOP may have missed faults: no figure then.
      if (ktrace.startedAtMs < stopAtMs) waits = faultWaits(faults, ktrace.trace.sched);
      ktrace = null;
    }
    // Whose QMP this is: the harness's own connection, or (command) the first socket, free.
    const q = dst?.qmp ?? (await connectQmp(join(o.workDir, 'dst.qmp')));
    destRunning = (await q.execute<{ status: string }>('query-status')).status === 'running';
    if (!dst) {
      await q.execute('quit').catch(() => {});
      await q.close();
    }
  } catch (err) {
    failure = err instanceof Error ? err.message : String(err);
    o.log(`FAILED: ${failure}`);
  }
  if (ktrace) ktrace.trace.stop();
  dstLog?.close();
  const dstConsole = dst ?? dstLog ?? { lines: [] };
  const guest = guestView(src ?? { lines: [] }, dstConsole);
  const stderrLines = dst
    ? dst.stderr.map((l) => l.text)
    : (dstLog?.lines ?? []).map((l) => l.text);
  const preloadLines = stderrLines.filter((t) => t.includes('yabusame-preload'));
  const daemonProblems = daemons.flatMap((d) =>
    fs
      .readFileSync(d.logPath, 'utf8')
      .split('\n')
      .filter((l) => /"level":"(warn|error)"/.test(l))
      .map((l) => `${d.logPath.split('/').pop()}: ${l}`),
  );
  await Promise.all([src?.stop(), dst?.stop()]);
  if (!dst) {
    // A destination migrate started, if it still runs (a failure before the quit above).
    const q = await connectQmp(join(o.workDir, 'dst.qmp'), { timeoutMs: 2000 }).catch(() => null);
    await q?.execute('quit').catch(() => {});
    await q?.close();
  }
  await proxy?.close();
  await Promise.all(daemons.map((d) => d.stop()));
  fs.rmSync(srcRam, { force: true });
  fs.rmSync(dstRam, { force: true });
  const done = migrateLines.find((l) => l['event'] === 'done');
  const migrateStopToCompleteMs = Number(done?.['stopToCompleteMs'] ?? NaN);
  const ok =
    failure === null &&
    migrateExit === 0 &&
    destRunning &&
    guest.errors === 0 &&
    guest.mismatchLines.length === 0;
  return {
    ok,
    failure,
    migrateExit,
    steps,
    stopToResumeMs: resumeAtMs - stopAtMs,
    stopToCompleteMs: Number.isFinite(completeAtMs)
      ? completeAtMs - stopAtMs
      : migrateStopToCompleteMs,
    migrateStopToCompleteMs,
    complete,
    faultServiceMs: serviceFromBuckets(buckets),
    faultStagesUs,
    guest,
    destRunning,
    kernelFaults,
    faultWaits: waits,
    destRestartedAfterMs,
    cuts,
    migrateLines,
    preloadLines,
    daemonProblems,
  };
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      mem: { type: 'string', default: '1024' },
      'workload-mib': { type: 'string', default: '512' },
      runs: { type: 'string', default: '1' },
      dest: { type: 'string', default: 'qmp' },
      'kernel-trace': { type: 'boolean', default: false },
      'restart-dest-after-ms': { type: 'string' },
      'cut-after-ms': { type: 'string' },
      json: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(
      'usage: try-yabusame.js [--mem MiB] [--workload-mib N] [--runs N] [--dest command|qmp]\n' +
        '                       [--kernel-trace] [--restart-dest-after-ms MS] [--cut-after-ms MS]\n' +
        '                       [--json] [--keep]\n',
    );
    return 0;
  }
  if (values.dest !== 'command' && values.dest !== 'qmp') {
    process.stderr.write('try-yabusame: --dest is command or qmp\n');
    return 2;
  }
  const guest = buildGuest();
  const preload = buildPreload();
  const log = (msg: string): void => void process.stderr.write(`try-yabusame: ${msg}\n`);
  const runs: YabusameRun[] = [];
  const opt = (s: string | undefined): number | undefined =>
    s === undefined ? undefined : Number(s);
  for (let i = 0; i < Number(values.runs); i++) {
    const workDir = fs.mkdtempSync('/tmp/yabusame-qemu-try-');
    log(`run ${i + 1} in ${workDir}`);
    const run = await tryYabusame({
      guest,
      preload,
      workDir,
      memMiB: Number(values.mem),
      workloadMiB: Number(values['workload-mib']),
      dest: values.dest,
      kernelTrace: values['kernel-trace'],
      restartDestAfterMs: opt(values['restart-dest-after-ms']),
      cutAfterMs: opt(values['cut-after-ms']),
      log,
    });
    runs.push(run);
    if (!values.keep) fs.rmSync(workDir, { recursive: true, force: true });
    if (!values.json) {
      const f = (x: number): string => (Number.isFinite(x) ? x.toFixed(1) : '–');
      process.stdout.write(
        [
          `run ${i + 1}: ${run.ok ? 'ok' : 'FAILED'}${run.failure ? ` (${run.failure})` : ''}`,
          `  STOP → RESUME ${f(run.stopToResumeMs)} ms; STOP → all RAM present ${f(run.stopToCompleteMs)} ms ` +
            `(migrate saw ${f(run.migrateStopToCompleteMs)} ms); destination running: ${run.destRunning}`,
          `  guest: slowest batch after resume ${run.guest.maxBatchMs} ms, first ${run.guest.firstBatchMs} ms, ` +
            `errors ${run.guest.errors}, MISMATCH lines ${run.guest.mismatchLines.length}`,
          run.faultServiceMs
            ? `  dest fault service: ${run.faultServiceMs.count} faults, p50 ${f(run.faultServiceMs.p50)} ms, p99 ${f(run.faultServiceMs.p99)} ms`
            : '',
          run.complete ? `  complete: ${JSON.stringify(run.complete)}` : '',
          run.faultWaits
            ? `  fault waits (kernel): ${run.faultWaits.waited} of ${run.faultWaits.faults} faults slept, p50 ${run.faultWaits.p50Ms.toFixed(3)} ms, p99 ${run.faultWaits.p99Ms.toFixed(3)} ms`
            : '',
          run.kernelFaults
            ? `  kernel: ${run.kernelFaults.faults} user faults on ${run.kernelFaults.distinctPages} pages; ` +
              `by thread ${JSON.stringify(run.kernelFaults.byThread)}; before RESUME ` +
              JSON.stringify(run.kernelFaults.beforeResume)
            : '',
          ...run.steps.map((s) => `  step ${s.step}: ${s.ms} ms`),
          ...run.preloadLines.map((l) => `  ${l}`),
          ...run.daemonProblems.slice(0, 20).map((l) => `  ${l}`),
        ]
          .filter(Boolean)
          .join('\n') + '\n',
      );
    }
  }
  if (values.json) process.stdout.write(`${JSON.stringify({ runs }, null, 2)}\n`);
  return runs.every((r) => r.ok) ? 0 : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (err: unknown) => {
      process.stderr.write(`try-yabusame: ${err instanceof Error ? err.stack : String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
