/**
 * Bench scenarios for `yabusame dest` as Firecracker's page-fault handler: lazy restores of a
 * snapshot memory file on this host (no source daemon), driven by fc-vmm (scripts/fc-vmm), which
 * sends Firecracker's handshake and verifies every page against the file.
 *
 *  - firecracker/prefetch: the same restore with prefetch off and on (a working set recorded on
 *    an earlier restore, streamed first): faults the working set took, time to its last touch
 *    (the workload's first useful work), time to every page.
 *  - firecracker/restores: many concurrent restores of one snapshot file by one dest, one
 *    Firecracker socket each: median and slowest time to every page, dest peak RSS.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildFcVmm, startFcVmm, type FcVmmOptions, type FcVmmResult } from '../fc-vmm/fc-vmm.js';
import { startDest, type Daemon } from '../lib/daemons.js';
import { MiB, type BenchContext, type ImageSpec } from './harness.js';
import { CpuMeter, peakRssBytes } from './proc.js';
import type { RunOutcome, Scenario } from './scenarios.js';
import { median } from './stats.js';

function fcSizes(quick: boolean) {
  return {
    prefetchImage: { sizeBytes: quick ? 64 * MiB : 256 * MiB, seed: 31 } satisfies ImageSpec,
    /** Pages of the working set: 8-page clusters at random places, 10% of them elsewhere on
     * each restore (what differs between two clones of one snapshot). */
    workingSet: { pages: quick ? 1000 : 4000, cluster: 8, seed: 7, jitter: 0.1 },
    restores: quick ? 10 : 50,
    restoreImage: { sizeBytes: quick ? 32 * MiB : 128 * MiB, seed: 32 } satisfies ImageSpec,
  };
}

const RESTORE_TIMEOUT_MS = 300_000;
let destSeq = 0;

/** A dest with one Firecracker socket per entry (memFile each), stopped after `fn`. */
async function withFcDest<T>(
  ctx: BenchContext,
  sockets: Array<{ name: string; memFile: string; prefetch?: string }>,
  fn: (dest: Daemon, sock: (name: string) => string) => Promise<T>,
): Promise<T> {
  const n = ++destSeq;
  const sock = (name: string): string => join(ctx.dir, `fc-${n}-${name}.sock`);
  const config = join(ctx.dir, `fc-dest-${n}.json`);
  writeFileSync(
    config,
    JSON.stringify({
      maxSessions: Math.max(64, sockets.length + 8),
      maxSessionsPerUid: Math.max(16, sockets.length + 8),
      firecracker: sockets.map((s) => ({
        socket: sock(s.name),
        memFile: s.memFile,
        ...(s.prefetch ? { prefetch: true, workingSetFile: s.prefetch } : {}),
      })),
    }) + '\n',
  );
  await buildFcVmm();
  const dest = await startDest(ctx.dir, ['--config', config], `fc-dest-${n}`);
  ctx.track(dest.child);
  try {
    return await fn(dest, sock);
  } finally {
    await dest.stop();
  }
}

async function restore(ctx: BenchContext, o: FcVmmOptions): Promise<FcVmmResult> {
  const vm = await startFcVmm({ timeoutMs: RESTORE_TIMEOUT_MS, ...o });
  ctx.track(vm.child);
  return vm.result;
}

function problemsOf(label: string, r: FcVmmResult): string[] {
  if (r.exitCode === 0 && r.pagesVerified === r.totalPages && r.mismatchCount === 0) return [];
  return [
    `${label}: ${r.outcome} ${r.code ?? ''}: ${r.pagesVerified}/${r.totalPages} verified, ` +
      `${r.mismatchCount} mismatches, ${r.missingPages} missing`,
    ...r.mismatches
      .slice(0, 3)
      .map((m) => `${label}: region ${m.region} page ${m.page}: ${m.reason}`),
  ];
}

// --- prefetch off and on ---

