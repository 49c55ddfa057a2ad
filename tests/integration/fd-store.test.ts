// The dest restarted by its service manager mid-migration (an upgrade: SIGTERM; a crash:
// SIGKILL) resumes its sessions from systemd's fd store by itself: this test plays systemd
// (scripts/lib/fake-systemd.ts: $NOTIFY_SOCKET, FDSTORE=1, then LISTEN_FDS for the new daemon).
// vm-sim runs WITHOUT resumeOnDaemonDeath: it never hands its uffd over again, and its
// connection to the dest never closes (the store holds it), so the migration can only finish
// if the new daemon picked the session up. Every page is verified byte for byte.
import t, { type Test } from 'tap';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim } from '../../scripts/vm-sim/vm-sim.js';
import { FakeSystemd } from '../../scripts/lib/fake-systemd.js';
import { buildFcVmm, startFcVmm } from '../../scripts/fc-vmm/fc-vmm.js';
import {
  destSessions,
  migrationState,
  registerMigration,
  startDest,
  startSource,
  type Daemon,
} from '../../scripts/lib/daemons.js';

const MiB = 1 << 20;
const SIZE = 32 * MiB;
const dir = mkdtempSync('/dev/shm/yabusame-fdstore-');
const daemons: Daemon[] = [];
let source: Awaited<ReturnType<typeof startSource>>;
const image = join(dir, 'vm.ram');
// A narrow background window keeps the migration going long enough to restart the dest in it.
const config = join(dir, 'dest.json');

t.before(async () => {
  await generateImage({ path: image, sizeBytes: SIZE, seed: 12 });
  writeFileSync(config, JSON.stringify({ backgroundWindowBytes: 256 * 1024 }));
  source = await startSource(dir);
  daemons.push(source);
});
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

type Dest = Awaited<ReturnType<typeof startDest>>;
interface SessionView {
  migrationId: string;
  state: string;
  presentPages: number;
  totalPages: number;
}

async function presentPages(dest: Dest, id: string): Promise<number> {
  try {
    const body = await destSessions<{ active: SessionView[] }>(dest);
    return body.active.find((s) => s.migrationId === id)?.presentPages ?? 0;
  } catch {
    return 0;
  }
}

