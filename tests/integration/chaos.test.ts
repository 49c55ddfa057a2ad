// A short, seeded chaos run: 64 MiB under a vm-sim workload with random cuts, stalls and bit
// flips through the chaos proxy, the source killed and restarted; every page must verify and
// every fault kind must have happened at least once.
import t from 'tap';
import { runChaos, summaryLine } from '../../scripts/chaos/run.js';

t.test('64 MiB through the chaos proxy, with a source restart', async (t) => {
  const r = await runChaos({
    sizeBytes: 64 << 20,
    seed: 7,
    durationMs: 8000,
    workers: 2,
    baseline: false,
    rates: { cutPerSec: 2, stallPerSec: 1, corruptPerSec: 4, sourceKillPerSec: 0.2 },
  });
  t.comment(summaryLine(r));
  t.notOk(r.error, 'vm-sim completed');
  t.ok(r.verified, 'every page verified byte for byte');
  t.equal(r.mismatches, 0);
  t.equal(r.missingPages, 0);
  t.equal(r.pagesVerified, r.totalPages);
  t.ok(r.faults.cut >= 1, `cuts: ${r.faults.cut}`);
  t.ok(r.faults.stall >= 1, `stalls: ${r.faults.stall}`);
  t.ok(r.faults.corrupt >= 1, `bit flips: ${r.faults.corrupt}`);
  t.ok(r.faults.sourceKill >= 1, `source kills: ${r.faults.sourceKill}`);
  t.equal(r.sourceRestarts, r.faults.sourceKill, 'every killed source came back');
  t.ok(r.faults.destKill >= 1, `dest kills: ${r.faults.destKill}`);
  t.ok(
    r.destResumes >= r.faults.destKill,
    `vm-sim resumed with each restarted dest (${r.destResumes})`,
  );
  t.ok(r.reconnects >= 1, `the dest reconnected ${r.reconnects} times`);
  t.equal(r.sourceState, 'complete', 'the source released the image after COMPLETE');
});
