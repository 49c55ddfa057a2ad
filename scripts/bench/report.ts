/**
 * The bench's result document (what `--json` prints) and its table rendering.
 */
import type { MachineInfo } from './machine.js';
import type { MetricDef } from './scenarios.js';
import { round, type Stat } from './stats.js';

export const SCHEMA = 'yabusame-bench/1';

export interface MetricResult extends Stat {
  label: string;
  unit: string;
}

export interface ScenarioResult {
  /** Row name: a scenario, or `background/<variant>`. */
  name: string;
  /** The `--only` name that selects it. */
  group: string;
  description: string;
  /** What "verified" means for this row. */
  verification: string;
  /** Runs that finished (a failing run ends the scenario). */
  runs: number;
  /** Runs whose verification passed. */
  verifiedRuns: number;
  /** Every run finished and verified. */
  ok: boolean;
  /** Metric key → median, min, max and every run's value. */
  metrics: Record<string, MetricResult>;
  /** Failed verifications and remarks, one line each. */
  problems: string[];
  /** Set when a run threw. */
  error?: string;
  /** Wall time of all its runs. */
  seconds: number;
}

export interface BenchReport {
  schema: typeof SCHEMA;
  startedAt: string;
  options: { runs: number; quick: boolean; only: string[] | null };
  machine: MachineInfo;
  scenarios: ScenarioResult[];
  /** Every scenario ok. */
  ok: boolean;
  totalSeconds: number;
}

/** Rounds a run's values and aggregates them (values kept in run order). */
export function metricResult(def: MetricDef, s: Stat): MetricResult {
  const r = (x: number): number => round(x, Math.max(def.digits, 1) + 1);
  return {
    label: def.label,
    unit: def.unit,
    median: r(s.median),
    min: r(s.min),
    max: r(s.max),
    values: s.values.map(r),
  };
}

function fmt(x: number, digits: number): string {
  if (!Number.isFinite(x)) return '–';
  return x.toLocaleString('en-US', {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

function wrap(text: string, width: number, indent: string): string {
  const words = text.split(' ');
  const lines: string[] = [];
  let line = '';
  for (const w of words) {
    if (line && line.length + 1 + w.length > width) {
      lines.push(line);
      line = w;
    } else line = line ? `${line} ${w}` : w;
  }
  if (line) lines.push(line);
  return lines.map((l) => indent + l).join('\n');
}

export function renderTable(report: BenchReport, defs: Map<string, MetricDef>): string {
  const m = report.machine;
  const out: string[] = [
    `yabusame bench — ${report.startedAt}`,
    `machine: ${m.cpuModel}, ${m.cores} cores, ${(m.memTotalBytes / 2 ** 30).toFixed(0)} GiB, ` +
      `${m.kernel}, node ${m.node}`,
    `runs per scenario: ${report.options.runs}${report.options.quick ? ' (quick sizes)' : ''}; ` +
      `median (min–max)`,
    '',
  ];
  for (const s of report.scenarios) {
    const status = s.error ? 'ERROR' : s.ok ? 'verified' : 'VERIFICATION FAILED';
    out.push(
      `== ${s.name}  [${status}, ${s.verifiedRuns}/${s.runs} runs, ${s.seconds.toFixed(0)} s]`,
    );
    out.push(wrap(s.description, 96, '   '));
    const rows = Object.entries(s.metrics).map(([key, r]) => {
      const digits = defs.get(`${s.name}:${key}`)?.digits ?? 2;
      const unit = r.unit ? ` ${r.unit}` : '';
      const range = r.min === r.max ? '' : `(${fmt(r.min, digits)}–${fmt(r.max, digits)})`;
      return [r.label, `${fmt(r.median, digits)}${unit}`, range];
    });
    const w0 = Math.max(0, ...rows.map((r) => r[0]!.length));
    const w1 = Math.max(0, ...rows.map((r) => r[1]!.length));
    for (const [a, b, c] of rows)
      out.push(`   ${a!.padEnd(w0)}  ${b!.padStart(w1)}  ${c}`.trimEnd());
    out.push(wrap(`verification: ${s.verification}`, 96, '   '));
    if (s.error) out.push(`   error: ${s.error}`);
    for (const p of s.problems.slice(0, 10)) out.push(`   ! ${p}`);
    out.push('');
  }
  out.push(
    `${report.ok ? 'all verified' : 'SOME SCENARIOS FAILED'}; total ${report.totalSeconds.toFixed(0)} s`,
  );
  return out.join('\n') + '\n';
}
