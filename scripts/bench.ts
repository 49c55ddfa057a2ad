/**
 * `npm run bench`: the real `yabusame source` and `yabusame dest` on loopback, driven by vm-sim,
 * for the scenarios in scripts/bench/scenarios.ts (demand faults idle and under load, background
 * throughput against a C ceiling, many vCPUs, many VMs, the in-process local floor). Each
 * scenario runs several times on fresh daemons; the table (or `--json`) gives the median and the
 * range, plus the machine. Progress goes to stderr. Exit 1 when any verification fails.
 *
 * The JSON document (`--json`, schema "yabusame-bench/1"):
 *   { schema, startedAt, options: { runs, quick, only }, machine: { cpuModel, cores, kernel,
 *     node, memTotalBytes, hostname }, ok, totalSeconds,
 *     scenarios: [ { name, group, description, verification, runs, verifiedRuns, ok, seconds,
 *       problems: string[], error?, metrics: { <key>: { label, unit, median, min, max,
 *       values: number[] } } } ] }
 * Metric keys: faults, faultP50Us, faultP99Us, faultP999Us, faultMaxUs (latency rows);
 * destCpuSecPerGiB, sourceCpuSecPerGiB, destPeakRssMiB, sourcePeakRssMiB (daemon rows);
 * others per scenario (see scenarios.ts).
 */
import { rmSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { createContext, killTracked } from './bench/harness.js';
import { machineInfo } from './bench/machine.js';
import {
  SCHEMA,
  metricResult,
  renderTable,
  type BenchReport,
  type ScenarioResult,
} from './bench/report.js';
import { GROUPS, SCENARIOS, type MetricDef, type Scenario } from './bench/scenarios.js';
import { stat } from './bench/stats.js';

const USAGE = `Usage: npm run bench -- [options]

Runs the real daemons on loopback (images in /dev/shm, deleted afterwards) and prints a table.

  --runs N       runs per scenario (default 3); the median and the range are reported
  --only A,B     scenarios: ${GROUPS.join(', ')}
                 (or a single row, e.g. background/c-reference)
  --quick        small sizes (the whole bench in about 2 minutes)
  --json         print one JSON document instead of the table
  --keep         keep the working folder (daemon logs)
  -q, --quiet    no progress on stderr
  -h, --help
`;

function select(only: string[] | null): Scenario[] {
  if (!only) return SCENARIOS;
  const known = new Set<string>([...GROUPS, ...SCENARIOS.map((s) => s.name)]);
  const unknown = only.filter((n) => !known.has(n));
  if (unknown.length) throw new RangeError(`unknown scenario: ${unknown.join(', ')}`);
  return SCENARIOS.filter((s) => only.includes(s.group) || only.includes(s.name));
}

function summaryLine(s: Scenario, values: Record<string, number>): string {
  return Object.entries(values)
    .slice(0, 4)
    .map(([k, v]) => {
      const d = s.metrics[k];
      return `${d?.label ?? k} ${v.toFixed(d?.digits ?? 2)}${d?.unit ? ` ${d.unit}` : ''}`;
    })
    .join(', ');
}

/** Fills derived metrics (ratios against another row's median) where both rows ran. */
function derive(results: ScenarioResult[], scenarios: Scenario[]): void {
  for (const s of scenarios) {
    const row = results.find((r) => r.name === s.name);
    if (!row) continue;
    const ordered: ScenarioResult['metrics'] = {};
    for (const [key, def] of Object.entries(s.metrics)) {
      if (!def.derived) {
        if (row.metrics[key]) ordered[key] = row.metrics[key];
        continue;
      }
      const [otherName, otherKey, mine, dir] = def.derived;
      const theirs = results.find((r) => r.name === otherName)?.metrics[otherKey]?.median;
      const values = row.metrics[mine]?.values;
      if (!theirs || !values?.length) continue;
      const ratios = values.map((v) => (dir === 'over' ? v / theirs : theirs / v));
      ordered[key] = metricResult(def, stat(ratios));
    }
    row.metrics = ordered;
  }
}

export async function main(argv: string[] = process.argv.slice(2)): Promise<number> {
  const { values: a } = parseArgs({
    args: argv,
    options: {
      runs: { type: 'string', default: '3' },
      only: { type: 'string' },
      quick: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      keep: { type: 'boolean', default: false },
      quiet: { type: 'boolean', short: 'q', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (a.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const runs = Number(a.runs);
  if (!Number.isInteger(runs) || runs < 1)
    throw new RangeError('--runs must be a positive integer');
  const only = a.only
    ? a.only
        .split(',')
        .map((x) => x.trim())
        .filter(Boolean)
    : null;
  const scenarios = select(only);

  const started = performance.now();
  const startedAt = new Date().toISOString();
  const ctx = createContext({ quick: a.quick, verbose: !a.quiet });
  const onSignal = (sig: NodeJS.Signals): void => {
    process.stderr.write(`bench: ${sig}, cleaning up\n`);
    killTracked();
    if (!a.keep) rmSync(ctx.dir, { recursive: true, force: true });
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  const machine = machineInfo();
  const results: ScenarioResult[] = [];
  const defs = new Map<string, MetricDef>();
  try {
    ctx.say(
      `yabusame bench: ${scenarios.length} rows × ${runs} runs${a.quick ? ' (quick)' : ''}; ` +
        `working folder ${ctx.dir}`,
    );
    for (const s of scenarios) {
      for (const [k, d] of Object.entries(s.metrics)) defs.set(`${s.name}:${k}`, d);
      const t0 = performance.now();
      const row: ScenarioResult = {
        name: s.name,
        group: s.group,
        description: s.describe(ctx),
        verification: s.verification,
        runs: 0,
        verifiedRuns: 0,
        ok: false,
        metrics: {},
        problems: [],
        seconds: 0,
      };
      ctx.say(`[${s.name}] ${row.description}`);
      const perRun: Array<Record<string, number>> = [];
      for (let i = 0; i < runs; i++) {
        try {
          const out = await s.runOnce(ctx, i);
          row.runs++;
          if (out.verified) row.verifiedRuns++;
          row.problems.push(...out.problems.map((p) => `run ${i + 1}: ${p}`));
          perRun.push(out.values);
          ctx.say(
            `  run ${i + 1}/${runs}: ${summaryLine(s, out.values)}` +
              (out.verified ? '' : ' — VERIFICATION FAILED'),
          );
        } catch (err) {
          row.error =
            `run ${i + 1}: ${(err as { code?: string }).code ?? ''} ${(err as Error).message}`.trim();
          ctx.say(`  run ${i + 1}/${runs} failed: ${(err as Error).stack ?? err}`);
          break;
        }
      }
      try {
        s.finish?.(ctx);
      } catch {
        /* best effort */
      }
      for (const [key, def] of Object.entries(s.metrics)) {
        const values = perRun.map((v) => v[key]).filter((v): v is number => v !== undefined);
        if (values.length) row.metrics[key] = metricResult(def, stat(values));
      }
      row.ok = !row.error && row.runs === runs && row.verifiedRuns === runs;
      row.seconds = Math.round((performance.now() - t0) / 100) / 10;
      results.push(row);
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (a.keep) process.stderr.write(`bench: kept ${ctx.dir}\n`);
    else ctx.cleanup();
  }
  derive(results, scenarios);

  const report: BenchReport = {
    schema: SCHEMA,
    startedAt,
    options: { runs, quick: a.quick, only },
    machine,
    scenarios: results,
    ok: results.every((r) => r.ok),
    totalSeconds: Math.round((performance.now() - started) / 100) / 10,
  };
  process.stdout.write(
    a.json ? JSON.stringify(report, null, 2) + '\n' : '\n' + renderTable(report, defs),
  );
  return report.ok ? 0 : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().then(
    (code) => (process.exitCode = code),
    (err: unknown) => {
      process.stderr.write(`bench failed: ${(err as Error).stack ?? err}\n`);
      process.exitCode = 2;
    },
  );
}
