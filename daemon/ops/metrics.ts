/**
 * Prometheus metrics: the only module that imports prom-client. The cores see only the narrow
 * ports in metric-ports.ts; this file implements them, one registry per daemon (no global
 * registry, so tests and several daemons in one process never collide).
 *
 * Naming follows https://prometheus.io/docs/practices/naming/: a `yabusame_dest_` or
 * `yabusame_source_` prefix, base units in the name (`_seconds`, `_bytes`), `_total` on counters
 * only (`promtool check metrics` is clean on the whole exposition). Labels come from bounded
 * sets: the PagePath/PageKind/ChannelName unions, result or error codes (stable strings, capped
 * anyway by boundedLabel(), so a bug that puts an address or an id in a code cannot grow the
 * series count without limit), and the migration id of the per-migration series, which exist
 * only while their migration runs and for at most `maxMigrationSeries` migrations at once.
 */
import {
  Counter,
  Gauge,
  Histogram,
  Registry,
  collectDefaultMetrics,
  type CounterConfiguration,
} from 'prom-client';
import {
  FAULT_STAGES,
  type ChannelName,
  type DestMetrics,
  type DestMigrationSample,
  type FaultStage,
  type PageKind,
  type PagePath,
  type SourceMetrics,
  type SourceMigrationSample,
} from './metric-ports.js';

/**
 * Buckets for page service times, in seconds: 10 µs to 5 min. The measured floor is about
 * 35-90 µs per fault on loopback (the design notes), a LAN round trip adds 50-500 µs, and
 * anything past 100 ms is a stall a guest feels. Past 1 s the buckets follow reconnects: a
 * fault waits through a lost source for up to reconnectTimeoutMs (default 2 min), so 2 and
 * 5 minutes are buckets of their own and only a wait beyond any reconnect lands in +Inf.
 */
export const SERVICE_SECONDS_BUCKETS: readonly number[] = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
  0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
];

/**
 * Migrations with per-migration series at once (the dest's default maxSessions). Beyond it a
 * migration has none until an earlier one ends; `_migrations_untracked` counts those waiting.
 */
export const DEFAULT_MAX_MIGRATION_SERIES = 64;

/**
 * prom-client's default gauges whose names end in `_total`, which the naming rules reserve for
 * counters (promtool: 'non-counter metrics should not have "_total" suffix'). Dropped: the same
 * numbers by type are in nodejs_active_handles, nodejs_active_requests, nodejs_active_resources.
 */
export const DROPPED_DEFAULT_METRICS: readonly string[] = [
  'nodejs_active_handles_total',
  'nodejs_active_requests_total',
  'nodejs_active_resources_total',
];

/**
 * Buckets for the stages of a demand fault, in seconds: 1 µs to 1 s, finer than the service
 * buckets below 1 ms, where the stages of a fault on a LAN lie (a checksum takes a microsecond,
 * a loopback round trip tens).
 */
export const STAGE_SECONDS_BUCKETS: readonly number[] = [
  0.000001, 0.0000025, 0.000005, 0.0000075, 0.00001, 0.000015, 0.00002, 0.00003, 0.00004, 0.00005,
  0.000075, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.1, 1,
];

/** One line of a histogram's exposition (a bucket, its sum or its count). */
interface HistogramValue {
  metricName: string;
  labels: Readonly<Record<string, string | number>>;
  value: number;
}

/**
 * A histogram kept in typed arrays, one row of bucket counts per series, and exported in
 * prom-client's histogram format at each scrape (registered in the registry like its own
 * metrics). On the fault path an observation is a bucket search and two adds, where
 * prom-client's observe checks and hashes its labels each time (about 0.7 µs; a dest fault
 * makes seven observations). A scrape sees every observation made before it.
 */
