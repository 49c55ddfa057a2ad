/**
 * `yabusame dest`: loads and checks the configuration (every usage or config error exits 2
 * before anything is bound), then runs the destination daemon until a signal stops it.
 */
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { createLogger } from '../ops/log.js';
import {
  configText,
  ConfigError,
  DEST_KEYS,
  keyOptions,
  keysHelp,
  loadDestConfig,
  type DestConfig,
} from '../ops/config.js';
import { parseSecret } from '../../protocol/auth.js';
import type { FirecrackerSocketConfig } from '../dest/firecracker.js';
import { createDestMetrics, createMetricsRegistry, metricsText } from '../ops/metrics.js';
import * as sd from '../ops/sdnotify.js';
import { startDestDaemon, type DestDaemonOptions } from '../dest/daemon.js';
import type { ClientTls } from '../transport/client.js';
import { liveStatus, onSignals, parse, readConfigFile, resolveGroup, str } from './common.js';
import { fdStoreParking, parkedSessions } from '../dest/fd-store.js';
import { VERSION } from './version.js';

export const DEST_USAGE = `Usage: yabusame dest [options]

Runs the destination daemon: VMMs hand it the userfaultfd of their guest's RAM on a UNIX
socket; it fills that memory with pages fetched from \`yabusame source\`. It is also
Firecracker's page-fault handler for snapshot restores ("mem_backend": {"backend_type":
"Uffd", "backend_path": SOCKET}), from a local memory file or from a \`yabusame source\`.

${keysHelp(DEST_KEYS, [
  ['--config FILE', 'JSON config (keys as below, in camelCase)'],
  ['--check-config', 'check the configuration and the files it names, print it, exit'],
  ['-h, --help', 'this help'],
])}

A Firecracker socket (one more entry of the config's "firecracker" list):
${keysHelp(
  [],
  [
    ['--firecracker-socket PATH', "the socket Firecracker's snapshot load names (mode 0660)"],
    ['--mem-file FILE', "serve the snapshot's memory file on this host, or..."],
    ['--source URL', '...fetch it from this yabusame source (ws:// or wss://)'],
    ['--migration-id ID', "  the source's migration"],
    ['--secret-file FILE', '  its secret (hex, mode 0600)'],
    ['--kill-on-failure', 'SIGKILL Firecracker when its VM cannot be served'],
    ['--prefetch', 'record the faults of a restore; stream them first on the next (--mem-file)'],
    ['--working-set-file FILE', 'where (default: the memory file + .working-set.json)'],
  ],
)}

Every option above the Firecracker ones is also a config key and an environment variable:
--max-sessions is maxSessions and YABUSAME_MAX_SESSIONS. A flag wins over the environment,
which wins over the file.
Signals: SIGTERM/SIGINT stop (a second one exits at once); SIGHUP re-reads the log level.
Logs are JSON lines on stderr. Exit codes: 0 stopped, 1 runtime failure, 2 usage or config.
`;

/** `fc:` and the socket's path, as a session id (`/run/fc/vm1.sock` → `fc:run.fc.vm1.sock`). */
function socketId(socket: string): string {
  return `fc:${socket.replace(/^\/+/, '').replace(/[^A-Za-z0-9._:-]/g, '.')}`.slice(0, 128);
}

/** The Firecracker sockets of a checked config: secrets read, ids and groups resolved. */
function firecrackerSockets(config: DestConfig): FirecrackerSocketConfig[] {
  const invalid = (i: number, message: string): ConfigError =>
    new ConfigError('CONFIG_INVALID', `firecracker.${i}: ${message}`);
  const sockets = new Set([config.socket, config.controlSocket]);
  const ids = new Set<string>();
  return config.firecracker.map((f, i) => {
    if (sockets.has(f.socket)) throw invalid(i, `socket ${f.socket} is already used`);
    sockets.add(f.socket);
    const migrationId = f.migrationId ?? f.id ?? socketId(f.socket);
    if (ids.has(migrationId)) {
      throw invalid(i, `${migrationId} names another socket's VMs too; give each its own id`);
    }
    ids.add(migrationId);
    let secret: string | undefined;
    if (f.secretFile) {
      secret = readConfigFile(f.secretFile, `firecracker.${i}.secretFile`, true)
        .toString('utf8')
        .trim();
      if (!parseSecret(secret)) throw invalid(i, `${f.secretFile}: not 16..64 bytes of hex`);
    } else if (f.source !== undefined && !config.insecureNoAuth) {
      throw invalid(i, 'source needs secretFile (the migration secret), or insecureNoAuth');
    }
    return {
      socket: f.socket,
      mode: f.socketMode,
      gid: resolveGroup(f.socketGroup, `firecracker.${i}.socketGroup`),
      migrationId,
      killOnFailure: f.killOnFailure,
      pages:
        f.memFile !== undefined
          ? {
              kind: 'file',
              memFile: f.memFile,
              workingSetFile: f.prefetch
                ? (f.workingSetFile ?? `${f.memFile}.working-set.json`)
                : null,
            }
          : { kind: 'remote', source: f.source!, secret },
    };
  });
}

