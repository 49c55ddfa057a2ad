// Every network failure as a deterministic test: the real `yabusame source` and `yabusame dest`,
// the chaos proxy between them, vm-sim as the VMM (2 workload threads) verifying every page byte
// for byte. Faults are timed by polling the dest's /v1/sessions for presentPages, never by sleeps,
// and every fault lands mid-migration whatever the machine's speed: until it is injected, the
// proxy paces each connection (FAULT_PACE), which bounds how much of the image can arrive while
// the test polls and injects; then the pace is lifted and the migration runs at full speed.
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { once } from 'node:events';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim, type VmSimOptions, type VmSimResult } from '../../scripts/vm-sim/vm-sim.js';
import { ChaosProxy } from '../../scripts/chaos/proxy.js';
import {
  destSessions,
  migrationState,
  registerMigration,
  secretFile,
  startDest,
  startSource,
  type Daemon,
} from '../../scripts/lib/daemons.js';

const MiB = 1 << 20;
const SIZE = 32 * MiB;
/** Source→dest bytes per second and connection until the fault is in (see the top). */
const FAULT_PACE = 1 * MiB;
const TOTAL_PAGES = SIZE / 4096;
const dir = mkdtempSync('/dev/shm/yabusame-faults-');
const daemons: Daemon[] = [];
const proxies: ChaosProxy[] = [];
t.teardown(async () => {
  await Promise.all(proxies.map((p) => p.close()));
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

let source: Awaited<ReturnType<typeof startSource>>;
let dest: Awaited<ReturnType<typeof startDest>>;

t.before(async () => {
  source = await startSource(dir);
  daemons.push(source);
  const config = join(dir, 'dest.json');
  // Quick detection, patient reconnection, and a small background window so that a migration
  // lasts long enough to be hit in the middle.
  writeFileSync(
    config,
    JSON.stringify({
      heartbeatMs: 200,
      reconnectTimeoutMs: 30_000,
      connectTimeoutMs: 2000,
      backgroundWindowBytes: 64 * 1024,
      progressIntervalMs: 100,
    }),
  );
  dest = await startDest(dir, ['--config', config]);
  daemons.push(dest);
});

let imageSeed = 100;
async function image(): Promise<string> {
  const path = join(dir, `image-${imageSeed}.ram`);
  await generateImage({ path, sizeBytes: SIZE, seed: imageSeed++ });
  return path;
}

interface SessionStats {
  migrationId: string;
  state: string;
  totalPages: number;
  presentPages: number;
  reconnects: number;
  error?: { code: string; message: string };
}
async function sessions(): Promise<{ active: SessionStats[]; ended: SessionStats[] }> {
  return destSessions<{ active: SessionStats[]; ended: SessionStats[] }>(dest);
}
async function session(id: string): Promise<SessionStats | undefined> {
  const s = await sessions();
  return (
    s.active.find((x) => x.migrationId === id) ??
    [...s.ended].reverse().find((x) => x.migrationId === id)
  );
}

/** Polls until the session has `fraction` of its pages (and is still running), bounded. */
async function waitPresent(id: string, fraction: number, run: Promise<unknown>): Promise<number> {
  let finished = false;
  void run.then(
    () => (finished = true),
    () => (finished = true),
  );
  const deadline = Date.now() + 30_000;
  for (;;) {
    const s = (await sessions()).active.find((x) => x.migrationId === id);
    if (s && s.presentPages >= fraction * s.totalPages) return s.presentPages;
    if (finished) throw new Error(`${id}: the run ended before ${fraction * 100}% was present`);
    if (Date.now() > deadline) throw new Error(`${id}: never reached ${fraction * 100}%`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** Polls until the session has reconnected at least `n` times. */
async function waitReconnects(id: string, n: number): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const s = await session(id);
    if (!s || s.reconnects >= n) return;
    if (s.state !== 'running' && s.state !== 'connecting') {
      throw new Error(`${id}: ${s.state} after ${s.reconnects} reconnects`);
    }
    if (Date.now() > deadline) throw new Error(`${id}: not ${n} reconnects within 30 s`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** Each migration's secret, in a file a restarted source reads again (secret-file=). */
const keys = new Map<string, { path: string; secret: string }>();
function key(id: string): { path: string; secret: string } {
  let k = keys.get(id);
  if (!k) keys.set(id, (k = secretFile(dir, id)));
  return k;
}

/** vm-sim migrating `img` from `source` through the dest, under a 2-thread mixed workload. */
function migrate(
  id: string,
  img: string,
  source: string,
  extra: Partial<VmSimOptions> = {},
): Promise<VmSimResult> {
  return runVmSim({
    image: img,
    migrationId: id,
    secret: key(id).secret,
    source,
    destSocket: dest.socket,
    workers: 2,
    pattern: 'mixed',
    timeoutMs: 45_000,
    ...extra,
  });
}

/** Counters of the dest's /metrics: `name{labels}` → value. */
async function metrics(): Promise<Map<string, number>> {
  const text = await (await fetch(`${dest.http}/metrics`)).text();
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const sp = line.lastIndexOf(' ');
    out.set(line.slice(0, sp), Number(line.slice(sp + 1)));
  }
  return out;
}
function sumMatching(m: Map<string, number>, re: RegExp): number {
  let n = 0;
  for (const [k, v] of m) if (re.test(k)) n += v;
  return n;
}

function assertVerified(t: Test, r: VmSimResult): void {
  t.equal(r.mismatchCount, 0, 'no page mismatched');
  t.equal(r.missingPages, 0, 'no page missing');
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified byte for byte`);
}

async function proxy(downBytesPerSec: number, port = source.port): Promise<ChaosProxy> {
  const p = await ChaosProxy.start({
    target: { port },
    seed: imageSeed,
    downBytesPerSec,
  });
  proxies.push(p);
  return p;
}

/**
 * One migration through a fresh proxy, paced at `pace` bytes/s per connection: once `fraction`
 * of the pages are present, `inject` runs, then the pace is lifted. Returns vm-sim's result, the
 * session's final stats and how many pages were present at the fault.
 */
async function migrateWithFault(
  id: string,
  fraction: number,
  inject: (p: ChaosProxy) => void | Promise<void>,
  pace = FAULT_PACE,
): Promise<{ r: VmSimResult; s: SessionStats; at: number; p: ChaosProxy }> {
  const img = await image();
  await registerMigration(source, { id, image: img, frozen: true, secret: key(id).secret });
  const p = await proxy(pace);
  const run = migrate(id, img, p.url, { seed: imageSeed });
  let at: number;
  try {
    at = await waitPresent(id, fraction, run);
    await p.waitFor((c) => c.filter((x) => x.channel).length === 2);
    await inject(p);
    p.setPace(0);
  } catch (err) {
    await run.catch(() => undefined);
    throw err;
  }
  const r = await run;
  const s = (await session(id))!;
  return { r, s, at, p };
}

t.test('(a) cut the demand connection mid-migration', async (t) => {
  const { r, s, at, p } = await migrateWithFault('nf-demand', 0.05, (p) => {
    t.equal(p.cutAll({ channel: 'demand' }), 1, 'one demand connection cut');
  });
  assertVerified(t, r);
  t.ok(at < TOTAL_PAGES, `cut with ${at}/${TOTAL_PAGES} pages present`);
  t.ok(s.reconnects >= 1, `the dest reconnected (${s.reconnects})`);
  t.equal(p.stats().cuts, 1);
  t.equal(await migrationState(source, 'nf-demand'), 'complete');
});

t.test('(b) cut the background connection mid-stream', async (t) => {
  const { r, s, at } = await migrateWithFault('nf-background', 0.05, (p) => {
    t.equal(p.cutAll({ channel: 'background' }), 1, 'one background connection cut');
  });
  assertVerified(t, r);
  t.ok(at < TOTAL_PAGES, `cut with ${at}/${TOTAL_PAGES} pages present`);
  t.ok(s.reconnects >= 1, `the dest reconnected (${s.reconnects})`);
});

t.test('(c) cut both connections, three times', async (t) => {
  // Three cuts, each after both links are back, must all land before the migration completes,
  // however fast the machine: while they are made, the proxy paces each connection at
  // 128 KiB/s, so that phase can deliver at most a few MiB of the 32 (it would have to last a
  // minute to deliver them all); then the pace is lifted and the migration completes.
  const { r, s, p } = await migrateWithFault(
    'nf-both',
    0.01,
    async (p) => {
      for (let i = 0; i < 3; i++) {
        // Each time after the dest has restored both channels (WELCOME received, not just dialed).
        await waitReconnects('nf-both', 2 * i);
        await p.waitFor((c) => c.filter((x) => x.channel).length === 2);
        t.equal(p.cutAll(), 2, `cut ${i + 1}: both connections`);
      }
      const now = (await session('nf-both'))!;
      t.ok(now.presentPages < TOTAL_PAGES, `mid-migration: ${now.presentPages}/${TOTAL_PAGES}`);
    },
    128 * 1024,
  );
  assertVerified(t, r);
  t.equal(p.stats().cuts, 6);
  // Before each of the first two cuts both channels were back (waitReconnects); after the last
  // one the background must return to finish, the demand link only if a fault needs it.
  t.ok(s.reconnects >= 5, `the dest reconnected after every cut (${s.reconnects})`);
});

t.test('(d) stall everything: heartbeats notice, then it is a cut', async (t) => {
  const before = await metrics();
  const t0 = Date.now();
  const { r, s, p } = await migrateWithFault('nf-stall', 0.05, (p) => {
    t.equal(p.stallAll(Infinity), 2, 'both connections silent until cut');
  });
  assertVerified(t, r);
  t.equal(p.stats().stalls, 2);
  t.equal(p.stats().cuts, 0, 'the proxy cut nothing: the dest gave up on the silent links');
  // Both links were declared lost (the metric counts losses); the background had to come back.
  t.ok(s.reconnects >= 1, `the dest reconnected (${s.reconnects})`);
  const after = await metrics();
  const re = /^yabusame_dest_reconnects_total/;
  t.ok(
    sumMatching(after, re) - sumMatching(before, re) >= 2,
    'yabusame_dest_reconnects_total counted both losses',
  );
  const hb = /^yabusame_dest_errors_total\{code="HEARTBEAT_TIMEOUT"/;
  t.ok(sumMatching(after, hb) - sumMatching(before, hb) >= 1, 'as HEARTBEAT_TIMEOUT');
  t.comment(`stalled run took ${Date.now() - t0} ms`);
});

t.test('(e) bit flips on the source→dest stream are never placed', async (t) => {
  const before = await metrics();
  const { r, s, p } = await migrateWithFault('nf-corrupt', 0.02, async (p) => {
    // One flip at a time, each on a live connection, so every flip lands.
    for (let i = 0; i < 6; i++) {
      await p.waitFor((c) => c.filter((x) => x.channel).length === 2);
      const applied = p.stats().corruptions;
      p.corruptNext(1, { channel: i % 3 === 0 ? 'demand' : 'background' });
      const deadline = Date.now() + 10_000;
      while (p.stats().corruptions === applied && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 2));
      }
    }
  });
  assertVerified(t, r);
  const flips = p.stats().corruptions;
  t.ok(flips >= 4, `${flips} bits flipped`);
  const after = await metrics();
  const re = /^yabusame_dest_errors_total\{code="(FRAME_|SOURCE_|HEARTBEAT_)/;
  const detected = sumMatching(after, re) - sumMatching(before, re);
  t.ok(
    detected > 0 || s.reconnects > 0,
    `detected: ${detected} errors, ${s.reconnects} reconnects`,
  );
  const crc = /^yabusame_dest_errors_total\{code="FRAME_CHECKSUM"/;
  t.comment(
    `FRAME_CHECKSUM: ${sumMatching(after, crc) - sumMatching(before, crc)}, reconnects ${s.reconnects}`,
  );
});

t.test('(f) the source killed (SIGKILL) and restarted on its port', async (t) => {
  const before = await metrics();
  const own = await startSource(dir, [], 'source-f1');
  daemons.push(own);
  const img = await image();
  const id = 'nf-source-kill';
  await registerMigration(own, { id, image: img, frozen: true, secret: key(id).secret });
  const p = await proxy(FAULT_PACE, own.port);
  const run = migrate(id, img, p.url);
  let restarted: Awaited<ReturnType<typeof startSource>>;
  try {
    const at = await waitPresent(id, 0.05, run);
    const exited = once(own.child, 'exit');
    own.child.kill('SIGKILL');
    await exited;
    t.ok(at < TOTAL_PAGES, `killed with ${at}/${TOTAL_PAGES} pages present`);
    restarted = await startSource(
      dir,
      ['--migration', `id=${id},image=${img},frozen,secret-file=${key(id).path}`],
      'source-f2',
      {
        port: own.port,
      },
    );
    daemons.push(restarted);
    p.setPace(0);
    const state = await migrationState(restarted, id);
    const s = await session(id);
    if (s?.state !== 'done') {
      t.equal(state, 'frozen', 'a source restarted before completion comes back frozen');
    }
  } catch (err) {
    await run.catch(() => undefined);
    throw err;
  }
  const r = await run;
  assertVerified(t, r);
  const s = (await session(id))!;
  // Both channels were lost; the background had to come back to finish. The demand link may
  // still be in backoff when the last page lands (no fault needed it), so it is not required.
  const lost = await metrics();
  for (const channel of ['demand', 'background']) {
    const key = `yabusame_dest_reconnects_total{channel="${channel}"}`;
    t.ok(
      (lost.get(key) ?? 0) - (before.get(key) ?? 0) >= 1,
      `the dest saw the ${channel} channel lost`,
    );
  }
  t.ok(s.reconnects >= 1, `the dest reconnected (${s.reconnects})`);
  t.equal(await migrationState(restarted, id), 'complete', 'the restarted source saw COMPLETE');
});

t.test('(g) the source lets go only after the dest holds every page', async (t) => {
  const own = await startSource(dir, [], 'source-g1');
  daemons.push(own);
  const img = await image();
  const id = 'nf-release';
  await registerMigration(own, { id, image: img, frozen: true, secret: key(id).secret });
  let vmsimCompleteAt = 0;
  // Paced until the source restart below, so the samples see it frozen with pages missing.
  const p = await proxy(FAULT_PACE, own.port);
  const run = migrate(id, img, p.url, { onPhaseEnd: () => (vmsimCompleteAt = Date.now()) });
  let finished = false;
  void run.then(
    () => (finished = true),
    () => (finished = true),
  );
  // Read the source's state, then the dest's: once the source says complete, the dest (read after)
  // must hold every page. A released image with a page missing would be a loss.
  let sawFrozenMidway = false;
  let firstCompleteAt = 0;
  let samples = 0;
  let restartedMidway: string | undefined;
  for (const deadline = Date.now() + 45_000; !finished && Date.now() < deadline; samples++) {
    const state = await migrationState(own, id);
    const s = (await sessions()).active.find((x) => x.migrationId === id);
    if (state === 'complete') {
      firstCompleteAt ||= Date.now();
      t.ok(!s || s.presentPages === s.totalPages, 'complete on the source: the dest has all');
    } else if (s && s.presentPages < s.totalPages) {
      sawFrozenMidway ||= state === 'frozen';
    }
    if (s && !restartedMidway && s.presentPages > 0.05 * s.totalPages) {
      // Kill and restart the source before completion: it comes back frozen, not complete.
      const exited = once(own.child, 'exit');
      own.child.kill('SIGKILL');
      await exited;
      const again = await startSource(
        dir,
        ['--migration', `id=${id},image=${img},frozen,secret-file=${key(id).path}`],
        'source-g2',
        { port: own.port },
      );
      daemons.push(again);
      restartedMidway = await migrationState(again, id);
      Object.assign(own, { child: again.child, control: again.control });
      p.setPace(0);
    }
    await new Promise((r) => setTimeout(r, 2));
  }
  const r = await run;
  assertVerified(t, r);
  t.ok(sawFrozenMidway, `the source said frozen while pages were missing (${samples} samples)`);
  t.equal(restartedMidway, 'frozen', 'restarted before completion: frozen, not complete');
  t.equal(await migrationState(own, id), 'complete', 'released once the dest confirmed');
  t.ok(vmsimCompleteAt > 0, 'vm-sim got complete');
  if (firstCompleteAt) {
    t.comment(`source complete seen ${firstCompleteAt - vmsimCompleteAt} ms after vm-sim's`);
  }
});
