import t, { type Test } from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  ConfigError,
  loadDestConfig,
  loadSourceConfig,
  keyOptions,
  DEST_KEYS,
  parseHostPort,
  parseMigrationSpec,
  SOURCE_KEYS,
} from '../../daemon/ops/config.js';

function tempDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-config-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function writeJson(dir: string, name: string, value: unknown): string {
  const file = join(dir, name);
  writeFileSync(file, typeof value === 'string' ? value : JSON.stringify(value));
  return file;
}

/** Runs `fn`, expects a ConfigError with `code`, returns it for message checks. */
function configError(t: Test, fn: () => unknown, code: string): ConfigError {
  try {
    fn();
  } catch (err) {
    t.type(err, ConfigError);
    t.equal((err as ConfigError).code, code);
    return err as ConfigError;
  }
  t.fail(`expected ConfigError ${code}`);
  return new ConfigError('CONFIG_INVALID', 'unreachable');
}

t.test('parseHostPort', async (t) => {
  t.same(parseHostPort('127.0.0.1:9464'), { host: '127.0.0.1', port: 9464 });
  t.same(parseHostPort('[::1]:0'), { host: '::1', port: 0 });
  t.same(parseHostPort('example.org:80'), { host: 'example.org', port: 80 });
  for (const bad of ['', '9464', 'host:', ':80', 'h:65536', 'h:-1', '::1:80', 'a b:1']) {
    t.equal(parseHostPort(bad), null, JSON.stringify(bad));
  }
});

t.test('dest defaults: secure unless told otherwise', async (t) => {
  const c = loadDestConfig();
  t.same(c.metricsListen, { host: '127.0.0.1', port: 9464 });
  t.equal(c.socket, '/run/yabusame/dest.sock');
  t.equal(c.controlSocket, '/run/yabusame/dest-control.sock', 'details on a UNIX socket');
  t.equal(c.controlSocketMode, 0o660);
  t.equal(c.insecureNoAuth, false, 'secrets required');
  t.equal(c.allowPlaintextSources, false, 'no plaintext off this host');
  t.same(c.allowedSources, [], 'any source (each migration has its secret)');
  t.equal(c.allowedUids, undefined, 'root and ourselves');
  t.equal(c.maxSessions, 64);
  t.equal(c.maxPendingHandoffsPerUid, 8);
});

t.test('dest: defaults < file < environment < flags < computed', async (t) => {
  const dir = tempDir(t);
  const file = writeJson(dir, 'dest.json', {
    maxSessions: 8,
    logLevel: 'debug',
    metricsListen: '[::1]:9100',
    heartbeatMs: 100,
  });
  const c = loadDestConfig({
    file,
    env: { YABUSAME_LOG_LEVEL: 'error', YABUSAME_HEARTBEAT_MS: '200', YABUSAME_MAX_SESSIONS: '9' },
    flags: { 'log-level': 'warn', socket: undefined, 'max-sessions': '10' },
    extra: { maxSessions: 11 },
  });
  t.equal(c.heartbeatMs, 200, 'environment over the file');
  t.equal(c.logLevel, 'warn', 'flag over the environment');
  t.equal(c.maxSessions, 11, 'computed over everything');
  t.equal(c.socket, '/run/yabusame/dest.sock', 'an undefined flag = not given');
  t.same(c.metricsListen, { host: '::1', port: 9100 }, 'from the file');
  t.equal(loadDestConfig({ flags: { 'metrics-listen': 'off' } }).metricsListen, null, 'off');
  t.has(
    loadDestConfig({ env: { YABUSAME_ALLOWED_UIDS: '0, 1000', YABUSAME_ALLOWED_SOURCES: '' } }),
    { allowedUids: [0, 1000], allowedSources: [] },
    'lists from the environment',
  );
  t.equal(loadDestConfig({ flags: { 'insecure-no-auth': true } }).insecureNoAuth, true);
  t.equal(loadDestConfig({ env: { YABUSAME_INSECURE_NO_AUTH: 'yes' } }).insecureNoAuth, true);
});

