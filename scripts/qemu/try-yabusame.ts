/**
 * A first migration of a real, stock QEMU VM through yabusame, end to end on loopback.
 *
 *  1. `yabusame source --listen 127.0.0.1:PORT` and `yabusame dest --socket … --metrics-listen off`
 *     (`node bin/yabusame.js`), their JSON logs kept with the host time of each line.
 *  2. The source QEMU boots the test guest (TCG, `-m 1G`, the workload on 512 MiB); once the
 *     workload runs, its RAM file is registered with the page server
 *     (`POST /v1/migrations {"id","image","frozen":false}`).
 *  3. The destination QEMU starts with `-incoming defer` and the preload library: its RAM
 *     mapping is handed to the dest daemon before QEMU goes on (the handoff's `ack`).
 *  4. `x-ignore-shared` on both sides, so QEMU's own stream carries device state only; then
 *     `migrate`. When QEMU's STOP event arrives, `POST /v1/migrations/ID/freeze`: the page
 *     server answers requests only after it (the destination's main thread reads a few guest
 *     pages while loading device state, after the source stopped).
 *  5. Measured as in baseline.ts: STOP → RESUME, STOP → all RAM present (the dest's `complete`,
 *     as the preload logs it), the guest's slowest batch after resume, its verification lines,
 *     and how long each step took. With `--metrics`, the dest serves metrics and the fault
 *     service time comes from its histogram.
 *
 * With `--kernel-trace`, the destination's page faults on guest RAM are recorded from the kernel
 * (kfaults.ts: which threads, when, before or after RESUME). With `--restart-dest-after-ms MS`
 * the dest daemon is killed (SIGKILL) that long after RESUME and a new one started on the same
 * socket: the preload hands the uffd over again with "resume":true.
 *
 * CLI: node dist/scripts/qemu/try-yabusame.js [--mem 1024] [--workload-mib 512] [--metrics]
 *      [--kernel-trace] [--stop-first] [--restart-dest-after-ms MS] [--runs 1] [--json] [--keep]
 *
 * `--stop-first` stops the source VM before registering its image and starting the destination:
 * today's page server scans the image's holes once, at registration (before STOP in the flow
 * above, since the destination's handoff needs the migration), and serves pages that were holes
 * then as zeros even if the guest wrote them before it stopped. (fallocate would not help:
 * SEEK_DATA still reports tmpfs pages that were allocated but never written as holes.)
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { buildGuest, type GuestFiles } from './guest/build.js';
import { summarizeFaults, UserFaultTrace, type FaultSummary } from './kfaults.js';
import { guestView, type GuestView } from './measure.js';
import { buildPreload } from './preload-build.js';
import { requestJson } from '../../daemon/cli/common.js';
import { freePort, nowMs, Qemu, setCapabilities, shmRamPath, type SerialLine } from './qemu.js';

const BIN = fileURLToPath(new URL('../../../bin/yabusame.js', import.meta.url));

interface Daemon {
  name: string;
  child: ChildProcess;
  lines: SerialLine[];
  logPath: string;
}

function startDaemon(name: string, args: string[], workDir: string): Daemon {
  const logPath = join(workDir, `${name}.log`);
  const out = fs.createWriteStream(logPath);
  // bin/yabusame.js's shebang sets these; `node bin/yabusame.js` does not read a shebang.
  const child = spawn(process.execPath, ['--max-semi-space-size=1', BIN, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, MALLOC_ARENA_MAX: '2' },
  });
  const lines: SerialLine[] = [];
  for (const stream of [child.stdout!, child.stderr!]) {
    createInterface({ input: stream }).on('line', (text) => {
      lines.push({ atMs: nowMs(), text });
      out.write(`${text}\n`);
    });
  }
  process.on('exit', () => child.kill('SIGKILL'));
  return { name, child, lines, logPath };
}

async function stopDaemon(d: Daemon): Promise<void> {
  if (d.child.exitCode !== null || d.child.signalCode !== null) return;
  const exited = new Promise<void>((r) => d.child.once('exit', () => r()));
  d.child.kill('SIGTERM');
  const timer = setTimeout(() => d.child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

async function until<T>(
  what: string,
  timeoutMs: number,
  probe: () => Promise<T | undefined>,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A control API request over a daemon's UNIX socket. */
async function http(
  method: string,
  socketPath: string,
  path: string,
  body?: unknown,
): Promise<{ status: number; json: unknown }> {
  const res = await requestJson({ socketPath }, method, path, body);
  return { status: res.status, json: res.body };
}

export interface Step {
  step: string;
  ms: number;
}

