// The monitoring files shipped in ops/: the Prometheus alert rules (promtool check rules, and
// promtool test rules with their unit tests) and the Grafana dashboard (valid JSON, every query
// valid PromQL by promtool, every panel on the shared datasource). Both may only name metrics
// the daemons export: each name is looked up in the exposition of real registries.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  createDestMetrics,
  createMetricsRegistry,
  createSourceMetrics,
  metricsText,
} from '../../daemon/ops/metrics.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const RULES = join(ROOT, 'ops', 'prometheus', 'yabusame-rules.yml');
const RULES_TEST = join(ROOT, 'ops', 'prometheus', 'yabusame-rules.test.yml');
const DASHBOARD = join(ROOT, 'ops', 'grafana', 'yabusame-dashboard.json');

const hasPromtool = !spawnSync('promtool', ['--version']).error;
const noPromtool = !hasPromtool && 'promtool not installed (Debian: apt-get install prometheus)';

function promtool(...args: string[]): { status: number | null; out: string } {
  const r = spawnSync('promtool', args, { encoding: 'utf8', cwd: dirname(RULES) });
  return { status: r.status, out: `${r.stdout}${r.stderr}`.trim() };
}

/** Every metric family either daemon exposes, with a histogram's _bucket/_sum/_count series. */
async function exported(): Promise<Set<string>> {
  const names = new Set<string>();
  for (const create of [createDestMetrics, createSourceMetrics]) {
    const registry = createMetricsRegistry({ version: 'test' });
    create(registry);
    for (const m of (await metricsText(registry)).body.matchAll(/^# TYPE (\S+) (\S+)$/gm)) {
      names.add(m[1]!);
      if (m[2] === 'histogram') for (const s of ['_bucket', '_sum', '_count']) names.add(m[1]! + s);
    }
  }
  return names;
}

/** The metric names a PromQL expression reads (ours and the defaults'), quoted strings aside. */
function metricNames(expr: string): string[] {
  const unquoted = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""');
  return [...unquoted.matchAll(/\b(?:yabusame|nodejs|process)_[a-z0-9_]+\b/g)].map((m) => m[0]);
}

interface Panel {
  id: number;
  type: string;
  title: string;
  gridPos: { h: number; w: number; x: number; y: number };
  datasource?: { type: string; uid: string };
  targets?: Array<{ expr: string; refId: string; datasource?: { uid: string } }>;
}
const dashboard = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as {
  uid: string;
  panels: Panel[];
  templating: { list: Array<{ name: string; definition?: string }> };
};
const queries = dashboard.panels.flatMap((p) => (p.targets ?? []).map((q) => ({ p, q })));

/** A dashboard query as Prometheus would get it: Grafana's variables filled in. */
const asPromQL = (expr: string): string =>
  expr
    .replace(/\$__rate_interval/g, '1m')
    .replace(/\$instance/g, '.*')
    .replace(/\$migration/g, '.*');

t.test('alert rules: promtool check rules', { skip: noPromtool }, async (t) => {
  const r = promtool('check', 'rules', RULES);
  t.equal(r.status, 0, r.out);
  t.match(r.out, /SUCCESS: 6 rules found/);
  t.comment(r.out);
});

t.test(
  'alert rules: promtool test rules (which fire, which do not)',
  { skip: noPromtool },
  async (t) => {
    const r = promtool('test', 'rules', RULES_TEST);
    t.equal(r.status, 0, r.out);
    t.match(r.out, /SUCCESS/);
  },
);

t.test('alert rules: the stalled, lost-source and error-rate alerts are there', async (t) => {
  const text = readFileSync(RULES, 'utf8');
  const alerts = [...text.matchAll(/^\s+- alert: (\S+)$/gm)].map((m) => m[1]);
  for (const name of ['YabusameMigrationStalled', 'YabusameSourceLost', 'YabusameDestErrorRate']) {
    t.ok(alerts.includes(name), name);
  }
});

t.test('rules and dashboard name only metrics the daemons export', async (t) => {
  const names = await exported();
  const rules = readFileSync(RULES, 'utf8');
  // Comments aside; the annotations' names count too (they send people to a metric).
  const fromRules = metricNames(rules.replace(/^\s*#.*$/gm, ''));
  t.ok(fromRules.length >= 8, `the rules read ${fromRules.length} metric names`);
  for (const name of new Set(fromRules)) t.ok(names.has(name), `rules: ${name} is exported`);
  const exprs = [
    ...queries.map(({ q }) => q.expr),
    ...dashboard.templating.list.flatMap((v) => (v.definition ? [v.definition] : [])),
  ];
  const fromDashboard = exprs.flatMap(metricNames);
  for (const name of new Set(fromDashboard))
    t.ok(names.has(name), `dashboard: ${name} is exported`);
  // The label_values query names its metrics with a regex; check what it can match.
  for (const n of ['yabusame_dest_migration_pages', 'yabusame_source_migration_pages']) {
    t.ok(names.has(n), `migration variable: ${n}`);
  }
});

t.test('dashboard: panels, datasource, the topics it must show', async (t) => {
  t.equal(dashboard.uid, 'yabusame');
  const ids = dashboard.panels.map((p) => p.id);
  t.equal(new Set(ids).size, ids.length, 'panel ids are unique');
  for (const p of dashboard.panels) {
    t.ok(p.gridPos.x + p.gridPos.w <= 24, `${p.title}: within the grid`);
    if (p.type === 'row') continue;
    t.same(p.datasource, { type: 'prometheus', uid: '${datasource}' }, `${p.title}: datasource`);
    t.ok((p.targets ?? []).length > 0, `${p.title}: has queries`);
  }
  const all = queries.map(({ q }) => q.expr).join('\n');
  t.match(
    all,
    /yabusame_dest_migration_present_pages\{[^}]*\} \/ yabusame_dest_migration_pages/,
    'per-migration progress',
  );
  t.match(all, /yabusame_dest_fault_service_seconds_bucket/, 'fault latency');
  t.ok(
    dashboard.panels.some((p) => p.type === 'heatmap'),
    'a heatmap',
  );
  t.match(all, /histogram_quantile\(0\.99,/, 'quantiles');
  t.match(all, /yabusame_dest_reconnects_total/, 'reconnects');
  t.match(all, /yabusame_dest_errors_total/, 'errors');
  t.match(all, /yabusame_dest_migration_link_up/, 'link state');
});

t.test('dashboard: every query is valid PromQL (promtool)', { skip: noPromtool }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-dashboard-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // One recording rule per query: promtool check rules parses each expression.
  const rules = queries.map(
    ({ p, q }) =>
      `      - record: dashboard:panel_${p.id}_${q.refId.toLowerCase()}\n        expr: ${JSON.stringify(asPromQL(q.expr))}`,
  );
  const path = join(dir, 'dashboard-queries.yml');
  writeFileSync(path, `groups:\n  - name: dashboard\n    rules:\n${rules.join('\n')}\n`);
  const r = promtool('check', 'rules', path);
  t.equal(r.status, 0, r.out);
  t.match(r.out, new RegExp(`SUCCESS: ${queries.length} rules found`));
});
