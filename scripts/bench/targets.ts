/**
 * The performance targets of issue 13, each checked against the figures of one bench run: the
 * value the bench measured, the limit, and pass or fail (or "not measured" when a row it needs
 * did not run). Ratios are taken within the run, from interleaved runs where the rows are
 * partners (plan.ts). The targets never change the bench's exit status: that is verification's.
 */
import type { ScenarioResult } from './report.js';

export interface TargetResult {
  /** Stable id, e.g. `idle-vs-local-floor`. */
  id: string;
  /** The target as stated, e.g. `demand-idle p50 ≤ 2.5× the local floor`. */
  text: string;
  /** The measured value (null: not measured), and the limit it is held to. */
  value: number | null;
  limit: number;
  unit: string;
  op: '<=' | '>=';
  /** null when not measured. */
  pass: boolean | null;
  /** How the value was taken, or why it was not. */
  detail: string;
}

type Rows = ReadonlyMap<string, ScenarioResult>;

interface TargetDef {
  id: string;
  text: string;
  limit: number;
  unit: string;
  op: '<=' | '>=';
  /** The value and how it was taken, or a string saying why it could not be. */
  measure(rows: Rows): { value: number; detail: string } | string;
}

const MiB = 2 ** 20;

/** The median of a metric of a row, with a note on how it was taken; or why there is none. */
function metric(rows: Rows, row: string, key: string): { value: number; note: string } | string {
  const r = rows.get(row);
  if (!r) return `${row} did not run`;
  if (r.skipped) return `${row} skipped: ${r.skipped}`;
  const m = r.metrics[key];
  if (!m || !Number.isFinite(m.median))
    return `${row} has no ${key}${r.error ? ` (${r.error})` : ''}`;
  const n = m.values.length;
  const note =
    m.pairing === 'per-run'
      ? `median of ${n} interleaved pair${n === 1 ? '' : 's'}`
      : m.pairing === 'medians'
        ? `against the other row's median (not interleaved), ${n} run${n === 1 ? '' : 's'}`
        : `median of ${n} run${n === 1 ? '' : 's'}`;
  return { value: m.median, note };
}

function fromMetric(row: string, key: string): TargetDef['measure'] {
  return (rows) => {
    const m = metric(rows, row, key);
    return typeof m === 'string' ? m : { value: m.value, detail: `${row}: ${m.note}` };
  };
}

/** Rows whose dest peak RSS is held to 100 MiB + 0.5% of their guest RAM. */
function rssBudget(rows: Rows): { value: number; detail: string } | string {
  let worst: { row: string; rss: number; budget: number } | null = null;
  let checked = 0;
  for (const r of rows.values()) {
    const rss = r.metrics['destPeakRssMiB']?.median;
    if (rss === undefined || !r.guestRamBytes) continue;
    checked++;
    const budget = 100 + (0.005 * r.guestRamBytes) / MiB;
    if (!worst || rss / budget > worst.rss / worst.budget) worst = { row: r.name, rss, budget };
  }
  if (!worst) return 'no row measured the dest';
  return {
    value: worst.rss / worst.budget,
    detail:
      `worst of ${checked} rows: ${worst.row}, ${worst.rss.toFixed(0)} MiB against a budget of ` +
      `${worst.budget.toFixed(1)} MiB`,
  };
}

/** Link rows: demand p50 against the link's measured round trip plus twice the local floor. */
function overTheLink(rtt: number): TargetDef {
  const row = `link/rtt${rtt}/demand-idle`;
  return {
    id: `link-rtt${rtt}-p50`,
    text: `over the emulated link (RTT ${rtt} µs): demand p50 ≤ RTT + 2× the local floor`,
    limit: 1,
    unit: '× (RTT + 2× floor)',
    op: '<=',
    measure(rows) {
      const p50 = metric(rows, row, 'faultP50Us');
      if (typeof p50 === 'string') return p50;
      const link = metric(rows, 'link/calibration', `rtt${rtt}P50Us`);
      if (typeof link === 'string') return link;
      const floor = metric(rows, 'local-floor', 'faultP50Us');
      if (typeof floor === 'string') return floor;
      const budget = link.value + 2 * floor.value;
      return {
        value: p50.value / budget,
        detail:
          `p50 ${p50.value.toFixed(1)} µs; link round trip (C, 4 KiB) ${link.value.toFixed(1)} µs ` +
          `+ 2 × local floor ${floor.value.toFixed(1)} µs = ${budget.toFixed(1)} µs`,
      };
    },
  };
}