export interface YabusameRun {
  ok: boolean;
  /** What failed, if anything: the first error seen, with codes. */
  failure: string | null;
  steps: Step[];
  stopToResumeMs: number;
  /** STOP event → the page server confirmed the freeze, ms. */
  stopToFrozenMs: number;
  /** STOP → the dest's `complete` reached the preload (all RAM present), ms. */
  stopToCompleteMs: number;
  /** The `complete` reply line, parsed. */
  complete: Record<string, unknown> | null;
  /** The dest's fault service time from its metrics (with --metrics). */
  faultServiceMs: { count: number; p50: number; p99: number } | null;
  guest: GuestView;
  /** The destination QEMU's user page faults on guest RAM (with --kernel-trace). */
  kernelFaults: FaultSummary | null;
  /** The dest daemon was killed and restarted this long after RESUME (--restart-dest-after-ms). */
  destRestartedAfterMs: number | null;
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
  metrics: boolean;
  /** Trace the destination's page faults in the kernel (root, tracefs). */
  kernelTrace: boolean;
  /**
   * Stop the source VM (QMP `stop`) before registering its image, frozen, with the page server
   * and before starting the destination; `cont` it there after the migration. Not post-copy's
   * flow (the destination's start-up is downtime), but the page server then scans the image's
   * holes after the guest's last write: today's page server scans them once, at registration,
   * and serves pages that were holes then as zeros, though a running guest may write them
   * before it stops.
   */
  stopFirst?: boolean;
  /** Kill the dest daemon this long after RESUME and start a new one on the same socket. */
  restartDestAfterMs?: number;
  log: (msg: string) => void;
}

/** Quantile from a Prometheus histogram's cumulative buckets (linear inside a bucket). */
function histogramQuantile(buckets: [number, number][], q: number): number {
  const total = buckets.at(-1)?.[1] ?? 0;
  if (total === 0) return NaN;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (!Number.isFinite(le)) return prevLe;
      const inBucket = count - prevCount;
      return prevLe + (inBucket ? ((rank - prevCount) / inBucket) * (le - prevLe) : 0);
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}

