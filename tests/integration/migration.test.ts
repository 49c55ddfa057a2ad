// End to end on the real path: `yabusame source` and `yabusame dest` as processes, vm-sim as the
// VMM (its workload threads raise the faults), real userfaultfd, SCM_RIGHTS and ws on loopback.
// vm-sim verifies every page byte for byte after each migration.
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim, type VmSimOptions, type VmSimResult } from '../../scripts/vm-sim/vm-sim.js';
import {
  migrationStatus,
  freezeMigration,
  migrationState,
  registerMigration,
  startDest,
  startSource,
  type Daemon,
} from '../../scripts/lib/daemons.js';

const MiB = 1 << 20;
const dir = mkdtempSync('/dev/shm/yabusame-e2e-');
const daemons: Daemon[] = [];
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

let source: Awaited<ReturnType<typeof startSource>>;
let dest: Awaited<ReturnType<typeof startDest>>;
/** A dest that holds the background stream back for a while: faults have the field to themselves. */
let slowDest: Awaited<ReturnType<typeof startDest>>;
/** A dest that prefetches 64 KiB after each fault in a sweep and never opens the background stream. */
let prefetchDest: Awaited<ReturnType<typeof startDest>>;

t.before(async () => {
  source = await startSource(dir);
  daemons.push(source);
  dest = await startDest(dir);
  daemons.push(dest);
  const config = join(dir, 'slow-dest.json');
  writeFileSync(
    config,
    JSON.stringify({ backgroundWindowBytes: 64 * 1024, backgroundDelayMs: 1500 }),
  );
  slowDest = await startDest(dir, ['--config', config], 'slow-dest');
  daemons.push(slowDest);
  prefetchDest = await startDest(
    dir,
    ['--demand-prefetch-bytes', String(64 * 1024), '--background-delay-ms', '3600000'],
    'prefetch-dest',
  );
  daemons.push(prefetchDest);
});

let imageSeed = 1;
async function image(sizeBytes: number): Promise<string> {
  const path = join(dir, `image-${imageSeed}.ram`);
  await generateImage({ path, sizeBytes, seed: imageSeed++ });
  return path;
}

function assertVerified(t: Test, r: VmSimResult): void {
  t.equal(r.mismatchCount, 0, 'no page mismatched');
  t.equal(r.missingPages, 0, 'no page missing');
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified byte for byte`);
  const d = r.daemonReport;
  t.equal(
    d.demandPages + d.backgroundPages + d.zeroPages + d.existedPages + d.discardedPages,
    r.totalPages,
    'the dest accounted for every page once',
  );
  t.equal(d.discardedPages, 0, 'a plain migration discards nothing');
  // The main thread (demand) and the bulk thread (background) may race for a page; the loser
  // meets EEXIST. Only a demanded page can race, so races are bounded by the faults.
  t.ok(
    d.existedPages <= r.workload.faults,
    `pages found present (${d.existedPages}) are races on faulted pages (${r.workload.faults})`,
  );
}

async function migrate(
  id: string,
  img: string,
  opts: Partial<VmSimOptions> & { destSocket?: string } = {},
): Promise<VmSimResult> {
  await registerMigration(source, { id, image: img, frozen: true });
  return runVmSim({
    image: img,
    migrationId: id,
    secret: source.secretOf(id),
    source: source.ws,
    destSocket: dest.socket,
    workers: 2,
    timeoutMs: 120_000,
    ...opts,
  });
}

t.test('one VM under a mixed workload', async (t) => {
  const img = await image(64 * MiB);
  const r = await migrate('vm-mixed', img, { workers: 4, pattern: 'mixed' });
  assertVerified(t, r);
  t.ok(r.daemonReport.zeroPages > 0, `zero pages went as zero runs (${r.daemonReport.zeroPages})`);
  t.ok(r.workload.writes > 0, 'the guest wrote while pages arrived');
  t.equal(
    await migrationState(source, 'vm-mixed'),
    'complete',
    'the source released the image only after COMPLETE',
  );
});

t.test('thousands of faults from several threads', async (t) => {
  const img = await image(32 * MiB);
  const r = await migrate('vm-faults', img, {
    destSocket: slowDest.socket,
    workers: 3,
    pattern: 'random',
    writeFraction: 0.3,
  });
  assertVerified(t, r);
  t.ok(r.workload.faults >= 1000, `guest threads faulted ${r.workload.faults} times`);
  t.ok(r.daemonReport.demandPages >= 500, `${r.daemonReport.demandPages} pages came by demand`);
});

t.test('pages written by the guest before their data arrives', async (t) => {
  const img = await image(16 * MiB);
  const r = await migrate('vm-writes', img, {
    destSocket: slowDest.socket,
    workers: 2,
    pattern: 'sequential',
    writeFraction: 1,
  });
  assertVerified(t, r);
  t.ok(
    r.workload.faults > 0 && r.workload.writes > 0,
    `${r.workload.faults} write faults; the writes landed on placed pages`,
  );
});

t.test('demand prefetch: sequential first touches fault on a fraction of the pages', async (t) => {
  // Only the demand channel brings pages here. A fault that continues a sweep also asks for the
  // next 16 pages, each answer placed whole before its vCPUs wake, so a thread sweeping its pages
  // faults at most once per answer frame (a touch of a page still in flight counts as a fault too).
  const img = await image(16 * MiB);
  const r = await migrate('vm-prefetch', img, {
    destSocket: prefetchDest.socket,
    workers: 2,
    pattern: 'sequential',
    touches: (16 * MiB) / 4096,
  });
  assertVerified(t, r);
  const d = r.daemonReport;
  t.equal(d.backgroundPages, 0, 'no page came by the background stream');
  t.ok(
    r.workload.faults * 4 < r.totalPages,
    `${r.workload.faults} faults for ${r.totalPages} pages touched in order`,
  );
  t.ok(
    d.demandPages + d.zeroPages > r.workload.faults * 4,
    `${d.demandPages} data and ${d.zeroPages} zero pages came by demand`,
  );
});

t.test('two VMs at once through one dest and one source', async (t) => {
  const [a, b] = await Promise.all([image(32 * MiB), image(32 * MiB)]);
  const [ra, rb] = await Promise.all([migrate('vm-two-a', a), migrate('vm-two-b', b)]);
  assertVerified(t, ra);
  assertVerified(t, rb);
});

t.test('requests wait until the VM is frozen on the source', async (t) => {
  const img = await image(8 * MiB);
  await registerMigration(source, { id: 'vm-held', image: img, frozen: false });
  const run = runVmSim({
    image: img,
    migrationId: 'vm-held',
    secret: source.secretOf('vm-held'),
    source: source.ws,
    destSocket: slowDest.socket,
    workers: 1,
    pattern: 'sequential',
    timeoutMs: 60_000,
  });
  // Wait until the guest is blocked on faults the source is holding.
  let status: { pendingRequests: number; pages: { sent: number } } | undefined;
  for (let delayMs = 5; ; delayMs = Math.min(delayMs * 2, 100)) {
    status = await migrationStatus<NonNullable<typeof status>>(source, 'vm-held');
    if (status && status.pendingRequests > 0) break;
    await new Promise((r) => setTimeout(r, delayMs));
  }
  t.equal(status!.pages.sent, 0, 'nothing was sent before the freeze');
  await freezeMigration(source, 'vm-held');
  assertVerified(t, await run);
});
