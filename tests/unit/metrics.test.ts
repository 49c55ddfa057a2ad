import t from 'tap';
import { spawnSync } from 'node:child_process';
import {
  DROPPED_DEFAULT_METRICS,
  MAX_CODE_LABEL_VALUES,
  SERVICE_SECONDS_BUCKETS,
  createDestMetrics,
  createMetricsRegistry as createRegistry,
  createSourceMetrics,
  metricsText,
} from '../../daemon/ops/metrics.js';
import type { DestMigrationSample, SourceMigrationSample } from '../../daemon/ops/metric-ports.js';

const createMetricsRegistry = () => createRegistry({ version: '9.8.7-test' });
import { FAULT_STAGES } from '../../daemon/ops/metric-ports.js';

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

t.test(
  'buckets span 10 µs to 5 min, increasing, with 2 min (a wait through a reconnect)',
  async (t) => {
    t.equal(SERVICE_SECONDS_BUCKETS[0], 0.00001);
    t.equal(SERVICE_SECONDS_BUCKETS.at(-1), 300);
    t.ok(SERVICE_SECONDS_BUCKETS.includes(120));
    t.ok(SERVICE_SECONDS_BUCKETS.every((b, i) => i === 0 || b > SERVICE_SECONDS_BUCKETS[i - 1]!));
  },
);

t.test('fault path metrics: bounds, non-finite values, and scrapes that follow', async (t) => {
  const registry = createMetricsRegistry();
  const m = createDestMetrics(registry);
  const scrape = async (): Promise<Map<string, number>> =>
    parseExposition((await metricsText(registry)).body).samples;
  m.faultServiceSeconds(0.0001); // exactly on a bound: that bucket, not the next
  m.faultServiceSeconds(Number.NaN); // not a time: not counted, and no throw on the fault path
  m.faultServiceSeconds(Number.POSITIVE_INFINITY);
  m.pagesPlaced('background', 'data', 7);
  let s = await scrape();
  t.equal(s.get('yabusame_dest_fault_service_seconds_bucket{le="0.00005"}'), 0);
  t.equal(s.get('yabusame_dest_fault_service_seconds_bucket{le="0.0001"}'), 1);
  t.equal(s.get('yabusame_dest_fault_service_seconds_count'), 1);
  t.equal(s.get('yabusame_dest_fault_service_seconds_sum'), 0.0001);
  t.equal(s.get('yabusame_dest_pages_placed_total{path="background",kind="data"}'), 7);
  // What comes after a scrape adds to what it showed; a scrape with nothing new repeats it.
  m.faultServiceSeconds(0.003);
  m.pagesPlaced('background', 'data', 5);
  await scrape();
  s = await scrape();
  t.equal(s.get('yabusame_dest_fault_service_seconds_bucket{le="0.0025"}'), 1);
  t.equal(s.get('yabusame_dest_fault_service_seconds_bucket{le="0.005"}'), 2);
  t.equal(s.get('yabusame_dest_fault_service_seconds_count'), 2);
  t.equal(s.get('yabusame_dest_pages_placed_total{path="background",kind="data"}'), 12);
});

t.test('dest metrics: every port method shows up in the exposition', async (t) => {
  const registry = createMetricsRegistry();
  const m = createDestMetrics(registry);
  m.fault();
  m.fault();
  m.faultServiceSeconds(0.00004); // falls in the 50 µs bucket
  m.faultServiceSeconds(2); // past 1 s: the 2.5 s bucket
  m.faultServiceSeconds(121); // a 2-minute stall behind a reconnect: the 5-minute bucket
  m.faultServiceSeconds(301); // past the last bucket: only +Inf
  m.faultStage('wire', 0.000012); // the 15 µs bucket
  m.faultStage('source_read', 0.000002);
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
  m.vmUnserved('SOURCE_UNREACHABLE', true);

  const { contentType, body } = await metricsText(registry);
  t.match(contentType, /^text\/plain; version=0\.0\.4/);
  const { families, samples } = parseExposition(body);
  const s = (k: string): number | undefined => samples.get(k);
  t.equal(s('yabusame_dest_faults_total'), 2);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="0.000025"}'), 0);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="0.00005"}'), 1);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="1"}'), 1);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="2.5"}'), 2);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="120"}'), 2);
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="300"}'), 3, 'not only in +Inf');
  t.equal(s('yabusame_dest_fault_service_seconds_bucket{le="+Inf"}'), 4);
  t.equal(s('yabusame_dest_fault_service_seconds_count'), 4);
  t.equal(s('yabusame_dest_fault_stage_seconds_bucket{le="0.00001",stage="wire"}'), 0);
  t.equal(s('yabusame_dest_fault_stage_seconds_bucket{le="0.000015",stage="wire"}'), 1);
  t.equal(s('yabusame_dest_fault_stage_seconds_count{stage="source_read"}'), 1);
  for (const stage of FAULT_STAGES) {
    t.ok(s(`yabusame_dest_fault_stage_seconds_count{stage="${stage}"}`) !== undefined, stage);
  }
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
  t.equal(s('yabusame_dest_vms_unserved_total{code="SOURCE_UNREACHABLE",action="killed"}'), 1);

  const ours = [...families].filter(([name]) => name.startsWith('yabusame_dest_'));
  // One per DestMetrics method, 7 per-migration families and migrations_untracked.
  t.equal(ours.length, 13 + 7 + 1, 'the families of the dest');
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
  const ours = [...families.keys()].filter((n) => n.startsWith('yabusame_source_'));
  // One per SourceMetrics method, 6 per-migration families and migrations_untracked.
  t.equal(ours.length, 6 + 6 + 1, 'the families of the source');
  t.same(
    [...families.keys()].filter((n) => n.startsWith('yabusame_') && !ours.includes(n)),
    ['yabusame_build_info'],
    'and build_info',
  );
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

