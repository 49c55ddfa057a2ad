/**
 * A bounded chaos run: one migration under a vm-sim workload with the chaos proxy between dest
 * and source injecting cuts, stalls and bit flips at random, and `yabusame source` killed
 * (SIGKILL) and restarted on its port at random moments. vm-sim verifies every page at the end.
 *
 * Besides the random faults, one fault of each kind is injected at fixed progress milestones
 * (cut 10%, stall 20%, corrupt 30%, source kill 40%, dest kill 50%), so that every kind happens
 * even when the migration is quick. Random faults stop after `durationMs` or at completion.
 *
 * Killing the dest needs a VMM that hands its uffd over again to a restarted daemon: vm-sim's
 * `resumeOnDaemonDeath`, which `killDest` turns on (the default).
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { once } from 'node:events';
import { join } from 'node:path';
import { generateImage } from '../image/gen-image.js';
import { runVmSim, type VmSimOptions, type VmSimResult } from '../vm-sim/vm-sim.js';
import { ChaosProxy, prng, type FaultEvent } from './proxy.js';
import {
  migrationState,
  destSessions,
  registerMigration,
  secretFile,
  startDest,
  startSource,
  type Daemon,
} from '../lib/daemons.js';

export interface ChaosRates {
  /** Expected faults per second while the chaos window is open. */
  cutPerSec: number;
  stallPerSec: number;
  corruptPerSec: number;
  sourceKillPerSec: number;
  destKillPerSec: number;
}

export interface ChaosOptions {
  sizeBytes: number;
  seed: number;
  /** How long random faults are injected (they also stop when the migration completes), ms. */
  durationMs: number;
  workers?: number;
  /** Folder for the image, sockets and logs; default a new one in /dev/shm, removed unless keep. */
  dir?: string;
  keep?: boolean;
  /** Measure a clean migration of the same image first (the time-lost reference). Default true. */
  baseline?: boolean;
  /** One fault of each kind at fixed progress milestones. Default true. */
  milestones?: boolean;
  /** Kill and restart the source at random (and at its milestone). Default true. */
  killSource?: boolean;
  /** Kill and restart the dest (vm-sim resumes its handoff). Default false. */
  killDest?: boolean;
  rates?: Partial<ChaosRates>;
  /** Progress lines (stderr in the CLI). */
  log?: (line: string) => void;
}

export type FaultCounts = {
  cut: number;
  stall: number;
  corrupt: number;
  sourceKill: number;
  destKill: number;
};

export interface ChaosResult {
  verified: boolean;
  seed: number;
  sizeBytes: number;
  totalPages: number;
  pagesVerified: number;
  mismatches: number;
  missingPages: number;
  faults: FaultCounts;
  /** Connections the dest restored (its sessions' `reconnects`, over every dest life). */
  reconnects: number;
  sourceRestarts: number;
  /** Resumed handoffs acked by a restarted dest (vm-sim's `resumes`). */
  destResumes: number;
  elapsedMs: number;
  /** The clean run's time, or null without a baseline. */
  baselineMs: number | null;
  lostMs: number | null;
  /** The migration's state on the (last) source: complete once the dest confirmed. */
  sourceState: string | undefined;
  error?: string;
  dir: string;
}

const DEFAULT_RATES: ChaosRates = {
  cutPerSec: 0.5,
  stallPerSec: 0.3,
  corruptPerSec: 1,
  sourceKillPerSec: 0.15,
  destKillPerSec: 0.1,
};

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface SessionView {
  migrationId: string;
  state: string;
  totalPages: number;
  presentPages: number;
  reconnects: number;
}

