/**
 * `yabusame`: one command, several subcommands. Exit codes: 0 success, 1 runtime failure,
 * 2 usage or configuration error.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { createLogger, type LogLevel } from './ops/log.js';
import { ConfigError, loadDestConfig, loadSourceConfig } from './ops/config.js';
import {
  createDestMetrics,
  createMetricsRegistry,
  createSourceMetrics,
  metricsText,
} from './ops/metrics.js';
import * as sd from './ops/sdnotify.js';
import * as sys from './linux/sys.js';
import { startDestDaemon } from './dest/daemon.js';
import { startSourceServer } from './source/server.js';

const VERSION = (
  JSON.parse(
    readFileSync(fileURLToPath(new URL('../../package.json', import.meta.url)), 'utf8'),
  ) as {
    version: string;
  }
).version;

const USAGE = `yabusame ${VERSION}: post-copy live migration of VM memory

Usage: yabusame <command> [options]

Commands:
  dest      run the destination daemon: takes userfaultfds from VMMs on a UNIX socket and
            fills their memory from a source
  source    run the source page server: serves memory images to destinations
  status    show the migrations of a running dest or source
  freeze    mark a migration frozen on a source (its VM stopped): requests are served from now on
  demo      generate a 1 GiB image and migrate a simulated VM of it end to end (see README)

Run 'yabusame <command> --help' for a command's options.
`;

const DEST_USAGE = `Usage: yabusame dest [options]

  --config FILE          JSON config (see README); flags below override it
  --socket PATH          handoff socket (default /run/yabusame/dest.sock); ignored under
                         systemd socket activation
  --metrics-listen H:P   serve /metrics, /healthz, /v1/sessions (default 127.0.0.1:9464, or "off")
  --max-sessions N       concurrent migrations (default 64)
  --log-level LEVEL      debug | info | warn | error (default info)
  -h, --help

Signals: SIGTERM/SIGINT stop gracefully (a second one forces exit). Logs are JSON lines on stderr.
`;

const SOURCE_USAGE = `Usage: yabusame source [options]

  --config FILE          JSON config with migrations (see README); flags below override it
  --listen H:P           page server and control API (default 127.0.0.1:7070)
  --migration SPEC       serve a migration: id=ID,image=PATH[,frozen] (repeatable)
  --exit-when-done       exit 0 once every configured migration completed
  --log-level LEVEL      debug | info | warn | error (default info)
  -h, --help

Control API on the same port: GET/POST /v1/migrations, POST /v1/migrations/ID/freeze,
DELETE /v1/migrations/ID, GET /metrics.
`;

const STATUS_USAGE = `Usage: yabusame status [--dest URL | --source URL] [--json]

  --dest URL     a dest's metrics endpoint (default http://127.0.0.1:9464)
  --source URL   a source's control endpoint (e.g. http://127.0.0.1:7070)
  --json         print the raw JSON
`;

const FREEZE_USAGE = `Usage: yabusame freeze --source URL --id MIGRATION

Marks the migration frozen on the source: its VM is stopped, so pages can no longer change and
held requests are answered.
`;

class UsageError extends Error {}

function parse(args: string[], options: ParseArgsConfig['options'], usage: string) {
  try {
    const parsed = parseArgs({
      args,
      options: { ...options, help: { type: 'boolean', short: 'h' } },
      strict: true,
    });
    if (parsed.values['help']) {
      process.stdout.write(usage);
      process.exit(0);
    }
    return parsed.values as Record<string, string | boolean | string[] | undefined>;
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${usage}`);
  }
}

const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);
const num = (v: unknown, name: string): number | undefined => {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n)) throw new UsageError(`--${name} must be an integer`);
  return n;
};

/** Stops on the first SIGTERM/SIGINT with a deadline; a second signal exits at once. */
function onShutdown(stop: () => Promise<void>, log: { info(m: string, f?: object): void }): void {
  let stopping = false;
  const handler = (signal: NodeJS.Signals): void => {
    if (stopping) {
      log.info('second signal: exiting now', { signal });
      process.exit(1);
    }
    stopping = true;
    log.info('stopping', { signal });
    sd.stopping();
    stop().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.on('SIGTERM', handler);
  process.on('SIGINT', handler);
}

async function runDest(args: string[]): Promise<void> {
  const v = parse(
    args,
    {
      config: { type: 'string' },
      socket: { type: 'string' },
      'metrics-listen': { type: 'string' },
      'max-sessions': { type: 'string' },
      'log-level': { type: 'string' },
    },
    DEST_USAGE,
  );
  const config = loadDestConfig(str(v['config']), {
    socketPath: str(v['socket']),
    metricsListen: str(v['metrics-listen']),
    maxSessions: num(v['max-sessions'], 'max-sessions'),
    logLevel: str(v['log-level']) as LogLevel | undefined,
  });
  const log = createLogger(config.logLevel, { service: 'yabusame-dest' });
  const registry = createMetricsRegistry();
  const activated = sd.listenFds().find((f) => f.name === 'handoff') ?? sd.listenFds()[0];
  const daemon = await startDestDaemon({
    ...(activated ? { listenFd: activated.fd } : { socketPath: config.socketPath }),
    http: config.metricsListen,
    maxSessions: config.maxSessions,
    handoffTimeoutMs: config.handoffTimeoutMs,
    session: {
      connectTimeoutMs: config.connectTimeoutMs,
      completeTimeoutMs: config.completeTimeoutMs,
      backgroundWindowBytes: config.backgroundWindowBytes,
      progressIntervalMs: config.progressIntervalMs,
      heartbeatMs: config.heartbeatMs,
      reconnectTimeoutMs: config.reconnectTimeoutMs,
      backgroundDelayMs: config.backgroundDelayMs,
    },
    bulkNice: config.bulkThreadNice,
    logLevel: config.logLevel,
    log,
    metrics: createDestMetrics(registry),
    metricsText: () => metricsText(registry),
    onSessionEnd: (s) =>
      sd.status(`${s.migrationId} ${s.state}; serving ${daemon.sessions().length}`),
  });
  sd.ready();
  sd.status('serving 0 migrations');
  onShutdown(() => daemon.close(), log);
}

function parseMigrationSpec(spec: string): { id: string; image: string; frozen: boolean } {
  const out: Record<string, string | boolean> = {};
  for (const part of spec.split(',')) {
    const [k, ...rest] = part.split('=');
    out[k!] = rest.length ? rest.join('=') : true;
  }
  if (typeof out['id'] !== 'string' || typeof out['image'] !== 'string') {
    throw new UsageError(`--migration needs id=ID,image=PATH[,frozen], got "${spec}"`);
  }
  return {
    id: out['id'],
    image: out['image'],
    frozen: out['frozen'] === true || out['frozen'] === 'true',
  };
}

async function runSource(args: string[]): Promise<void> {
  const v = parse(
    args,
    {
      config: { type: 'string' },
      listen: { type: 'string' },
      migration: { type: 'string', multiple: true },
      'exit-when-done': { type: 'boolean' },
      'log-level': { type: 'string' },
    },
    SOURCE_USAGE,
  );
  const specs = ((v['migration'] as string[] | undefined) ?? []).map(parseMigrationSpec);
  const config = loadSourceConfig(str(v['config']), {
    listen: str(v['listen']),
    exitWhenDone: v['exit-when-done'] === true ? true : undefined,
    logLevel: str(v['log-level']) as LogLevel | undefined,
    ...(specs.length ? { migrations: specs } : {}),
  });
  const log = createLogger(config.logLevel, { service: 'yabusame-source' });
  const registry = createMetricsRegistry();
  const server = await startSourceServer({
    listen: config.listen,
    backgroundFrameBytes: config.backgroundFrameBytes,
    bulkThreadNice: config.bulkThreadNice,
    metrics: createSourceMetrics(registry),
    log,
    httpHandler: (req, res) => {
      if (req.url !== '/metrics') {
        res.writeHead(404, { 'content-type': 'application/json' });
        res.end('{"error":{"code":"NOT_FOUND","message":"no such path"}}');
        return;
      }
      metricsText(registry).then(
        ({ contentType, body }) => res.writeHead(200, { 'content-type': contentType }).end(body),
        (err: Error) => res.writeHead(500).end(err.message),
      );
    },
  });
  for (const m of config.migrations) server.registry.register(m);
  if (config.exitWhenDone && config.migrations.length > 0) {
    const ids = new Set(config.migrations.map((m) => m.id));
    server.registry.onEvent((event) => {
      if (event.type !== 'complete') return;
      ids.delete(event.id);
      if (ids.size === 0) {
        log.info('every migration completed; exiting');
        void server.close().then(() => process.exit(0));
      }
    });
  }
  sd.ready();
  onShutdown(() => server.close(), log);
}

async function fetchJson(url: string, init?: RequestInit): Promise<unknown> {
  let res: Response;
  try {
    res = await fetch(url, init);
  } catch (err) {
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    throw Object.assign(new Error(`cannot reach ${url}: ${cause?.code ?? cause?.message ?? err}`), {
      code: 'UNREACHABLE',
    });
  }
  const body = (await res.json()) as unknown;
  if (!res.ok) {
    const e = (body as { error?: { code?: string; message?: string } }).error;
    throw new Error(`${res.status} ${e?.code ?? ''} ${e?.message ?? ''}`.trim());
  }
  return body;
}

async function runStatus(args: string[]): Promise<void> {
  const v = parse(
    args,
    { dest: { type: 'string' }, source: { type: 'string' }, json: { type: 'boolean' } },
    STATUS_USAGE,
  );
  const source = str(v['source']);
  const url = source
    ? `${source.replace(/\/$/, '')}/v1/migrations`
    : `${(str(v['dest']) ?? 'http://127.0.0.1:9464').replace(/\/$/, '')}/v1/sessions`;
  const body = await fetchJson(url);
  if (v['json']) {
    process.stdout.write(JSON.stringify(body, null, 2) + '\n');
    return;
  }
  const rows = source
    ? ((body as { migrations?: Array<Record<string, unknown>> }).migrations ?? [])
    : ((body as { active: Array<Record<string, unknown>> }).active ?? []);
  if (rows.length === 0) process.stdout.write('no migrations\n');
  for (const r of rows) {
    const total = Number(r['totalPages'] ?? 0);
    const present = Number(r['presentPages'] ?? r['sentPages'] ?? 0);
    const pct = total ? ((100 * present) / total).toFixed(1) : '-';
    process.stdout.write(
      `${String(r['migrationId'] ?? r['id'])}\t${String(r['state'])}\t${present}/${total} pages (${pct}%)\n`,
    );
  }
}

async function runFreeze(args: string[]): Promise<void> {
  const v = parse(args, { source: { type: 'string' }, id: { type: 'string' } }, FREEZE_USAGE);
  const source = str(v['source']);
  const id = str(v['id']);
  if (!source || !id) throw new UsageError(FREEZE_USAGE);
  await fetchJson(`${source.replace(/\/$/, '')}/v1/migrations/${encodeURIComponent(id)}/freeze`, {
    method: 'POST',
  });
  process.stdout.write(`${id}: frozen\n`);
}

async function main(argv: string[]): Promise<void> {
  const [cmd, ...rest] = argv;
  if (cmd === 'dest' || cmd === 'source') sys.keepFreedBuffers(64 * 1024 * 1024);
  switch (cmd) {
    case 'dest':
      return runDest(rest);
    case 'source':
      return runSource(rest);
    case 'status':
      return runStatus(rest);
    case 'freeze':
      return runFreeze(rest);
    case 'demo': {
      const { main: demo } = await import('../scripts/demo.js');
      return demo(rest);
    }
    case '--version':
    case '-V':
      process.stdout.write(`${VERSION}\n`);
      return;
    case undefined:
    case '--help':
    case '-h':
    case 'help':
      process.stdout.write(USAGE);
      if (cmd === undefined) process.exitCode = 2;
      return;
    default:
      throw new UsageError(`unknown command "${cmd}"\n\n${USAGE}`);
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  if (err instanceof UsageError) {
    process.stderr.write(`yabusame: ${err.message}\n`);
    process.exit(2);
  }
  if (err instanceof ConfigError) {
    process.stderr.write(`yabusame: ${err.code}: ${err.message}\n`);
    process.exit(2);
  }
  const code = (err as { code?: string }).code;
  process.stderr.write(
    `yabusame: ${code ? `${code}: ` : ''}${(err as Error).message ?? String(err)}\n`,
  );
  process.exit(1);
});
