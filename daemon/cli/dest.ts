/**
 * `yabusame dest`: loads and checks the configuration (every usage or config error exits 2
 * before anything is bound), then runs the destination daemon until a signal stops it.
 */
import { createLogger } from '../ops/log.js';
import {
  configText,
  DEST_KEYS,
  keyOptions,
  keysHelp,
  loadDestConfig,
  type DestConfig,
} from '../ops/config.js';
import { createDestMetrics, createMetricsRegistry, metricsText } from '../ops/metrics.js';
import * as sd from '../ops/sdnotify.js';
import { startDestDaemon, type DestDaemonOptions } from '../dest/daemon.js';
import type { ClientTls } from '../transport/client.js';
import { liveStatus, onSignals, parse, readConfigFile, resolveGroup, str } from './common.js';
import { fdStoreParking, parkedSessions } from '../dest/fd-store.js';
import { VERSION } from './version.js';

export const DEST_USAGE = `Usage: yabusame dest [options]

Runs the destination daemon: VMMs hand it the userfaultfd of their guest's RAM on a UNIX
socket; it fills that memory with pages fetched from \`yabusame source\`.

${keysHelp(DEST_KEYS, [
  ['--config FILE', 'JSON config (keys as below, in camelCase)'],
  ['--check-config', 'check the configuration and the files it names, print it, exit'],
  ['-h, --help', 'this help'],
])}

Every option is also a config key and an environment variable: --max-sessions is maxSessions
and YABUSAME_MAX_SESSIONS. A flag wins over the environment, which wins over the file.
Signals: SIGTERM/SIGINT stop (a second one exits at once); SIGHUP re-reads the log level.
Logs are JSON lines on stderr. Exit codes: 0 stopped, 1 runtime failure, 2 usage or config.
`;

/** The daemon's options from a checked config: files read, groups resolved, defaults filled. */
export function destOptions(
  config: DestConfig,
): Omit<DestDaemonOptions, 'log' | 'metrics' | 'metricsText' | 'listenFd'> {
  const tls: ClientTls = {
    ca: config.sourceCaFile ? readConfigFile(config.sourceCaFile, 'sourceCaFile') : undefined,
    cert: config.clientCertFile
      ? readConfigFile(config.clientCertFile, 'clientCertFile')
      : undefined,
    key: config.clientKeyFile
      ? readConfigFile(config.clientKeyFile, 'clientKeyFile', true)
      : undefined,
  };
  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;
  return {
    socketPath: config.socket,
    socketMode: config.socketMode,
    socketGid: resolveGroup(config.socketGroup, 'socketGroup'),
    http: config.metricsListen,
    control: config.controlSocket
      ? {
          path: config.controlSocket,
          mode: config.controlSocketMode,
          gid: resolveGroup(config.controlSocketGroup, 'controlSocketGroup'),
        }
      : null,
    maxSessions: config.maxSessions,
    handoffTimeoutMs: config.handoffTimeoutMs,
    peers: {
      allowedUids: config.allowedUids ?? [...new Set([0, uid])],
      allowedGids: config.allowedGids ?? [gid],
      maxSessionsPerUid: config.maxSessionsPerUid,
      maxPending: config.maxPendingHandoffs,
      maxPendingPerUid: config.maxPendingHandoffsPerUid,
    },
    session: {
      connectTimeoutMs: config.connectTimeoutMs,
      completeTimeoutMs: config.completeTimeoutMs,
      backgroundWindowBytes: config.backgroundWindowBytes,
      progressIntervalMs: config.progressIntervalMs,
      heartbeatMs: config.heartbeatMs,
      reconnectTimeoutMs: config.reconnectTimeoutMs,
      backgroundDelayMs: config.backgroundDelayMs,
      requireSecret: !config.insecureNoAuth,
      sourcePolicy: {
        allowed: config.allowedSources,
        allowPlaintext: config.allowPlaintextSources,
        loopbackOnly: config.insecureNoAuth,
      },
      tls,
    },
    bulkNice: config.bulkThreadNice,
    logLevel: config.logLevel,
  };
}

export async function runDest(args: string[]): Promise<void> {
  const v = parse(
    args,
    { config: { type: 'string' }, 'check-config': { type: 'boolean' }, ...keyOptions(DEST_KEYS) },
    DEST_USAGE,
  );
  const input = {
    file: str(v['config']),
    flags: v as Record<string, string | boolean>,
    env: process.env,
  };
  const config = loadDestConfig(input);
  const options = destOptions(config);
  if (v['check-config']) {
    process.stdout.write(`yabusame dest: configuration ok\n${configText(config)}\n`);
    return;
  }
  const log = createLogger(config.logLevel, { service: 'yabusame-dest' });
  log.info('yabusame dest starting', { version: VERSION, config: JSON.parse(configText(config)) });
  if (config.insecureNoAuth) {
    log.warn(
      'INSECURE: running without migration secrets (--insecure-no-auth); loopback sources only',
    );
  }
  const registry = createMetricsRegistry({ version: VERSION });
  // From systemd: the handoff socket (socket activation), and sessions a previous daemon parked.
  const fds = sd.listenFds();
  const activated = fds.find((f) => f.name === 'handoff') ?? fds.find((f) => f.name === 'unknown');
  const parking = fdStoreParking(log);
  const parked = parkedSessions(fds, log, parking);
  if (parked.length > 0) log.info('resuming parked sessions', { sessions: parked.length });
  const daemon = await startDestDaemon({
    ...options,
    ...(activated ? { listenFd: activated.fd } : {}),
    log,
    metrics: createDestMetrics(registry),
    metricsText: () => metricsText(registry),
    parking,
    parked,
  });
  sd.ready();
  liveStatus(() => {
    const sessions = daemon.sessions();
    const left = sessions.reduce((n, s) => n + s.totalPages - s.presentPages, 0);
    return `${sessions.length} migrations running, ${left} pages to place`;
  });
  onSignals(
    () => daemon.close(),
    log,
    () => {
      try {
        log.setLevel(loadDestConfig(input).logLevel);
      } catch (err) {
        log.error('SIGHUP: the configuration does not load; the log level stays', { err });
      }
    },
  );
}
