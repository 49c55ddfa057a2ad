/**
 * `npm run bench`: the real `yabusame source` and `yabusame dest` on loopback (and over an
 * emulated link between two network namespaces), driven by vm-sim, for the scenarios in
 * scripts/bench/scenarios.ts (demand faults idle and under load, background throughput against a
 * C ceiling, many vCPUs, many VMs, the in-process local floor, the C remote floor). Each row runs
 * several times on fresh daemons; rows that are partners (plan.ts) run interleaved, one run of
 * each in turn, so the ratios between them are taken run by run. The table (or `--json`) gives
 * the median and the range, the machine, and issue 13's targets (targets.ts) measured against
 * their limits. Progress goes to stderr. Exit 1 when any verification fails.
 *
 * The JSON document (`--json`, schema "yabusame-bench/2"):
 *   { schema, startedAt, options: { runs, quick, only, solo }, machine: { cpuModel, cores,
 *     kernel, node, memTotalBytes, hostname }, ok, totalSeconds,
 *     scenarios: [ { name, group, description, verification, runs, verifiedRuns, ok, seconds,
 *       skipped?, interleavedWith?, guestRamBytes?, problems: string[], error?,
 *       metrics: { <key>: { label, unit, median, min, max, values: number[],
 *       pairing?: 'per-run' | 'medians' } } } ],
 *     targets: [ { id, text, value, limit, unit, op, pass, detail } ] }
 * Metric keys: faults, faultP50Us, faultP99Us, faultP999Us, faultMaxUs (latency rows);
 * destCpuSecPerGiB, sourceCpuSecPerGiB, destPeakRssMiB, sourcePeakRssMiB (daemon rows);
 * destCpuUsPerFault, sourceCpuUsPerFault (rows where every touch faults);
 * others per scenario (see scenarios.ts).
 */
import { rmSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { createContext, runCleanups } from './bench/harness.js';
import { machineInfo } from './bench/machine.js';
import {
  SCHEMA,
  metricResult,
  renderTable,
  type BenchReport,
  type ScenarioResult,
} from './bench/report.js';
import { interleave, interleavedSets, ratios, selectRows } from './bench/plan.js';
import {
  GROUPS,
  SCENARIOS,
  SkipScenario,
  type MetricDef,
  type Scenario,
} from './bench/scenarios.js';
import { stat } from './bench/stats.js';
import { evaluateTargets } from './bench/targets.js';

const USAGE = `Usage: npm run bench -- [options]

Runs the real daemons on loopback (images in /dev/shm, deleted afterwards) and prints a table,
then issue 13's targets against what was measured.

  --runs N       runs per scenario (default 3); the median and the range are reported
  --only A,B     scenarios: ${GROUPS.join(', ')}
                 (or a single row, e.g. background/c-reference, link/rtt100); a row's
                 partners (run interleaved with it) and the rows its ratios need come along
  --solo         only the rows --only names, without partners (ratios across rows only
                 where both ran)
  --quick        small sizes (the whole bench in a few minutes)
  --json         print one JSON document instead of the table
  --keep         keep the working folder (daemon logs)
  -q, --quiet    no progress on stderr
  -h, --help
`;

function summaryLine(s: Scenario, values: Record<string, number>): string {
  return Object.entries(values)
    .slice(0, 4)
    .map(([k, v]) => {
      const d = s.metrics[k];
      return `${d?.label ?? k} ${v.toFixed(d?.digits ?? 2)}${d?.unit ? ` ${d.unit}` : ''}`;
    })
    .join(', ');
}

/**
 * Fills derived metrics (ratios against another row) where both rows ran: run by run when the
 * two ran interleaved (`setOf` gives the same set), else against the other row's median.
 */
function derive(
  results: ScenarioResult[],
  scenarios: Scenario[],
  perRun: ReadonlyMap<string, Array<Record<string, number> | undefined>>,
  setOf: ReadonlyMap<string, number>,
): void {
  for (const s of scenarios) {
    const row = results.find((r) => r.name === s.name);
    if (!row || row.skipped) continue;
    const ordered: ScenarioResult['metrics'] = {};
    for (const [key, def] of Object.entries(s.metrics)) {
      if (!def.derived) {
        if (row.metrics[key]) ordered[key] = row.metrics[key];
        continue;
      }
      const [otherName, otherKey, mine, dir] = def.derived;
      const theirs = perRun.get(otherName);
      const own = perRun.get(s.name);
      if (!theirs || !own) continue;
      const pairing = setOf.get(otherName) === setOf.get(s.name) ? 'per-run' : 'medians';
      const values = ratios(
        own.map((v) => v?.[mine]),
        theirs.map((v) => v?.[otherKey]),
        dir,
        pairing,
      );
      if (values.length) ordered[key] = metricResult(def, stat(values), pairing);
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
      solo: { type: 'boolean', default: false },
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
  const scenarios = selectRows(SCENARIOS, only, a.solo);
  const sets = interleavedSets(scenarios);
  const setOf = new Map<string, number>();
  sets.forEach((set, i) => set.forEach((s) => setOf.set(s.name, i)));

  const started = performance.now();
  const startedAt = new Date().toISOString();
  const ctx = createContext({ quick: a.quick, verbose: !a.quiet });
  const onSignal = (sig: NodeJS.Signals): void => {
    process.stderr.write(`bench: ${sig}, cleaning up\n`);
    runCleanups();
    if (!a.keep) rmSync(ctx.dir, { recursive: true, force: true });
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  const machine = machineInfo();
  const rows = new Map<string, ScenarioResult>();
  const perRun = new Map<string, Array<Record<string, number> | undefined>>();
  const defs = new Map<string, MetricDef>();
  try {
    ctx.say(
      `yabusame bench: ${scenarios.length} rows × ${runs} runs${a.quick ? ' (quick)' : ''}` +
        `${sets.length < scenarios.length ? ', partners interleaved' : ''}; ` +
        `working folder ${ctx.dir}`,
    );
    for (const set of sets) {
      const partners = set.map((s) => s.name);
      for (const s of set) {
        for (const [k, d] of Object.entries(s.metrics)) defs.set(`${s.name}:${k}`, d);
        const description = s.describe(ctx);
        rows.set(s.name, {
          name: s.name,
          group: s.group,
          description,
          verification: s.verification,
          runs: 0,
          verifiedRuns: 0,
          ok: false,
          ...(set.length > 1 ? { interleavedWith: partners.filter((n) => n !== s.name) } : {}),
          ...(s.guestRamBytes ? { guestRamBytes: s.guestRamBytes(ctx) } : {}),
          metrics: {},
          problems: [],
          seconds: 0,
        });
        perRun.set(s.name, []);
        ctx.say(`[${s.name}] ${description}`);
      }
      for (const [s, i] of interleave(set, runs)) {
        const row = rows.get(s.name)!;
        if (row.error || row.skipped) continue;
        const t0 = performance.now();
        try {
          const out = await s.runOnce(ctx, i);
          row.runs++;
          if (out.verified) row.verifiedRuns++;
          row.problems.push(...out.problems.map((p) => `run ${i + 1}: ${p}`));
          perRun.get(s.name)![i] = out.values;
          ctx.say(
            `  [${s.name}] run ${i + 1}/${runs}: ${summaryLine(s, out.values)}` +
              (out.verified ? '' : ' — VERIFICATION FAILED'),
          );
        } catch (err) {
          if (err instanceof SkipScenario) {
            row.skipped = err.message;
            ctx.say(`  [${s.name}] skipped: ${err.message}`);
          } else {
            row.error =
              `run ${i + 1}: ${(err as { code?: string }).code ?? ''} ${(err as Error).message}`.trim();
            ctx.say(`  [${s.name}] run ${i + 1}/${runs} failed: ${(err as Error).stack ?? err}`);
          }
        }
        row.seconds += (performance.now() - t0) / 1000;
      }
      for (const s of set) {
        try {
          s.finish?.(ctx);
        } catch {
          /* best effort */
        }
        const row = rows.get(s.name)!;
        for (const [key, def] of Object.entries(s.metrics)) {
          const values = perRun
            .get(s.name)!
            .map((v) => v?.[key])
            .filter((v): v is number => v !== undefined);
          if (values.length) row.metrics[key] = metricResult(def, stat(values));
        }
        row.ok = !!row.skipped || (!row.error && row.runs === runs && row.verifiedRuns === runs);
        row.seconds = Math.round(row.seconds * 10) / 10;
      }
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (a.keep) process.stderr.write(`bench: kept ${ctx.dir}\n`);
    else ctx.cleanup();
  }
  const results = scenarios.map((s) => rows.get(s.name)!);
  derive(results, scenarios, perRun, setOf);

  const report: BenchReport = {
    schema: SCHEMA,
    startedAt,
    options: { runs, quick: a.quick, only, solo: a.solo },
    machine,
    scenarios: results,
    targets: evaluateTargets(results),
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
