/**
 * Runs the real `yabusame source` and `yabusame dest` as child processes on loopback, for the
 * demo, the benchmarks and the integration tests.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, statSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../daemon/cli.js', import.meta.url));

/** A free TCP port on loopback (bound then released; the daemon binds it right after). */
export async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** Polls `url` until it answers 200, or fails when the child exits or `timeoutMs` passes. */
export async function waitHttp(
  url: string,
  child: ChildProcess,
  timeoutMs = 15_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (let delayMs = 10; ; delayMs = Math.min(delayMs * 2, 200)) {
    if (child.exitCode !== null)
      throw new Error(`${url}: the daemon exited with ${child.exitCode}`);
    try {
      const res = await fetch(url);
      if (res.ok) return;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > deadline) throw new Error(`${url} did not answer within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

export interface Daemon {
  child: ChildProcess;
  /** Base HTTP URL (control API / metrics). */
  http: string;
  logPath: string;
  stop(): Promise<void>;
}

function spawnCli(args: string[], logPath: string): ChildProcess {
  // YABUSAME_DAEMON_NODE_ARGS passes node flags to the daemons (e.g. --cpu-prof for profiling).
  const nodeArgs = (process.env['YABUSAME_DAEMON_NODE_ARGS'] ?? '').split(' ').filter(Boolean);
  // The flags and environment of bin/yabusame.js's shebang, which this bypasses.
  const flags = ['--enable-source-maps', '--max-semi-space-size=1'];
  const child = spawn(process.execPath, [...flags, ...nodeArgs, CLI, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, MALLOC_ARENA_MAX: '2' },
  });
  child.stderr!.pipe(createWriteStream(logPath));
  return child;
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await exited;
  clearTimeout(timer);
}

function daemon(child: ChildProcess, http: string, logPath: string): Daemon {
  return { child, http, logPath, stop: () => stopChild(child) };
}

/**
 * `yabusame source` on a free loopback port, or on `opts.port` (a source restarted where its
 * dests expect it); `args` adds e.g. --migration specs.
 */
export async function startSource(
  dir: string,
  args: string[] = [],
  name = 'source',
  opts: { port?: number } = {},
): Promise<Daemon & { ws: string; port: number }> {
  const port = opts.port ?? (await freePort());
  const logPath = join(dir, `${name}.log`);
  const child = spawnCli(['source', '--listen', `127.0.0.1:${port}`, ...args], logPath);
  const http = `http://127.0.0.1:${port}`;
  try {
    await waitHttp(`${http}/v1/migrations`, child);
  } catch (err) {
    await stopChild(child);
    throw err;
  }
  return { ...daemon(child, http, logPath), ws: `ws://127.0.0.1:${port}`, port };
}

/**
 * `yabusame dest` with its handoff socket in `dir` (`<dir>/<name>.sock`) and its log in
 * `<dir>/<name>.log`. `opts.socket` and `opts.port` restart a dest where its VMMs and clients
 * expect it (same socket path, same metrics port) under a new name, so each life keeps its log.
 */
export async function startDest(
  dir: string,
  args: string[] = [],
  name = 'dest',
  opts: { port?: number; socket?: string } = {},
): Promise<Daemon & { socket: string; port: number }> {
  const port = opts.port ?? (await freePort());
  const socket = opts.socket ?? join(dir, `${name}.sock`);
  const logPath = join(dir, `${name}.log`);
  const child = spawnCli(
    ['dest', '--socket', socket, '--metrics-listen', `127.0.0.1:${port}`, ...args],
    logPath,
  );
  const http = `http://127.0.0.1:${port}`;
  try {
    await waitHttp(`${http}/healthz`, child);
  } catch (err) {
    await stopChild(child);
    throw err;
  }
  return { ...daemon(child, http, logPath), socket, port };
}

/** Registers a migration on a running source through its control API. */
export async function registerMigration(
  source: { http: string },
  m: { id: string; image: string; frozen?: boolean },
): Promise<void> {
  const res = await fetch(`${source.http}/v1/migrations`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      regions: [
        {
          name: 'ram0',
          offset: 0,
          sizeBytes: statSync(m.image).size,
          fileOffset: 0,
          pageSizeBytes: 4096,
        },
      ],
      ...m,
    }),
  });
  if (!res.ok) throw new Error(`register ${m.id}: ${res.status} ${await res.text()}`);
}

/** Marks a migration frozen on the source (its VM stopped). */
export async function freezeMigration(source: { http: string }, id: string): Promise<void> {
  const res = await fetch(`${source.http}/v1/migrations/${encodeURIComponent(id)}/freeze`, {
    method: 'POST',
  });
  if (!res.ok) throw new Error(`freeze ${id}: ${res.status} ${await res.text()}`);
}

/** A migration's state on the source (registered, frozen, complete, aborted). */
export async function migrationState(
  source: { http: string },
  id: string,
): Promise<string | undefined> {
  const res = await fetch(`${source.http}/v1/migrations/${encodeURIComponent(id)}`);
  if (!res.ok) return undefined;
  const body = (await res.json()) as { state?: string; migration?: { state?: string } };
  return body.state ?? body.migration?.state;
}