function logLines(dest: Dest): Array<Record<string, unknown>> {
  return readFileSync(dest.logPath, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

async function restartMidway(t: Test, id: string, signal: 'SIGTERM' | 'SIGKILL'): Promise<void> {
  const systemd = new FakeSystemd(dir);
  t.teardown(() => systemd.close());
  await registerMigration(source, { id, image, frozen: true });
  const first = await startDest(dir, ['--config', config], `${id}-0`, { systemd });
  daemons.push(first);
  await systemd.until(() => systemd.messages.some((m) => m['READY'] === '1'));
  const run = { settled: false };
  const vm = runVmSim({
    image,
    migrationId: id,
    secret: source.secretOf(id),
    source: source.ws,
    destSocket: first.socket,
    workers: 2,
    timeoutMs: 60_000,
  }).finally(() => (run.settled = true));
  vm.catch(() => undefined);

  // Parked at the ack: one name, three descriptors (uffd, VMM connection, state).
  await systemd.until(() => systemd.storedNames().length === 1);
  const [name] = systemd.storedNames();
  t.equal(systemd.store.length, 3, `${name}: three descriptors parked`);
  const deadline = Date.now() + 20_000;
  let present = 0;
  while (!run.settled && Date.now() < deadline) {
    present = await presentPages(first, id);
    if (present >= 0.2 * (SIZE / 4096)) break;
    await new Promise((r) => setTimeout(r, 5));
  }
  t.notOk(run.settled, 'the migration was still running when the dest went down');
  const exited = new Promise<void>((r) => first.child.once('exit', () => r()));
  first.child.kill(signal);
  await exited;
  t.pass(`dest stopped with ${signal} at ${present} pages present`);
  t.same(systemd.storedNames(), [name], 'the session stays parked while no daemon runs');

  const second = await startDest(dir, ['--config', config], `${id}-1`, {
    systemd,
    socket: first.socket,
    port: first.port,
  });
  daemons.push(second);
  const r = await vm;
  t.equal(r.resumes, 0, 'the VMM never handed its uffd over again');
  t.equal(r.mismatchCount, 0, 'no page mismatched');
  t.equal(r.missingPages, 0, 'no page missing');
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified byte for byte`);
  t.ok(
    logLines(second).some((l) => l['msg'] === 'migration resumed from the fd store'),
    'the new dest resumed the parked session',
  );
  t.ok(!logLines(second).some((l) => l['msg'] === 'migration started'), 'and did not ack it again');
  await systemd.until(() => systemd.storedNames().length === 0);
  t.pass('the finished session left the fd store');
  t.equal(await migrationState(source, id), 'complete', 'the source released the image');
}

t.test('an upgrade (SIGTERM, then a new daemon) resumes from the fd store', async (t) => {
  await restartMidway(t, 'fdstore-upgrade', 'SIGTERM');
});

t.test('a crash (SIGKILL, then a restart) resumes from the fd store', async (t) => {
  await restartMidway(t, 'fdstore-crash', 'SIGKILL');
});

t.test('status and watchdog reach the service manager', async (t) => {
  const systemd = new FakeSystemd(dir);
  t.teardown(() => systemd.close());
  // WatchdogSec=0.4s: systemd's WATCHDOG_USEC (the child inherits it; it is not ours to keep).
  process.env['WATCHDOG_USEC'] = '400000';
  const dest = await startDest(dir, [], 'watchdog', { systemd }).finally(
    () => delete process.env['WATCHDOG_USEC'],
  );
  daemons.push(dest);
  t.teardown(() => dest.stop());
  await systemd.until(() => systemd.messages.some((m) => m['READY'] === '1'));
  t.ok(
    systemd.messages.some((m) => /^0 migrations running/.test(m['STATUS'] ?? '')),
    'a live STATUS= line',
  );
  const pings = (): number => systemd.messages.filter((m) => m['WATCHDOG'] === '1').length;
  await systemd.until(() => pings() >= 3);
  t.pass('WATCHDOG=1 keeps coming from the event loop');
});

t.test('a Firecracker restore outlives a dest upgrade, from the fd store', async (t) => {
  // Firecracker never hands its uffd over again: the fd store is the only way its VM survives.
  const systemd = new FakeSystemd(dir);
  t.teardown(() => systemd.close());
  const socket = join(dir, 'fc.sock');
  // The first daemon never sweeps (demand only), so pages are surely missing at its restart,
  // however slow the machine; the second one sweeps at once and finishes.
  const fcConfig = (delayMs: number): string => {
    const path = join(dir, `dest-fc-${delayMs}.json`);
    writeFileSync(
      path,
      JSON.stringify({ backgroundDelayMs: delayMs, firecracker: [{ socket, memFile: image }] }),
    );
    return path;
  };
  const first = await startDest(dir, ['--config', fcConfig(3_600_000)], 'fc-0', { systemd });
  daemons.push(first);
  await buildFcVmm();
  const fc = await startFcVmm({ socket, memFile: image, format: 'v1.12', vcpus: 2 });
  fc.result.catch(() => undefined);
  await fc.handshakeSent;

  // Parked at the ack: the uffd, Firecracker's pidfd and socket, and the state.
  await systemd.until(() => systemd.storedNames().length === 1);
  const [name] = systemd.storedNames();
  t.equal(systemd.store.length, 4, `${name}: four descriptors parked`);
  const exited = new Promise<void>((r) => first.child.once('exit', () => r()));
  first.child.kill('SIGTERM');
  await exited;
  t.same(systemd.storedNames(), [name], 'the session stays parked while no daemon runs');
  t.ok(
    logLines(first).some(
      (l) => l['msg'] === 'Firecracker VM left in the fd store for the next daemon',
    ),
    'the old daemon said where the VM went',
  );
  t.equal(fc.child.exitCode, null, 'Firecracker still waits for pages (neither killed nor done)');

  const second = await startDest(dir, ['--config', fcConfig(0)], 'fc-1', {
    systemd,
    port: first.port,
  });
  daemons.push(second);
  const r = await fc.result;
  t.equal(r.exitCode, 0, `fc-vmm: ${r.outcome}`);
  t.equal(r.mismatchCount, 0, 'no page mismatched');
  t.equal(r.missingPages, 0, 'no page missing');
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified byte for byte`);
  t.equal(r.unexpectedBytes, 0, 'nothing was written to Firecracker');
  t.ok(
    logLines(second).some((l) => l['msg'] === 'migration resumed from the fd store'),
    'the new dest resumed the parked session',
  );
  await systemd.until(() => systemd.storedNames().length === 0);
  t.pass('the finished session left the fd store');
});
