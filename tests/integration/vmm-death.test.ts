// A VMM that dies mid-migration ends its session cleanly: the source is told, and over 100 such
// deaths the dest leaks no file descriptors, libuv resources (timers, sockets) or memory.
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import * as sys from '../../daemon/linux/sys.js';
import * as abi from '../../daemon/linux/abi.js';
import * as uffd from '../../daemon/uffd/uffd.js';
import { encodeHandoff } from '../../protocol/handoff.js';
import { generateImage } from '../../scripts/image/gen-image.js';
import {
  migrationState,
  destSessions,
  registerMigration,
  secretFile,
  startDest,
  startSource,
  type Daemon,
} from '../../scripts/lib/daemons.js';
import { connectHandoff, sendRaw } from '../helpers/vmm-client.js';

const SIZE = 8 << 20;
const dir = mkdtempSync('/dev/shm/yabusame-vmmdeath-');
const image = join(dir, 'vm.ram');
const daemons: Daemon[] = [];
let source: Awaited<ReturnType<typeof startSource>>;
let dest: Awaited<ReturnType<typeof startDest>>;
const key = secretFile(dir, 'vm-dies');

t.before(async () => {
  await generateImage({ path: image, sizeBytes: SIZE, seed: 7 });
  source = await startSource(dir);
  daemons.push(source);
  await registerMigration(source, { id: 'vm-dies', image, frozen: true, secret: key.secret });
  const config = join(dir, 'dest.json');
  // No background stream: every session is still running when its VMM dies.
  writeFileSync(config, JSON.stringify({ backgroundDelayMs: 3_600_000, progressIntervalMs: 50 }));
  dest = await startDest(dir, ['--config', config]);
  daemons.push(dest);
});
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

interface Snapshot {
  active: unknown[];
  ended: Array<{ state: string; error?: { code: string } }>;
  process: { fds: number; resources: Record<string, number>; rssBytes: number };
}
async function snapshot(): Promise<Snapshot> {
  return destSessions<Snapshot>(dest);
}
/**
 * Waits until every session ended and the dest's fds and resources hold still: closing ws
 * connections keep a socket and a 2 s terminate timer each until the close handshake ends.
 */
async function waitIdle(endedAtLeast: number): Promise<Snapshot> {
  let prev = '';
  // Settled: no session, no connection to a source, no timer, and the same fds twice running.
  // The deadline only bounds a wait that never settles (the asserts below then report why).
  const deadline = Date.now() + 60_000;
  for (let delayMs = 5; ; delayMs = Math.min(delayMs * 2, 200)) {
    const s = await snapshot();
    const key = JSON.stringify([s.process.fds, s.process.resources]);
    const idle = s.active.length === 0 && s.ended.length >= endedAtLeast;
    const quiet = !s.process.resources['Timeout'] && !s.process.resources['TCPSocketWrap'];
    if (idle && quiet && key === prev) return s;
    if (Date.now() > deadline) return s;
    prev = idle ? key : '';
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

/** One VMM life: map RAM, hand it over, get the ack, then die (fd, connection and memory gone). */
async function liveAndDie(): Promise<void> {
  const base = sys.mmap(SIZE, abi.PROT_READ | abi.PROT_WRITE, abi.MAP_PRIVATE | abi.MAP_ANONYMOUS);
  const { fd } = uffd.create(0);
  uffd.registerMissing(fd, base, SIZE);
  const c = await connectHandoff(dest.socket);
  sendRaw(
    c,
    encodeHandoff({
      type: 'handoff',
      version: 1,
      migrationId: 'vm-dies',
      secret: key.secret,
      source: source.ws,
      regions: [{ name: 'ram0', base, sizeBytes: SIZE, offset: 0, pageSizeBytes: 4096 }],
    }),
    [fd],
  );
  const ack = await c.next();
  if (ack.type !== 'ack') throw new Error(`expected ack, got ${JSON.stringify(ack)}`);
  c.close();
  sys.close(fd);
  sys.munmap(base, SIZE);
}

t.test('100 VMM deaths leak nothing in the dest', async (t) => {
  // Warm up (JIT, first connections), then measure.
  for (let i = 0; i < 5; i++) await liveAndDie();
  const before = await waitIdle(5);
  for (let i = 0; i < 100; i++) await liveAndDie();
  const after = await waitIdle(105);
  const last = after.ended.slice(-100);
  t.ok(
    last.every((s) => s.state === 'failed' && s.error?.code === 'VMM_GONE'),
    'every session ended with VMM_GONE',
  );
  t.equal(after.process.fds, before.process.fds, `open fds stay at ${before.process.fds}`);
  t.same(
    after.process.resources,
    before.process.resources,
    'no timer, socket or handle left behind',
  );
  const growth = after.process.rssBytes - before.process.rssBytes;
  t.ok(growth < 32 << 20, `RSS grew ${(growth / 2 ** 20).toFixed(1)} MiB over 100 sessions`);
});

t.test('a VMM process killed with SIGKILL mid-migration', async (t) => {
  const vmSim = fileURLToPath(new URL('../../scripts/vm-sim/vm-sim.js', import.meta.url));
  const endedBefore = (await snapshot()).ended.length;
  const child = spawn(
    process.execPath,
    [
      vmSim,
      '--image',
      image,
      '--source',
      source.ws,
      '--socket',
      dest.socket,
      '--id',
      'vm-dies',
      '--secret-file',
      key.path,
      '--workers',
      '1',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  // Kill it once the dest has its session running.
  for (let delayMs = 5; ; delayMs = Math.min(delayMs * 2, 100)) {
    if ((await snapshot()).active.length > 0) break;
    await new Promise((r) => setTimeout(r, delayMs));
  }
  child.kill('SIGKILL');
  const s = await waitIdle(endedBefore + 1);
  t.equal(s.ended.at(-1)?.error?.code, 'VMM_GONE', 'the session ended with VMM_GONE');
  t.equal(
    await migrationState(source, 'vm-dies'),
    'frozen',
    'the source kept its image: the migration is not complete',
  );
});
