/**
 * The demo migration (README's first command): a 1 GiB memory image with a realistic mix of
 * pages, a real `yabusame source` and `yabusame dest` on loopback (separate processes), and
 * vm-sim as the VMM, migrating under a running workload and verifying every page at the end.
 */
import { mkdtempSync, rmSync, accessSync, constants as fsc } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { generateImage, parseSize } from './image/gen-image.js';
import { runVmSim, type VmSimResult } from './vm-sim/vm-sim.js';
import {
  freezeMigration,
  migrationState,
  startDest,
  startSource,
  type Daemon,
} from './lib/daemons.js';

const USAGE = `Usage: npm run demo -- [options]   (or: yabusame demo [options])

  --size SIZE      guest RAM and image size (default 1G)
  --workers N      workload threads in the simulated VM (default 4)
  --pattern P      mixed | sequential | random | hotset (default mixed)
  --dir DIR        where the image, sockets and logs go (default a new folder in /dev/shm)
  --keep           keep that folder afterwards
  --json           print the result as JSON instead of a table
  -h, --help
`;

function defaultDir(): string {
  try {
    accessSync('/dev/shm', fsc.W_OK);
    return mkdtempSync('/dev/shm/yabusame-demo-');
  } catch {
    return mkdtempSync(join(tmpdir(), 'yabusame-demo-'));
  }
}

const fmtBytes = (n: number): string =>
  n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`;

function table(rows: Array<[string, string]>): string {
  const w = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, v]) => `  ${k.padEnd(w)}  ${v}`).join('\n');
}

export async function main(argv: string[] = process.argv.slice(2)): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      size: { type: 'string', default: '1G' },
      workers: { type: 'string', default: '4' },
      pattern: { type: 'string', default: 'mixed' },
      dir: { type: 'string' },
      keep: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return;
  }
  const sizeBytes = parseSize(values.size);
  const dir = values.dir ?? defaultDir();
  const say = (s: string): void => {
    if (!values.json) process.stderr.write(s + '\n');
  };
  const image = join(dir, 'vm.ram');
  const daemons: Daemon[] = [];
  let result: VmSimResult | undefined;
  try {
    say(`yabusame demo: ${fmtBytes(sizeBytes)} guest, working folder ${dir}`);
    let t0 = performance.now();
    const gen = await generateImage({ path: image, sizeBytes, seed: 1 });
    const pages = sizeBytes / 4096;
    const pct = (n: number): string => `${((100 * n) / pages).toFixed(0)}%`;
    say(
      `  image generated in ${((performance.now() - t0) / 1000).toFixed(1)} s: ` +
        `${pct(gen.pages.zero)} zero (${pct(gen.pages.hole)} as file holes), ` +
        `${pct(gen.pages.text)} text, ${pct(gen.pages.random)} random`,
    );

    const source = await startSource(dir, ['--migration', `id=demo-vm,image=${image}`]);
    daemons.push(source);
    const dest = await startDest(dir);
    daemons.push(dest);
    say(`  source on ${source.ws}, dest on ${dest.socket} (logs in ${dir})`);

    // The VM stops on the source (its pages can no longer change), then resumes on the dest.
    await freezeMigration(source, 'demo-vm');
    say('  VM frozen on the source; resuming on the destination with empty RAM');

    t0 = performance.now();
    let lastLine = 0;
    result = await runVmSim({
      image,
      migrationId: 'demo-vm',
      // The secret the source generated for the migration: the VMM hands it to the dest.
      secret: source.secretOf('demo-vm'),
      source: source.ws,
      destSocket: dest.socket,
      workers: Number(values.workers),
      pattern: values.pattern as 'mixed',
      timeoutMs: 10 * 60_000,
      onProgress: ({ presentPages, totalPages }) => {
        const now = performance.now();
        if (values.json || (now - lastLine < 500 && presentPages < totalPages)) return;
        lastLine = now;
        const s = (now - t0) / 1000;
        const rate = (presentPages * 4096) / 2 ** 30 / Math.max(s, 0.001);
        process.stderr.write(
          `  migrating: ${((100 * presentPages) / totalPages).toFixed(1).padStart(5)}% ` +
            `${presentPages}/${totalPages} pages, ${s.toFixed(1)} s, ${rate.toFixed(2)} GiB/s\n`,
        );
      },
    });
    const released = (await migrationState(source, 'demo-vm')) === 'complete';

    const r = result;
    const ok = r.mismatchCount === 0 && r.missingPages === 0 && r.pagesVerified === r.totalPages;
    const seconds = r.elapsedMs / 1000;
    const summary = {
      sizeBytes,
      pages: r.totalPages,
      demandPages: r.daemonReport.demandPages,
      backgroundPages: r.daemonReport.backgroundPages,
      zeroPages: r.daemonReport.zeroPages,
      faults: r.faultLatencyUs.count,
      faultLatencyUs: r.faultLatencyUs,
      totalSeconds: seconds,
      throughputGiBs: sizeBytes / 2 ** 30 / seconds,
      pagesVerified: r.pagesVerified,
      mismatches: r.mismatchCount,
      missingPages: r.missingPages,
      guestWrites: r.workload.writes,
      sourceReleasedImage: released,
      verified: ok,
    };
    if (values.json) {
      process.stdout.write(JSON.stringify(summary, null, 2) + '\n');
    } else {
      process.stdout.write(
        '\n' +
          table([
            ['guest RAM', `${fmtBytes(sizeBytes)} (${r.totalPages} pages)`],
            ['pages by demand', String(summary.demandPages)],
            ['pages by background', String(summary.backgroundPages)],
            ['pages as zero runs', String(summary.zeroPages)],
            ['guest faults timed', String(r.faultLatencyUs.count)],
            [
              'fault latency',
              `p50 ${r.faultLatencyUs.p50} us, p99 ${r.faultLatencyUs.p99} us, max ${r.faultLatencyUs.max} us`,
            ],
            ['total time', `${seconds.toFixed(2)} s`],
            ['throughput', `${summary.throughputGiBs.toFixed(2)} GiB/s`],
            ['guest writes during migration', String(r.workload.writes)],
            [
              'source released its image',
              released ? 'yes (after the dest confirmed complete)' : 'NO',
            ],
            [
              'verification',
              ok
                ? `OK: ${r.pagesVerified}/${r.totalPages} pages byte-for-byte`
                : `FAILED: ${r.mismatchCount} mismatched, ${r.missingPages} missing`,
            ],
          ]) +
          '\n',
      );
      for (const m of r.mismatches.slice(0, 10)) say(`  mismatch: page ${m.page}: ${m.reason}`);
    }
    if (!ok || !released) process.exitCode = 1;
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
    if (!values.keep && (result || !values.dir)) rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    process.stderr.write(
      `demo failed: ${(err as { code?: string }).code ?? ''} ${(err as Error).stack ?? err}\n`,
    );
    process.exit(1);
  });
}