t.test('every key has a flag, and every flag a key', async (t) => {
  for (const [keys, schema] of [
    [DEST_KEYS, loadDestConfig()],
    [SOURCE_KEYS, loadSourceConfig()],
  ] as const) {
    const names = keys.map((k) => k.key);
    t.equal(new Set(names).size, names.length, 'no key twice');
    for (const k of Object.keys(schema)) {
      // Lists have flags of their own (--migration; --firecracker-socket and its companions).
      if (k === 'migrations' || k === 'firecracker') continue;
      t.ok(names.includes(k), `${k} can be set by a flag`);
    }
    t.equal(Object.keys(keyOptions(keys)).length, keys.length);
  }
});

t.test('dest errors carry stable codes', async (t) => {
  const dir = tempDir(t);
  const nf = configError(
    t,
    () => loadDestConfig({ file: join(dir, 'absent.json') }),
    'CONFIG_NOT_FOUND',
  );
  t.match(nf.message, /absent\.json/);
  t.equal((nf.cause as NodeJS.ErrnoException).code, 'ENOENT', 'cause kept');
  const bad = configError(
    t,
    () => loadDestConfig({ file: writeJson(dir, 'bad.json', '{\n  "a": 1,\n  "b":\n}') }),
    'CONFIG_BAD_JSON',
  );
  t.match(bad.message, /line 4, column 1/, 'where the JSON breaks');
  const root = configError(
    t,
    () => loadDestConfig({ file: writeJson(dir, 'arr.json', [1]) }),
    'CONFIG_INVALID',
  );
  t.match(root.message, /\(root\)/);
  const range = configError(
    t,
    () => loadDestConfig({ file: writeJson(dir, 'n.json', { maxSessions: 0 }) }),
    'CONFIG_INVALID',
  );
  t.match(
    range.message,
    /maxSessions \(--max-sessions, YABUSAME_MAX_SESSIONS\)/,
    'names all three',
  );
  const typo = configError(
    t,
    () => loadDestConfig({ file: writeJson(dir, 'typo.json', { maxSesions: 3 }) }),
    'CONFIG_INVALID',
  );
  t.match(typo.message, /maxSesions/, 'unknown keys are refused, so typos show');
  const hp = configError(
    t,
    () => loadDestConfig({ flags: { 'metrics-listen': 'localhost' } }),
    'CONFIG_INVALID',
  );
  t.match(hp.message, /metricsListen.*expected host:port/);
  const win = configError(
    t,
    () => loadDestConfig({ flags: { 'background-window-bytes': '100000' } }),
    'CONFIG_INVALID',
  );
  t.match(win.message, /backgroundWindowBytes.*multiple of 4096/);
  const notInt = configError(
    t,
    () => loadDestConfig({ env: { YABUSAME_MAX_SESSIONS: 'many' } }),
    'CONFIG_INVALID',
  );
  t.match(notInt.message, /YABUSAME_MAX_SESSIONS: expected an integer, got "many"/);
  const notBool = configError(
    t,
    () => loadDestConfig({ env: { YABUSAME_INSECURE_NO_AUTH: 'maybe' } }),
    'CONFIG_INVALID',
  );
  t.match(notBool.message, /expected true or false/);
  const mode = configError(
    t,
    () => loadDestConfig({ flags: { 'control-socket-mode': '666' + '6' } }),
    'CONFIG_INVALID',
  );
  t.match(mode.message, /octal/);
  t.same(
    loadDestConfig({ flags: { 'allowed-sources': '10.0.0.0/8, fd00::/8,192.0.2.7,src.example' } })
      .allowedSources,
    ['10.0.0.0/8', 'fd00::/8', '192.0.2.7', 'src.example'],
  );
  for (const bad of ['10.0.0.0/33', '10.0.0.0/8/1', 'fd00::/129', 'a b', 'host/8', '-x']) {
    const e = configError(
      t,
      () => loadDestConfig({ flags: { 'allowed-sources': bad } }),
      'CONFIG_INVALID',
    );
    t.match(e.message, /allowedSources\.0: expected an address, a CIDR/, bad);
  }
});

t.test('source defaults', async (t) => {
  const c = loadSourceConfig();
  t.same(c.listen, { host: '127.0.0.1', port: 7070 });
  t.equal(c.imageRoot, '/var/lib/yabusame/images', 'images come from one directory');
  t.equal(c.controlSocket, '/run/yabusame/source.sock', 'control on a UNIX socket');
  t.equal(c.controlListen, null, 'no control over TCP');
  t.same(c.metricsListen, { host: '127.0.0.1', port: 9465 });
  t.equal(c.insecureNoAuth, false);
  t.equal(c.allowPlaintext, false);
  t.equal(c.maxMigrations, 64);
  t.equal(c.backgroundFrameBytes, 256 * 1024);
  t.same(c.migrations, []);
});

