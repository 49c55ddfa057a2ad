/**
 * The bench's run plan (scripts/bench/plan.ts) and its targets (scripts/bench/targets.ts): which
 * rows run, interleaved how, and how ratios and target verdicts are taken. Pure functions: no
 * daemon runs.
 */
import t from 'tap';
import {
  interleave,
  interleavedSets,
  ratios,
  selectRows,
  type RowSpec,
} from '../../scripts/bench/plan.js';
import type { ScenarioResult } from '../../scripts/bench/report.js';
import { bucketQuantile, stageValues } from '../../scripts/bench/stages.js';
import { evaluateTargets } from '../../scripts/bench/targets.js';

const ROWS: RowSpec[] = [
  { name: 'demand-idle', group: 'demand-idle', partners: ['local-floor', 'remote-floor'] },
  { name: 'background/c-reference', group: 'background' },
  { name: 'background/data-heavy', group: 'background', partners: ['background/c-reference'] },
  { name: 'many-vms', group: 'many-vms', requires: ['demand-under-load'] },
  { name: 'demand-under-load', group: 'demand-under-load' },
  { name: 'local-floor', group: 'local-floor' },
  { name: 'remote-floor', group: 'remote-floor' },
  { name: 'link/rtt100/demand-idle', group: 'link' },
];
const names = (rows: RowSpec[]): string[] => rows.map((r) => r.name);

t.test('selectRows: partners both ways and required rows come along, unless solo', async (t) => {
  t.same(names(selectRows(ROWS, null)), names(ROWS));
  t.same(names(selectRows(ROWS, ['local-floor'])), ['demand-idle', 'local-floor', 'remote-floor']);
  t.same(names(selectRows(ROWS, ['local-floor'], true)), ['local-floor']);
  t.same(names(selectRows(ROWS, ['many-vms'])), ['many-vms', 'demand-under-load']);
  t.same(names(selectRows(ROWS, ['link/rtt100'])), ['link/rtt100/demand-idle']);
  t.same(names(selectRows(ROWS, ['background'], true)), [
    'background/c-reference',
    'background/data-heavy',
  ]);
  t.throws(() => selectRows(ROWS, ['nope']), RangeError);
});

t.test('interleavedSets and interleave: A B A B within a set', async (t) => {
  const sets = interleavedSets(selectRows(ROWS, ['demand-idle', 'many-vms']));
  t.same(sets.map(names), [
    ['demand-idle', 'local-floor', 'remote-floor'],
    ['many-vms'],
    ['demand-under-load'],
  ]);
  t.same(
    interleave(['a', 'b'], 3).map(([r, i]) => `${r}${i}`),
    ['a0', 'b0', 'a1', 'b1', 'a2', 'b2'],
  );
});

t.test('ratios: per run when interleaved, against the median otherwise', async (t) => {
  t.same(ratios([10, 20, 30], [5, 10, 10], 'over', 'per-run'), [2, 2, 3]);
  t.same(ratios([10, undefined, 30], [5, 10], 'over', 'per-run'), [2]);
  t.same(ratios([10, 20], [5, 10, 20], 'over', 'medians'), [1, 2]);
  t.same(ratios([10, 20], [5, 10], 'under', 'per-run'), [0.5, 0.5]);
  t.same(ratios([0], [5], 'under', 'per-run'), [], 'no division by zero');
});

function row(name: string, metrics: Record<string, number>, extra: Partial<ScenarioResult> = {}) {
  const r: ScenarioResult = {
    name,
    group: name,
    description: '',
    verification: '',
    runs: 1,
    verifiedRuns: 1,
    ok: true,
    metrics: {},
    problems: [],
    seconds: 1,
    ...extra,
  };
  for (const [k, v] of Object.entries(metrics))
    r.metrics[k] = { label: k, unit: '', median: v, min: v, max: v, values: [v] };
  return r;
}

