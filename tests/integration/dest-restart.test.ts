// `yabusame dest` killed (SIGKILL) mid-migration and restarted on the same socket: vm-sim keeps
// its uffd, its vCPU threads stay blocked on their faults, and it hands the uffd over again with
// `"resume": true` (protocol/README.md, Resuming). The restarted dest wakes the blocked faults,
// treats pages already present as such and finishes; vm-sim verifies every page byte for byte.
import t, { type Test } from 'tap';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim, socketHandoff, type VmSimResult } from '../../scripts/vm-sim/vm-sim.js';
import type { HandoffRequest } from '../../protocol/handoff.js';
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
const TOTAL_PAGES = SIZE / 4096;
const dir = mkdtempSync('/dev/shm/yabusame-destrestart-');
const daemons: Daemon[] = [];
let source: Awaited<ReturnType<typeof startSource>>;
const image = join(dir, 'vm.ram');
// A narrow background window slows the stream enough to catch the dest mid-way.
const config = join(dir, 'dest.json');

t.before(async () => {
  await generateImage({ path: image, sizeBytes: SIZE, seed: 11 });
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

async function activeSession(dest: Dest, id: string): Promise<SessionView | undefined> {
  try {
    const body = await destSessions<{ active: SessionView[] }>(dest);
    return body.active.find((s) => s.migrationId === id);
  } catch {
    return undefined; // not answering (yet, or any more)
  }
}

/**
 * Polls the dest until its session for `id` holds at least `fraction` of the pages. Fails if the
 * migration ends first (`run` settled: the stream was too fast to catch) or at the deadline.
 */
async function waitPresent(
  dest: Dest,
  id: string,
  fraction: number,
  run: { settled: boolean },
  timeoutMs = 15_000,
): Promise<SessionView> {
  const deadline = Date.now() + timeoutMs;
  for (let delayMs = 2; ; delayMs = Math.min(delayMs * 2, 20)) {
    if (run.settled) throw new Error(`${id}: vm-sim ended before the dest was killed`);
    const s = await activeSession(dest, id);
    if (s && s.presentPages >= fraction * s.totalPages) return s;
    if (Date.now() > deadline) {
      throw new Error(
        `${id}: ${s?.presentPages ?? 'no session'} pages present after ${timeoutMs} ms`,
      );
    }
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

async function kill(dest: Dest): Promise<void> {
  const exited = new Promise<void>((r) => dest.child.once('exit', () => r()));
  dest.child.kill('SIGKILL');
  await exited;
}

/**
 * A new dest on the killed one's socket path and metrics port, with its own log. `slow`: the
 * narrow window again (it will be killed too); otherwise the defaults, to finish quickly.
 */
async function restart(dead: Dest, name: string, slow: boolean): Promise<Dest> {
  const dest = await startDest(dir, slow ? ['--config', config] : [], name, {
    socket: dead.socket,
    port: dead.port,
  });
  daemons.push(dest);
  return dest;
}

type LogLine = Record<string, unknown> & { level: string; msg: string };

/** The dest's log: JSON lines. */
function log(dest: Dest): LogLine[] {
  return readFileSync(dest.logPath, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as LogLine);
}

/** The dest's log lines at warn level or worse. */
function problems(dest: Dest): LogLine[] {
  return log(dest).filter((l) => ['warn', 'error', 'fatal'].includes(l.level));
}

/**
 * What the dest that finished says: it took a resumed handoff, and its accounting covers every
 * page, those it placed plus those the dead daemons had placed (EEXIST, `existed`).
 */
function assertResumedDest(t: Test, dest: Dest, r: VmSimResult): void {
  const lines = log(dest);
  const started = lines.find((l) => l.msg === 'migration started');
  const done = lines.find((l) => l.msg === 'migration complete') as
    | (LogLine & {
        demandPages: number;
        backgroundPages: number;
        zeroPages: number;
        existedPages: number;
        discardedPages: number;
      })
    | undefined;
  t.equal(
    started?.['resume'],
    true,
    `the last dest took a resumed handoff (${JSON.stringify(started)})`,
  );
  if (!done) return void t.fail('the last dest logged no "migration complete"');
  const d = r.daemonReport;
  t.same(
    [d.demandPages, d.backgroundPages, d.zeroPages],
    [done.demandPages, done.backgroundPages, done.zeroPages],
    'complete reports what the last dest logged',
  );
  t.ok(done.existedPages > 0, `${done.existedPages} pages found already present (EEXIST)`);
  t.equal(
    done.demandPages +
      done.backgroundPages +
      done.zeroPages +
      done.existedPages +
      done.discardedPages,
    r.totalPages,
    'placed by the last dest + already present = every page',
  );
  t.comment(
    `last dest: ${JSON.stringify({ queuedFaults: started?.['queuedFaults'], ...d })}; vm-sim: ${r.resumes} resume(s), ${r.workload.faults} faults, ${r.elapsedMs} ms`,
  );
}

async function waitSourceState(id: string, want: string, timeoutMs = 5_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (let delayMs = 5; ; delayMs = Math.min(delayMs * 2, 100)) {
    const state = await migrationState(source, id);
    if (state === want || Date.now() > deadline) return state ?? 'unknown';
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

function assertVerified(t: Test, r: VmSimResult): void {
  t.equal(r.totalPages, TOTAL_PAGES);
  t.equal(r.mismatchCount, 0, 'no page mismatched');
  t.same(r.mismatches, []);
  t.equal(r.missingPages, 0, 'no page missing');
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified byte for byte`);
  t.ok(r.writtenPages > 0, `${r.writtenPages} pages written by the workload across the deaths`);
  t.equal(r.daemonReport.totalPages, r.totalPages);
}

/** Runs vm-sim against `dest`, killing and restarting the dest `kills` times mid-migration. */
async function migrateThroughKills(
  t: Test,
  id: string,
  kills: number,
): Promise<{ r: VmSimResult; dests: Dest[] }> {
  await registerMigration(source, { id, image, frozen: true });
  let dest = await startDest(dir, ['--config', config], `${id}-dest-0`);
  daemons.push(dest);
  const dests = [dest];
  const run = { settled: false };
  const vm = runVmSim({
    image,
    migrationId: id,
    secret: source.secretOf(id),
    source: source.ws,
    destSocket: dest.socket,
    workers: 2,
    timeoutMs: 40_000,
    resumeOnDaemonDeath: { timeoutMs: 10_000 },
  }).finally(() => (run.settled = true));
  vm.catch(() => undefined); // awaited below; a failure while we poll surfaces there
  try {
    for (let k = 1; k <= kills; k++) {
      const s = await waitPresent(dest, id, 0.2, run);
      await kill(dest);
      t.pass(`dest ${k - 1} killed with ${s.presentPages}/${s.totalPages} pages present`);
      dest = await restart(dest, `${id}-dest-${k}`, k < kills);
      dests.push(dest);
    }
  } catch (err) {
    // Show vm-sim's own failure if it is the cause.
    await vm;
    throw err;
  }
  const r = await vm;
  return { r, dests };
}

t.test('dest killed once mid-migration: vm-sim resumes, every page verified', async (t) => {
  const id = 'restart-once';
  const { r, dests } = await migrateThroughKills(t, id, 1);
  assertVerified(t, r);
  t.ok(r.resumes >= 1, `${r.resumes} resumed handoff(s)`);
  t.equal(await waitSourceState(id, 'complete'), 'complete', 'the source ended complete');
  t.same(problems(dests.at(-1)!), [], 'the restarted dest logged no warning');
  assertResumedDest(t, dests.at(-1)!, r);
});

t.test('dest killed twice mid-migration: vm-sim resumes twice, every page verified', async (t) => {
  const id = 'restart-twice';
  const { r, dests } = await migrateThroughKills(t, id, 2);
  assertVerified(t, r);
  t.ok(r.resumes >= 2, `${r.resumes} resumed handoff(s)`);
  t.equal(await waitSourceState(id, 'complete'), 'complete', 'the source ended complete');
  t.same(problems(dests.at(-1)!), [], 'the last dest logged no warning');
  assertResumedDest(t, dests.at(-1)!, r);
});

t.test('the dest does not come back: VMSIM_RESUME_TIMEOUT', async (t) => {
  const id = 'restart-never';
  await registerMigration(source, { id, image, frozen: true });
  const dest = await startDest(dir, ['--config', config], `${id}-dest-0`);
  daemons.push(dest);
  const run = { settled: false };
  const calls: HandoffRequest[] = [];
  const vm = runVmSim({
    image,
    migrationId: id,
    secret: source.secretOf(id),
    source: source.ws,
    workers: 2,
    timeoutMs: 40_000,
    resumeOnDaemonDeath: { timeoutMs: 300 },
    handoff: (request, fd, sink) => {
      calls.push(request);
      return socketHandoff(dest.socket)(request, fd, sink);
    },
  }).finally(() => (run.settled = true));
  vm.catch(() => undefined);
  await waitPresent(dest, id, 0.05, run);
  await kill(dest);
  await t.rejects(vm, { code: 'VMSIM_RESUME_TIMEOUT' });
  t.equal(calls[0]?.resume, undefined, 'the first handoff is not a resume');
  const { resume, ...again } = calls[1]!;
  t.equal(resume, true, 'the next ones are');
  t.strictSame(again, calls[0], 'with the same request otherwise');
  t.ok(calls.length >= 3, `${calls.length - 1} resume attempts with backoff in 300 ms`);
});

t.test('an error reply is a failure, never resumed', async (t) => {
  const calls: HandoffRequest[] = [];
  const vm = runVmSim({
    image,
    sizeBytes: 4 * MiB,
    migrationId: 'restart-error',
    source: 'ws://127.0.0.1:1',
    workers: 1,
    timeoutMs: 10_000,
    resumeOnDaemonDeath: { timeoutMs: 10_000 },
    handoff: (request, _fd, sink) => {
      calls.push(request);
      setImmediate(() => {
        sink.reply({ type: 'ack', migrationId: request.migrationId, totalPages: 1024 });
        sink.reply({ type: 'error', code: 'SESSION_FAILED', message: 'source lost for good' });
        sink.closed();
      });
      return { close: () => undefined };
    },
  });
  await t.rejects(vm, { code: 'SESSION_FAILED' });
  t.equal(calls.length, 1, 'no resumed handoff');
});
