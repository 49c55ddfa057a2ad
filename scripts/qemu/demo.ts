/**
 * `npm run demo:qemu`: a stock QEMU VM live-migrated post-copy through yabusame on loopback.
 *
 * Boots the test guest under TCG (Debian's kernel, a busybox initramfs whose workload rewrites
 * and verifies its memory and prints a line per batch on the serial console), starts `yabusame
 * source` and `yabusame dest`, and runs `yabusame migrate` while the workload runs: migrate
 * starts the destination QEMU with the preload, moves device state, and the guest's RAM follows
 * through yabusame. The guest's own lines (source, then destination) are printed next to
 * yabusame's progress, then a summary. Missing Debian packages (qemu-system-x86, a kernel in
 * /boot, busybox-static, gcc, libc6-dev) are installed with apt-get first, and it says so.
 *
 * Exit status 0: the migration completed, the destination runs, and the guest saw no wrong page.
 */
import * as fs from 'node:fs';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { buildGuest } from './guest/build.js';
import { buildPreload } from './preload-build.js';
import { ensureQemu, type SerialLine } from './qemu.js';
import { tryYabusame } from './try-yabusame.js';

const USAGE = `Usage: npm run demo:qemu -- [options]

  --mem MiB            guest RAM (default 1024)
  --workload-mib N     memory the guest's workload rewrites and verifies (default 512)
  --keep               keep the work folder (logs, sockets) afterwards
  -h, --help

Runs as root (QEMU's RAM files on /dev/shm, apt-get for missing packages).
`;

const WIDTH = 11;

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      mem: { type: 'string', default: '1024' },
      'workload-mib': { type: 'string', default: '512' },
      keep: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const tty = process.stdout.isTTY === true;
  let barShown = false;
  const out = (who: string, text: string): void => {
    if (barShown) process.stdout.write('\r\x1b[K');
    barShown = false;
    process.stdout.write(`${who.padEnd(WIDTH)}│ ${text}\n`);
  };
  let lastProgressAt = 0;
  const onLine = (who: 'src' | 'dst' | 'migrate', line: SerialLine): void => {
    if (who !== 'migrate') {
      // The guest's console (and, on the destination, QEMU's and the preload's messages).
      if (/^yb-|MISMATCH|yabusame-preload/.test(line.text)) {
        out(who === 'src' ? 'source VM' : 'dest VM', line.text);
      }
      return;
    }
    let j: Record<string, unknown>;
    try {
      j = JSON.parse(line.text) as Record<string, unknown>;
    } catch {
      out('yabusame', line.text);
      return;
    }
    if (j['event'] === 'progress') {
      const total = Number(j['totalPages']);
      const present = Number(j['presentPages']);
      const frac = total ? present / total : 0;
      const bar = `[${'#'.repeat(Math.round(frac * 30)).padEnd(30, '.')}] ${(frac * 100).toFixed(1)}% of RAM present, ${(Number(j['sinceStopMs']) / 1000).toFixed(1)} s since STOP`;
      if (tty) {
        process.stdout.write(`\r\x1b[K${'yabusame'.padEnd(WIDTH)}│ ${bar}`);
        barShown = true;
      } else if (line.atMs - lastProgressAt >= 500 || present === total) {
        lastProgressAt = line.atMs;
        out('yabusame', bar);
      }
      return;
    }
    if (j['event'] === 'step') out('yabusame', `${String(j['step'])}: ${String(j['msg'])}`);
    else if (j['event'] === 'error') {
      out(
        'yabusame',
        `FAILED at step ${String(j['step'])}: ${String(j['code'])}: ${String(j['message'])}`,
      );
    } else if (j['event'] === 'warning') out('yabusame', `warning: ${String(j['msg'])}`);
  };

  ensureQemu();
  const guest = buildGuest();
  const preload = buildPreload();
  const workDir = fs.mkdtempSync('/tmp/yabusame-demo-qemu-');
  const mem = Number(values.mem);
  const workload = Number(values['workload-mib']);
  out('demo', `booting a ${mem} MiB guest under TCG (no KVM needed; this takes a while)`);
  out('demo', `its workload rewrites and verifies ${workload} MiB, one line per batch`);
  const run = await tryYabusame({
    guest,
    preload,
    workDir,
    memMiB: mem,
    workloadMiB: workload,
    dest: 'command',
    batchesAfter: 3,
    onLine,
    log: (msg) => {
      if (/booted|RESUME|migrate done/.test(msg)) out('demo', msg);
    },
    onMigrate: (argv) => out('demo', `running: yabusame ${shorten(argv).join(' ')}`),
  });
  if (barShown) process.stdout.write('\n');
  const f = (x: number): string => (Number.isFinite(x) ? `${x.toFixed(1)} ms` : '–');
  const rows: [string, string][] = [
    ['source STOP → destination RESUME', f(run.stopToResumeMs)],
    ['source STOP → all RAM present', f(run.stopToCompleteMs)],
    ["guest's slowest batch after resume", `${run.guest.maxBatchMs} ms`],
    ['destination QEMU', run.destRunning ? 'running' : 'NOT running'],
    [
      "guest's verification",
      `${run.guest.errors} errors, ${run.guest.mismatchLines.length} wrong pages seen`,
    ],
    [
      'result',
      run.ok ? 'ok: the VM moved and kept its memory' : `FAILED: ${run.failure ?? 'see above'}`,
    ],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  process.stdout.write(`\n${rows.map(([k, v]) => `  ${k.padEnd(w)}  ${v}`).join('\n')}\n`);
  if (values.keep || !run.ok) process.stdout.write(`  work folder: ${workDir}\n`);
  else fs.rmSync(workDir, { recursive: true, force: true });
  return run.ok ? 0 : 1;
}

/** The migrate command line as printed: long paths and the QEMU command shortened. */
function shorten(argv: string[]): string[] {
  const dash = argv.indexOf('--');
  const head = dash < 0 ? argv : argv.slice(0, dash);
  return [...head, ...(dash < 0 ? [] : ['--', argv[dash + 1] ?? '', '…(the destination QEMU)'])];
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (err: unknown) => {
      process.stderr.write(`demo:qemu: ${err instanceof Error ? err.stack : String(err)}\n`);
      process.exitCode = 1;
    },
  );
}