export const TARGETS: readonly TargetDef[] = [
  {
    id: 'dest-cpu-per-fault',
    text: 'CPU per demand fault, dest ≤ 90 µs',
    limit: 90,
    unit: 'µs',
    op: '<=',
    measure: fromMetric('demand-idle', 'destCpuUsPerFault'),
  },
  {
    id: 'source-cpu-per-fault',
    text: 'CPU per demand fault, source ≤ 45 µs',
    limit: 45,
    unit: 'µs',
    op: '<=',
    measure: fromMetric('demand-idle', 'sourceCpuUsPerFault'),
  },
  {
    id: 'idle-vs-local-floor',
    text: 'demand-idle p50 ≤ 2.5× the local floor',
    limit: 2.5,
    unit: '×',
    op: '<=',
    measure: fromMetric('demand-idle', 'vsLocalFloor'),
  },
  {
    id: 'idle-vs-remote-floor',
    text: 'demand-idle p50 ≤ 1.5× the remote floor',
    limit: 1.5,
    unit: '×',
    op: '<=',
    measure: fromMetric('demand-idle', 'vsRemoteFloor'),
  },
  {
    id: 'idle-p99',
    text: 'demand-idle p99 ≤ 1 ms',
    limit: 1000,
    unit: 'µs',
    op: '<=',
    measure: fromMetric('demand-idle', 'faultP99Us'),
  },
  {
    id: 'under-load-vs-idle',
    text: 'demand p50 under full background load ≤ 1.5× idle',
    limit: 1.5,
    unit: '×',
    op: '<=',
    measure: fromMetric('demand-under-load', 'p50VsIdle'),
  },
  {
    id: 'many-vms-vs-under-load',
    text: 'many-vms fault p50 ≤ 2× the single-VM under-load p50',
    limit: 2,
    unit: '×',
    op: '<=',
    measure: fromMetric('many-vms', 'p50VsUnderLoad'),
  },
  {
    id: 'many-vms-fairness',
    text: 'many-vms: the slowest VM within 1.3× of the median (fault p50)',
    limit: 1.3,
    unit: '×',
    op: '<=',
    measure: fromMetric('many-vms', 'faultP50SpreadX'),
  },
  {
    id: 'data-heavy-vs-c',
    text: 'data-heavy ≥ 0.7× the C new-data loop',
    limit: 0.7,
    unit: '×',
    op: '>=',
    measure: fromMetric('background/data-heavy', 'vsCDistinct'),
  },
  {
    id: 'mostly-empty-vs-data-heavy',
    text: 'mostly-empty ≥ 5× data-heavy (all pages placed per second)',
    limit: 5,
    unit: '×',
    op: '>=',
    measure: fromMetric('background/mostly-empty', 'vsDataHeavy'),
  },
  {
    id: 'dest-rss',
    text: 'dest peak RSS ≤ 100 MiB + 0.5% of guest RAM (every row)',
    limit: 1,
    unit: '× budget',
    op: '<=',
    measure: rssBudget,
  },
  {
    id: 'source-rss-16',
    text: 'source peak RSS ≤ 150 MiB with 16 migrations',
    limit: 150,
    unit: 'MiB',
    op: '<=',
    measure: fromMetric('many-vms', 'sourcePeakRssMiB'),
  },
  overTheLink(0),
  overTheLink(100),
  overTheLink(500),
];

/** Every target against these rows. */
export function evaluateTargets(results: readonly ScenarioResult[]): TargetResult[] {
  const rows = new Map(results.map((r) => [r.name, r]));
  return TARGETS.map((t) => {
    const m = t.measure(rows);
    const base = { id: t.id, text: t.text, limit: t.limit, unit: t.unit, op: t.op };
    if (typeof m === 'string') return { ...base, value: null, pass: null, detail: m };
    const pass = t.op === '<=' ? m.value <= t.limit : m.value >= t.limit;
    return { ...base, value: m.value, pass, detail: m.detail };
  });
}