class LocalHistogram {
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  /** Per series: a count per bucket (not cumulative), the last one above every bound. */
  private readonly counts: Float64Array;
  private readonly sums: Float64Array;

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly bounds: readonly number[],
    /** The label set of each series (a single `{}` for a histogram without labels). */
    private readonly series: ReadonlyArray<Readonly<Record<string, string>>>,
    registry: Registry,
  ) {
    this.counts = new Float64Array(series.length * (bounds.length + 1));
    this.sums = new Float64Array(series.length);
    // The registry asks a metric for name, get() and reset() only; not a prom-client class.
    registry.registerMetric(this as unknown as Histogram);
  }

  observe(series: number, value: number): void {
    if (!Number.isFinite(value)) return;
    const b = this.bounds;
    let lo = 0;
    let hi = b.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (value <= b[mid]!) hi = mid;
      else lo = mid + 1;
    }
    this.counts[series * (b.length + 1) + lo]! += 1;
    this.sums[series]! += value;
  }

  /** The series in prom-client's shape: cumulative buckets, +Inf, _sum and _count. */
  get(): Promise<{
    name: string;
    help: string;
    type: 'histogram';
    aggregator: 'sum';
    values: HistogramValue[];
  }> {
    const values: HistogramValue[] = [];
    const n = this.bounds.length + 1;
    this.series.forEach((labels, s) => {
      let cumulative = 0;
      for (let i = 0; i < n; i++) {
        cumulative += this.counts[s * n + i]!;
        values.push({
          metricName: `${this.name}_bucket`,
          labels: { le: i < n - 1 ? this.bounds[i]! : '+Inf', ...labels },
          value: cumulative,
        });
      }
      values.push({ metricName: `${this.name}_sum`, labels, value: this.sums[s]! });
      values.push({ metricName: `${this.name}_count`, labels, value: cumulative });
    });
    return Promise.resolve({
      name: this.name,
      help: this.help,
      type: this.type,
      aggregator: this.aggregator,
      values,
    });
  }

  reset(): void {
    this.counts.fill(0);
    this.sums.fill(0);
  }
}

/**
 * A prom-client counter whose increments on the hot paths are summed in a typed array, one
 * slot per series, and handed to prom-client at each scrape (its collect): an increment is one
 * add instead of a label check and hash. Every series is exported from the start, at 0.
 */
function talliedCounter<L extends string>(
  config: CounterConfiguration<L>,
  series: ReadonlyArray<Partial<Record<L, string>>>,
): (slot: number, by: number) => void {
  const pending = new Float64Array(series.length);
  const counter: Counter<L> = new Counter<L>({
    ...config,
    collect: () => {
      for (let i = 0; i < series.length; i++) {
        if (pending[i] === 0) continue;
        counter.inc(series[i]!, pending[i]!);
        pending[i] = 0;
      }
    },
  });
  for (const labels of series) counter.inc(labels, 0);
  return (slot, by) => {
    pending[slot]! += by;
  };
}

const PATHS: readonly PagePath[] = ['demand', 'background'];
const KINDS: readonly PageKind[] = ['data', 'zero'];
const CHANNELS: readonly ChannelName[] = ['demand', 'background'];
/** The series of a counter by path and kind, and of one by channel, with their slots. */
const PATH_KIND_SERIES = PATHS.flatMap((path) => KINDS.map((kind) => ({ path, kind })));
const pathKindSlot = (path: PagePath, kind: PageKind): number =>
  PATHS.indexOf(path) * KINDS.length + KINDS.indexOf(kind);
const CHANNEL_SERIES = CHANNELS.map((channel) => ({ channel }));

/** Distinct values a free-form label (a result or error code) may take before `other`. */
export const MAX_CODE_LABEL_VALUES = 64;
const CODE_RE = /^[A-Za-z0-9_.:-]{1,64}$/;

/** Maps free-form codes into a bounded set: well-formed, at most `max` distinct, else `other`. */
function boundedLabel(max = MAX_CODE_LABEL_VALUES): (value: string) => string {
  const seen = new Set<string>();
  return (value) => {
    if (!CODE_RE.test(value)) return 'other';
    if (seen.has(value)) return value;
    if (seen.size >= max) return 'other';
    seen.add(value);
    return value;
  };
}

