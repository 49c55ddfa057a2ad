/**
 * The source following a QEMU's QMP socket for the freeze, end to end: a migration registered
 * with `qmp` (control API, or a `--migration …,qmp=` spec of the real daemon) holds a dest's
 * requests until the fake QEMU stops the VM for its migration, then serves them; a lost QMP
 * connection shows in status and freezes nothing; a VM that runs again aborts the migration.
 */
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { call, requestJson } from '../../daemon/cli/common.js';
import { silentLogger } from '../../daemon/ops/log.js';
import { noopSourceMetrics } from '../../daemon/ops/metric-ports.js';
import { startControlServer } from '../../daemon/source/control-api.js';
import { startSourceServer, type SourceServer } from '../../daemon/source/server.js';
import { encodeRequest } from '../../protocol/page-codec.js';
import { Channel, FrameType } from '../../protocol/wire.js';
import { startSource } from '../../scripts/lib/daemons.js';
import { RawDest } from '../fixtures/raw-dest.js';
import { writeTestImage } from '../fixtures/memory-image.js';
import { FakeQemu } from '../helpers/fake-qemu.js';

const img = writeTestImage();
t.teardown(() => img.remove());
const PAGE = 4096;
const dir = mkdtempSync(join(tmpdir(), 'yabusame-source-qmp-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

interface Status {
  state: string;
  pendingRequests: number;
  qmp?: { path: string; state: string; runState?: string; error?: { code: string } };
}

async function start(t: Test): Promise<{ server: SourceServer; control: string }> {
  const server = await startSourceServer({
    listen: { host: '127.0.0.1', port: 0 },
    authRequired: true,
    imageRoot: tmpdir(),
    maxMigrations: 8,
    metrics: noopSourceMetrics,
    log: silentLogger,
  });
  const control = join(dir, `${server.port}.sock`);
  const api = await startControlServer(server.registry, silentLogger, {
    socket: { path: control, mode: 0o600 },
  });
  t.teardown(async () => {
    await api.close();
    await server.close();
  });
  return { server, control };
}

/** Polls a migration's status until `done` holds (or fails after `timeoutMs`). */
async function statusUntil(
  control: string,
  id: string,
  done: (s: Status) => boolean,
  timeoutMs = 10_000,
): Promise<Status> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = (await call({ socketPath: control }, 'GET', `/v1/migrations/${id}`)) as Status;
    if (done(s)) return s;
    if (Date.now() > deadline) throw new Error(`status of ${id}: ${JSON.stringify(s)}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function register(control: string, id: string, qmp: string): Promise<string> {
  const secret = Buffer.alloc(32, id.length).toString('hex');
  RawDest.secrets.set(id, Buffer.from(secret, 'hex'));
  await call({ socketPath: control }, 'POST', '/v1/migrations', {
    id,
    image: img.path,
    regions: img.regions,
    secret,
    qmp,
  });
  return secret;
}

t.test(
  "requests wait until QEMU stops the VM for its migration, then they're served",
  async (t) => {
    const { server, control } = await start(t);
    const qemu = await FakeQemu.start(t);
    await register(control, 'vm1', qemu.path);
    const following = await statusUntil(control, 'vm1', (s) => s.qmp?.state === 'following');
    t.equal(following.state, 'registered');
    t.equal(following.qmp?.path, qemu.path);
    t.equal(following.qmp?.runState, 'running');
    t.equal(qemu.vm.capabilities['events'], true, 'the source turned on the events capability');

    const { dest } = await RawDest.open(server.port, Channel.DEMAND, 'vm1');
    dest.send(encodeRequest([{ offset: 3 * PAGE, length: PAGE }]));
    await dest.roundTrip();
    // An operator's pause is not a freeze.
    qemu.stop('paused');
    qemu.resume();
    qemu.migration('setup');
    qemu.migration('active');
    // Events arrive in order: once `active` shows, the stop and resume were handled.
    await statusUntil(
      control,
      'vm1',
      (s) => s.pendingRequests === 1 && (s.qmp as { migration?: string })?.migration === 'active',
    );
    t.equal(dest.frames.length, 1, 'nothing but the WELCOME while the VM runs');
    t.equal(server.registry.get('vm1')?.state, 'registered');

    qemu.stop('finish-migrate');
    const answer = await dest.frameAt(1);
    t.ok(answer.type === FrameType.DATA || answer.type === FrameType.ZERO, 'the held request');
    const frozen = await statusUntil(control, 'vm1', (s) => s.state === 'frozen');
    t.equal(frozen.qmp?.state, 'frozen');
    t.equal(frozen.pendingRequests, 0);
  },
);

t.test('a lost QMP connection shows in status and freezes nothing', async (t) => {
  const { server, control } = await start(t);
  const qemu = await FakeQemu.start(t);
  await register(control, 'vm2', qemu.path);
  await statusUntil(control, 'vm2', (s) => s.qmp?.state === 'following');
  qemu.migration('active');
  qemu.dropClient();
  const lost = await statusUntil(control, 'vm2', (s) => s.qmp?.state === 'failed');
  t.equal(lost.qmp?.error?.code, 'QMP_CLOSED');
  t.equal(lost.state, 'registered', 'not frozen');
  t.equal(server.registry.get('vm2')?.state, 'registered');

  await register(control, 'vm3', join(dir, 'absent.qmp'));
  const absent = await statusUntil(control, 'vm3', (s) => s.qmp?.state === 'failed');
  t.equal(absent.qmp?.error?.code, 'QMP_CONNECT');
  t.equal(absent.state, 'registered');

  const relative = await requestJson({ socketPath: control }, 'POST', '/v1/migrations', {
    id: 'vm4',
    image: img.path,
    qmp: 'relative.qmp',
  });
  t.equal(relative.status, 400, 'qmp must be an absolute path');
});

t.test('the VM running again after the freeze aborts the migration', async (t) => {
  const { server, control } = await start(t);
  const qemu = await FakeQemu.start(t);
  await register(control, 'vm5', qemu.path);
  await statusUntil(control, 'vm5', (s) => s.qmp?.state === 'following');
  const { dest } = await RawDest.open(server.port, Channel.DEMAND, 'vm5');
  qemu.migration('active');
  qemu.stop('finish-migrate');
  await statusUntil(control, 'vm5', (s) => s.state === 'frozen');
  qemu.migration('failed');
  qemu.resume();
  const end = await dest.frameAt(1);
  t.equal(end.type, FrameType.ERROR);
  if (end.type === FrameType.ERROR) {
    t.equal(end.code, 'MIGRATION_ABORTED');
    t.match(end.message, /runs again/);
  }
  const aborted = await statusUntil(control, 'vm5', (s) => s.state === 'aborted');
  t.equal(aborted.qmp?.error?.code, 'QMP_VM_RESUMED');
});

t.test('the daemon follows a --migration spec with qmp=', async (t) => {
  const qemu = await FakeQemu.start(t, { running: false, status: 'postmigrate' });
  const source = await startSource(
    dir,
    ['--migration', `id=vm6,image=${img.path},qmp=${qemu.path}`],
    'source-vm6',
    { imageRoot: tmpdir() },
  );
  t.teardown(() => source.stop());
  const s = await statusUntil(source.control, 'vm6', (s) => s.state === 'frozen');
  t.equal(s.qmp?.state, 'frozen', 'a VM its migration already stopped: frozen at once');
});