t.test('source migrations: secret files relative to the config file', async (t) => {
  const dir = tempDir(t);
  const file = writeJson(dir, 'source.json', {
    listen: '0.0.0.0:0',
    imageRoot: dir,
    migrations: [
      { id: 'vm1', image: 'vm1.img', secretFile: 'vm1.key', qmp: 'run/vm1.qmp' },
      {
        id: 'vm2',
        image: 'sub/vm2',
        frozen: true,
        regions: [
          { name: 'lo', offset: 0, sizeBytes: 8192, fileOffset: 0, pageSizeBytes: 4096 },
          {
            name: 'hi',
            offset: 2 ** 21,
            sizeBytes: 2 ** 21,
            fileOffset: 2 ** 21,
            pageSizeBytes: 2 ** 21,
          },
        ],
      },
    ],
  });
  const c = loadSourceConfig({ file, flags: { 'exit-when-done': true } });
  t.same(c.listen, { host: '0.0.0.0', port: 0 });
  t.equal(c.exitWhenDone, true);
  const [vm1, vm2] = c.migrations;
  t.equal(vm1?.image, 'vm1.img', 'images stay relative: they resolve beneath imageRoot');
  t.equal(vm1?.secretFile, join(dir, 'vm1.key'), 'secret files resolve next to the config');
  t.equal(vm1?.qmp, join(dir, 'run/vm1.qmp'), 'so do QMP sockets');
  t.equal(vm2?.qmp, undefined);
  t.equal(vm1?.frozen, false);
  t.equal(vm1?.regions, undefined, 'default region: sized when the image opens');
  t.equal(vm2?.frozen, true);
  t.equal(vm2?.regions?.length, 2, 'given regions kept; the image need not exist yet');
});

t.test('source errors', async (t) => {
  const dir = tempDir(t);
  const region = { name: 'r', offset: 0, sizeBytes: 4096, fileOffset: 0, pageSizeBytes: 4096 };
  const cases: Array<[string, unknown, RegExp]> = [
    ['bad id', { migrations: [{ id: 'a b', image: '/x' }] }, /migrations\.0\.id/],
    [
      'duplicate id',
      {
        migrations: [
          { id: 'a', image: '/x', regions: [region] },
          { id: 'a', image: '/y', regions: [region] },
        ],
      },
      /migrations\.1\.id: duplicate id/,
    ],
    [
      'unaligned size',
      { migrations: [{ id: 'a', image: '/x', regions: [{ ...region, sizeBytes: 1000 }] }] },
      /migrations\.0\.regions\.0\.sizeBytes: must be a multiple of pageSizeBytes/,
    ],
    [
      'page size not a power of two',
      { migrations: [{ id: 'a', image: '/x', regions: [{ ...region, pageSizeBytes: 12288 }] }] },
      /regions\.0\.pageSizeBytes: must be a power of two/,
    ],
    [
      'overlap',
      {
        migrations: [
          {
            id: 'a',
            image: '/x',
            regions: [
              { ...region, sizeBytes: 8192 },
              { ...region, name: 's', offset: 4096 },
            ],
          },
        ],
      },
      /regions\.1\.offset: overlaps region r/,
    ],
    ['unknown migration key', { migrations: [{ id: 'a', image: 'x', secret: 'ab' }] }, /secret/],
    ['frame size', { backgroundFrameBytes: 1000 }, /backgroundFrameBytes/],
    ['listen', { listen: 'off' }, /listen.*expected host:port/],
    ['cert without key', { tlsCertFile: '/c.pem' }, /tlsCertFile and tlsKeyFile go together/],
    ['TCP control without token', { controlListen: '127.0.0.1:1' }, /controlTokenFile/],
  ];
  for (const [name, json, message] of cases) {
    const err = configError(
      t,
      () => loadSourceConfig({ file: writeJson(dir, 'source.json', json) }),
      'CONFIG_INVALID',
    );
    t.match(err.message, message, name);
  }
  configError(t, () => loadSourceConfig({ file: join(dir, 'nope.json') }), 'CONFIG_NOT_FOUND');
  configError(
    t,
    () => loadSourceConfig({ file: writeJson(dir, 'x.json', 'nope') }),
    'CONFIG_BAD_JSON',
  );
});