t.test('evaluateTargets: pass, fail, not measured', async (t) => {
  const res = evaluateTargets([
    row('demand-idle', { destCpuUsPerFault: 80, sourceCpuUsPerFault: 60, faultP50Us: 100 }),
    row(
      'demand-under-load',
      { destPeakRssMiB: 120 },
      { guestRamBytes: 1024 * 2 ** 20 }, // budget 105.12 MiB
    ),
    row('link/calibration', { rtt100P50Us: 120 }),
    row('local-floor', { faultP50Us: 40 }),
    row('link/rtt100/demand-idle', { faultP50Us: 150 }),
    row('many-vms', {}, { skipped: 'no room' }),
  ]);
  const by = new Map(res.map((x) => [x.id, x]));
  t.equal(by.get('dest-cpu-per-fault')!.pass, true);
  t.equal(by.get('source-cpu-per-fault')!.pass, false);
  t.equal(by.get('idle-vs-local-floor')!.pass, null, 'no ratio measured');
  t.match(by.get('source-rss-16')!.detail, /skipped: no room/);
  t.equal(by.get('dest-rss')!.pass, false);
  t.ok(Math.abs(by.get('dest-rss')!.value! - 120 / 105.12) < 1e-9);
  // 150 µs against 120 + 2 × 40 = 200 µs.
  t.equal(by.get('link-rtt100-p50')!.value, 0.75);
  t.equal(by.get('link-rtt100-p50')!.pass, true);
  t.equal(by.get('link-rtt500-p50')!.pass, null);
});

t.test('stage quantiles from the dest histogram, as histogram_quantile', async (t) => {
  t.equal(
    bucketQuantile(
      [
        [1, 0],
        [2, 10],
        [Infinity, 10],
      ],
      0.5,
    ),
    1.5,
  );
  t.equal(
    bucketQuantile(
      [
        [1, 5],
        [Infinity, 10],
      ],
      0.99,
    ),
    1,
    'in +Inf: the last finite bound',
  );
  t.ok(
    Number.isNaN(
      bucketQuantile(
        [
          [1, 0],
          [Infinity, 0],
        ],
        0.5,
      ),
    ),
    'nothing observed',
  );
  const text = [
    '# TYPE yabusame_dest_fault_stage_seconds histogram',
    'yabusame_dest_fault_stage_seconds_bucket{le="0.00001",stage="wire"} 0',
    'yabusame_dest_fault_stage_seconds_bucket{le="0.00002",stage="wire"} 4',
    'yabusame_dest_fault_stage_seconds_bucket{le="+Inf",stage="wire"} 4',
    'yabusame_dest_fault_stage_seconds_bucket{le="0.00001",stage="place"} 0',
    'yabusame_dest_fault_stage_seconds_bucket{le="+Inf",stage="place"} 0',
  ].join('\n');
  const v = stageValues(text);
  t.ok(Math.abs(v['stageWireP50Us']! - 15) < 1e-9, 'wire p50 halfway through its bucket');
  t.notOk('stagePlaceP50Us' in v, 'a stage never observed is left out');
  // An earlier reading of the same dest (a warm-up migration's faults) is taken out.
  const before = [
    'yabusame_dest_fault_stage_seconds_bucket{le="0.00001",stage="wire"} 0',
    'yabusame_dest_fault_stage_seconds_bucket{le="0.00002",stage="wire"} 3',
    'yabusame_dest_fault_stage_seconds_bucket{le="+Inf",stage="wire"} 3',
  ].join('\n');
  const later = text
    .replace('le="0.00001",stage="wire"} 0', 'le="0.00001",stage="wire"} 2')
    .replace('le="0.00002",stage="wire"} 4', 'le="0.00002",stage="wire"} 5')
    .replace('le="+Inf",stage="wire"} 4', 'le="+Inf",stage="wire"} 5');
  t.ok(
    Math.abs(stageValues(later)['stageWireP50Us']! - (10 + 10 / 6)) < 1e-9,
    'all five faults: p50 a sixth of the way into the second bucket',
  );
  t.ok(
    Math.abs(stageValues(later, before)['stageWireP50Us']! - 5) < 1e-9,
    'without the three counted before: both left in the first bucket, p50 halfway',
  );
});
