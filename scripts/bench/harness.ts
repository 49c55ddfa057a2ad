/**
 * What every bench scenario shares: the working folder (on /dev/shm), a cache of generated
 * memory images, the real daemons (fresh per run, so peak RSS and CPU belong to that run), and
 * cleanup of everything it started.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import {
  accessSync,
  constants as fsc,
  mkdtempSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateImage, type GeneratedImage } from '../image/gen-image.js';
import {
  startDest,
  startSource,
  type Daemon,
  type SourceDaemon,
  writeSourceConfig,
} from '../lib/daemons.js';
import { CpuMeter, peakRssBytes } from './proc.js';

export const GiB = 2 ** 30;
export const MiB = 2 ** 20;
export const PAGE = 4096;

export interface ImageSpec {
  sizeBytes: number;
  seed: number;
  zeroFraction?: number;
  holeFraction?: number;
  textFraction?: number;
}

export interface BenchContext {
  dir: string;
  quick: boolean;
  /** Progress on stderr. */
  say(line: string): void;
  image(spec: ImageSpec): Promise<GeneratedImage>;
  /** Deletes a cached image (big ones are dropped as soon as their scenario is done). */
  dropImage(spec: ImageSpec): void;
  /** Dest config file that holds the background stream back for 10 minutes. */
  noBackgroundConfig: string;
  /** Tracks a child process so an interrupted bench still ends it. */
  track(child: ChildProcess): void;
  /**
   * Registers a synchronous cleanup (e.g. removing network namespaces), run once at the end,
   * or when the bench is interrupted (after the tracked children are killed), or at exit.
   */
  onCleanup(fn: () => void): void;
}

const live = new Set<ChildProcess>();
const cleanups: Array<() => void> = [];

/** Ends every tracked child (SIGKILL): used when the bench itself is interrupted. */
export function killTracked(): void {
  for (const c of live) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
}

/** Kills the tracked children, then runs the registered cleanups (each once, newest first). */
export function runCleanups(): void {
  killTracked();
  while (cleanups.length) {
    try {
      cleanups.pop()!();
    } catch (err) {
      process.stderr.write(`bench: cleanup failed: ${(err as Error).message}\n`);
    }
  }
}

export function createContext(opts: { quick: boolean; verbose: boolean }): BenchContext & {
  cleanup(): void;
} {
  let base = tmpdir();
  try {
    accessSync('/dev/shm', fsc.W_OK);
    base = '/dev/shm';
  } catch {
    /* not on /dev/shm: images in the temp folder */
  }
  const dir = mkdtempSync(join(base, 'yabusame-bench-'));
  const images = new Map<string, Promise<GeneratedImage>>();
  const key = (s: ImageSpec): string =>
    [s.sizeBytes, s.seed, s.zeroFraction, s.holeFraction, s.textFraction]
      .map((x) => x ?? 'd')
      .join('-');
  const noBackgroundConfig = join(dir, 'dest-no-background.json');
  writeFileSync(noBackgroundConfig, JSON.stringify({ backgroundDelayMs: 600_000 }) + '\n');
  const say = (line: string): void => {
    if (opts.verbose) process.stderr.write(line + '\n');
  };
  return {
    dir,
    quick: opts.quick,
    say,
    noBackgroundConfig,
    image(spec) {
      const k = key(spec);
      let p = images.get(k);
      if (!p) {
        const t0 = performance.now();
        p = generateImage({ path: join(dir, `image-${k}.ram`), ...spec }).then((g) => {
          say(
            `  image ${(spec.sizeBytes / MiB).toFixed(0)} MiB (zero ${spec.zeroFraction ?? 0.4}) ` +
              `generated in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
          );
          return g;
        });
        images.set(k, p);
      }
      return p;
    },
    dropImage(spec) {
      const k = key(spec);
      if (!images.delete(k)) return;
      rmSync(join(dir, `image-${k}.ram`), { force: true });
    },
    track(child) {
      live.add(child);
      child.once('exit', () => live.delete(child));
    },
    onCleanup(fn) {
      if (cleanups.length === 0) process.once('exit', runCleanups);
      cleanups.push(fn);
    },
    cleanup() {
      runCleanups();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface DaemonPair {
  source: SourceDaemon;
  dest: Daemon & { socket: string };
  /** Starts a CPU window on both daemons: seconds(0) is the dest, seconds(1) the source. */
  meter(): CpuMeter;
  /** Peak RSS of both daemons so far, bytes. */
  peakRss(): { dest: number; source: number };
}

let pairSeq = 0;

/** Where the daemons of a pair run (default: here, on loopback). */
export interface DaemonPlacement {
  /** The source's network namespace, listen host and extra arguments. */
  source?: { netns?: string; host?: string; args?: string[] };
  /** The dest's network namespace. */
  dest?: { netns?: string };
}

/**
 * Runs `fn` with a fresh `yabusame source` (serving `migrations`, already frozen, each image as
 * one region of `pageSizeBytes` pages, 4 KiB by default) and `yabusame dest` (with `destConfig`
 * as its config file, if given), then stops both.
 */
export async function withDaemons<T>(
  ctx: BenchContext,
  migrations: Array<{ id: string; image: string; pageSizeBytes?: number }>,
  destConfig: string | undefined,
  fn: (pair: DaemonPair) => Promise<T>,
  where: DaemonPlacement = {},
): Promise<T> {
  const n = ++pairSeq;
  const daemons: Daemon[] = [];
  try {
    const config = writeSourceConfig(
      ctx.dir,
      `source-${n}`,
      migrations.map((m) => ({
        id: m.id,
        image: m.image,
        frozen: true,
        regions: [
          {
            name: 'ram0',
            offset: 0,
            sizeBytes: statSync(m.image).size,
            fileOffset: 0,
            pageSizeBytes: m.pageSizeBytes ?? PAGE,
          },
        ],
      })),
    );
    const source = await startSource(
      ctx.dir,
      ['--config', config.path, ...(where.source?.args ?? [])],
      `source-${n}`,
      { secrets: config.secrets, netns: where.source?.netns, host: where.source?.host },
    );
    daemons.push(source);
    ctx.track(source.child);
    const dest = await startDest(ctx.dir, destConfig ? ['--config', destConfig] : [], `dest-${n}`, {
      netns: where.dest?.netns,
    });
    daemons.push(dest);
    ctx.track(dest.child);
    const pids = [dest.child.pid!, source.child.pid!];
    return await fn({
      source,
      dest,
      meter: () => new CpuMeter(pids),
      peakRss: () => ({ dest: peakRssBytes(pids[0]!), source: peakRssBytes(pids[1]!) }),
    });
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
  }
}

/** Runs a command to completion; resolves with its stdout, rejects on a non-zero exit. */
export function run(
  ctx: BenchContext,
  cmd: string,
  args: string[],
): Promise<{ stdout: string; code: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    ctx.track(child);
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('error', reject);
    child.once('close', (code) => {
      if (code === 0) resolve({ stdout, code });
      else {
        const err = new Error(`${cmd} exited with ${code}: ${stderr.trim().slice(-2000)}`);
        Object.assign(err, { stdout, code });
        reject(err);
      }
    });
  });
}