/** What `yabusame_build_info` says. */
export interface BuildInfo {
  /** The package's version. */
  version: string;
}

/** Work to do right before each scrape of a registry (sampling the per-migration series). */
const beforeScrape = new WeakMap<Registry, Array<() => void>>();
function onScrape(registry: Registry, refresh: () => void): void {
  const list = beforeScrape.get(registry) ?? [];
  list.push(refresh);
  beforeScrape.set(registry, list);
}

/**
 * A registry with `yabusame_build_info` and the process and Node.js default metrics (cpu,
 * memory, fds, event loop lag), less DROPPED_DEFAULT_METRICS.
 */
export function createMetricsRegistry(build: BuildInfo): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  for (const name of DROPPED_DEFAULT_METRICS) registry.removeSingleMetric(name);
  new Gauge({
    name: 'yabusame_build_info',
    help: 'Always 1; the labels say which yabusame and which Node.js serve this endpoint.',
    labelNames: ['version', 'node'] as const,
    registers: [registry],
  }).set({ version: build.version, node: process.version }, 1);
  return registry;
}

/**
 * The migrations that export per-migration series: each with a sampler read at every scrape.
 * The first `max` tracked (in order) have series; the others wait, counted, until one ends.
 */
class MigrationTracker<S> {
  private readonly samplers = new Map<string, { sample: () => S }>();
  constructor(private readonly max: number) {}

  track(id: string, sample: () => S): () => void {
    const entry = { sample };
    // A later session of the same id (a resumed handoff) takes the series over.
    this.samplers.delete(id);
    this.samplers.set(id, entry);
    return () => {
      if (this.samplers.get(id) === entry) this.samplers.delete(id);
    };
  }

  /** The samples of the migrations with series, and how many more have none. */
  sample(): { samples: Array<[string, S]>; untracked: number } {
    const samples: Array<[string, S]> = [];
    for (const [id, { sample }] of this.samplers) {
      if (samples.length >= this.max) break;
      samples.push([id, sample()]);
    }
    return { samples, untracked: this.samplers.size - samples.length };
  }
}

export interface MigrationSeriesOptions {
  /** Migrations with per-migration series at once (default DEFAULT_MAX_MIGRATION_SERIES). */
  maxMigrationSeries?: number;
}

