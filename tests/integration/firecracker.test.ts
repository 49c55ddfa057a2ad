// `yabusame dest` as Firecracker's page-fault handler, driven by fc-vmm (scripts/fc-vmm), which
// sends exactly what each Firecracker release family sends (the fixtures' bytes, or their shape
// for its own regions), faults from vCPU threads in its own process, and verifies every page
// against the snapshot memory file. Real dest processes with several Firecracker sockets each:
// local files and a remote `yabusame source`, 4 KiB and 2 MiB pages, a balloon, prefetch,
// Firecracker dying in each way it can, and every handshake error, refused with its code while
// the daemon serves another VM.
import t, { type Test } from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import {
  chmodSync,
  closeSync,
  existsSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  utimesSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as sys from '../../daemon/linux/sys.js';
import * as abi from '../../daemon/linux/abi.js';
import { SyscallError } from '../../daemon/linux/errors.js';
import { encodeFirecrackerHandshake } from '../../protocol/firecracker.js';
import { generateImage } from '../../scripts/image/gen-image.js';
import {
  buildFcVmm,
  runFcVmm,
  startFcVmm,
  type FcVmmOptions,
  type FcVmmResult,
} from '../../scripts/fc-vmm/fc-vmm.js';
import {
  destSessions,
  startDest,
  startSource,
  writeSourceConfig,
  type Daemon,
} from '../../scripts/lib/daemons.js';
import { reserveHugePages } from '../../scripts/lib/hugepages.js';
import { connectHandoff } from '../helpers/vmm-client.js';
import { guestRam } from '../helpers/dest.js';
import { writeHugePageFile } from '../helpers/huge-image.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const HUGE = 2 * MiB;
const FIXTURES = fileURLToPath(new URL('../../../tests/fixtures/firecracker/', import.meta.url));

const dir = mkdtempSync('/dev/shm/yabusame-fc-');
// Traversable by others: the socket-permission checks run a client as another user.
chmodSync(dir, 0o711);
const daemons: Daemon[] = [];
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

type Dest = Awaited<ReturnType<typeof startDest>>;
let dest: Dest; // the background at once
let slow: Dest; // the background after 2 s
let held: Dest; // no background: a session runs until its VM dies
let source: Awaited<ReturnType<typeof startSource>>;

const file = (name: string): string => join(dir, name);
const sock = (name: string): string => join(dir, `${name}.sock`);

/** The 4 GiB memory file of the fixtures' guest: data at the start, around the 3 GiB region
 * boundary (the two regions' file ranges touch there) and at the end; holes elsewhere. */
async function sparseSnapshot(path: string): Promise<void> {
  const donor = file('donor.mem');
  await generateImage({ path: donor, sizeBytes: 32 * MiB, seed: 21 });
  const from = openSync(donor, 'r');
  const to = openSync(path, 'w');
  const buf = Buffer.alloc(MiB);
  const copy = (fromMiB: number, toByte: number, mib: number): void => {
    for (let i = 0; i < mib; i++) {
      readSync(from, buf, 0, MiB, (fromMiB + i) * MiB);
      writeSync(to, buf, 0, MiB, toByte + i * MiB);
    }
  };
  copy(0, 0, 16);
  copy(16, 3 * GiB - 4 * MiB, 8);
  copy(24, 4 * GiB - 8 * MiB, 8);
  ftruncateSync(to, 4 * GiB);
  closeSync(from);
  closeSync(to);
  rmSync(donor);
}

const HUGE_PAGES = 'DZHDDHHZDDDDZHDDDHZDDDDHHDZDDDDH';

t.before(async () => {
  await buildFcVmm();
  await sparseSnapshot(file('fixture.mem'));
  await writeHugePageFile(file('huge.mem'), HUGE_PAGES, 22);
  await generateImage({ path: file('vm.mem'), sizeBytes: 32 * MiB, seed: 23 });
  await generateImage({ path: file('ws.mem'), sizeBytes: 32 * MiB, seed: 24 });
  await generateImage({ path: file('small.mem'), sizeBytes: 16 * MiB, seed: 25 });
  const config = writeSourceConfig(dir, 'source', [
    { id: 'fc-remote', image: file('vm.mem'), frozen: true },
  ]);
  source = await startSource(dir, ['--config', config.path], 'source', {
    secrets: config.secrets,
  });
  daemons.push(source);
  const local = (name: string, memFile: string, extra: object = {}): object => ({
    socket: sock(name),
    memFile: file(memFile),
    ...extra,
  });
  const common = {
    reconnectTimeoutMs: 2000,
    handoffTimeoutMs: 1000,
    maxSessionsPerUid: 32,
  };
  writeFileSync(
    file('dest.json'),
    JSON.stringify({
      ...common,
      firecracker: [
        local('fixture', 'fixture.mem'),
        local('huge', 'huge.mem'),
        local('local', 'vm.mem'),
        {
          socket: sock('remote'),
          source: source.ws,
          migrationId: 'fc-remote',
          secretFile: file('fc-remote.secret'),
        },
        local('kill', 'small.mem', { killOnFailure: true }),
        local('missing', 'no-such.mem'),
      ],
    }),
  );
  writeFileSync(
    file('slow.json'),
    JSON.stringify({
      ...common,
      backgroundDelayMs: 2000,
      firecracker: [
        local('balloon', 'vm.mem'),
        local('serve', 'vm.mem'),
        local('err', 'vm.mem'),
        local('ws', 'ws.mem', { prefetch: true }),
        local('peer', 'vm.mem', { socketGroup: '65534' }),
      ],
    }),
  );
  writeFileSync(
    file('held.json'),
    JSON.stringify({
      ...common,
      backgroundDelayMs: 3_600_000,
      firecracker: [
        local('hugefix', 'fixture.mem'),
        local('death', 'vm.mem'),
        local('busy', 'vm.mem'),
        local('ws-held', 'ws.mem', { prefetch: true }),
        local('ws-off', 'ws.mem'),
      ],
    }),
  );
  const started = await Promise.allSettled(
    ['dest', 'slow', 'held'].map((name) =>
      startDest(dir, ['--config', file(`${name}.json`)], name),
    ),
  );
  // Those that started are stopped at the end even if another did not.
  for (const s of started) if (s.status === 'fulfilled') daemons.push(s.value);
  for (const s of started) if (s.status === 'rejected') throw s.reason;
  [dest, slow, held] = daemons.slice(-3) as [Dest, Dest, Dest];
});

// --- status ---

interface Outcome {
  outcome: string;
  pid: number;
  code?: string;
  message?: string;
  killed?: boolean;
}
interface SocketStatus {
  socket: string;
  state: string;
  pid?: number;
  format?: string;
  completed: number;
  failed: number;
  refused: number;
  last?: Outcome;
}
interface SessionStats {
  migrationId: string;
  state: string;
  totalPages: number;
  demandPages: number;
  backgroundPages: number;
  zeroPages: number;
  existedPages: number;
  discardedPages: number;
  vmm?: { pid: number; socket: string; format: string };
  source?: string;
  sourceInfo?: { prefetch: string; prefetchPages: number };
  error?: { code: string; message: string };
}
interface Status {
  active: SessionStats[];
  ended: SessionStats[];
  firecracker: SocketStatus[];
  process: { fds: number; resources: Record<string, number>; rssBytes: number };
}

const status = (d: Dest): Promise<Status> => destSessions<Status>(d);
const socketStatus = async (d: Dest, name: string): Promise<SocketStatus> =>
  (await status(d)).firecracker.find((f) => f.socket === sock(name))!;

/** Polls `d`'s status until `ok` holds (15 s at most: then the last one, for the asserts). */
async function until(d: Dest, ok: (s: Status) => boolean): Promise<Status> {
  const deadline = Date.now() + 15_000;
  for (let delayMs = 5; ; delayMs = Math.min(delayMs * 2, 100)) {
    const s = await status(d);
    if (ok(s) || Date.now() > deadline) return s;
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

/** Polls `ok` until it holds (15 s at most); its last answer. */
async function eventually(ok: () => boolean): Promise<boolean> {
  const deadline = Date.now() + 15_000;
  for (let delayMs = 5; ; delayMs = Math.min(delayMs * 2, 100)) {
    if (ok() || Date.now() > deadline) return ok();
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

const ended = async (d: Dest, name: string, count: number): Promise<SocketStatus> => {
  const s = await until(d, (s) => {
    const f = s.firecracker.find((x) => x.socket === sock(name))!;
    return f.state === 'idle' && f.completed + f.failed + f.refused >= count;
  });
  return s.firecracker.find((x) => x.socket === sock(name))!;
};
const turns = (f: SocketStatus): number => f.completed + f.failed + f.refused;

function tail(path: string, lines = 30): string {
  try {
    return readFileSync(path, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

function assertVerified(t: Test, r: FcVmmResult, d: Dest): void {
  const diag = {
    fcVmm: { code: r.code, message: r.message, mismatches: r.mismatches, stderr: r.stderr },
    daemonLog: tail(d.logPath),
  };
  t.equal(r.outcome, 'complete', `every page arrived (${r.code ?? r.outcome})`, diag);
  t.equal(r.missingPages, 0, 'no page missing', diag);
  t.equal(r.mismatchCount, 0, 'no page differs from the memory file', diag);
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified byte for byte`, diag);
  t.equal(r.unexpectedBytes, 0, 'the dest wrote nothing to Firecracker', diag);
  t.equal(r.exitCode, 0, 'fc-vmm exits 0', diag);
}

function assertAddsUp(t: Test, s: SessionStats | undefined): void {
  if (!s) return void t.fail('no session stats');
  t.equal(
    s.demandPages + s.backgroundPages + s.zeroPages + s.existedPages + s.discardedPages,
    s.totalPages,
    `the session's counts add up: ${JSON.stringify(s)}`,
  );
}

/** One restore on `name`; resolves once the dest has ended its session too (fc-vmm may finish
 * first: it sees every page present before the dest has completed). */
async function restore(
  d: Dest,
  name: string,
  o: Omit<FcVmmOptions, 'socket'>,
): Promise<FcVmmResult> {
  const before = turns(await socketStatus(d, name));
  const r = await runFcVmm({ socket: sock(name), timeoutMs: 30_000, ...o });
  await ended(d, name, before + 1);
  return r;
}

// --- the handshake of every release family ---

for (const [format, name] of [
  ['v1.1', 'handshake-v1.1.json'],
  ['v1.7', 'handshake-v1.7.json'],
  ['v1.12', 'handshake-v1.12.json'],
] as const) {
  t.test(`${format}: its exact handshake, a 4 GiB guest in two regions`, async (t) => {
    const before = turns(await socketStatus(dest, 'fixture'));
    const r = await restore(dest, 'fixture', {
      handshake: FIXTURES + 'aligned/' + name,
      memFile: file('fixture.mem'),
      vcpus: 3,
      touchFraction: 0.002,
    });
    t.equal(r.format, format);
    t.equal(r.handshakeBytes, readFileSync(FIXTURES + 'aligned/' + name).length, 'sent as is');
    t.same(
      r.regions.map((x) => [x.base, x.size, x.offset]),
      [
        [139999999688704, 3 * GiB, 0],
        [139989998370816, GiB, 3 * GiB],
      ],
      'mapped where the handshake says, region 1 below region 0',
    );
    assertVerified(t, r, dest);
    const f = await ended(dest, 'fixture', before + 1);
    t.equal(f.last?.outcome, 'complete', 'the socket reports the restore complete');
    const s = (await status(dest)).ended.filter((x) => x.vmm?.socket === sock('fixture')).at(-1);
    t.equal(s?.vmm?.format, format, `the session knows the ${format} shape`);
    assertAddsUp(t, s);
    if (format !== 'v1.12') {
      t.comment('this release closed its socket right after sending: EOF meant nothing');
    }
  });
}

// --- 2 MiB pages ---

t.test(
  '2 MiB pages: the exact hugepage handshakes, faults served at their addresses',
  async (t) => {
    const pool = reserveHugePages(40, 24);
    if ('skip' in pool) return t.plan(0, pool.skip);
    t.teardown(pool.release);
    for (const [format, name] of [
      ['v1.7', 'handshake-hugepages-v1.7.json'],
      ['v1.12', 'handshake-hugepages-v1.12.json'],
    ] as const) {
      const before = turns(await socketStatus(held, 'hugefix'));
      // The background is held back (it would need 2048 huge pages): the vCPUs' faults are all
      // served on demand, from both regions, then fc-vmm exits and the session ends VMM_GONE.
      const r = await restore(held, 'hugefix', {
        handshake: FIXTURES + 'aligned/' + name,
        memFile: file('fixture.mem'),
        vcpus: 2,
        touchFraction: 0.006,
        writeFraction: 0,
        noWait: true,
      });
      t.equal(r.format, format);
      t.ok(
        r.regions.every((x) => x.pageSize === HUGE),
        `${format}: 2 MiB pages`,
      );
      t.ok(r.work.touches >= 10, `${r.work.touches} huge pages touched`);
      t.equal(r.touchesVerified, r.work.touches, `${format}: every touched page is the file's`, {
        mismatches: r.mismatches,
        log: tail(held.logPath),
      });
      const f = await ended(held, 'hugefix', before + 1);
      t.equal(f.last?.code, 'VMM_GONE', `${format}: the session ended when fc-vmm exited`);
      t.equal(f.last?.killed, false, 'nothing was killed');
    }
  },
);

t.test('2 MiB pages: a whole restore, with zero huge pages and holes', async (t) => {
  const pool = reserveHugePages(HUGE_PAGES.length + 8, HUGE_PAGES.length);
  if ('skip' in pool) return t.plan(0, pool.skip);
  t.teardown(pool.release);
  const r = await restore(dest, 'huge', {
    format: 'v1.12',
    page: '2m',
    split: 20 * HUGE,
    memFile: file('huge.mem'),
    vcpus: 2,
    touchFraction: 0.5,
  });
  t.equal(r.regions.length, 2, 'two regions, split at 40 MiB');
  assertVerified(t, r, dest);
});

// --- balloon, local and remote, prefetch ---

t.test('a balloon discards pages while the guest faults (UFFD_EVENT_REMOVE)', async (t) => {
  // The background waits 2 s, so the discards meet pages present and missing alike.
  const r = await restore(slow, 'balloon', {
    format: 'v1.12',
    split: 24 * MiB,
    memFile: file('vm.mem'),
    vcpus: 3,
    balloon: 64,
  });
  t.equal(r.balloonRuns, 64, `the balloon discarded 64 runs (${r.discardedPages} pages)`);
  assertVerified(t, r, slow);
  const s = (await status(slow)).ended.filter((x) => x.vmm?.socket === sock('balloon')).at(-1);
  t.ok((s?.discardedPages ?? 0) > 0, `the dest counted ${s?.discardedPages} discarded pages`);
  assertAddsUp(t, s);
});

t.test('the same snapshot from a local file and from a remote source, at once', async (t) => {
  const [local, remote] = await Promise.all([
    restore(dest, 'local', { format: 'v1.7', memFile: file('vm.mem'), vcpus: 2 }),
    restore(dest, 'remote', { format: 'v1.12', memFile: file('vm.mem'), vcpus: 2 }),
  ]);
  t.test('local file', async (t) => assertVerified(t, local, dest));
  t.test('remote source', async (t) => assertVerified(t, remote, dest));
  const all = (await status(dest)).ended;
  t.equal(all.filter((x) => x.vmm?.socket === sock('local')).at(-1)?.source, file('vm.mem'));
  t.equal(all.filter((x) => x.vmm?.socket === sock('remote')).at(-1)?.source, source.ws);
  t.notOk(existsSync(`${file('vm.mem')}.working-set.json`), 'no prefetch: no working set');
});

t.test(
  'prefetch: a restore records its working set; the next places it ahead of any fault',
  async (t) => {
    const wsFile = `${file('ws.mem')}.working-set.json`;
    const workingSet = { pages: 400, cluster: 8, seed: 5 };
    const run = async (): Promise<SessionStats | undefined> => {
      const r = await restore(slow, 'ws', {
        format: 'v1.12',
        memFile: file('ws.mem'),
        vcpus: 1,
        workingSet,
      });
      assertVerified(t, r, slow);
      t.comment(`working set: ${r.work.faults} of ${r.work.touches} touches faulted`);
      return (await status(slow)).ended.filter((x) => x.vmm?.socket === sock('ws')).at(-1);
    };
    const first = await run();
    t.equal(first?.sourceInfo?.prefetch, 'record', 'no working set yet: this restore records');
    // Written when the dest completes the session, which fc-vmm, done once every page is
    // present, does not wait for (it may even exit first: the session then ends VMM_GONE).
    t.ok(
      await eventually(() => existsSync(wsFile)),
      'the working set is written beside the snapshot',
    );
    const ws = JSON.parse(readFileSync(wsFile, 'utf8')) as {
      snapshot: { sizeBytes: number };
      offsets: number[];
    };
    t.equal(ws.snapshot.sizeBytes, 32 * MiB, 'for this snapshot');
    t.ok(ws.offsets.length > 0, `${ws.offsets.length} pages, in fault order`);
    t.equal(new Set(ws.offsets).size, ws.offsets.length, 'each page once');
    t.ok(
      ws.offsets.every((o) => o % 4096 === 0 && o < 32 * MiB),
      'page offsets inside the memory file',
    );

    // Ahead of any fault: on `held` the background sweep never starts, and fc-vmm's guest starts
    // only once the session has placed what it streams ahead (prefetchPages, from its status).
    // What is present then, and what the working set's touches fault on, is exact.
    const ahead = async (name: 'ws-held' | 'ws-off'): Promise<[FcVmmResult, SessionStats]> => {
      const before = turns(await socketStatus(held, name));
      const vm = await startFcVmm({
        socket: sock(name),
        memFile: file('ws.mem'),
        format: 'v1.12',
        vcpus: 1,
        workingSet,
        startOnSignal: true,
        noWait: true,
        timeoutMs: 30_000,
      });
      vm.result.catch(() => {});
      await vm.handshakeSent;
      const mine = (s: Status): SessionStats | undefined =>
        s.active.find((x) => x.vmm?.pid === vm.child.pid);
      const s = mine(
        await until(held, (s) => {
          const x = mine(s);
          return (
            x?.state === 'running' &&
            x.backgroundPages + x.zeroPages >= (x.sourceInfo?.prefetchPages ?? 0)
          );
        }),
      );
      vm.child.kill('SIGUSR1');
      const r = await vm.result;
      await ended(held, name, before + 1);
      if (!s) throw new Error(`no session for fc-vmm ${vm.child.pid}: ${tail(held.logPath)}`);
      t.equal(r.exitCode, 0, `${name}: every touched page verified`, { stderr: r.stderr });
      t.equal(r.touchesVerified, r.work.touches, `${name}: all ${r.work.touches} touches`);
      return [r, s];
    };
    const recorded = ws.offsets.length;
    const [on, onSession] = await ahead('ws-held');
    t.equal(onSession.sourceInfo?.prefetch, 'replay', 'the next restore replays it');
    t.equal(onSession.sourceInfo?.prefetchPages, recorded, 'all of it');
    t.equal(onSession.demandPages, 0, 'before any fault');
    t.equal(on.atStart.present, recorded, `prefetch on: ${recorded} pages present at start`);
    t.equal(on.atStart.wsPresent, recorded, '...all of them pages of the working set');
    t.equal(
      on.work.faults,
      on.atStart.wsPages - recorded,
      `prefetch on: ${on.work.faults} of ${on.atStart.wsPages} working-set pages faulted`,
    );
    const [off, offSession] = await ahead('ws-off');
    t.equal(offSession.sourceInfo?.prefetch, 'off');
    t.equal(off.atStart.present, 0, 'prefetch off: nothing present at start');
    t.equal(
      off.work.faults,
      off.atStart.wsPages,
      `prefetch off: all ${off.work.faults} working-set pages faulted`,
    );
    t.ok(on.work.faults < off.work.faults, 'prefetch saved faults');

    // The snapshot is replaced (here: its mtime changes): the working set is not its own any more.
    utimesSync(file('ws.mem'), new Date(), new Date(Date.now() + 5000));
    const third = await run();
    t.equal(third?.sourceInfo?.prefetch, 'record', 'another snapshot: recorded afresh');
  },
);

// --- Firecracker dies ---

t.test('Firecracker dies mid-restore: the session ends, nothing leaks', async (t) => {
  const idle = async (turnsAtLeast: number): Promise<Status> => {
    let prev = '';
    return until(held, (s) => {
      const f = s.firecracker.find((x) => x.socket === sock('death'))!;
      const key = JSON.stringify([s.process.fds, s.process.resources]);
      const quiet = s.active.length === 0 && turns(f) >= turnsAtLeast && key === prev;
      prev = key;
      return quiet;
    });
  };
  const life = async (
    format: 'v1.7' | 'v1.12',
    how: 'kill' | 'kill-idle' | 'close-socket',
  ): Promise<SocketStatus> => {
    const before = turns(await socketStatus(held, 'death'));
    const vm = await startFcVmm({
      socket: sock('death'),
      memFile: file('vm.mem'),
      format,
      vcpus: 2,
      // 'kill-idle': no fault, no background (held): nothing but the pidfd can tell.
      touchFraction: how === 'kill' ? 0.05 : 0,
      ...(how === 'close-socket' ? { closeSocketAfterMs: 100 } : {}),
      timeoutMs: 30_000,
    });
    vm.result.catch(() => {});
    await vm.handshakeSent;
    const serving = await until(held, (s) => s.active.some((x) => x.vmm?.pid === vm.child.pid));
    t.ok(
      serving.active.some((x) => x.vmm?.pid === vm.child.pid),
      `${format}: the session runs${format === 'v1.7' ? ' although the socket was closed at once' : ''}`,
    );
    if (how !== 'close-socket') vm.child.kill('SIGKILL');
    const f = await ended(held, 'death', before + 1);
    if (how === 'close-socket') vm.child.kill('SIGKILL');
    return f;
  };

  // Warm up (JIT, first sessions), then measure.
  await life('v1.12', 'kill');
  const before = await idle(1);
  const killed12 = await life('v1.12', 'kill');
  t.equal(killed12.last?.code, 'VMM_GONE', 'v1.12 killed: VMM_GONE');
  const killed7 = await life('v1.7', 'kill');
  t.equal(killed7.last?.code, 'VMM_GONE', 'v1.7 killed while faulting: VMM_GONE');
  const idle7 = await life('v1.7', 'kill-idle');
  t.equal(idle7.last?.code, 'VMM_GONE', 'v1.7 killed idle (its socket long closed): VMM_GONE');
  t.match(idle7.last?.message, /exited/, 'learned from its pidfd');
  const closed = await life('v1.12', 'close-socket');
  t.equal(closed.last?.code, 'VMM_GONE', 'v1.12 closing its socket: VMM_GONE');
  t.match(closed.last?.message, /closed its socket/, 'a v1.12 EOF means Firecracker is gone');
  for (let i = 0; i < 5; i++) await life(i % 2 ? 'v1.7' : 'v1.12', 'kill');
  const after = await idle(turns(before.firecracker.find((x) => x.socket === sock('death'))!) + 9);
  t.equal(after.active.length, 0, 'no session left');
  t.equal(after.process.fds, before.process.fds, `open fds stay at ${before.process.fds}`);
  t.same(after.process.resources, before.process.resources, 'no timer, socket or handle left');
});

// --- every handshake error, while another VM is served ---

/** A uffd of ours (UFFDIO_API done) over `size` bytes of anonymous memory, for bad handshakes. */
function uffdOver(size: number): { base: number; fd: number } {
  return guestRam(size, abi.UFFD_FEATURE_EVENT_REMOVE);
}

interface Attempt {
  /** The bytes of the one sendmsg, and its fds. */
  bytes: Buffer;
  fds?: number[];
  /** More bytes later, or close before the end. */
  then?: 'wait' | 'close';
}

/** One connection to `name` on `d`; resolves when the dest has closed it. */
async function attempt(name: string, a: Attempt): Promise<void> {
  const c = connectHandoff(sock(name));
  try {
    c.send(a.bytes, a.fds ?? []);
  } catch (err) {
    // Refused at accept (HANDOFF_SOCKET_BUSY), before anything was read: the socket is closed.
    if (!(err instanceof SyscallError && (err.code === 'EPIPE' || err.code === 'ECONNRESET'))) {
      throw err;
    }
  }
  if (a.then === 'close') c.close();
  await c.closed;
}

t.test('every handshake error is refused with its code; the daemon serves on', async (t) => {
  // A VM restored on another socket of the same daemon meanwhile, verified at the end.
  const served = restore(slow, 'serve', {
    format: 'v1.12',
    memFile: file('vm.mem'),
    vcpus: 2,
    touchFraction: 0.3,
  });
  const good = uffdOver(32 * MiB);
  const region = { base: good.base, sizeBytes: 32 * MiB, offset: 0, pageSizeBytes: 4096 };
  const hs = (regions: object[]): Buffer => Buffer.from(JSON.stringify(regions));
  const notUffd = sys.open('/dev/null', abi.O_RDONLY);
  const rawUffd = sys.userfaultfd(abi.O_CLOEXEC | abi.O_NONBLOCK); // no UFFDIO_API
  t.teardown(() => {
    for (const fd of [good.fd, notUffd, rawUffd]) sys.close(fd);
  });
  const cases: Array<[string, string, Attempt]> = [
    [
      'unaligned bases (the original fixture)',
      'HANDOFF_UNALIGNED',
      { bytes: readFileSync(FIXTURES + 'handshake-v1.12.json'), fds: [good.fd] },
    ],
    [
      'a native handoff line',
      'HANDOFF_BAD_JSON',
      { bytes: Buffer.from('{"type":"handoff"}\n'), fds: [good.fd] },
    ],
    ['not JSON', 'HANDOFF_BAD_JSON', { bytes: Buffer.from('[{"size":}]'), fds: [good.fd] }],
    [
      'closed before the array ends',
      'HANDOFF_BAD_JSON',
      { bytes: Buffer.from('[{"base_host_virt_addr":'), fds: [good.fd], then: 'close' },
    ],
    [
      'a field missing',
      'HANDOFF_INVALID',
      { bytes: hs([{ base_host_virt_addr: good.base, offset: 0 }]), fds: [good.fd] },
    ],
    [
      'a page size of 3000',
      'HANDOFF_BAD_PAGE_SIZE',
      {
        bytes: hs([{ base_host_virt_addr: good.base, size: 32 * MiB, offset: 0, page_size: 3000 }]),
        fds: [good.fd],
      },
    ],
    [
      'overlapping regions',
      'HANDOFF_OVERLAP',
      {
        bytes: encodeFirecrackerHandshake('v1.7', [
          { ...region, sizeBytes: 16 * MiB },
          { ...region, sizeBytes: 16 * MiB, offset: 16 * MiB, base: good.base + 8 * MiB },
        ]),
        fds: [good.fd],
      },
    ],
    ['no fd', 'HANDOFF_NO_FD', { bytes: encodeFirecrackerHandshake('v1.12', [region]) }],
    [
      'two fds',
      'HANDOFF_TOO_MANY_FDS',
      { bytes: encodeFirecrackerHandshake('v1.12', [region]), fds: [good.fd, notUffd] },
    ],
    [
      'not a userfaultfd',
      'HANDOFF_NOT_UFFD',
      { bytes: encodeFirecrackerHandshake('v1.12', [region]), fds: [notUffd] },
    ],
    [
      'a uffd without UFFDIO_API',
      'HANDOFF_UFFD_UNINITIALIZED',
      { bytes: encodeFirecrackerHandshake('v1.12', [region]), fds: [rawUffd] },
    ],
    [
      'regions that are not the memory file (16 of its 32 MiB)',
      'SOURCE_MISMATCH',
      {
        bytes: encodeFirecrackerHandshake('v1.12', [{ ...region, sizeBytes: 16 * MiB }]),
        fds: [good.fd],
      },
    ],
    [
      'over 64 KiB and no end',
      'HANDOFF_TOO_LARGE',
      { bytes: Buffer.concat([Buffer.from('['), Buffer.alloc(70_000, 0x20)]), fds: [good.fd] },
    ],
    [
      'half a handshake, then nothing',
      'HANDOFF_TIMEOUT',
      { bytes: Buffer.from('[{"base_host_virt_addr":1'), fds: [good.fd], then: 'wait' },
    ],
  ];
  for (const [what, code, a] of cases) {
    const before = await socketStatus(slow, 'err');
    await attempt('err', a);
    const f = await ended(slow, 'err', turns(before) + 1);
    t.equal(f.last?.code, code, `${what}: ${code} (${f.last?.message})`);
  }
  {
    // Memory nobody mapped: fc-vmm unmaps the tail of its region after registering it, and
    // waits (SIGUSR1, never sent) so that its address space outlives the refusal.
    const before = await socketStatus(slow, 'err');
    const vm = await startFcVmm({
      socket: sock('err'),
      memFile: file('vm.mem'),
      format: 'v1.12',
      unmapTail: 4 * MiB,
      startOnSignal: true,
    });
    vm.result.catch(() => {});
    const f = await ended(slow, 'err', turns(before) + 1);
    vm.child.kill('SIGKILL');
    t.equal(
      f.last?.code,
      'HANDOFF_REGION_UNMAPPED',
      `the tail of a region unmapped: HANDOFF_REGION_UNMAPPED (${f.last?.message})`,
    );
  }
  const metrics = await (await fetch(`${slow.http}/metrics`)).text();
  for (const code of new Set([...cases.map((c) => c[1]), 'HANDOFF_REGION_UNMAPPED'])) {
    t.match(metrics, new RegExp(`yabusame_dest_handoffs_total\\{result="${code}"\\} [1-9]`));
  }
  t.test('meanwhile a VM on another socket was served', async (t) =>
    assertVerified(t, await served, slow),
  );
  const r = await restore(slow, 'err', { format: 'v1.1', memFile: file('vm.mem'), vcpus: 2 });
  t.test('and the socket that refused them serves a VM', async (t) => assertVerified(t, r, slow));
});

t.test('a second Firecracker on a socket that serves one is refused', async (t) => {
  const before = turns(await socketStatus(held, 'busy'));
  const vm = await startFcVmm({
    socket: sock('busy'),
    memFile: file('vm.mem'),
    format: 'v1.12',
    touchFraction: 0,
    timeoutMs: 30_000,
  });
  vm.result.catch(() => {});
  await vm.handshakeSent;
  await until(held, (s) => s.active.some((x) => x.vmm?.pid === vm.child.pid));
  const other = uffdOver(32 * MiB);
  t.teardown(() => sys.close(other.fd));
  await attempt('busy', {
    bytes: encodeFirecrackerHandshake('v1.12', [
      { base: other.base, sizeBytes: 32 * MiB, offset: 0, pageSizeBytes: 4096 },
    ]),
    fds: [other.fd],
  });
  const f = await until(
    held,
    (s) => s.firecracker.find((x) => x.socket === sock('busy'))!.refused > 0,
  );
  const busy = f.firecracker.find((x) => x.socket === sock('busy'))!;
  t.equal(busy.last?.code, 'HANDOFF_SOCKET_BUSY', 'refused: HANDOFF_SOCKET_BUSY');
  t.equal(busy.state, 'serving', 'the first one is still served');
  t.equal(busy.pid, vm.child.pid);
  vm.child.kill('SIGKILL');
  await ended(held, 'busy', before + 2);
});

t.test('an unreadable memory file: IMAGE_IO, reported with the pid', async (t) => {
  const vm = uffdOver(16 * MiB);
  t.teardown(() => sys.close(vm.fd));
  await attempt('missing', {
    bytes: encodeFirecrackerHandshake('v1.12', [
      { base: vm.base, sizeBytes: 16 * MiB, offset: 0, pageSizeBytes: 4096 },
    ]),
    fds: [vm.fd],
  });
  const f = await ended(dest, 'missing', 1);
  t.equal(f.last?.code, 'IMAGE_IO');
  t.equal(f.last?.pid, process.pid, 'with the pid of the process that connected');
  const logged = /"msg":"Firecracker VM cannot be served".*"pid":\d+.*"code":"IMAGE_IO"/;
  t.ok(await eventually(() => logged.test(tail(dest.logPath))), 'logged with the pid and code', {
    log: tail(dest.logPath),
  });
});

t.test('--kill-on-failure: a VM that cannot be served is killed (pidfd)', async (t) => {
  // fc-vmm maps the 32 MiB of vm.mem; this socket serves the 16 MiB small.mem: SOURCE_MISMATCH.
  const before = turns(await socketStatus(dest, 'kill'));
  const vm = await startFcVmm({
    socket: sock('kill'),
    memFile: file('vm.mem'),
    format: 'v1.12',
    timeoutMs: 30_000,
  });
  const result = vm.result.catch((err: Error) => err);
  await new Promise((r) => vm.child.once('exit', r));
  t.equal(vm.child.signalCode, 'SIGKILL', 'fc-vmm was killed');
  t.type(await result, Error, 'and printed no result');
  const f = await ended(dest, 'kill', before + 1);
  t.equal(f.last?.code, 'SOURCE_MISMATCH');
  t.equal(f.last?.killed, true, 'the status says it was killed');
  const metrics = await (await fetch(`${dest.http}/metrics`)).text();
  t.match(metrics, /yabusame_dest_vms_unserved_total\{code="SOURCE_MISMATCH",action="killed"\} 1/);
  // A refused handshake of an admitted peer is killed too: a child that sends unaligned bases.
  const child = spawn(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `
      import * as uffd from ${JSON.stringify(new URL('../../daemon/uffd/uffd.js', import.meta.url).href)};
      import * as sys from ${JSON.stringify(new URL('../../daemon/linux/sys.js', import.meta.url).href)};
      const { fd } = uffd.create(0);
      const s = sys.connectUnix(${JSON.stringify(sock('kill'))});
      sys.sendWithFds(s, Buffer.from(${JSON.stringify(readFileSync(FIXTURES + 'handshake-v1.7.json', 'utf8'))}), [fd]);
      setTimeout(() => {}, 60000);
      `,
    ],
    { stdio: 'ignore' },
  );
  await new Promise((r) => child.once('exit', r));
  t.equal(child.signalCode, 'SIGKILL', 'a refused Firecracker is killed');
  const g = await ended(dest, 'kill', before + 2);
  t.equal(g.last?.code, 'HANDOFF_UNALIGNED');
  t.equal(g.last?.killed, true);
});

t.test('the socket is 0660 and the peers policy applies', async (t) => {
  const nobody = { uid: 65534, gid: 65534 };
  const connect = (path: string): string => {
    const r = spawnSync(
      process.execPath,
      [
        '-e',
        `const s = require('net').connect(${JSON.stringify(path)});
         s.on('error', (e) => { console.log(e.code); process.exit(0); });
         s.on('connect', () => s.on('close', () => { console.log('closed'); process.exit(0); }));`,
      ],
      // Without tap's NODE_OPTIONS: its hooks would write into the root-owned .tap folder.
      { ...nobody, env: { PATH: process.env['PATH'] }, encoding: 'utf8', timeout: 10_000 },
    );
    return r.stdout.trim();
  };
  t.equal(connect(sock('err')), 'EACCES', 'another user cannot connect to a 0660 root socket');
  const before = turns(await socketStatus(slow, 'peer'));
  t.equal(connect(sock('peer')), 'closed', 'its group can connect (socketGroup)...');
  const f = await ended(slow, 'peer', before + 1);
  t.equal(f.last?.code, 'HANDOFF_PEER_DENIED', '...but is not an allowed peer');
});
