// The stages of a demand fault (yabusame_dest_fault_stage_seconds) after a real migration: the
// real daemons, vm-sim's threads faulting while the dest holds the background back, so pages
// come by demand. Every stage is observed once per timed fault, the stages fit inside the
// fault's service time, and the source's times (carried in its DEMAND answers) inside the wire
// stage. No timing thresholds.
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { generateImage } from '../../scripts/image/gen-image.js';
import { runVmSim } from '../../scripts/vm-sim/vm-sim.js';
import {
  registerMigration,
  startDest,
  startSource,
  type Daemon,
} from '../../scripts/lib/daemons.js';
import { FAULT_STAGES } from '../../daemon/ops/metric-ports.js';

const MiB = 1 << 20;
const dir = mkdtempSync('/dev/shm/yabusame-stages-');
const daemons: Daemon[] = [];
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

/** The dest's /metrics samples: `name{labels}` → value. */
async function samples(http: string): Promise<Map<string, number>> {
  const text = await (await fetch(`${http}/metrics`)).text();
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const sp = line.lastIndexOf(' ');
    out.set(line.slice(0, sp), Number(line.slice(sp + 1)));
  }
  return out;
}

t.test('every stage of the demand faults of a migration is timed', async (t) => {
  const source = await startSource(dir);
  daemons.push(source);
  const config = join(dir, 'dest.json');
  writeFileSync(config, JSON.stringify({ backgroundDelayMs: 3000 }));
  const dest = await startDest(dir, ['--config', config]);
  daemons.push(dest);
  const before = await samples(dest.http);
  for (const stage of FAULT_STAGES) {
    t.equal(before.get(`yabusame_dest_fault_stage_seconds_count{stage="${stage}"}`), 0, stage);
  }

  const img = join(dir, 'vm.ram');
  await generateImage({ path: img, sizeBytes: 16 * MiB, seed: 7 });
  await registerMigration(source, { id: 'vm-stages', image: img, frozen: true });
  const r = await runVmSim({
    image: img,
    migrationId: 'vm-stages',
    secret: source.secretOf('vm-stages'),
    source: source.ws,
    destSocket: dest.socket,
    workers: 1,
    pattern: 'random',
    touches: 300,
    timeoutMs: 120_000,
  });
  t.equal(r.mismatchCount, 0, 'no page mismatched');
  t.equal(r.pagesVerified, r.totalPages, 'every page verified');
  t.ok(r.daemonReport.demandPages > 0, `${r.daemonReport.demandPages} pages came by demand`);

  const m = await samples(dest.http);
  const count = (stage: string): number =>
    m.get(`yabusame_dest_fault_stage_seconds_count{stage="${stage}"}`) ?? NaN;
  const sum = (stage: string): number =>
    m.get(`yabusame_dest_fault_stage_seconds_sum{stage="${stage}"}`) ?? NaN;
  const timed = count('request');
  t.ok(timed > 0, `${timed} faults timed stage by stage`);
  for (const stage of FAULT_STAGES) t.equal(count(stage), timed, `${stage}: one per fault`);
  const faults = m.get('yabusame_dest_fault_service_seconds_count')!;
  t.ok(timed <= faults, `timed faults (${timed}) are among the faults served (${faults})`);
  const local = ['request', 'wire', 'verify', 'place'].reduce((a, s) => a + sum(s), 0);
  t.ok(
    local <= m.get('yabusame_dest_fault_service_seconds_sum')! + 1e-6,
    'the dest stages add up to no more than the faults their vCPUs waited',
  );
  t.ok(sum('source_read') > 0, 'the source stamped its read time into its answers');
  t.ok(
    sum('source_read') + sum('source_send') <= sum('wire') + timed * 1e-7,
    "the source's part lies within the wire stage",
  );
  for (const stage of FAULT_STAGES) {
    const inf = m.get(`yabusame_dest_fault_stage_seconds_bucket{le="+Inf",stage="${stage}"}`);
    t.equal(inf, timed, `${stage}: the +Inf bucket holds every observation`);
  }
});