t.test('build_info carries the version and the Node.js version', async (t) => {
  const { samples, families } = parseExposition((await metricsText(createMetricsRegistry())).body);
  t.equal(families.get('yabusame_build_info')?.type, 'gauge');
  t.equal(samples.get(`yabusame_build_info{version="9.8.7-test",node="${process.version}"}`), 1);
});

t.test('default gauges named like counters are dropped, their by-type twins kept', async (t) => {
  const { families } = parseExposition((await metricsText(createMetricsRegistry())).body);
  for (const name of DROPPED_DEFAULT_METRICS) {
    t.notOk(families.has(name), `${name} dropped`);
    t.equal(families.get(name.replace(/_total$/, ''))?.type, 'gauge', 'the twin stays');
  }
});

function destSample(over: Partial<DestMigrationSample> = {}): DestMigrationSample {
  return {
    totalPages: 1000,
    presentPages: 250,
    faultsWaiting: 3,
    receivedBytes: 1 << 20,
    reconnects: 1,
    links: { demand: true, background: false },
    startedAtMs: 1_700_000_000_000,
    ...over,
  };
}

t.test('dest per-migration series: sampled at each scrape, removed when untracked', async (t) => {
  const registry = createMetricsRegistry();
  const m = createDestMetrics(registry);
  let present = 250;
  const untrackA = m.trackMigration('vm-a', () => destSample({ presentPages: present }));
  const untrackB = m.trackMigration('vm-b', () =>
    destSample({ totalPages: 8, presentPages: 8, links: { demand: true } }),
  );
  let s = parseExposition((await metricsText(registry)).body).samples;
  t.equal(s.get('yabusame_dest_migration_pages{migration="vm-a"}'), 1000);
  t.equal(s.get('yabusame_dest_migration_present_pages{migration="vm-a"}'), 250);
  t.equal(s.get('yabusame_dest_migration_faults_waiting{migration="vm-a"}'), 3);
  t.equal(s.get('yabusame_dest_migration_received_bytes_total{migration="vm-a"}'), 1 << 20);
  t.equal(s.get('yabusame_dest_migration_reconnects_total{migration="vm-a"}'), 1);
  t.equal(s.get('yabusame_dest_migration_start_time_seconds{migration="vm-a"}'), 1_700_000_000);
  t.equal(s.get('yabusame_dest_migration_link_up{migration="vm-a",channel="demand"}'), 1);
  t.equal(s.get('yabusame_dest_migration_link_up{migration="vm-a",channel="background"}'), 0);
  t.equal(s.get('yabusame_dest_migration_pages{migration="vm-b"}'), 8);
  t.notOk(
    s.has('yabusame_dest_migration_link_up{migration="vm-b",channel="background"}'),
    'a channel closed on purpose has no link_up series',
  );
  t.equal(s.get('yabusame_dest_migrations_untracked'), 0);

  present = 600;
  s = parseExposition((await metricsText(registry)).body).samples;
  t.equal(s.get('yabusame_dest_migration_present_pages{migration="vm-a"}'), 600, 'sampled again');

  untrackA();
  untrackA(); // idempotent
  s = parseExposition((await metricsText(registry)).body).samples;
  const left = [...s.keys()].filter((k) => k.includes('migration="vm-a"'));
  t.same(left, [], 'every series of an ended migration is gone');
  t.equal(s.get('yabusame_dest_migration_pages{migration="vm-b"}'), 8, 'the other stays');
  untrackB();
  s = parseExposition((await metricsText(registry)).body).samples;
  t.same(
    [...s.keys()].filter((k) => k.includes('migration=')),
    [],
    'no per-migration series once none runs',
  );
});

