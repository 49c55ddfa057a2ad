/**
 * The stages of a demand fault as the dest exposes them (yabusame_dest_fault_stage_seconds,
 * daemon/ops/metric-ports.ts FaultStage), read from its /metrics after a run: p50 and p99 per
 * stage, interpolated within the histogram's buckets as Prometheus' histogram_quantile does.
 */
import { FAULT_STAGES, type FaultStage } from '../../daemon/ops/metric-ports.js';
import type { MetricDef } from './scenarios.js';

const FAMILY = 'yabusame_dest_fault_stage_seconds';

/** What each stage covers, for the table's labels. */
const LABELS: Record<FaultStage, string> = {
  request: 'fault read → REQUEST sent',
  wire: 'REQUEST sent → answer received',
  source_read: 'source: REQUEST read → pages read',
  source_send: 'source: pages read → frame sent',
  verify: 'answer received → checksum verified',
  place: 'verified → placed and woken',
};

const key = (stage: FaultStage, q: 'P50' | 'P99'): string =>
  `stage_${stage}${q}Us`.replace(/_(\w)/g, (_, c: string) => c.toUpperCase());

/** The table rows: p50 and p99 of every stage. */
export const STAGE_METRICS: Record<string, MetricDef> = Object.fromEntries(
  FAULT_STAGES.flatMap((s) => [
    [key(s, 'P50'), { label: `stage p50: ${LABELS[s]}`, unit: 'µs', digits: 1 }],
    [key(s, 'P99'), { label: `stage p99: ${LABELS[s]}`, unit: 'µs', digits: 1 }],
  ]),
);

/** The q-quantile of cumulative buckets [upper bound, count], linear within its bucket. */
export function bucketQuantile(buckets: ReadonlyArray<[number, number]>, q: number): number {
  const total = buckets.at(-1)?.[1] ?? 0;
  if (!total) return NaN;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (!Number.isFinite(le)) return prevLe; // in +Inf: the last finite bound
      return prevLe + ((le - prevLe) * (rank - prevCount)) / Math.max(count - prevCount, 1);
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}

/** The stage histogram's cumulative bucket counts in a /metrics text, by "stage le". */
function stageBuckets(exposition: string): Map<string, number> {
  const counts = new Map<string, number>();
  const re = new RegExp(`^${FAMILY}_bucket\\{le="([^"]+)",stage="([a-z_]+)"\\} (\\S+)$`);
  for (const line of exposition.split('\n')) {
    const m = re.exec(line);
    if (m) counts.set(`${m[2]} ${m[1]}`, Number(m[3]));
  }
  return counts;
}

/**
 * p50 and p99 of each stage (µs) from a dest's /metrics text; stages never observed are left
 * out. `before`: an earlier text of the same dest, whose counts are taken out (the faults of an
 * earlier migration).
 */
export function stageValues(exposition: string, before = ''): Record<string, number> {
  const earlier = stageBuckets(before);
  const buckets = new Map<string, Array<[number, number]>>();
  for (const [k, count] of stageBuckets(exposition)) {
    const [stage, leText] = k.split(' ') as [string, string];
    const le = leText === '+Inf' ? Infinity : Number(leText);
    let list = buckets.get(stage);
    if (!list) buckets.set(stage, (list = []));
    list.push([le, count - (earlier.get(k) ?? 0)]);
  }
  const out: Record<string, number> = {};
  for (const stage of FAULT_STAGES) {
    const list = buckets.get(stage)?.sort((a, b) => a[0] - b[0]);
    if (!list?.at(-1)?.[1]) continue;
    out[key(stage, 'P50')] = bucketQuantile(list, 0.5) * 1e6;
    out[key(stage, 'P99')] = bucketQuantile(list, 0.99) * 1e6;
  }
  return out;
}