const prefetch: Scenario = {
  name: 'firecracker/prefetch',
  group: 'firecracker',
  describe: (ctx) => {
    const s = fcSizes(ctx.quick);
    return (
      `a Firecracker restore of a ${s.prefetchImage.sizeBytes / MiB} MiB snapshot file (fc-vmm, ` +
      `1 vCPU touching a working set of ${s.workingSet.pages} pages in clusters, ` +
      `${s.workingSet.jitter * 100}% of them moved on each restore), with prefetch off, then on ` +
      `(the working set recorded on an earlier restore streamed first); background at once`
    );
  },
  verification: 'every page of every restore byte-for-byte against the snapshot file',
  metrics: {
    wsFaultsOff: { label: 'working-set faults, prefetch off', unit: '', digits: 0 },
    wsFaultsOn: { label: 'working-set faults, prefetch on', unit: '', digits: 0 },
    firstWorkMsOff: { label: 'first useful work, prefetch off', unit: 'ms', digits: 1 },
    firstWorkMsOn: { label: 'first useful work, prefetch on', unit: 'ms', digits: 1 },
    restoreMsOff: { label: 'every page present, prefetch off', unit: 'ms', digits: 0 },
    restoreMsOn: { label: 'every page present, prefetch on', unit: 'ms', digits: 0 },
    recordedPages: { label: 'pages in the recorded working set', unit: '', digits: 0 },
  },
  async runOnce(ctx, index): Promise<RunOutcome> {
    const s = fcSizes(ctx.quick);
    const image = await ctx.image(s.prefetchImage);
    const wsFile = join(ctx.dir, `fc-prefetch-${index}.working-set.json`);
    return withFcDest(
      ctx,
      [
        { name: 'on', memFile: image.path, prefetch: wsFile },
        { name: 'off', memFile: image.path },
      ],
      async (_dest, sock) => {
        const go = (name: string, jitterSeed: number): Promise<FcVmmResult> =>
          restore(ctx, {
            socket: sock(name),
            memFile: image.path,
            format: 'v1.12',
            vcpus: 1,
            workingSet: { ...s.workingSet, jitterSeed },
            seed: jitterSeed,
          });
        // The first restore on the prefetch socket records; the measured ones are other clones.
        const recording = await go('on', 1000 + index);
        const off = await go('off', 2000 + index);
        const on = await go('on', 2000 + index);
        const problems = [
          ...problemsOf('recording', recording),
          ...problemsOf('off', off),
          ...problemsOf('on', on),
        ];
        let recordedPages = 0;
        try {
          recordedPages = (JSON.parse(readFileSync(wsFile, 'utf8')) as { offsets: number[] })
            .offsets.length;
        } catch (err) {
          problems.push(`no working set recorded: ${(err as Error).message}`);
        }
        ctx.say(
          `    run ${index + 1}: working-set faults ${off.work.faults} off, ${on.work.faults} on; ` +
            `first useful work ${off.work.ms} ms off, ${on.work.ms} ms on`,
        );
        return {
          values: {
            wsFaultsOff: off.work.faults,
            wsFaultsOn: on.work.faults,
            firstWorkMsOff: off.work.ms,
            firstWorkMsOn: on.work.ms,
            restoreMsOff: off.elapsedMs,
            restoreMsOn: on.elapsedMs,
            recordedPages,
          },
          verified: problems.length === 0,
          problems,
        };
      },
    );
  },
  finish: (ctx) => ctx.dropImage(fcSizes(ctx.quick).prefetchImage),
};

// --- many concurrent restores of one file ---

const restores: Scenario = {
  name: 'firecracker/restores',
  group: 'firecracker',
  describe: (ctx) => {
    const s = fcSizes(ctx.quick);
    return (
      `${s.restores} concurrent Firecracker restores of one ${s.restoreImage.sizeBytes / MiB} MiB ` +
      `snapshot file by one dest, one socket each (fc-vmm: 1 vCPU first-touching 2% of the ` +
      `pages while the rest streams)`
    );
  },
  verification: 'every page of every restore byte-for-byte against the snapshot file',
  metrics: {
    restoreSecMedian: { label: 'every page present, median restore', unit: 's', digits: 2 },
    restoreSecMax: { label: 'every page present, slowest restore', unit: 's', digits: 2 },
    allSec: { label: 'first handshake → last restore complete', unit: 's', digits: 2 },
    faultP50Us: { label: 'fault p50, median restore', unit: 'µs', digits: 1 },
    faultP99Us: { label: 'fault p99, worst restore', unit: 'µs', digits: 1 },
    destCpuSec: { label: 'dest CPU', unit: 's', digits: 2 },
    destPeakRssMiB: { label: 'dest peak RSS', unit: 'MiB', digits: 0 },
  },
  async runOnce(ctx, index): Promise<RunOutcome> {
    const s = fcSizes(ctx.quick);
    const image = await ctx.image(s.restoreImage);
    const names = Array.from({ length: s.restores }, (_, i) => `vm${i}`);
    return withFcDest(
      ctx,
      names.map((name) => ({ name, memFile: image.path })),
      async (dest, sock) => {
        const meter = new CpuMeter([dest.child.pid!]);
        const t0 = performance.now();
        let done = 0;
        const results = await Promise.all(
          names.map(async (name, i) => {
            try {
              return await restore(ctx, {
                socket: sock(name),
                memFile: image.path,
                format: 'v1.12',
                vcpus: 1,
                touchFraction: 0.02,
                seed: i + 1,
              });
            } catch (err) {
              return { error: (err as Error).message.slice(0, 500) };
            } finally {
              if (++done % 10 === 0)
                ctx.say(`    run ${index + 1}: ${done}/${names.length} restored`);
            }
          }),
        );
        const allSec = (performance.now() - t0) / 1000;
        meter.stop();
        const problems: string[] = [];
        const ok: FcVmmResult[] = [];
        results.forEach((r, i) => {
          if ('error' in r) problems.push(`${names[i]}: ${r.error}`);
          else {
            const p = problemsOf(names[i]!, r);
            problems.push(...p);
            if (p.length === 0) ok.push(r);
          }
        });
        const all = results.filter((r): r is FcVmmResult => !('error' in r));
        const secs = all.map((r) => r.elapsedMs / 1000);
        return {
          values: {
            restoreSecMedian: median(secs),
            restoreSecMax: Math.max(...secs),
            allSec,
            faultP50Us: median(all.map((r) => r.faults.p50Us)),
            faultP99Us: Math.max(...all.map((r) => r.faults.p99Us)),
            destCpuSec: meter.seconds(0),
            destPeakRssMiB: peakRssBytes(dest.child.pid!) / MiB,
          },
          verified: problems.length === 0 && ok.length === names.length,
          problems,
        };
      },
    );
  },
  finish: (ctx) => ctx.dropImage(fcSizes(ctx.quick).restoreImage),
};

export const FIRECRACKER_SCENARIOS: Scenario[] = [prefetch, restores];