/** The flags that make one Firecracker socket entry (appended to the config file's list). */
const FIRECRACKER_FLAGS = {
  'firecracker-socket': { type: 'string' },
  'mem-file': { type: 'string' },
  source: { type: 'string' },
  'migration-id': { type: 'string' },
  'secret-file': { type: 'string' },
  'kill-on-failure': { type: 'boolean' },
  prefetch: { type: 'boolean' },
  'working-set-file': { type: 'string' },
} as const;

function firecrackerFlagEntry(v: Record<string, unknown>): Record<string, unknown> | undefined {
  const path = (k: string): string | undefined => {
    const x = str(v[k]);
    return x === undefined ? undefined : resolve(x);
  };
  const given = Object.keys(FIRECRACKER_FLAGS).filter((k) => v[k] !== undefined);
  if (given.length === 0) return undefined;
  if (v['firecracker-socket'] === undefined) {
    throw new ConfigError(
      'CONFIG_INVALID',
      `--${given[0]} goes with --firecracker-socket (a Firecracker socket to serve)`,
    );
  }
  const entry: Record<string, unknown> = {
    socket: path('firecracker-socket'),
    memFile: path('mem-file'),
    source: str(v['source']),
    migrationId: str(v['migration-id']),
    secretFile: path('secret-file'),
    workingSetFile: path('working-set-file'),
    ...(v['kill-on-failure'] ? { killOnFailure: true } : {}),
    ...(v['prefetch'] ? { prefetch: true } : {}),
  };
  for (const k of Object.keys(entry)) if (entry[k] === undefined) delete entry[k];
  return entry;
}

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
      demandPrefetchBytes: config.demandPrefetchBytes,
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
    firecracker: firecrackerSockets(config),
  };
}

export async function runDest(args: string[]): Promise<void> {
  const v = parse(
    args,
    {
      config: { type: 'string' },
      'check-config': { type: 'boolean' },
      ...keyOptions(DEST_KEYS),
      ...FIRECRACKER_FLAGS,
    },
    DEST_USAGE,
  );
  const fcEntry = firecrackerFlagEntry(v);
  const input = {
    file: str(v['config']),
    flags: v as Record<string, string | boolean>,
    env: process.env,
    ...(fcEntry ? { append: { firecracker: [fcEntry] } } : {}),
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
  for (const f of config.firecracker) {
    // Snapshots are often written after the daemon starts: a missing file is not an error yet.
    if (f.memFile !== undefined && !existsSync(f.memFile)) {
      log.warn('Firecracker memory file not found (yet): restores fail until it exists', {
        socket: f.socket,
        memFile: f.memFile,
      });
    }
  }
  const registry = createMetricsRegistry({ version: VERSION });
  // From systemd: the handoff socket (socket activation), and sessions a previous daemon parked.
  const fds = sd.listenFds();
  const activated = fds.find((f) => f.name === 'handoff') ?? fds.find((f) => f.name === 'unknown');
  const parking = fdStoreParking(log);
  const parked = parkedSessions(fds, log, parking);
  const parkedCount = parked.handoffs.length + parked.firecracker.length;
  if (parkedCount > 0) {
    log.info('resuming parked sessions', {
      sessions: parkedCount,
      firecracker: parked.firecracker.length,
    });
  }
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
