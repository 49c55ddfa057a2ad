/**
 * Prometheus metrics: the only module that imports prom-client. The cores see only the narrow
 * ports in metric-ports.ts; this file implements them, one registry per daemon (no global
 * registry, so tests and several daemons in one process never collide).
 *
 * Naming follows https://prometheus.io/docs/practices/naming/: a `yabusame_dest_` or
 * `yabusame_source_` prefix, base units in the name (`_seconds`, `_bytes`), `_total` on counters.
 * Labels come only from bounded sets: the PagePath/PageKind/ChannelName unions, and result or
 * error codes, which are stable strings; boundedLabel() caps them anyway so a bug that puts an
 * address or an id in a code cannot grow the series count without limit.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type {
  ChannelName,
  DestMetrics,
  PageKind,
  PagePath,
  SourceMetrics,
} from './metric-ports.js';

/**
 * Buckets for page service times, in seconds: 10 µs to 1 s in roughly 1-2.5-5 steps. The
 * measured floor is about 35-90 µs per fault on loopback (../shared/DESIGN.md), a LAN round
 * trip adds 50-500 µs, and anything past 100 ms is a stall a guest feels; 1 s and +Inf catch
 * reconnects.
 */
export const SERVICE_SECONDS_BUCKETS: readonly number[] = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
  0.25, 0.5, 1,
];

const PATHS: readonly PagePath[] = ['demand', 'background'];
const KINDS: readonly PageKind[] = ['data', 'zero'];
const CHANNELS: readonly ChannelName[] = ['demand', 'background'];

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

/** A registry with the process and Node.js default metrics (cpu, memory, fds, event loop lag). */
export function createMetricsRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  return registry;
}

/** The destination daemon's metrics, registered in `registry`. Call once per registry. */
export function createDestMetrics(registry: Registry): DestMetrics {
  const p = 'yabusame_dest_';
  const registers = [registry];
  const faults = new Counter({
    name: `${p}faults_total`,
    help: 'userfaultfd page faults read.',
    registers,
  });
  const faultService = new Histogram({
    name: `${p}fault_service_seconds`,
    help: 'Time from reading a fault to its page being placed (what the vCPU waits).',
    buckets: [...SERVICE_SECONDS_BUCKETS],
    registers,
  });
  const pagesPlaced = new Counter({
    name: `${p}pages_placed_total`,
    help: 'Pages placed into guest memory, by path (demand, background) and kind (data, zero).',
    labelNames: ['path', 'kind'] as const,
    registers,
  });
  const bytesReceived = new Counter({
    name: `${p}received_bytes_total`,
    help: 'Frame bytes received from the source, by channel.',
    labelNames: ['channel'] as const,
    registers,
  });
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

  // Every bounded combination is exported from the start (at 0), so rate() sees the first page.
  for (const path of PATHS) for (const kind of KINDS) pagesPlaced.inc({ path, kind }, 0);
  for (const channel of CHANNELS) bytesReceived.inc({ channel }, 0);
  for (const channel of CHANNELS) reconnects.inc({ channel }, 0);
  handoffs.inc({ result: 'ok' }, 0);
  sessionsEnded.inc({ result: 'complete' }, 0);

  const handoffResult = boundedLabel();
  const sessionResult = boundedLabel();
  const errorCode = boundedLabel();
  return {
    fault: () => faults.inc(),
    faultServiceSeconds: (seconds) => faultService.observe(seconds),
    pagesPlaced: (path, kind, pages) => pagesPlaced.inc({ path, kind }, pages),
    bytesReceived: (channel, bytes) => bytesReceived.inc({ channel }, bytes),
    placeExists: () => placeExists.inc(),
    placeRetry: () => placeRetries.inc(),
    reconnect: (channel) => reconnects.inc({ channel }),
    handoff: (result) => handoffs.inc({ result: handoffResult(result) }),
    sessionEnded: (result) => sessionsEnded.inc({ result: sessionResult(result) }),
    sessionsActive: (n) => sessionsActive.set(n),
    error: (code) => errors.inc({ code: errorCode(code) }),
  };
}

/** The source daemon's metrics, registered in `registry`. Call once per registry. */
export function createSourceMetrics(registry: Registry): SourceMetrics {
  const p = 'yabusame_source_';
  const registers = [registry];
  const pagesSent = new Counter({
    name: `${p}pages_sent_total`,
    help: 'Pages sent, by path (demand answer, background stream) and kind (data, zero run).',
    labelNames: ['path', 'kind'] as const,
    registers,
  });
  const bytesSent = new Counter({
    name: `${p}sent_bytes_total`,
    help: 'Frame bytes written to connections, by channel.',
    labelNames: ['channel'] as const,
    registers,
  });
  const demandService = new Histogram({
    name: `${p}demand_service_seconds`,
    help: "Time from a REQUEST frame's arrival to its page data being handed to the socket.",
    buckets: [...SERVICE_SECONDS_BUCKETS],
    registers,
  });
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

  for (const path of PATHS) for (const kind of KINDS) pagesSent.inc({ path, kind }, 0);
  for (const channel of CHANNELS) {
    bytesSent.inc({ channel }, 0);
    connections.inc({ channel }, 0);
  }
  for (const event of ['registered', 'frozen', 'complete', 'aborted'] as const) {
    migrationEvents.inc({ event }, 0);
  }

  const errorCode = boundedLabel();
  return {
    pagesSent: (path, kind, pages) => pagesSent.inc({ path, kind }, pages),
    bytesSent: (channel, bytes) => bytesSent.inc({ channel }, bytes),
    demandServiceSeconds: (seconds) => demandService.observe(seconds),
    connectionOpened: (channel) => connections.inc({ channel }),
    error: (code) => errors.inc({ code: errorCode(code) }),
    migrationEvent: (event) => migrationEvents.inc({ event }),
  };
}

export interface MetricsText {
  /** The Content-Type header for the body (Prometheus text exposition format 0.0.4). */
  contentType: string;
  body: string;
}

/** The registry rendered for a scrape (GET /metrics). */
export async function metricsText(registry: Registry): Promise<MetricsText> {
  return { contentType: registry.contentType, body: await registry.metrics() };
}

export type { Registry };
