/**
 * `yabusame source`'s composition root: the migration registry (images beneath one root, each
 * migration with its secret), the page server (ws or wss on /v1/pages), and the bulk thread that
 * serves background connections. The control API is not here: it listens on its own socket
 * (control-api.ts), never on the page port. close() stops accepting, closes every connection,
 * then releases every image, once.
 */
import type https from 'node:https';
import type { Logger } from '../ops/log.js';
import type { SourceMetrics } from '../ops/metric-ports.js';
import { rateLimitedLog } from '../ops/rate-limit.js';
import { listenPageServer } from '../transport/server.js';
import { SourceBulkThread } from './bulk.js';
import { ImageRoot } from './image.js';
import type { MigrationOptions } from './migration.js';
import { MigrationRegistry } from './registry.js';

export interface SourceTls {
  /** The page server's certificate chain and key (PEM). */
  cert: Buffer;
  key: Buffer;
  /** CAs that sign the destinations' client certificates: when given, one is required. */
  clientCa?: Buffer | undefined;
  /** Where the bulk thread listens for background connections (a TLS session cannot move). */
  backgroundListen: { host: string; port: number };
}

export interface SourceServerOptions extends MigrationOptions {
  listen: { host: string; port: number };
  /** Serve wss (absent: plaintext ws). */
  tls?: SourceTls | undefined;
  /** Every page connection must prove its migration's secret (false only for --insecure-no-auth). */
  authRequired: boolean;
  /** The one directory images are read from. */
  imageRoot: string;
  /** Migrations registered at once. */
  maxMigrations: number;
  metrics: SourceMetrics;
  log: Logger;
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
  /** With TLS, the bulk thread's port for background connections; else 0 (the same port). */
  readonly backgroundPort: number;
  readonly registry: MigrationRegistry;
  close(): Promise<void>;
}

export async function startSourceServer(opts: SourceServerOptions): Promise<SourceServer> {
  const { log, metrics } = opts;
  const root = new ImageRoot(opts.imageRoot);
  const tlsServer: https.ServerOptions | undefined = opts.tls && {
    cert: opts.tls.cert,
    key: opts.tls.key,
    ...(opts.tls.clientCa
      ? { ca: opts.tls.clientCa, requestCert: true, rejectUnauthorized: true }
      : {}),
  };
  const bulk = new SourceBulkThread({
    nice: opts.bulkThreadNice ?? 0,
    log,
    metrics,
    heartbeatIntervalMs: opts.heartbeatIntervalMs,
    helloTimeoutMs: opts.helloTimeoutMs,
    authRequired: opts.authRequired,
    tls: opts.tls && tlsServer && { listen: opts.tls.backgroundListen, server: tlsServer },
    ...(opts.bulkWorkerUrl ? { workerUrl: opts.bulkWorkerUrl } : {}),
  });
  try {
    await bulk.ready();
  } catch (err) {
    await bulk.stop();
    root.close();
    throw err;
  }
  const registry = new MigrationRegistry(
    metrics,
    log,
    bulk,
    root,
    { authRequired: opts.authRequired, maxMigrations: opts.maxMigrations },
    opts,
  );
  let pages;
  try {
    pages = await listenPageServer({
      host: opts.listen.host,
      port: opts.listen.port,
      tls: tlsServer,
      onHello: registry.acceptHello,
      backgroundPort: () => bulk.backgroundPort,
      background: (socket) => bulk.adopt(socket),
      heartbeatIntervalMs: opts.heartbeatIntervalMs,
      helloTimeoutMs: opts.helloTimeoutMs,
      log,
      refusalLog: rateLimitedLog(log),
      onError: (code) => metrics.error(code),
    });
  } catch (err) {
    await bulk.stop();
    root.close();
    throw err;
  }
  log.info('source listening', {
    host: opts.listen.host,
    port: pages.port,
    tls: opts.tls !== undefined,
    backgroundPort: bulk.backgroundPort || pages.port,
    auth: opts.authRequired,
    imageRoot: root.path,
  });
  let closing: Promise<void> | null = null;
  return {
    port: pages.port,
    get backgroundPort() {
      return bulk.backgroundPort;
    },
    registry,
    close() {
      closing ??= pages
        .close()
        .then(() => registry.dispose())
        .then(() => bulk.stop())
        .then(() => root.close());
      return closing;
    },
  };
}
