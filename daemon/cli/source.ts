/**
 * `yabusame source`: loads and checks the configuration (every usage or config error exits 2
 * before anything is bound: TLS files read, the secure-by-default rules applied), then runs the
 * page server, its control API and its metrics until a signal stops it.
 */
import { createLogger } from '../ops/log.js';
import {
  ConfigError,
  configText,
  isLoopbackHost,
  keyOptions,
  keysHelp,
  loadSourceConfig,
  parseMigrationSpec,
  SOURCE_KEYS,
  type SourceConfig,
} from '../ops/config.js';
import { createMetricsRegistry, createSourceMetrics, metricsText } from '../ops/metrics.js';
import { serveHttp, type HttpEndpoint } from '../ops/http.js';
import * as sd from '../ops/sdnotify.js';
import { startSourceServer, type SourceServerOptions } from '../source/server.js';
import { ImageRoot, openImage } from '../source/image.js';
import { startControlServer, type ControlServer } from '../source/control-api.js';
import { liveStatus, onSignals, parse, readConfigFile, resolveGroup, str } from './common.js';
import { VERSION } from './version.js';

export const SOURCE_USAGE = `Usage: yabusame source [options]

Runs the page server: serves memory images (files beneath --image-root) to destinations that
prove each migration's secret, and a control API on a UNIX socket to register, freeze and
delete migrations.

${keysHelp(SOURCE_KEYS, [
  ['--config FILE', 'JSON config (keys as below, in camelCase, and "migrations")'],
  ['--check-config', 'check the configuration and the files it names, print it, exit'],
  [
    '--migration SPEC',
    'serve id=ID,image=PATH[,frozen][,secret-file=FILE][,qmp=SOCKET] (repeatable)',
  ],
  ['-h, --help', 'this help'],
])}

A --migration without a secret file gets a generated secret, printed once on stdout as
"migration ID secret HEX": the VMM on the destination hands it to the dest with the uffd.
With qmp=SOCKET the source follows that QEMU's QMP socket and marks the migration frozen when
QEMU stops the VM for its migration (a VM an operator merely paused is not frozen; one that runs
again after the freeze aborts the migration).

Every option is also a config key and an environment variable: --image-root is imageRoot and
YABUSAME_IMAGE_ROOT. A flag wins over the environment, which wins over the file.
Secure by default: pages are served only to destinations that prove the migration's secret;
off loopback only over TLS (or with --allow-plaintext); the control API is a UNIX socket
(mode 0660) unless --control-listen adds a TCP listener with a bearer token.
Signals: SIGTERM/SIGINT stop (a second one exits at once); SIGHUP re-reads the log level.
Exit codes: 0 stopped (or every migration done with --exit-when-done), 1 runtime failure,
2 usage or config.
`;

interface ResolvedSource {
  server: Omit<SourceServerOptions, 'metrics' | 'log'>;
  control: Parameters<typeof startControlServer>[2];
  /** Configured migrations with their secrets read (null: generate one). */
  migrations: Array<SourceConfig['migrations'][number] & { secret: string | undefined }>;
}

/**
 * Opens a configured migration's image beneath the root and closes it again, so a missing,
 * misplaced or unreadable image is a configuration error (exit 2) before anything is bound.
 */
function checkImage(root: string, m: SourceConfig['migrations'][number]): void {
  let imageRoot: ImageRoot;
  try {
    imageRoot = new ImageRoot(root);
  } catch (err) {
    throw new ConfigError('CONFIG_INVALID', `imageRoot: ${(err as Error).message}`, undefined, {
      cause: err,
    });
  }
  try {
    openImage(imageRoot, m.image, m.regions).close();
  } catch (err) {
    const code = (err as { code?: string }).code ?? 'IMAGE_OPEN';
    throw new ConfigError(
      'CONFIG_INVALID',
      `migrations.${m.id}.image: ${code}: ${(err as Error).message}`,
      undefined,
      { cause: err },
    );
  } finally {
    imageRoot.close();
  }
}