t.test('--migration specs', async (t) => {
  t.same(parseMigrationSpec('id=vm1,image=vm1.img'), {
    id: 'vm1',
    image: 'vm1.img',
    frozen: false,
  });
  const s = parseMigrationSpec('id=vm1,image=a/b,frozen,secret-file=k');
  t.equal(s.frozen, true);
  t.ok(s.secretFile?.startsWith('/'), 'the secret file resolves against the working directory');
  const q = parseMigrationSpec('id=vm1,image=a/b,qmp=run/vm1.qmp');
  t.equal(q.qmp, join(process.cwd(), 'run/vm1.qmp'), 'so does the QMP socket');
  t.equal(q.frozen, false);
  for (const [spec, msg] of [
    ['id=vm1,image=x,qmp', /"qmp" needs a path/],
    ['id=vm1,image=x,qmp=', /"qmp" needs a path/],
    ['id=vm1', /needs id=ID,image=PATH/],
    ['id=vm1,image=x,frozn', /unknown key "frozn"/],
    ['id=vm1,image=x,frozen=yes', /takes no value/],
    ['id=vm1,image=x,secret=00', /unknown key "secret"/],
  ] as const) {
    configError(t, () => parseMigrationSpec(spec), 'CONFIG_INVALID');
    try {
      parseMigrationSpec(spec);
    } catch (err) {
      t.match((err as Error).message, msg, spec);
    }
  }
});

t.test('Firecracker sockets: from the file (paths beside it) and from flags', async (t) => {
  const dir = tempDir(t);
  const file = writeJson(dir, 'dest.json', {
    firecracker: [
      { socket: 'fc0.sock', memFile: 'vm.mem', prefetch: true },
      {
        socket: '/run/fc1.sock',
        source: 'wss://src:7070',
        migrationId: 'vm1',
        secretFile: 'vm1.secret',
        killOnFailure: true,
        socketMode: '0600',
      },
    ],
  });
  const c = loadDestConfig({
    file,
    append: { firecracker: [{ socket: '/run/fc2.sock', memFile: '/snap/vm2.mem' }] },
  });
  t.same(
    c.firecracker.map((f) => [f.socket, f.memFile, f.source, f.secretFile]),
    [
      [join(dir, 'fc0.sock'), join(dir, 'vm.mem'), undefined, undefined],
      ['/run/fc1.sock', undefined, 'wss://src:7070', join(dir, 'vm1.secret')],
      ['/run/fc2.sock', '/snap/vm2.mem', undefined, undefined],
    ],
    "the file's entries, relative paths beside it, then the flags' entry",
  );
  t.same(
    c.firecracker.map((f) => [f.prefetch, f.killOnFailure, f.socketMode]),
    [
      [true, false, 0o660],
      [false, true, 0o600],
      [false, false, 0o660],
    ],
    'defaults: no prefetch, no kill, mode 0660',
  );
  const bad = (entry: Record<string, unknown>, what: string, message: RegExp): void => {
    const e = configError(
      t,
      () => loadDestConfig({ append: { firecracker: [{ socket: '/run/x.sock', ...entry }] } }),
      'CONFIG_INVALID',
    );
    t.match(e.message, message, what);
  };
  bad({}, 'neither memFile nor source', /either memFile .* or source/);
  bad({ memFile: '/m', source: 'ws://127.0.0.1:1' }, 'both', /either memFile/);
  bad({ source: 'ws://127.0.0.1:1' }, 'source without migrationId', /needs migrationId/);
  bad({ source: 'http://h:1', migrationId: 'a' }, 'not a ws URL', /ws:\/\/ or wss:\/\//);
  bad(
    { source: 'ws://127.0.0.1:1', migrationId: 'a', prefetch: true },
    'prefetch with a source',
    /prefetch goes with memFile/,
  );
  bad({ memFile: '/m', secretFile: '/s' }, 'a secret for a file', /secretFile goes with source/);
  bad({ memFile: '/m', extra: 1 }, 'an unknown key', /extra/);
});