export async function runChaos(opts: ChaosOptions): Promise<ChaosResult> {
  const log = opts.log ?? ((): void => undefined);
  const rates = { ...DEFAULT_RATES, ...opts.rates };
  const killSource = opts.killSource ?? true;
  const killDest = opts.killDest ?? true;
  const rand = prng(opts.seed ^ 0x5eed);
  const dir = opts.dir ?? mkdtempSync('/dev/shm/yabusame-chaos-');
  const image = join(dir, 'vm.ram');
  const id = 'chaos-vm';
  const workers = opts.workers ?? 2;
  const daemons: Daemon[] = [];
  let proxy: ChaosProxy | undefined;
  const faults: FaultCounts = { cut: 0, stall: 0, corrupt: 0, sourceKill: 0, destKill: 0 };

  try {
    log(`image ${opts.sizeBytes >> 20} MiB in ${dir}`);
    await generateImage({ path: image, sizeBytes: opts.sizeBytes, seed: opts.seed });
    const totalPages = opts.sizeBytes / 4096;
    const destConfig = join(dir, 'dest.json');
    writeFileSync(
      destConfig,
      JSON.stringify({
        heartbeatMs: 250,
        reconnectTimeoutMs: 60_000,
        connectTimeoutMs: 2000,
        completeTimeoutMs: 30_000,
        progressIntervalMs: 200,
      }),
    );
    let source = await startSource(dir, [], 'source-0');
    daemons.push(source);
    let dest = await startDest(dir, ['--config', destConfig], 'dest-0');
    daemons.push(dest);
    const vmOpts = (migrationId: string, src: string, secret: string): VmSimOptions => ({
      image,
      migrationId,
      secret,
      source: src,
      destSocket: dest.socket,
      workers,
      pattern: 'mixed',
      seed: opts.seed,
      timeoutMs: opts.durationMs + 300_000,
    });

    let baselineMs: number | null = null;
    if (opts.baseline ?? true) {
      const secret = await registerMigration(source, { id: 'chaos-baseline', image, frozen: true });
      const b = await runVmSim(vmOpts('chaos-baseline', source.ws, secret));
      baselineMs = b.elapsedMs;
      log(`clean run: ${(baselineMs / 1000).toFixed(1)} s`);
    }

    // Restarted sources serve the migration from their command line, frozen, with its secret.
    const key = secretFile(dir, id);
    const sourceArgs = ['--migration', `id=${id},image=${image},frozen,secret-file=${key.path}`];
    source.child.kill('SIGKILL');
    await once(source.child, 'exit').catch(() => undefined);
    source = await startSource(dir, sourceArgs, 'source-1', { port: source.port });
    daemons.push(source);
    let sourceLives = 1;
    let destLives = 0;

    proxy = await ChaosProxy.start({
      target: { port: source.port },
      seed: opts.seed,
      onFault: (e: FaultEvent) => {
        faults[e.kind]++;
        log(`fault: ${e.kind}${e.channel ? ` ${e.channel}` : ''}${e.random ? '' : ' (milestone)'}`);
      },
    });
    const p = proxy;

    const run = runVmSim({
      ...vmOpts(id, p.url, key.secret),
      ...(killDest ? { resumeOnDaemonDeath: { timeoutMs: 60_000 } } : {}),
    });
    let finished = false;
    void run.then(
      () => (finished = true),
      () => (finished = true),
    );

    // --- the director: milestones, random kills, the chaos window ---
    const reconnectsByLife = new Map<number, number>();
    const view = async (): Promise<SessionView | undefined> => {
      try {
        const body = await destSessions<{ active: SessionView[]; ended: SessionView[] }>(dest);
        const s =
          body.active.find((x) => x.migrationId === id) ??
          [...body.ended].reverse().find((x) => x.migrationId === id);
        if (s)
          reconnectsByLife.set(
            destLives,
            Math.max(s.reconnects, reconnectsByLife.get(destLives) ?? 0),
          );
        return s;
      } catch {
        return undefined; // the dest is restarting
      }
    };
    const restartSource = async (): Promise<void> => {
      faults.sourceKill++;
      log('fault: source killed');
      source.child.kill('SIGKILL');
      await once(source.child, 'exit').catch(() => undefined);
      await sleep(Math.floor(rand() * 500));
      source = await startSource(dir, sourceArgs, `source-${++sourceLives}`, { port: source.port });
      daemons.push(source);
    };
    const restartDest = async (): Promise<void> => {
      faults.destKill++;
      log('fault: dest killed');
      dest.child.kill('SIGKILL');
      await once(dest.child, 'exit').catch(() => undefined);
      await sleep(Math.floor(rand() * 300));
      dest = await startDest(dir, ['--config', destConfig], `dest-${++destLives}`, {
        port: dest.port,
        socket: dest.socket,
      });
      daemons.push(dest);
    };

    const milestones: Array<[number, () => Promise<void> | void]> =
      (opts.milestones ?? true)
        ? [
            [0.1, () => void p.cutAll()],
            [0.2, () => void p.stallAll(Infinity, { channel: 'background' })],
            [0.3, () => p.corruptNext(2)],
            ...(killSource ? [[0.4, restartSource] as [number, () => Promise<void>]] : []),
            ...(killDest ? [[0.5, restartDest] as [number, () => Promise<void>]] : []),
          ]
        : [];
    const tickMs = 50;
    const started = Date.now();
    let chaosOn = true;
    // Random faults start once the handoff is acked (the session running): a handoff whose
    // source cannot be reached fails at once by design, so the VMM can still choose what to do.
    // Chaos is about recovery afterwards.
    let randomOn = false;
    let lastLog = 0;
    while (!finished) {
      const s = await view();
      const fraction = s ? s.presentPages / s.totalPages : 0;
      if (chaosOn && !randomOn && s && s.state !== 'connecting') {
        randomOn = true;
        p.setRandom({
          cutPerSec: rates.cutPerSec,
          stallPerSec: rates.stallPerSec,
          corruptPerSec: rates.corruptPerSec,
          stallMs: [200, 1500],
        });
      }
      if (chaosOn && (Date.now() - started > opts.durationMs || fraction >= 1)) {
        chaosOn = false;
        p.setRandom(null);
        p.unstallAll();
        log('chaos window closed; letting the migration finish');
      }
      if (Date.now() - lastLog > 1000 && s) {
        lastLog = Date.now();
        log(`progress ${(fraction * 100).toFixed(1)}% (${s.reconnects} reconnects this dest life)`);
      }
      // Milestones need both channels up (so a cut or stall hits something).
      const next = milestones[0];
      if (next && s && fraction >= next[0] && fraction < 1) {
        const kindNeedsConns = next[0] <= 0.3;
        if (!kindNeedsConns || p.connections().filter((c) => c.channel).length >= 2) {
          milestones.shift();
          await next[1]();
          continue;
        }
      }
      if (chaosOn && randomOn && s && fraction < 1) {
        if (killSource && rand() < (rates.sourceKillPerSec * tickMs) / 1000) await restartSource();
        else if (killDest && rand() < (rates.destKillPerSec * tickMs) / 1000) await restartDest();
      }
      await sleep(tickMs);
    }
    p.setRandom(null);

    let r: VmSimResult | undefined;
    let error: string | undefined;
    try {
      r = await run;
    } catch (err) {
      error = `${(err as { code?: string }).code ?? 'ERROR'}: ${(err as Error).message}`;
    }
    await view();
    const reconnects = [...reconnectsByLife.values()].reduce((a, b) => a + b, 0);
    const sourceState = await migrationState(source, id).catch(() => undefined);
    const verified =
      !!r && r.mismatchCount === 0 && r.missingPages === 0 && r.pagesVerified === r.totalPages;
    const elapsedMs = r?.elapsedMs ?? Date.now() - started;
    return {
      verified,
      seed: opts.seed,
      sizeBytes: opts.sizeBytes,
      totalPages,
      pagesVerified: r?.pagesVerified ?? 0,
      mismatches: r?.mismatchCount ?? 0,
      missingPages: r?.missingPages ?? totalPages,
      faults,
      reconnects,
      sourceRestarts: sourceLives - 1,
      destResumes: (r as { resumes?: number } | undefined)?.resumes ?? 0,
      elapsedMs,
      baselineMs,
      lostMs: baselineMs === null ? null : elapsedMs - baselineMs,
      sourceState,
      ...(error ? { error } : {}),
      dir,
    };
  } finally {
    await proxy?.close();
    await Promise.all(daemons.map((d) => d.stop()));
    if (!opts.keep && !opts.dir) rmSync(dir, { recursive: true, force: true });
  }
}

/** The one-line summary. */
export function summaryLine(r: ChaosResult): string {
  const f = r.faults;
  const s = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
  const time =
    r.baselineMs === null
      ? `time ${s(r.elapsedMs)} (no clean run)`
      : `time ${s(r.elapsedMs)} vs clean ${s(r.baselineMs)} (${r.lostMs! >= 0 ? '+' : ''}${s(r.lostMs!)} lost)`;
  return (
    `chaos seed=${r.seed} size=${r.sizeBytes >> 20}MiB: ` +
    `faults cut=${f.cut} stall=${f.stall} corrupt=${f.corrupt} source-kill=${f.sourceKill} dest-kill=${f.destKill}; ` +
    `recoveries ${r.reconnects} reconnects, ${r.sourceRestarts} source restarts, ${r.destResumes} dest resumes; ` +
    `${time}; verified ${r.pagesVerified}/${r.totalPages} pages, ${r.mismatches} mismatches, ` +
    `${r.missingPages} missing; source ${r.sourceState ?? '?'}: ${r.verified ? 'PASS' : 'FAIL'}` +
    (r.error ? ` (${r.error})` : '')
  );
}