/** The daemon's options from a checked config: files read, rules applied. Throws ConfigError. */
export function sourceOptions(config: SourceConfig): ResolvedSource {
  const invalid = (key: string, message: string): ConfigError =>
    new ConfigError('CONFIG_INVALID', `${key}: ${message}`);
  const tls = config.tlsCertFile !== undefined;
  if (config.insecureNoAuth && !isLoopbackHost(config.listen.host)) {
    throw invalid(
      'insecureNoAuth',
      'without authentication the page server must listen on loopback',
    );
  }
  if (!tls && !config.allowPlaintext && !isLoopbackHost(config.listen.host)) {
    throw invalid(
      'listen',
      `serving pages on ${config.listen.host} needs TLS (tlsCertFile, tlsKeyFile), or allowPlaintext`,
    );
  }
  const token = config.controlTokenFile
    ? readConfigFile(config.controlTokenFile, 'controlTokenFile', true).toString('utf8').trim()
    : undefined;
  if (token !== undefined && token.length < 16) {
    throw invalid('controlTokenFile', 'the token must be at least 16 characters');
  }
  return {
    server: {
      listen: config.listen,
      tls: tls
        ? {
            cert: readConfigFile(config.tlsCertFile!, 'tlsCertFile'),
            key: readConfigFile(config.tlsKeyFile!, 'tlsKeyFile', true),
            clientCa: config.tlsClientCaFile
              ? readConfigFile(config.tlsClientCaFile, 'tlsClientCaFile')
              : undefined,
            backgroundListen: config.backgroundListen ?? {
              host: config.listen.host,
              port: config.listen.port === 0 ? 0 : config.listen.port + 1,
            },
          }
        : undefined,
      authRequired: !config.insecureNoAuth,
      imageRoot: config.imageRoot,
      maxMigrations: config.maxMigrations,
      backgroundFrameBytes: config.backgroundFrameBytes,
      bulkThreadNice: config.bulkThreadNice,
    },
    control: {
      socket: config.controlSocket
        ? {
            path: config.controlSocket,
            mode: config.controlSocketMode,
            gid: resolveGroup(config.controlSocketGroup, 'controlSocketGroup'),
          }
        : undefined,
      tcp: config.controlListen && token ? { ...config.controlListen, token } : undefined,
    },
    migrations: config.migrations.map((m) => {
      checkImage(config.imageRoot, m);
      const secret = m.secretFile
        ? readConfigFile(m.secretFile, `migrations.${m.id}.secretFile`, true)
            .toString('utf8')
            .trim()
        : undefined;
      return { ...m, secret };
    }),
  };
}

export async function runSource(args: string[]): Promise<void> {
  const v = parse(
    args,
    {
      config: { type: 'string' },
      'check-config': { type: 'boolean' },
      migration: { type: 'string', multiple: true },
      ...keyOptions(SOURCE_KEYS),
    },
    SOURCE_USAGE,
  );
  const specs = ((v['migration'] as string[] | undefined) ?? []).map(parseMigrationSpec);
  const input = {
    file: str(v['config']),
    flags: v as Record<string, string | boolean>,
    env: process.env,
    ...(specs.length ? { extra: { migrations: specs } } : {}),
  };
  const config = loadSourceConfig(input);
  const resolved = sourceOptions(config);
  if (v['check-config']) {
    process.stdout.write(`yabusame source: configuration ok\n${configText(config)}\n`);
    return;
  }
  const log = createLogger(config.logLevel, { service: 'yabusame-source' });
  log.info('yabusame source starting', {
    version: VERSION,
    config: JSON.parse(configText(config)),
  });
  if (config.insecureNoAuth) {
    log.warn('INSECURE: serving pages without migration secrets (--insecure-no-auth), on loopback');
  } else if (!resolved.server.tls && !isLoopbackHost(config.listen.host)) {
    log.warn(
      'serving pages in plaintext off loopback (--allow-plaintext): anyone on the path reads guest memory',
    );
  }
  const registry = createMetricsRegistry({ version: VERSION });
  const server = await startSourceServer({
    ...resolved.server,
    metrics: createSourceMetrics(registry),
    log,
  });
  const closers: Array<() => Promise<void>> = [() => server.close()];
  let control: ControlServer | null = null;
  let metrics: HttpEndpoint | null = null;
  try {
    control = await startControlServer(server.registry, log, resolved.control);
    closers.unshift(() => control!.close());
    if (config.metricsListen) {
      metrics = await serveHttp(
        config.metricsListen,
        {
          '/healthz': () => ({ type: 'text/plain', body: 'ok\n' }),
          '/metrics': async () => {
            const m = await metricsText(registry);
            return { type: m.contentType, body: m.body };
          },
        },
        'metricsListen',
      );
      closers.unshift(() => metrics!.close());
    }
    for (const m of resolved.migrations) {
      const { generatedSecret } = server.registry.register(m);
      // Printed once, where the operator who started the source reads it; never logged.
      if (generatedSecret) process.stdout.write(`migration ${m.id} secret ${generatedSecret}\n`);
    }
  } catch (err) {
    for (const close of closers) await close();
    throw err;
  }
  const stop = async (): Promise<void> => {
    for (const close of closers) await close();
  };
  if (config.exitWhenDone && config.migrations.length > 0) {
    const ids = new Set(config.migrations.map((m) => m.id));
    server.registry.onEvent((event) => {
      if (event.type !== 'complete') return;
      ids.delete(event.id);
      if (ids.size === 0) {
        log.info('every migration completed; exiting');
        void stop().then(() => process.exit(0));
      }
    });
  }
  sd.ready();
  liveStatus(() => {
    const all = server.registry.list();
    const count = (state: string): number => all.filter((m) => m.state === state).length;
    return `${all.length} migrations: ${count('frozen')} frozen (serving), ${count('registered')} waiting for their freeze`;
  });
  onSignals(stop, log, () => {
    try {
      log.setLevel(loadSourceConfig(input).logLevel);
    } catch (err) {
      log.error('SIGHUP: the configuration does not load; the log level stays', { err });
    }
  });
}
