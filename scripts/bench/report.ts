/**
 * The bench's result document (what `--json` prints) and its table rendering.
 */
import type { MachineInfo } from './machine.js';
import type { Pairing } from './plan.js';
import type { MetricDef } from './scenarios.js';
import { round, type Stat } from './stats.js';
import type { TargetResult } from './targets.js';

export const SCHEMA = 'yabusame-bench/2';

export interface MetricResult extends Stat {
  label: string;
  unit: string;
  /**
   * Ratios only: `per-run` when the two rows ran interleaved and `values` holds one ratio per
   * pair of runs; `medians` when each run of this row was compared with the other row's median.
   */
  pairing?: Pairing;
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
  /** Every run finished and verified (or the row was skipped). */
  ok: boolean;
  /** Why the row did not run (e.g. no network namespaces without root); no metrics then. */
  skipped?: string;
  /** The rows it ran interleaved with, run by run (plan.ts). */
  interleavedWith?: string[];
  /** Guest RAM the dest served in one run, bytes (the dest's RSS budget is based on it). */
  guestRamBytes?: number;
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
  options: { runs: number; quick: boolean; only: string[] | null; solo: boolean };
  machine: MachineInfo;
  scenarios: ScenarioResult[];
  /** Issue 13's targets, each with its measured value and pass/fail (targets.ts). */
  targets: TargetResult[];
  /** Every scenario ok. */
  ok: boolean;
  totalSeconds: number;
}

/** Rounds a run's values and aggregates them (values kept in run order). */
export function metricResult(def: MetricDef, s: Stat, pairing?: Pairing): MetricResult {
  const r = (x: number): number => round(x, Math.max(def.digits, 1) + 1);
  return {
    label: def.label,
    unit: def.unit,
    median: r(s.median),
    min: r(s.min),
    max: r(s.max),
    values: s.values.map(r),
    ...(pairing ? { pairing } : {}),
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
    if (s.skipped) {
      out.push(`== ${s.name}  [skipped]`);
      out.push(wrap(s.description, 96, '   '));
      out.push(wrap(`skipped: ${s.skipped}`, 96, '   '));
      out.push('');
      continue;
    }
    const status = s.error ? 'ERROR' : s.ok ? 'verified' : 'VERIFICATION FAILED';
    const with_ = s.interleavedWith?.length
      ? `, interleaved with ${s.interleavedWith.join(', ')}`
      : '';
    out.push(
      `== ${s.name}  [${status}, ${s.verifiedRuns}/${s.runs} runs, ${s.seconds.toFixed(0)} s${with_}]`,
    );
    out.push(wrap(s.description, 96, '   '));
    const rows = Object.entries(s.metrics).map(([key, r]) => {
      const digits = defs.get(`${s.name}:${key}`)?.digits ?? 2;
      const unit = r.unit ? ` ${r.unit}` : '';
      const n = r.values.length;
      const how =
        r.pairing === 'per-run'
          ? `${n} interleaved pair${n === 1 ? '' : 's'}`
          : r.pairing === 'medians'
            ? "against the other row's median"
            : '';
      const range = r.min === r.max ? '' : `${fmt(r.min, digits)}–${fmt(r.max, digits)}`;
      const note = [range, how].filter(Boolean).join(', ');
      return [r.label, `${fmt(r.median, digits)}${unit}`, note ? `(${note})` : ''];
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
  out.push(...renderTargets(report.targets), '');
  out.push(
    `${report.ok ? 'all verified' : 'SOME SCENARIOS FAILED'}; total ${report.totalSeconds.toFixed(0)} s`,
  );
  return out.join('\n') + '\n';
}

/** The targets section: a mark, the target, the measured value, how it was taken. */
export function renderTargets(targets: readonly TargetResult[]): string[] {
  const measured = targets.filter((t) => t.pass !== null);
  const passed = measured.filter((t) => t.pass).length;
  const out = [
    `== targets (issue 13): ${passed} of ${measured.length} measured met` +
      (measured.length < targets.length
        ? `, ${targets.length - measured.length} not measured`
        : ''),
  ];
  for (const t of targets) {
    const mark = t.pass === null ? '  –  ' : t.pass ? ' PASS' : ' FAIL';
    const op = t.op === '<=' ? '≤' : '≥';
    const value =
      t.value === null
        ? 'not measured'
        : `${fmt(t.value, t.value >= 100 ? 0 : 2)} ${t.unit} (limit ${op} ${t.limit})`;
    out.push(`  ${mark}  ${t.text}: ${value}`);
    out.push(wrap(t.detail, 90, '          '));
  }
  return out;
}
