import t, { type Test } from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  ConfigError,
  loadDestConfig,
  loadSourceConfig,
  parseHostPort,
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

t.test('dest defaults', async (t) => {
  t.same(loadDestConfig(), {
    socketPath: '/run/yabusame/dest.sock',
    metricsListen: { host: '127.0.0.1', port: 9464 },
    maxSessions: 64,
    handoffTimeoutMs: 5000,
    connectTimeoutMs: 5000,
    completeTimeoutMs: 10000,
    backgroundWindowBytes: 8 * 1024 * 1024,
    bulkThreadNice: 0,
    backgroundDelayMs: 0,
    reconnectTimeoutMs: 120000,
    heartbeatMs: 5000,
    progressIntervalMs: 1000,
    logLevel: 'info',
  });
});

t.test('dest: file, then overrides on top', async (t) => {
  const dir = tempDir(t);
  const file = writeJson(dir, 'dest.json', {
    maxSessions: 8,
    logLevel: 'debug',
    metricsListen: '[::1]:9100',
  });
  const c = loadDestConfig(file, { logLevel: 'warn', socketPath: undefined });
  t.equal(c.maxSessions, 8, 'from the file');
  t.equal(c.logLevel, 'warn', 'override wins');
  t.equal(c.socketPath, '/run/yabusame/dest.sock', 'undefined override = not given');
  t.same(c.metricsListen, { host: '::1', port: 9100 });
  t.equal(loadDestConfig(undefined, { metricsListen: 'off' }).metricsListen, null, 'off');
});

t.test('dest errors carry stable codes', async (t) => {
  const dir = tempDir(t);
  const nf = configError(t, () => loadDestConfig(join(dir, 'absent.json')), 'CONFIG_NOT_FOUND');
  t.match(nf.message, /absent\.json/);
  t.equal((nf.cause as NodeJS.ErrnoException).code, 'ENOENT', 'cause kept');
  configError(t, () => loadDestConfig(writeJson(dir, 'bad.json', '{"a":')), 'CONFIG_BAD_JSON');
  const root = configError(
    t,
    () => loadDestConfig(writeJson(dir, 'arr.json', [1])),
    'CONFIG_INVALID',
  );
  t.match(root.message, /\(root\)/);
  const range = configError(
    t,
    () => loadDestConfig(writeJson(dir, 'n.json', { maxSessions: 0 })),
    'CONFIG_INVALID',
  );
  t.match(range.message, /maxSessions/, 'names the path');
  const typo = configError(
    t,
    () => loadDestConfig(writeJson(dir, 'typo.json', { maxSesions: 3 })),
    'CONFIG_INVALID',
  );
  t.match(typo.message, /maxSesions/, 'unknown keys are refused, so typos show');
  const hp = configError(
    t,
    () => loadDestConfig(undefined, { metricsListen: 'localhost' }),
    'CONFIG_INVALID',
  );
  t.match(hp.message, /metricsListen: expected host:port/);
  const win = configError(
    t,
    () => loadDestConfig(undefined, { backgroundWindowBytes: 100_000 }),
    'CONFIG_INVALID',
  );
  t.match(win.message, /backgroundWindowBytes.*multiple of 4096/);
});

t.test('source defaults', async (t) => {
  t.same(loadSourceConfig(), {
    listen: { host: '127.0.0.1', port: 7070 },
    backgroundFrameBytes: 256 * 1024,
    bulkThreadNice: 0,
    exitWhenDone: false,
    logLevel: 'info',
    metricsListen: null,
    migrations: [],
  });
});

t.test('source migrations: default region from the image size, paths from the file', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'vm1.img'), Buffer.alloc(5 * 4096));
  const file = writeJson(dir, 'source.json', {
    listen: '0.0.0.0:0',
    migrations: [
      { id: 'vm1', image: 'vm1.img' },
      {
        id: 'vm2',
        image: '/dev/shm/vm2',
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
  const c = loadSourceConfig(file, { exitWhenDone: true });
  t.same(c.listen, { host: '0.0.0.0', port: 0 });
  t.equal(c.exitWhenDone, true);
  const [vm1, vm2] = c.migrations;
  t.equal(vm1?.image, join(dir, 'vm1.img'), 'relative to the config file');
  t.equal(vm1?.frozen, false);
  t.same(vm1?.regions, [
    { name: 'ram0', offset: 0, sizeBytes: 5 * 4096, fileOffset: 0, pageSizeBytes: 4096 },
  ]);
  t.equal(vm2?.frozen, true);
  t.equal(vm2?.regions.length, 2, 'given regions kept; the image need not exist yet');
});

t.test('source errors', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'odd.img'), Buffer.alloc(4097));
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
    [
      'missing image',
      { migrations: [{ id: 'a', image: 'absent.img' }] },
      /migrations\.0\.image: cannot stat/,
    ],
    ['image not whole pages', { migrations: [{ id: 'a', image: 'odd.img' }] }, /4097 bytes/],
    ['frame size', { backgroundFrameBytes: 1000 }, /backgroundFrameBytes/],
    ['listen', { listen: 'off' }, /listen: expected host:port/],
  ];
  for (const [name, json, message] of cases) {
    const err = configError(
      t,
      () => loadSourceConfig(writeJson(dir, 'source.json', json)),
      'CONFIG_INVALID',
    );
    t.match(err.message, message, name);
  }
  configError(t, () => loadSourceConfig(join(dir, 'nope.json')), 'CONFIG_NOT_FOUND');
  configError(t, () => loadSourceConfig(writeJson(dir, 'x.json', 'nope')), 'CONFIG_BAD_JSON');
});
