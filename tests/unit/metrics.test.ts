import t from 'tap';
import { spawnSync } from 'node:child_process';
import {
  MAX_CODE_LABEL_VALUES,
  SERVICE_SECONDS_BUCKETS,
  createDestMetrics,
  createMetricsRegistry,
  createSourceMetrics,
  metricsText,
} from '../../daemon/ops/metrics.js';

interface Family {
  help?: string;
  type?: string;
}
interface Exposition {
  families: Map<string, Family>;
  /** `name{labels}` exactly as exposed → value. */
  samples: Map<string, number>;
}

const SAMPLE_RE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)(?:\s+-?\d+)?$/;

/** A strict reader of the text exposition format 0.0.4: throws on any line it does not know. */
function parseExposition(text: string): Exposition {
  const families = new Map<string, Family>();
  const samples = new Map<string, number>();
  const family = (name: string): Family => {
    let f = families.get(name);
    if (!f) families.set(name, (f = {}));
    return f;
  };
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const meta = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line);
    if (meta) {
      const f = family(meta[2]!);
      if (meta[1] === 'HELP') f.help = meta[3]!;
      else f.type = meta[3]!;
      continue;
    }
    const m = SAMPLE_RE.exec(line);
    if (!m) throw new Error(`not an exposition line: ${JSON.stringify(line)}`);
    const raw = m[3]!;
    const value = raw === '+Inf' ? Infinity : raw === '-Inf' ? -Infinity : Number(raw);
    // Prometheus reads values with Go's ParseFloat, where NaN is case-insensitive; prom-client
    // writes `Nan` for an event-loop-lag gauge not sampled yet.
    if (Number.isNaN(value) && !/^nan$/i.test(raw)) throw new Error(`bad value in ${line}`);
    samples.set(`${m[1]}${m[2] ?? ''}`, value);
  }
  return { families, samples };
}

const hasPromtool = !spawnSync('promtool', ['--version']).error;

t.test('buckets span 10 µs to 1 s, increasing', async (t) => {
  t.equal(SERVICE_SECONDS_BUCKETS[0], 0.00001);
  t.equal(SERVICE_SECONDS_BUCKETS.at(-1), 1);
  t.ok(SERVICE_SECONDS_BUCKETS.every((b, i) => i === 0 || b > SERVICE_SECONDS_BUCKETS[i - 1]!));
});

t.test('dest metrics: every port method shows up in the exposition', async (t) => {
  const registry = createMetricsRegistry();
  const m = createDestMetrics(registry);
  m.fault();
  m.fault();
  m.faultServiceSeconds(0.00004); // falls in the 50 µs bucket
  m.faultServiceSeconds(2); // past the last bucket: only +Inf
  m.pagesPlaced('demand', 'data', 3);
  m.pagesPlaced('background', 'zero', 512);
  m.bytesReceived('background', 1 << 20);
  m.placeExists();
  m.placeRetry();
  m.handoff('ok');
  m.handoff('HANDOFF_INVALID');
  m.sessionEnded('complete');
  m.sessionsActive(5);
  m.sessionsActive(4);
  m.error('SOURCE_GONE');
  m.reconnect('demand');

  const { contentType, body } = await metricsText(registry);
  t.match(contentType, /^text\/plain; version=0\.0\.4/);
  const { families, samples } = parseExposition(body);
  const s = (k: string): number | undefined => samples.get(k);
  t.equal(s('yabusame_dest_faults_total'), 2);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="0.000025"}'), 0);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="0.00005"}'), 1);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="1"}'), 1);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="+Inf"}'), 2);
  t.equal(s('yabusame_dest_fault_service_seconds_count'), 2);
  t.equal(s('yabusame_dest_pages_placed_total{path="demand",kind="data"}'), 3);
  t.equal(s('yabusame_dest_pages_placed_total{path="background",kind="zero"}'), 512);
  t.equal(s('yabusame_dest_pages_placed_total{path="demand",kind="zero"}'), 0, 'pre-created');
  t.equal(s('yabusame_dest_received_bytes_total{channel="background"}'), 1 << 20);
  t.equal(s('yabusame_dest_received_bytes_total{channel="demand"}'), 0);
  t.equal(s('yabusame_dest_place_exists_total'), 1);
  t.equal(s('yabusame_dest_place_retries_total'), 1);
  t.equal(s('yabusame_dest_handoffs_total{result="ok"}'), 1);
  t.equal(s('yabusame_dest_handoffs_total{result="HANDOFF_INVALID"}'), 1);
  t.equal(s('yabusame_dest_sessions_ended_total{result="complete"}'), 1);
  t.equal(s('yabusame_dest_sessions_active'), 4);
  t.equal(s('yabusame_dest_errors_total{code="SOURCE_GONE"}'), 1);
  t.equal(s('yabusame_dest_reconnects_total{channel="demand"}'), 1);
  t.equal(s('yabusame_dest_reconnects_total{channel="background"}'), 0, 'pre-created');

  const ours = [...families].filter(([name]) => name.startsWith('yabusame_'));
  t.equal(ours.length, 11, 'one family per DestMetrics method');
  for (const [name, f] of ours) {
    t.ok(f.help, `${name} has HELP`);
    if (f.type === 'counter') t.match(name, /_total$/, `${name}: counters end in _total`);
    t.ok(name.startsWith('yabusame_dest_'), `${name} prefixed`);
  }
  t.equal(families.get('process_cpu_seconds_total')?.type, 'counter', 'process default metrics');
  t.ok(families.has('nodejs_eventloop_lag_seconds'), 'node default metrics');
});