t.test('per-migration series are capped; the next migration takes a freed place', async (t) => {
  const registry = createMetricsRegistry();
  const m = createDestMetrics(registry, { maxMigrationSeries: 2 });
  const untrack = ['m1', 'm2', 'm3'].map((id) => m.trackMigration(id, () => destSample()));
  const ids = async (): Promise<string[]> => {
    const s = parseExposition((await metricsText(registry)).body).samples;
    return [...s.keys()]
      .filter((k) => k.startsWith('yabusame_dest_migration_pages{'))
      .map((k) => /migration="([^"]+)"/.exec(k)![1]!)
      .sort();
  };
  t.same(await ids(), ['m1', 'm2'], 'the first two tracked');
  let s = parseExposition((await metricsText(registry)).body).samples;
  t.equal(s.get('yabusame_dest_migrations_untracked'), 1, 'the third is counted');
  untrack[0]!();
  t.same(await ids(), ['m2', 'm3'], 'the third gets the freed place');
  s = parseExposition((await metricsText(registry)).body).samples;
  t.equal(s.get('yabusame_dest_migrations_untracked'), 0);
  // A later session of the same id takes its series over; the old one's untrack is then a no-op.
  const again = m.trackMigration('m2', () => destSample({ presentPages: 999 }));
  untrack[1]!();
  s = parseExposition((await metricsText(registry)).body).samples;
  t.equal(s.get('yabusame_dest_migration_present_pages{migration="m2"}'), 999);
  again();
});

t.test('source per-migration series', async (t) => {
  const registry = createMetricsRegistry();
  const m = createSourceMetrics(registry);
  const sample: SourceMigrationSample = {
    state: 'frozen',
    totalPages: 4096,
    sentPages: 100,
    pagesSent: 120,
    connections: { demand: true, background: false },
    heldRequests: 0,
  };
  const untrack = m.trackMigration('vm42', () => sample);
  let s = parseExposition((await metricsText(registry)).body).samples;
  t.equal(s.get('yabusame_source_migration_pages{migration="vm42"}'), 4096);
  t.equal(s.get('yabusame_source_migration_sent_pages{migration="vm42"}'), 100);
  t.equal(s.get('yabusame_source_migration_pages_sent_total{migration="vm42"}'), 120);
  t.equal(s.get('yabusame_source_migration_connected{migration="vm42",channel="demand"}'), 1);
  t.equal(s.get('yabusame_source_migration_connected{migration="vm42",channel="background"}'), 0);
  t.equal(s.get('yabusame_source_migration_state{migration="vm42",state="frozen"}'), 1);
  t.equal(s.get('yabusame_source_migration_state{migration="vm42",state="registered"}'), 0);
  t.equal(s.get('yabusame_source_migration_held_requests{migration="vm42"}'), 0);
  untrack();
  s = parseExposition((await metricsText(registry)).body).samples;
  t.same(
    [...s.keys()].filter((k) => k.includes('migration=')),
    [],
    'gone once complete or aborted',
  );
});

const noPromtool = 'promtool not installed (Debian: apt-get install prometheus)';
t.test(
  'promtool check metrics: the whole exposition of each daemon, clean',
  { skip: !hasPromtool && noPromtool },
  async (t) => {
    for (const daemon of ['dest', 'source'] as const) {
      const registry = createMetricsRegistry();
      if (daemon === 'dest') {
        const dest = createDestMetrics(registry);
        dest.faultServiceSeconds(0.001);
        dest.trackMigration('vm-1', () => destSample());
      } else {
        createSourceMetrics(registry).trackMigration('vm-1', () => ({
          state: 'registered',
          totalPages: 1,
          sentPages: 0,
          pagesSent: 0,
          connections: { demand: false, background: false },
          heldRequests: 0,
        }));
      }
      const { body } = await metricsText(registry);
      t.match(body, /migration="vm-1"/, `${daemon}: with per-migration series`);
      const run = spawnSync('promtool', ['check', 'metrics'], { input: body, encoding: 'utf8' });
      // Exit 1 is a parse error, 3 lint findings; 0 and no output is clean.
      t.equal(run.status, 0, `${daemon}: promtool exit status`);
      t.equal(`${run.stdout}${run.stderr}`, '', `${daemon}: no findings`);
    }
  },
);
