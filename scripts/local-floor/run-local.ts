/**
 * The local floor as a command: vm-sim with the in-process local handler (no daemon, no network),
 * the baseline a benchmark compares `yabusame dest` against.
 *
 * node dist/scripts/local-floor/run-local.js --image /dev/shm/img --workers 1 --pattern random \
 *   [--size 256M] [--background-after 1000000] [--pages-per-tick 64] [--json]
 */
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import { parseSize } from '../image/gen-image.js';
import { runVmSim, type HandoffFn, type Pattern } from '../vm-sim/vm-sim.js';
import { startLocalHandler, type LocalHandler } from './local-handler.js';

const USAGE = `usage: run-local --image <path> [options]

  --size <n>               guest RAM size (default: the image size)
  --workers <n>            workload threads (default 1)
  --pattern <p>            mixed | sequential | random | hotset (default random)
  --write-fraction <f>     share of writes (default 0.2)
  --background-after <n>   start the background stream after n demand faults (default 0)
  --pages-per-tick <n>     background pages per event-loop turn (default 64)
  --json                   print the result as JSON
`;

async function main(argv: string[]): Promise<number> {
  const { values: a } = parseArgs({
    args: argv,
    options: {
      image: { type: 'string' },
      size: { type: 'string' },
      workers: { type: 'string', default: '1' },
      pattern: { type: 'string', default: 'random' },
      'write-fraction': { type: 'string', default: '0.2' },
      'background-after': { type: 'string', default: '0' },
      'pages-per-tick': { type: 'string', default: '64' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (a.help || !a.image) {
    (a.help ? process.stdout : process.stderr).write(USAGE);
    return a.help ? 0 : 2;
  }
  let handler: LocalHandler | undefined;
  const handoff: HandoffFn = (request, uffdFd, sink) => {
    handler = startLocalHandler({
      uffdFd,
      request,
      imagePath: a.image!,
      backgroundAfterFaults: Number(a['background-after']),
      backgroundPagesPerTick: Number(a['pages-per-tick']),
      onReply: (r) => sink.reply(r),
    });
    return { close: () => handler!.close() };
  };
  const r = await runVmSim({
    image: a.image,
    sizeBytes: a.size ? parseSize(a.size) : undefined,
    migrationId: 'local-floor',
    source: 'ws://127.0.0.1:1',
    workers: Number(a.workers),
    pattern: a.pattern as Pattern,
    writeFraction: Number(a['write-fraction']),
    handoff,
  });
  const service = [...handler!.stats.serviceUs].sort((x, y) => x - y);
  const q = (p: number): number =>
    Math.round((service[Math.min(service.length - 1, Math.floor(p * service.length))] ?? 0) * 10) /
    10;
  const out = {
    ok: r.mismatchCount === 0 && r.pagesVerified === r.totalPages,
    totalPages: r.totalPages,
    pagesVerified: r.pagesVerified,
    mismatchCount: r.mismatchCount,
    elapsedMs: r.elapsedMs,
    verifyMs: r.verifyMs,
    faultLatencyUs: r.faultLatencyUs,
    handlerServiceUs: { count: service.length, p50: q(0.5), p99: q(0.99) },
    daemonReport: r.daemonReport,
    ops: r.workload.ops,
  };
  process.stdout.write(a.json ? `${JSON.stringify(out)}\n` : `${JSON.stringify(out, null, 2)}\n`);
  return out.ok ? 0 : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then((code) => (process.exitCode = code));
}