/** The destination daemon's metrics, registered in `registry`. Call once per registry. */
export function createDestMetrics(
  registry: Registry,
  opts: MigrationSeriesOptions = {},
): DestMetrics {
  const p = 'yabusame_dest_';
  const registers = [registry];
  // What the fault path counts and observes is kept in typed arrays until a scrape.
  const faults = talliedCounter(
    { name: `${p}faults_total`, help: 'userfaultfd page faults read.', registers },
    [{}],
  );
  const faultService = new LocalHistogram(
    `${p}fault_service_seconds`,
    'Time from reading a fault to its page being placed (what the vCPU waits).',
    SERVICE_SECONDS_BUCKETS,
    [{}],
    registry,
  );
  const faultStage = new LocalHistogram(
    `${p}fault_stage_seconds`,
    'Time of each stage of a demand fault answered on the demand channel: request (fault read ' +
      'to REQUEST sent), wire (to the answer received), source_read and source_send (the ' +
      "source's part of wire, from the answer), verify (checksum), place (UFFDIO_COPY, which " +
      'wakes the vCPU).',
    STAGE_SECONDS_BUCKETS,
    FAULT_STAGES.map((stage) => ({ stage })),
    registry,
  );
  const stageSlot = Object.fromEntries(FAULT_STAGES.map((s, i) => [s, i])) as Record<
    FaultStage,
    number
  >;
  const pagesPlaced = talliedCounter(
    {
      name: `${p}pages_placed_total`,
      help: 'Pages settled in guest memory, by path (demand, background) and kind (data, zero; zero pages nobody awaited are left for the kernel to fill).',
      labelNames: ['path', 'kind'] as const,
      registers,
    },
    PATH_KIND_SERIES,
  );
  const bytesReceived = talliedCounter(
    {
      name: `${p}received_bytes_total`,
      help: 'Frame bytes received from the source, by channel.',
      labelNames: ['channel'] as const,
      registers,
    },
    CHANNEL_SERIES,
  );
  const placeExists = new Counter({
    name: `${p}place_exists_total`,
    help: 'Placements that found the page already present (demand and background raced).',
    registers,
  });
  const placeRetries = new Counter({
    name: `${p}place_retries_total`,
    help: 'Placements that returned EAGAIN and were retried after draining events.',
    registers,
  });
  const handoffs = new Counter({
    name: `${p}handoffs_total`,
    help: 'Handoffs from a VMM, by result (ok, or the error code it was refused with).',
    labelNames: ['result'] as const,
    registers,
  });
  const sessionsEnded = new Counter({
    name: `${p}sessions_ended_total`,
    help: 'Sessions ended, by result (complete, or the error code that ended it).',
    labelNames: ['result'] as const,
    registers,
  });
  const sessionsActive = new Gauge({
    name: `${p}sessions_active`,
    help: 'Sessions currently running.',
    registers,
  });
  const errors = new Counter({
    name: `${p}errors_total`,
    help: 'Coded errors, by code.',
    labelNames: ['code'] as const,
    registers,
  });
  const reconnects = new Counter({
    name: `${p}reconnects_total`,
    help: 'Connections to the source lost (the dest then reconnects with backoff), by channel.',
    labelNames: ['channel'] as const,
    registers,
  });

  const m = `${p}migration_`;
  const migration = ['migration'] as const;
  const mPages = new Gauge({
    name: `${m}pages`,
    help: "Pages of the migration's guest memory, by migration (while it runs).",
    labelNames: migration,
    registers,
  });
  const mPresent = new Gauge({
    name: `${m}present_pages`,
    help: 'Pages present in guest memory (placed, found present or discarded), by migration.',
    labelNames: migration,
    registers,
  });
  const mWaiting = new Gauge({
    name: `${m}faults_waiting`,
    help: 'Faults whose page has not arrived yet (vCPUs waiting), by migration.',
    labelNames: migration,
    registers,
  });
  const mLinkUp = new Gauge({
    name: `${m}link_up`,
    help: 'Whether a channel to the source is connected (1) or being re-established (0), by migration; a channel closed on purpose has no series.',
    labelNames: ['migration', 'channel'] as const,
    registers,
  });
  const mBytes = new Counter({
    name: `${m}received_bytes_total`,
    help: 'Frame bytes received from the source, both channels, by migration.',
    labelNames: migration,
    registers,
  });
  const mReconnects = new Counter({
    name: `${m}reconnects_total`,
    help: 'Connections to the source lost and restored, by migration.',
    labelNames: migration,
    registers,
  });
  const mStart = new Gauge({
    name: `${m}start_time_seconds`,
    help: 'When the migration started on this host, seconds since the epoch, by migration.',
    labelNames: migration,
    registers,
  });
  const untracked = new Gauge({
    name: `${p}migrations_untracked`,
    help: 'Running migrations without per-migration series (beyond the cap) until others end.',
    registers,
  });
  const tracker = new MigrationTracker<DestMigrationSample>(
    opts.maxMigrationSeries ?? DEFAULT_MAX_MIGRATION_SERIES,
  );
  onScrape(registry, () => {
    const { samples, untracked: n } = tracker.sample();
    for (const g of [mPages, mPresent, mWaiting, mLinkUp, mBytes, mReconnects, mStart]) g.reset();
    for (const [id, x] of samples) {
      const l = { migration: id };
      mPages.set(l, x.totalPages);
      mPresent.set(l, x.presentPages);
      mWaiting.set(l, x.faultsWaiting);
      mBytes.inc(l, x.receivedBytes);
      mReconnects.inc(l, x.reconnects);
      mStart.set(l, x.startedAtMs / 1000);
      for (const channel of CHANNELS) {
        const up = x.links[channel];
        if (up !== undefined) mLinkUp.set({ migration: id, channel }, up ? 1 : 0);
      }
    }
    untracked.set(n);
  });
  const vmsUnserved = new Counter({
    name: `${p}vms_unserved_total`,
    help:
      'VMs the dest could not serve (a refused Firecracker handshake, a failed Firecracker session), ' +
      'by code and action (killed, or left blocked at its next fault).',
    labelNames: ['code', 'action'] as const,
    registers,
  });

  // Every bounded combination is exported from the start (at 0), so rate() sees the first page.
  for (const channel of CHANNELS) reconnects.inc({ channel }, 0);
  handoffs.inc({ result: 'ok' }, 0);
  sessionsEnded.inc({ result: 'complete' }, 0);

  const handoffResult = boundedLabel();
  const sessionResult = boundedLabel();
  const errorCode = boundedLabel();
  const unservedCode = boundedLabel();
  return {
    fault: () => faults(0, 1),
    faultServiceSeconds: (seconds) => faultService.observe(0, seconds),
    faultStage: (stage, seconds) => faultStage.observe(stageSlot[stage], seconds),
    pagesPlaced: (path, kind, pages) => pagesPlaced(pathKindSlot(path, kind), pages),
    bytesReceived: (channel, bytes) => bytesReceived(CHANNELS.indexOf(channel), bytes),
    placeExists: () => placeExists.inc(),
    placeRetry: () => placeRetries.inc(),
    reconnect: (channel) => reconnects.inc({ channel }),
    handoff: (result) => handoffs.inc({ result: handoffResult(result) }),
    sessionEnded: (result) => sessionsEnded.inc({ result: sessionResult(result) }),
    sessionsActive: (n) => sessionsActive.set(n),
    error: (code) => errors.inc({ code: errorCode(code) }),
    trackMigration: (id, sample) => tracker.track(id, sample),
    vmUnserved: (code, killed) =>
      vmsUnserved.inc({ code: unservedCode(code), action: killed ? 'killed' : 'left' }),
  };
}

