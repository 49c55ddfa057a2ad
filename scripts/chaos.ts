/**
 * `npm run chaos`: a bounded chaos run (see scripts/chaos/run.ts). Exit 0 only when every page
 * was verified byte for byte; 1 otherwise; 2 on a usage error.
 */
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { parseSize } from './image/gen-image.js';
import { runChaos, summaryLine, type ChaosOptions } from './chaos/run.js';

const USAGE = `Usage: npm run chaos -- [options]

A migration under a vm-sim workload with a fault-injecting proxy between dest and source
(connection cuts, stalls, bit flips on the source->dest stream, at random) and the source killed
(SIGKILL) and restarted at random moments. Every page is verified byte for byte at the end.

  --size SIZE       guest RAM and image size (default 512M, at least 512M unless --small)
  --seed N          PRNG seed of the faults, the image and the workload (default 1)
  --duration SECS   how long random faults are injected (default 30; they stop at completion)
  --workers N       workload threads (default 2)
  --no-baseline     skip the clean reference run (no time-lost figure)
  --no-kill-source  never kill the source
  --no-kill-dest    never kill the dest (by default it is killed with SIGKILL and restarted;
                    vm-sim hands its uffd over again with resume)
  --cut-rate R, --stall-rate R, --corrupt-rate R, --kill-rate R
                    expected faults per second of each kind (defaults 0.5, 0.3, 1, 0.15)
  --small           allow sizes below 512M (quick runs)
  --dir DIR         where the image, sockets and logs go (default a new folder in /dev/shm)
  --keep            keep that folder (logs: source-N.log, dest-N.log, JSON lines)
  --json            print the result as JSON instead of the summary line
  -h, --help
`;

class UsageError extends Error {}

function num(v: string | undefined, name: string, min = 0): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n < min) throw new UsageError(`--${name}: bad number "${v}"`);
  return n;
}

export function parseChaosArgs(argv: string[]): (ChaosOptions & { json: boolean }) | 'help' {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        size: { type: 'string', default: '512M' },
        seed: { type: 'string', default: '1' },
        duration: { type: 'string', default: '30' },
        workers: { type: 'string', default: '2' },
        'no-baseline': { type: 'boolean', default: false },
        'no-kill-source': { type: 'boolean', default: false },
        'no-kill-dest': { type: 'boolean', default: false },
        'cut-rate': { type: 'string' },
        'stall-rate': { type: 'string' },
        'corrupt-rate': { type: 'string' },
        'kill-rate': { type: 'string' },
        small: { type: 'boolean', default: false },
        dir: { type: 'string' },
        keep: { type: 'boolean', default: false },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (values.help) return 'help';
  let sizeBytes: number;
  try {
    sizeBytes = parseSize(values.size);
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (sizeBytes % 4096 || sizeBytes <= 0) throw new UsageError('--size: whole 4 KiB pages');
  if (sizeBytes < 512 << 20 && !values.small) {
    throw new UsageError('--size: at least 512M (use --small for quick runs)');
  }
  const seed = num(values.seed, 'seed')!;
  if (!Number.isSafeInteger(seed)) throw new UsageError('--seed: an integer');
  const workers = num(values.workers, 'workers', 1)!;
  if (!Number.isInteger(workers)) throw new UsageError('--workers: an integer');
  const rates: NonNullable<ChaosOptions['rates']> = {};
  const set = (k: keyof NonNullable<ChaosOptions['rates']>, flag: string): void => {
    const v = num(values[flag as 'cut-rate'], flag);
    if (v !== undefined) rates[k] = v;
  };
  set('cutPerSec', 'cut-rate');
  set('stallPerSec', 'stall-rate');
  set('corruptPerSec', 'corrupt-rate');
  set('sourceKillPerSec', 'kill-rate');
  return {
    sizeBytes,
    seed,
    durationMs: num(values.duration, 'duration')! * 1000,
    workers,
    baseline: !values['no-baseline'],
    killSource: !values['no-kill-source'],
    killDest: !values['no-kill-dest'],
    rates,
    keep: values.keep,
    json: values.json,
    ...(values.dir ? { dir: values.dir } : {}),
  };
}

export async function main(argv: string[] = process.argv.slice(2)): Promise<number> {
  let opts: ReturnType<typeof parseChaosArgs>;
  try {
    opts = parseChaosArgs(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`chaos: ${err.message}\n\n${USAGE}`);
    return 2;
  }
  if (opts === 'help') {
    process.stdout.write(USAGE);
    return 0;
  }
  const { json, ...chaos } = opts;
  const t0 = Date.now();
  const r = await runChaos({
    ...chaos,
    log: (line) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${line}\n`),
  });
  process.stdout.write(json ? JSON.stringify(r, null, 2) + '\n' : summaryLine(r) + '\n');
  return r.verified ? 0 : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`chaos failed: ${(err as Error).stack ?? String(err)}\n`);
      process.exit(1);
    },
  );
}