async function faultServiceFromMetrics(url: string): Promise<YabusameRun['faultServiceMs']> {
  const text = await (await fetch(url)).text();
  const buckets: [number, number][] = [];
  for (const m of text.matchAll(
    /^yabusame_dest_fault_service_seconds_bucket\{le="([^"]+)"\} (\d+)/gm,
  )) {
    buckets.push([m[1] === '+Inf' ? Infinity : Number(m[1]), Number(m[2])]);
  }
  if (buckets.length === 0) return null;
  return {
    count: buckets.at(-1)![1],
    p50: histogramQuantile(buckets, 0.5) * 1000,
    p99: histogramQuantile(buckets, 0.99) * 1000,
  };
}

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
  const sockPath = join(o.workDir, 'dest.sock');
  const pagePort = await freePort();
  const metricsPort = o.metrics ? await freePort() : 0;
  const sourceControl = join(o.workDir, 'source.control');
  const common = {
    workDir: o.workDir,
    memMiB: o.memMiB,
    kernel: o.guest.kernel,
    initramfs: o.guest.initramfs,
    workloadMiB: o.workloadMiB,
  };
  let src: Qemu | undefined;
  let dst: Qemu | undefined;
  const daemons: Daemon[] = [];
  let failure: string | null = null;
  let stopAtMs = NaN;
  let resumeAtMs = NaN;
  let frozenAtMs = NaN;
  let completeAtMs = NaN;
  let complete: Record<string, unknown> | null = null;
  let faultServiceMs: YabusameRun['faultServiceMs'] = null;
  let kernelFaults: FaultSummary | null = null;
  let ktrace: { trace: UserFaultTrace; base: number } | null = null;
  let destRestartedAfterMs: number | null = null;
  try {
    const source = startDaemon(
      'source',
      [
        'source',
        '--listen',
        `127.0.0.1:${pagePort}`,
        // QEMU's RAM files live in /dev/shm: the source reads images beneath it only.
        '--image-root',
        '/dev/shm',
        '--control-socket',
        sourceControl,
        '--metrics-listen',
        'off',
      ],
      o.workDir,
    );
    daemons.push(source);
    const destArgs = [
      'dest',
      '--socket',
      sockPath,
      '--metrics-listen',
      o.metrics ? `127.0.0.1:${metricsPort}` : 'off',
      '--control-socket',
      join(o.workDir, 'dest.control'),
    ];
    let dest = startDaemon('dest', destArgs, o.workDir);
    daemons.push(dest);
    await until('page server', 15_000, async () =>
      (await http('GET', sourceControl, '/v1/migrations')).status === 200 ? true : undefined,
    );
    await until('dest handoff socket', 15_000, async () =>
      fs.existsSync(sockPath) ? true : undefined,
    );
    step('daemons up');

    src = await Qemu.start({ ...common, name: 'src', ramPath: srcRam });
    await src.waitWorkload();
    step('source guest booted to its workload');
    if (o.stopFirst) {
      const stopEvent = src.qmp.waitEvent('STOP', { timeoutMs: 10_000 });
      await src.qmp.execute('stop');
      stopAtMs = (await stopEvent).timestampMs;
      step('source VM stopped first (QMP stop)');
    }
    const reg = await http('POST', sourceControl, '/v1/migrations', {
      id,
      image: srcRam,
      frozen: o.stopFirst === true,
    });
    if (reg.status >= 300)
      throw new Error(`register: HTTP ${reg.status} ${JSON.stringify(reg.json)}`);
    // The secret the source generated: the destination's preload hands it over with the uffd.
    const secret = (reg.json as { secret: string }).secret;
    step('migration registered with the page server');

    dst = await Qemu.start({
      ...common,
      name: 'dst',
      ramPath: dstRam,
      incoming: true,
      qmpTimeoutMs: 60_000,
      env: {
        LD_PRELOAD: o.preload,
        YABUSAME_RAM_PATH: dstRam,
        YABUSAME_SOCKET: sockPath,
        YABUSAME_MIGRATION_ID: id,
        YABUSAME_SOURCE: `ws://127.0.0.1:${pagePort}`,
        YABUSAME_SECRET: secret,
      },
    });
    const dstQemu = dst;
    step('destination QEMU up (RAM handed to the dest daemon, ack received)');
    if (o.kernelTrace) {
      const ack = dst.stderr.find((l) => l.text.includes('yabusame-preload: ack'));
      const m = / serves (\d+) bytes at (0x[0-9a-f]+)/.exec(ack?.text ?? '');
      if (!m) throw new Error('kernel trace: no ack line from the preload to read the range from');
      const base = Number(m[2]);
      ktrace = { trace: UserFaultTrace.start(base, Number(m[1])), base };
    }
    const completeLine = new Promise<SerialLine>((resolve) => {
      const seen = dstQemu.stderr.find((l) => l.text.includes('yabusame-preload: complete'));
      if (seen) resolve(seen);
      dstQemu.on('stderr', (l) => {
        if (l.text.includes('yabusame-preload: complete')) resolve(l);
      });
    });

    await setCapabilities(src, ['events', 'x-ignore-shared']);
    await setCapabilities(dst, ['events', 'x-ignore-shared']);
    await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 8 * 1024 ** 3 });
    const port = await freePort();
    await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    const stopped = o.stopFirst ? null : src.qmp.waitEvent('STOP', { timeoutMs: 60_000 });
    const resumed = dst.qmp.waitEvent('RESUME', { timeoutMs: 120_000 });
    const srcDone = src.qmp.waitEvent('MIGRATION', {
      match: (e) => e.data['status'] === 'completed' || e.data['status'] === 'failed',
      timeoutMs: 120_000,
    });
    const dstDone = dst.qmp.waitEvent('MIGRATION', {
      match: (e) => e.data['status'] === 'completed' || e.data['status'] === 'failed',
      timeoutMs: 120_000,
    });
    step('capabilities set, destination listening');
    await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    if (stopped) {
      const stop = await stopped;
      stopAtMs = stop.timestampMs;
      const fr = await http('POST', sourceControl, `/v1/migrations/${id}/freeze`);
      frozenAtMs = nowMs();
      if (fr.status >= 300) throw new Error(`freeze: HTTP ${fr.status} ${JSON.stringify(fr.json)}`);
    }
    const [srcEnd] = await Promise.all([srcDone, dstDone]);
    if (srcEnd.data['status'] !== 'completed') {
      throw new Error(`QEMU's migration (device state) ${String(srcEnd.data['status'])}`);
    }
    if (o.stopFirst) {
      // A VM stopped before migrating stays stopped on the destination until told.
      await dstDone;
      await dst.qmp.execute('cont');
    }
    resumeAtMs = (await resumed).timestampMs;
    step('migrate → destination RESUME');
    if (o.restartDestAfterMs !== undefined) {
      const waitMs = resumeAtMs + o.restartDestAfterMs - nowMs();
      if (waitMs > 0) await new Promise((r) => setTimeout(r, waitMs));
      const killedAtMs = nowMs();
      const exited = new Promise<void>((r) => dest.child.once('exit', () => r()));
      dest.child.kill('SIGKILL');
      await exited;
      dest = startDaemon('dest-restarted', destArgs, o.workDir);
      daemons.push(dest);
      destRestartedAfterMs = Math.round(killedAtMs - resumeAtMs);
      step(`dest daemon killed (SIGKILL) ${destRestartedAfterMs} ms after RESUME and restarted`);
    }

    let giveUp: NodeJS.Timeout | undefined;
    const doneLine = await Promise.race([
      completeLine,
      new Promise<null>((r) => (giveUp = setTimeout(() => r(null), 180_000))),
    ]);
    clearTimeout(giveUp);
    if (doneLine === null) throw new Error('no complete from the dest within 180 s after RESUME');
    completeAtMs = doneLine.atMs;
    const json = doneLine.text.slice(doneLine.text.indexOf('{'));
    try {
      complete = JSON.parse(json) as Record<string, unknown>;
    } catch {
      complete = { raw: doneLine.text };
    }
    step('RESUME → dest complete');
    if (o.metrics)
      faultServiceMs = await faultServiceFromMetrics(`http://127.0.0.1:${metricsPort}/metrics`);
    const n = dst.batches().length + 3;
    const dstVm = dst;
    await dst.waitLine(() => dstVm.batches().length >= n, 60_000);
    step('three more workload batches on the destination');
    if (ktrace) {
      kernelFaults = summarizeFaults(ktrace.trace.stop(), ktrace.base, stopAtMs, resumeAtMs);
      ktrace = null;
    }
  } catch (err) {
    failure = err instanceof Error ? err.message : String(err);
    o.log(`FAILED: ${failure}`);
  }
  if (ktrace) ktrace.trace.stop();
  const guest = src && dst ? guestView(src, dst) : guestView(src ?? dst!, dst ?? src!);
  const preloadLines = (dst?.stderr ?? [])
    .map((l) => l.text)
    .filter((t) => t.includes('yabusame-preload'));
  const daemonProblems = daemons.flatMap((d) =>
    d.lines
      .filter((l) => /"level":"(warn|error)"|Error|error/.test(l.text))
      .map((l) => `${d.name}: ${l.text}`),
  );
  await Promise.all([src?.stop(), dst?.stop()]);
  await Promise.all(daemons.map(stopDaemon));
  fs.rmSync(srcRam, { force: true });
  fs.rmSync(dstRam, { force: true });
  const ok =
    failure === null && guest.errors === 0 && guest.mismatchLines.length === 0 && complete !== null;
  return {
    ok,
    failure,
    steps,
    stopToResumeMs: resumeAtMs - stopAtMs,
    stopToFrozenMs: frozenAtMs - stopAtMs,
    stopToCompleteMs: completeAtMs - stopAtMs,
    complete,
    faultServiceMs,
    kernelFaults,
    destRestartedAfterMs,
    guest,
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
      metrics: { type: 'boolean', default: false },
      'kernel-trace': { type: 'boolean', default: false },
      'stop-first': { type: 'boolean', default: false },
      'restart-dest-after-ms': { type: 'string' },
      json: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(
      'usage: try-yabusame.js [--mem MiB] [--workload-mib N] [--runs N] [--metrics] [--kernel-trace]\n' +
        '                       [--stop-first]\n' +
        '                       [--restart-dest-after-ms MS] [--json] [--keep]\n',
    );
    return 0;
  }
  const guest = buildGuest();
  const preload = buildPreload();
  const log = (msg: string): void => void process.stderr.write(`try-yabusame: ${msg}\n`);
  const runs: YabusameRun[] = [];
  for (let i = 0; i < Number(values.runs); i++) {
    const workDir = fs.mkdtempSync('/tmp/yabusame-qemu-try-');
    log(`run ${i + 1} in ${workDir}`);
    const run = await tryYabusame({
      guest,
      preload,
      workDir,
      memMiB: Number(values.mem),
      workloadMiB: Number(values['workload-mib']),
      metrics: values.metrics,
      kernelTrace: values['kernel-trace'],
      stopFirst: values['stop-first'],
      restartDestAfterMs:
        values['restart-dest-after-ms'] === undefined
          ? undefined
          : Number(values['restart-dest-after-ms']),
      log,
    });
    runs.push(run);
    if (!values.keep) fs.rmSync(workDir, { recursive: true, force: true });
    if (!values.json) {
      const f = (x: number): string => (Number.isFinite(x) ? x.toFixed(1) : '–');
      process.stdout.write(
        [
          `run ${i + 1}: ${run.ok ? 'ok' : 'FAILED'}${run.failure ? ` (${run.failure})` : ''}`,
          `  STOP → RESUME ${f(run.stopToResumeMs)} ms; STOP → frozen ${f(run.stopToFrozenMs)} ms; ` +
            `STOP → all RAM present (complete) ${f(run.stopToCompleteMs)} ms`,
          `  guest: slowest batch after resume ${run.guest.maxBatchMs} ms, first ${run.guest.firstBatchMs} ms, ` +
            `errors ${run.guest.errors}, MISMATCH lines ${run.guest.mismatchLines.length}`,
          run.faultServiceMs
            ? `  dest fault service: ${run.faultServiceMs.count} faults, p50 ${f(run.faultServiceMs.p50)} ms, p99 ${f(run.faultServiceMs.p99)} ms`
            : '',
          `  complete: ${JSON.stringify(run.complete)}`,
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
