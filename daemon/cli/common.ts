/**
 * What the commands share: argument parsing with usage errors, reading the files a config
 * names (certificates, tokens, secrets: read before anything is bound, so a bad one is a config
 * error, exit 2), group names, JSON over a UNIX socket, and the shutdown signals.
 */
import { fstatSync, openSync, readFileSync, closeSync } from 'node:fs';
import http from 'node:http';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { ConfigError } from '../ops/config.js';
import * as sd from '../ops/sdnotify.js';

export class UsageError extends Error {}

/** Parses `args` against `options` (+ -h/--help, which prints `usage` and exits 0). */
export function parse(
  args: string[],
  options: ParseArgsConfig['options'],
  usage: string,
): Record<string, string | boolean | string[] | undefined> {
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

export const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);

/**
 * Reads a file a config names: PEM certificates and keys, and (`secret`) files that only their
 * owner may read (tokens, migration secrets: group or world access is refused).
 */
export function readConfigFile(path: string, key: string, secret = false): Buffer {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (err) {
    throw new ConfigError(
      'CONFIG_INVALID',
      `${key}: cannot read ${path}: ${(err as Error).message}`,
    );
  }
  try {
    if (secret && (fstatSync(fd).mode & 0o077) !== 0) {
      throw new ConfigError(
        'CONFIG_INVALID',
        `${key}: ${path} is readable by its group or others; chmod 600 it`,
      );
    }
    return readFileSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** A group given by name or number → its gid (/etc/group). */
export function resolveGroup(group: string | undefined, key: string): number | undefined {
  if (group === undefined) return undefined;
  if (/^\d+$/.test(group)) return Number(group);
  const line = readFileSync('/etc/group', 'utf8')
    .split('\n')
    .find((l) => l.split(':')[0] === group);
  const gid = line ? Number(line.split(':')[2]) : NaN;
  if (!Number.isInteger(gid)) throw new ConfigError('CONFIG_INVALID', `${key}: no group ${group}`);
  return gid;
}

/** Where a client command sends its requests: a UNIX socket, or a TCP URL with a token. */
export type Target = { socketPath: string } | { url: string; token?: string | undefined };

/** One JSON request; resolves with the status and the parsed body. */
export function requestJson(
  target: Target,
  method: string,
  path: string,
  body?: unknown,
): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const text = body === undefined ? undefined : JSON.stringify(body);
    const headers: Record<string, string> = {};
    if (text !== undefined) headers['content-type'] = 'application/json';
    let opts: http.RequestOptions;
    if ('socketPath' in target) {
      opts = { socketPath: target.socketPath, path, method, headers };
    } else {
      const u = new URL(path, target.url);
      if (target.token) headers['authorization'] = `Bearer ${target.token}`;
      opts = { host: u.hostname, port: u.port, path: u.pathname, method, headers };
    }
    const where = 'socketPath' in target ? target.socketPath : target.url;
    const req = http.request(opts, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const raw = Buffer.concat(chunks).toString('utf8');
        try {
          resolve({ status: res.statusCode ?? 0, body: raw ? JSON.parse(raw) : null });
        } catch {
          reject(
            Object.assign(new Error(`${where}: not JSON: ${raw.slice(0, 200)}`), {
              code: 'BAD_RESPONSE',
            }),
          );
        }
      });
    });
    req.on('error', (err: Error & { code?: string }) =>
      reject(
        Object.assign(new Error(`cannot reach ${where}: ${err.code ?? err.message}`), {
          code: 'UNREACHABLE',
        }),
      ),
    );
    req.end(text);
  });
}

/** A request whose error answer becomes an exception with the answer's code. */
export async function call(
  target: Target,
  method: string,
  path: string,
  body?: unknown,
): Promise<unknown> {
  const res = await requestJson(target, method, path, body);
  if (res.status >= 400) {
    const e = (res.body as { error?: { code?: string; message?: string } } | null)?.error;
    throw Object.assign(new Error(`${e?.message ?? `HTTP ${res.status}`}`), {
      code: e?.code ?? `HTTP_${res.status}`,
    });
  }
  return res.body;
}

/**
 * SIGTERM/SIGINT stop gracefully (a second one exits at once); SIGHUP calls `reload` (the log
 * level is re-read) instead of killing the daemon.
 */
export function onSignals(
  stop: () => Promise<void>,
  log: { info(m: string, f?: object): void },
  reload: () => void,
): void {
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
  process.on('SIGHUP', () => {
    log.info('SIGHUP: reloading the log level');
    reload();
  });
}

/**
 * systemd's view of a running daemon: STATUS= from `line` every few seconds (what `systemctl
 * status` shows), and WATCHDOG=1 at half the WatchdogSec= period, from the event loop, so a
 * wedged loop stops the pings and systemd restarts the daemon. No-ops without systemd.
 */
export function liveStatus(line: () => string, everyMs = 5000): void {
  const update = (): void => {
    try {
      sd.status(line());
    } catch {
      // the manager went away; nothing to tell
    }
  };
  update();
  setInterval(update, everyMs).unref();
  const watchdogMs = sd.watchdogIntervalMs();
  if (watchdogMs !== null) {
    setInterval(() => sd.watchdog(), Math.max(watchdogMs / 2, 100)).unref();
  }
}
