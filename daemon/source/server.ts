/**
 * `yabusame source`'s composition root: the migration registry, the page server (ws on
 * /v1/pages) and the control API on one HTTP port, and the bulk thread that serves background
 * connections. close() stops accepting, closes every connection, then releases every image, once.
 */
import type http from 'node:http';
import type { Logger } from '../ops/log.js';
import type { SourceMetrics } from '../ops/metric-ports.js';
import { listenPageServer } from '../transport/server.js';
import { SourceBulkThread } from './bulk.js';
import { controlApi } from './control-api.js';
import type { MigrationOptions } from './migration.js';
import { MigrationRegistry } from './registry.js';

export interface SourceServerOptions extends MigrationOptions {
  listen: { host: string; port: number };
  metrics: SourceMetrics;
  log: Logger;
  /** Requests outside /v1/migrations (the lead mounts /metrics here); 404 when absent. */
  httpHandler?: http.RequestListener;
  /** ws ping interval, ms; 0 disables. Default 15 s. */
  heartbeatIntervalMs?: number;
  /** Time a connection has to send its HELLO, ms. Default 10 s. */
  helloTimeoutMs?: number;
  /** Nice value of the bulk thread that serves background connections. Default 0. */
  bulkThreadNice?: number;
  /** The bulk thread's entry (tests give a stand-in). */
  bulkWorkerUrl?: URL;
}

export interface SourceServer {
  readonly port: number;
  readonly registry: MigrationRegistry;
  close(): Promise<void>;
}

export async function startSourceServer(opts: SourceServerOptions): Promise<SourceServer> {
  const { log, metrics } = opts;
  const bulk = new SourceBulkThread({
    nice: opts.bulkThreadNice ?? 0,
    log,
    metrics,
    heartbeatIntervalMs: opts.heartbeatIntervalMs,
    helloTimeoutMs: opts.helloTimeoutMs,
    ...(opts.bulkWorkerUrl ? { workerUrl: opts.bulkWorkerUrl } : {}),
  });
  const registry = new MigrationRegistry(metrics, log, bulk, opts);
  const pages = await listenPageServer({
    host: opts.listen.host,
    port: opts.listen.port,
    onHello: registry.acceptHello,
    background: (socket) => bulk.adopt(socket),
    httpHandler: controlApi(registry, log, opts.httpHandler),
    heartbeatIntervalMs: opts.heartbeatIntervalMs,
    helloTimeoutMs: opts.helloTimeoutMs,
    log,
    onError: (code) => metrics.error(code),
  });
  log.info('source listening', { host: opts.listen.host, port: pages.port });
  let closing: Promise<void> | null = null;
  return {
    port: pages.port,
    registry,
    close() {
      closing ??= pages
        .close()
        .then(() => registry.dispose())
        .then(() => bulk.stop());
      return closing;
    },
  };
}
