/**
 * A stock QEMU (Debian's qemu-system-x86, TCG) live-migrated post-copy through yabusame by
 * `yabusame migrate`, end to end on loopback: a small Linux guest whose workload rewrites and
 * verifies its memory the whole time must keep running on the destination with zero
 * verification errors, and the destination QEMU must reach `running`. Three scenarios, one boot
 * each:
 *
 *  - the plain migration, the destination QEMU started by `yabusame migrate` itself;
 *  - the dest daemon killed (SIGKILL) at the destination's RESUME and started again: the preload
 *    hands the uffd over with "resume":true, the guest pauses, then completes;
 *  - every page connection cut at RESUME (a ChaosProxy between dest and source): the dest
 *    reconnects and completes.
 *
 * The dest holds its background stream back (--background-delay-ms) in the last two, so the
 * migration is surely under way when the daemon dies or the link is cut, however fast the
 * machine. Nothing here measures time. Needs root (QEMU's RAM files on /dev/shm, apt-get for
 * missing packages: .ci/run installs them).
 */
import t, { type Test } from 'tap';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { buildGuest, type GuestFiles } from '../../scripts/qemu/guest/build.js';
import { buildPreload } from '../../scripts/qemu/preload-build.js';
import { ensureQemu } from '../../scripts/qemu/qemu.js';
import { tryYabusame, type TryOptions, type YabusameRun } from '../../scripts/qemu/try-yabusame.js';

const skip = process.getuid?.() === 0 ? false : 'needs root (QEMU RAM files on /dev/shm, apt-get)';

// A small guest keeps the run short: 256 MiB of RAM, 48 MiB of it rewritten and checked.
const MEM_MIB = 256;
const WORKLOAD_MIB = 48;

let guest: GuestFiles;
let preload: string;
t.before(() => {
  if (skip) return;
  ensureQemu();
  guest = buildGuest();
  preload = buildPreload();
});

async function migrate(
  t: Test,
  name: string,
  opts: Partial<TryOptions>,
): Promise<YabusameRun & { logs: string }> {
  const workDir = mkdtempSync(`/tmp/yabusame-qemu-test-${name}-`);
  const lines: string[] = [];
  const run = await tryYabusame({
    guest,
    preload,
    workDir,
    memMiB: MEM_MIB,
    workloadMiB: WORKLOAD_MIB,
    dest: 'command',
    batchesAfter: 2,
    log: (m) => lines.push(m),
    ...opts,
  });
  const logs = ['dest.log', 'dest-restarted.log', 'source.log']
    .map((f) => {
      try {
        return readFileSync(`${workDir}/${f}`, 'utf8');
      } catch {
        return '';
      }
    })
    .join('');
  // Kept for a look when something failed.
  if (run.ok) rmSync(workDir, { recursive: true, force: true });
  else t.comment(`kept ${workDir}; steps: ${lines.join(' | ')}`);
  return { ...run, logs };
}

function guestKeptRunning(t: Test, run: YabusameRun): void {
  t.equal(run.failure, null, 'no step failed');
  t.equal(run.migrateExit, 0, 'yabusame migrate exited 0');
  t.ok(run.destRunning, 'the destination QEMU is running');
  t.ok(
    run.guest.batches >= 2,
    `the guest ran on: ${run.guest.batches} workload batches after resume`,
  );
  t.equal(run.guest.errors, 0, 'zero verification errors');
  t.same(run.guest.mismatchLines, [], 'no page seen with the wrong contents');
}

t.test('a running guest migrates, verified by its own workload', { skip }, async (t) => {
  const run = await migrate(t, 'plain', {});
  guestKeptRunning(t, run);
  const steps = run.migrateLines.map((l) => l['step']).filter(Boolean);
  for (const s of ['source', 'register', 'destination', 'capabilities', 'incoming', 'migrate']) {
    t.ok(steps.includes(s), `migrate reported step ${s}`);
  }
  t.ok(steps.includes('switch-over') && steps.includes('memory') && steps.includes('release'));
  const done = run.migrateLines.find((l) => l['event'] === 'done');
  t.ok(done, 'migrate said done');
  t.equal(done?.['totalPages'], (MEM_MIB << 20) / 4096);
  t.ok(
    run.migrateLines.some((l) => l['event'] === 'progress'),
    'and reported progress on the way',
  );
});

t.test(
  'the dest daemon killed during the migration: the guest pauses, then completes',
  { skip },
  async (t) => {
    const run = await migrate(t, 'restart', {
      dest: 'qmp',
      restartDestAfterMs: 0,
      destArgs: ['--background-delay-ms', '1500'],
    });
    guestKeptRunning(t, run);
    t.ok(run.destRestartedAfterMs !== null, 'the dest daemon was killed and restarted');
    t.ok(
      run.preloadLines.some((l) => l.includes('handing the uffd over again with resume')),
      'the preload saw the daemon die',
    );
    t.ok(
      run.preloadLines.some((l) => l.includes('resume: ack')),
      'and handed the uffd to the new one',
    );
    const existed = Number(run.complete?.['existedPages'] ?? 0);
    t.ok(existed > 0, `the new session found pages the first had placed (${existed})`);
    t.equal(run.complete?.['totalPages'], (MEM_MIB << 20) / 4096);
  },
);

t.test(
  'the page connections cut during the migration: the dest reconnects',
  { skip },
  async (t) => {
    const run = await migrate(t, 'cut', {
      cutAfterMs: 0,
      destArgs: ['--background-delay-ms', '1500'],
    });
    guestKeptRunning(t, run);
    t.ok((run.cuts?.connections ?? 0) >= 1, `cut ${run.cuts?.connections} connections`);
    t.match(run.logs, /source connection lost; reconnecting/, 'the dest lost and reconnected');
  },
);