/** The source daemon's metrics, registered in `registry`. Call once per registry. */
export function createSourceMetrics(
  registry: Registry,
  opts: MigrationSeriesOptions = {},
): SourceMetrics {
  const p = 'yabusame_source_';
  const registers = [registry];
  // What the demand path counts and observes is kept in typed arrays until a scrape.
  const pagesSent = talliedCounter(
    {
      name: `${p}pages_sent_total`,
      help: 'Pages sent, by path (demand answer, background stream) and kind (data, zero run).',
      labelNames: ['path', 'kind'] as const,
      registers,
    },
    PATH_KIND_SERIES,
  );
  const bytesSent = talliedCounter(
    {
      name: `${p}sent_bytes_total`,
      help: 'Frame bytes written to connections, by channel.',
      labelNames: ['channel'] as const,
      registers,
    },
    CHANNEL_SERIES,
  );
  const demandService = new LocalHistogram(
    `${p}demand_service_seconds`,
    "Time from a REQUEST frame's arrival to its page data being handed to the socket.",
    SERVICE_SECONDS_BUCKETS,
    [{}],
    registry,
  );
  const connections = new Counter({
    name: `${p}connections_opened_total`,
    help: 'Connections accepted after a valid HELLO, by channel.',
    labelNames: ['channel'] as const,
    registers,
  });
  const errors = new Counter({
    name: `${p}errors_total`,
    help: 'Coded errors (protocol, image, I/O), by code.',
    labelNames: ['code'] as const,
    registers,
  });
  const migrationEvents = new Counter({
    name: `${p}migration_events_total`,
    help: 'Migrations reaching a state: registered, frozen, complete, aborted.',
    labelNames: ['event'] as const,
    registers,
  });

  const m = `${p}migration_`;
  const migration = ['migration'] as const;
  const mPages = new Gauge({
    name: `${m}pages`,
    help: "Pages of the migration's memory image, by migration (while registered or frozen).",
    labelNames: migration,
    registers,
  });
  const mSent = new Gauge({
    name: `${m}sent_pages`,
    help: 'Pages the dest was sent or said it holds, by migration (may drop after a reconnect).',
    labelNames: migration,
    registers,
  });
  const mPagesSent = new Counter({
    name: `${m}pages_sent_total`,
    help: 'Pages sent by either path, counting repeats, by migration.',
    labelNames: migration,
    registers,
  });
  const mConnected = new Gauge({
    name: `${m}connected`,
    help: 'Whether the dest of the migration is connected on a channel (1) or not (0).',
    labelNames: ['migration', 'channel'] as const,
    registers,
  });
  const mState = new Gauge({
    name: `${m}state`,
    help: 'The migration state (1 for the current one): registered, frozen.',
    labelNames: ['migration', 'state'] as const,
    registers,
  });
  const mHeld = new Gauge({
    name: `${m}held_requests`,
    help: 'REQUEST frames held until the freeze, by migration.',
    labelNames: migration,
    registers,
  });
  const untracked = new Gauge({
    name: `${p}migrations_untracked`,
    help: 'Live migrations without per-migration series (beyond the cap) until others end.',
    registers,
  });
  const tracker = new MigrationTracker<SourceMigrationSample>(
    opts.maxMigrationSeries ?? DEFAULT_MAX_MIGRATION_SERIES,
  );
  onScrape(registry, () => {
    const { samples, untracked: n } = tracker.sample();
    for (const g of [mPages, mSent, mPagesSent, mConnected, mState, mHeld]) g.reset();
    for (const [id, x] of samples) {
      const l = { migration: id };
      mPages.set(l, x.totalPages);
      mSent.set(l, x.sentPages);
      mPagesSent.inc(l, x.pagesSent);
      mHeld.set(l, x.heldRequests);
      for (const state of ['registered', 'frozen'] as const) {
        mState.set({ migration: id, state }, x.state === state ? 1 : 0);
      }
      for (const channel of CHANNELS) {
        mConnected.set({ migration: id, channel }, x.connections[channel] ? 1 : 0);
      }
    }
    untracked.set(n);
  });

  for (const channel of CHANNELS) connections.inc({ channel }, 0);
  for (const event of ['registered', 'frozen', 'complete', 'aborted'] as const) {
    migrationEvents.inc({ event }, 0);
  }

  const errorCode = boundedLabel();
  return {
    pagesSent: (path, kind, pages) => pagesSent(pathKindSlot(path, kind), pages),
    bytesSent: (channel, bytes) => bytesSent(CHANNELS.indexOf(channel), bytes),
    demandServiceSeconds: (seconds) => demandService.observe(0, seconds),
    connectionOpened: (channel) => connections.inc({ channel }),
    error: (code) => errors.inc({ code: errorCode(code) }),
    migrationEvent: (event) => migrationEvents.inc({ event }),
    trackMigration: (id, sample) => tracker.track(id, sample),
  };
}

export interface MetricsText {
  /** The Content-Type header for the body (Prometheus text exposition format 0.0.4). */
  contentType: string;
  body: string;
}

/** The registry rendered for a scrape (GET /metrics), per-migration series sampled first. */
export async function metricsText(registry: Registry): Promise<MetricsText> {
  for (const refresh of beforeScrape.get(registry) ?? []) refresh();
  return { contentType: registry.contentType, body: await registry.metrics() };
}

export type { Registry };
