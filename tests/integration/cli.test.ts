// The daemons as an operator meets them on the command line: exit codes (2 for every usage or
// config error, before anything is bound), socket paths that are never taken from a live
// daemon nor from a file, bind errors that name their option, and SIGHUP.
import t from 'tap';
import { spawn, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { existsSync, lstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI, startDest } from '../../scripts/lib/daemons.js';
import * as sys from '../../daemon/linux/sys.js';

const dir = mkdtempSync(join(tmpdir(), 'yabusame-cli-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

function cli(args: string[]): SpawnSyncReturns<string> {
  return spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 30_000 });
}

/** A TCP port something else holds. */
async function busyPort(): Promise<{ port: number; server: Server }> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { port: (server.address() as { port: number }).port, server };
}

t.test('usage and config errors exit 2 and bind nothing', async (t) => {
  const { port, server } = await busyPort();
  server.close();
  const cases: Array<[string, string[], RegExp]> = [
    ['unknown flag', ['dest', '--sockt', join(dir, 'x')], /Unknown option '--sockt'/],
    ['not an integer', ['dest', '--max-sessions', 'lots'], /--max-sessions: expected an integer/],
    ['a bad address', ['source', '--listen', 'nohost'], /listen .*expected host:port/],
    [
      'a typo in --migration',
      ['source', '--migration', 'id=a,image=x,frozn'],
      /unknown key "frozn"/,
    ],
    [
      'a missing image',
      [
        'source',
        '--image-root',
        dir,
        '--listen',
        `127.0.0.1:${port}`,
        '--migration',
        'id=a,image=nope',
      ],
      /migrations\.a\.image: IMAGE_NOT_FOUND/,
    ],
    [
      'an image that is a directory',
      [
        'source',
        '--image-root',
        tmpdir(),
        '--listen',
        `127.0.0.1:${port}`,
        '--migration',
        `id=a,image=${dir}`,
      ],
      /IMAGE_NOT_REGULAR/,
    ],
    [
      'a bad control URL',
      ['register', '--control-url', 'nope', '--id', 'a', '--image', 'x'],
      /--control-url/,
    ],
    ['plaintext off loopback', ['source', '--listen', '0.0.0.0:7070'], /needs TLS/],
  ];
  for (const [what, args, message] of cases) {
    const r = cli(args);
    t.equal(r.status, 2, `${what}: exit 2`);
    t.match(r.stderr, message, what);
  }
  // Nothing was bound by the failed starts: the port is still free.
  const again = createServer();
  await new Promise<void>((resolve, reject) => {
    again.once('error', reject);
    again.listen(port, '127.0.0.1', () => resolve());
  });
  again.close();
  t.pass(`port ${port} was never bound`);

  const bad = join(dir, 'bad.json');
  writeFileSync(bad, '{\n  "maxSessions": 4,\n  "logLevel": "info"\n  "heartbeatMs": 1\n}\n');
  const r = cli(['dest', '--config', bad, '--check-config']);
  t.equal(r.status, 2);
  t.match(
    r.stderr,
    /CONFIG_BAD_JSON: .*line 4, column 3/,
    'a JSON error names its line and column',
  );
});

t.test('socket paths: a live socket and a file are never taken; a dead socket is', async (t) => {
  const first = await startDest(dir, [], 'first');
  t.teardown(() => first.stop());
  const control = join(dir, 'second.control');
  const second = cli([
    'dest',
    '--socket',
    first.socket,
    '--control-socket',
    control,
    '--metrics-listen',
    'off',
  ]);
  t.equal(second.status, 1);
  t.match(second.stderr, /SOCKET_IN_USE/, 'another daemon listens there');
  t.ok(lstatSync(first.socket).isSocket(), 'the first daemon keeps its socket');
  t.notOk(existsSync(control), 'the failed start left no control socket behind');
  t.ok((await fetch(`${first.http}/healthz`)).ok, 'and keeps serving');

  const file = join(dir, 'a-file');
  writeFileSync(file, 'precious');
  const onFile = cli([
    'dest',
    '--socket',
    file,
    '--control-socket',
    'off',
    '--metrics-listen',
    'off',
  ]);
  t.equal(onFile.status, 1);
  t.match(onFile.stderr, /SOCKET_PATH_NOT_SOCKET/);
  t.equal(readFileSync(file, 'utf8'), 'precious', 'a regular file is never deleted');

  // A socket whose daemon died: bound, never listened on, closed: nobody answers.
  const stale = join(dir, 'stale.sock');
  const fd = sys.socketUnixDgram();
  sys.bindUnix(fd, stale);
  sys.close(fd);
  const taken = await startDest(dir, [], 'taken', { socket: stale });
  t.teardown(() => taken.stop());
  t.ok((await fetch(`${taken.http}/healthz`)).ok, 'a dead socket is taken over');
});

t.test('a failed bind names its option, and the start cleans up after itself', async (t) => {
  const { port, server } = await busyPort();
  t.teardown(() => server.close());
  const socket = join(dir, 'bind.sock');
  const r = cli([
    'dest',
    '--socket',
    socket,
    '--control-socket',
    join(dir, 'bind.control'),
    '--metrics-listen',
    `127.0.0.1:${port}`,
  ]);
  t.equal(r.status, 1, 'a runtime failure: exit 1');
  t.match(
    r.stderr,
    new RegExp(`EADDRINUSE: metricsListen 127\\.0\\.0\\.1:${port}: another process`),
  );
  t.notOk(existsSync(socket), 'the handoff socket is removed again');
  t.notOk(existsSync(join(dir, 'bind.control')), 'and the control socket');
});

t.test('SIGHUP re-reads the log level and the daemon stays', async (t) => {
  const dest = await startDest(dir, [], 'hup');
  t.teardown(() => dest.stop());
  dest.child.kill('SIGHUP');
  const deadline = Date.now() + 10_000;
  while (!readFileSync(dest.logPath, 'utf8').includes('SIGHUP: reloading the log level')) {
    if (Date.now() > deadline) throw new Error('no SIGHUP log line');
    await new Promise((r) => setTimeout(r, 20));
  }
  t.equal(dest.child.exitCode, null, 'still running');
  t.ok((await fetch(`${dest.http}/healthz`)).ok, 'still serving');
  const lines = readFileSync(dest.logPath, 'utf8').split('\n').filter(Boolean);
  const start = JSON.parse(lines[0]!) as { msg: string; version: string; config: object };
  t.equal(start.msg, 'yabusame dest starting');
  t.match(start.version, /^\d+\.\d+\.\d+/, 'the version at start');
  t.match(start.config, { maxSessions: 64, metricsListen: /^127\.0\.0\.1:\d+$/ }, 'and the config');
});

t.test('a reader that goes away is not an error', async (t) => {
  const child = spawn(process.execPath, [CLI, '--help'], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.destroy();
  const code = await new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  t.equal(code, 0, 'EPIPE on stdout: exit 0');
});