t.test('source metrics: every port method shows up in the exposition', async (t) => {
  const registry = createMetricsRegistry();
  const m = createSourceMetrics(registry);
  m.pagesSent('demand', 'data', 1);
  m.pagesSent('background', 'zero', 100);
  m.bytesSent('demand', 4104);
  m.demandServiceSeconds(0.0003);
  m.connectionOpened('demand');
  m.connectionOpened('background');
  m.error('FRAME_BAD_VALUE');
  m.migrationEvent('frozen');

  const { samples, families } = parseExposition((await metricsText(registry)).body);
  const s = (k: string): number | undefined => samples.get(k);
  t.equal(s('yabusame_source_pages_sent_total{path="demand",kind="data"}'), 1);
  t.equal(s('yabusame_source_pages_sent_total{path="background",kind="zero"}'), 100);
  t.equal(s('yabusame_source_sent_bytes_total{channel="demand"}'), 4104);
  t.equal(s('yabusame_source_demand_service_seconds_bucket{le="0.00025"}'), 0);
  t.equal(s('yabusame_source_demand_service_seconds_bucket{le="0.0005"}'), 1);
  t.equal(s('yabusame_source_connections_opened_total{channel="background"}'), 1);
  t.equal(s('yabusame_source_errors_total{code="FRAME_BAD_VALUE"}'), 1);
  t.equal(s('yabusame_source_migration_events_total{event="frozen"}'), 1);
  t.equal(s('yabusame_source_migration_events_total{event="complete"}'), 0, 'pre-created');
  const ours = [...families.keys()].filter((n) => n.startsWith('yabusame_'));
  t.equal(ours.length, 6, 'one family per SourceMetrics method');
  t.ok(ours.every((n) => n.startsWith('yabusame_source_')));
});

t.test('free-form code labels stay bounded', async (t) => {
  const registry = createMetricsRegistry();
  const m = createDestMetrics(registry);
  for (let i = 0; i < 3 * MAX_CODE_LABEL_VALUES; i++) m.error(`CODE_${i}`);
  m.error('has spaces and "quotes"');
  m.handoff('x'.repeat(1000));
  const { samples } = parseExposition((await metricsText(registry)).body);
  const codes = [...samples.keys()].filter((k) => k.startsWith('yabusame_dest_errors_total{'));
  t.equal(codes.length, MAX_CODE_LABEL_VALUES + 1, 'the first N codes, then "other"');
  t.equal(samples.get('yabusame_dest_errors_total{code="other"}'), 2 * MAX_CODE_LABEL_VALUES + 1);
  t.equal(samples.get('yabusame_dest_handoffs_total{result="other"}'), 1);
});

t.test('registries are independent (no global registry)', async (t) => {
  const a = createMetricsRegistry();
  const b = createMetricsRegistry();
  createDestMetrics(a).fault();
  createDestMetrics(b);
  const sa = parseExposition((await metricsText(a)).body).samples;
  const sb = parseExposition((await metricsText(b)).body).samples;
  t.equal(sa.get('yabusame_dest_faults_total'), 1);
  t.equal(sb.get('yabusame_dest_faults_total'), 0);
  t.throws(() => createDestMetrics(a), 'a second factory call on one registry is refused');
});

const noPromtool = 'promtool not installed (Debian: apt-get install prometheus)';
t.test(
  'promtool check metrics accepts the exposition',
  { skip: !hasPromtool && noPromtool },
  async (t) => {
    const registry = createMetricsRegistry();
    const dest = createDestMetrics(registry);
    createSourceMetrics(registry);
    dest.faultServiceSeconds(0.001);
    const { body } = await metricsText(registry);
    const run = spawnSync('promtool', ['check', 'metrics'], { input: body, encoding: 'utf8' });
    const r = { status: run.status, output: `${run.stdout}${run.stderr}` };
    // Exit 1 is a parse error; 3 is lint findings. prom-client's own Node.js gauges
    // (nodejs_active_handles_total, ...) carry a _total suffix that promtool's linter flags:
    // tolerated, but nothing of ours may be flagged.
    t.not(r.status, 1, `promtool parsed the exposition: ${r.output}`);
    const findings = r.output.split('\n').filter((l) => l.trim() !== '');
    const ours = findings.filter((l) => l.includes('yabusame_'));
    t.same(ours, [], 'no promtool findings on yabusame_ metrics');
    const foreign = findings.filter(
      (l) => !/^nodejs_\w+ non-counter metrics should not have "_total" suffix$/.test(l),
    );
    t.same(foreign, [], 'only the known prom-client findings');
  },
);
