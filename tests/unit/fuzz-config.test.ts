// Config fuzzing: thousands of random and mutated JSON documents (and non-JSON bytes) through
// loadDestConfig and loadSourceConfig. Each either loads or throws a ConfigError with one of the
// documented codes; never any other exception.
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  ConfigError,
  loadDestConfig,
  loadSourceConfig,
  type DestConfig,
  type SourceConfig,
} from '../../daemon/ops/config.js';
import { prng } from '../../scripts/chaos/proxy.js';

const CODES = new Set(['CONFIG_NOT_FOUND', 'CONFIG_BAD_JSON', 'CONFIG_INVALID']);
const dir = mkdtempSync('/dev/shm/yabusame-fuzz-config-');
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const file = join(dir, 'config.json');
// A real image for migrations without regions (its default region is sized from the file).
const image = join(dir, 'vm.ram');
writeFileSync(image, Buffer.alloc(64 * 1024));
writeFileSync(join(dir, 'odd.ram'), Buffer.alloc(5000));
writeFileSync(join(dir, 'empty.ram'), Buffer.alloc(0));

const rand = prng(20261126);
const int = (n: number): number => Math.floor(rand() * n);
const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;

const VALID_DEST = {
  socket: '/run/yabusame/dest.sock',
  metricsListen: '127.0.0.1:9464',
  maxSessions: 64,
  handoffTimeoutMs: 5000,
  connectTimeoutMs: 5000,
  completeTimeoutMs: 10000,
  backgroundWindowBytes: 8388608,
  backgroundDelayMs: 0,
  reconnectTimeoutMs: 120000,
  heartbeatMs: 5000,
  progressIntervalMs: 1000,
  logLevel: 'info',
};
const VALID_SOURCE = {
  listen: '127.0.0.1:7070',
  backgroundFrameBytes: 262144,
  exitWhenDone: false,
  logLevel: 'debug',
  metricsListen: 'off',
  migrations: [
    { id: 'vm1', image, frozen: true },
    {
      id: 'vm2',
      image: 'vm.ram',
      regions: [
        { name: 'ram0', offset: 0, sizeBytes: 32768, fileOffset: 0, pageSizeBytes: 4096 },
        { name: 'ram1', offset: 32768, sizeBytes: 32768, fileOffset: 32768, pageSizeBytes: 4096 },
      ],
    },
  ],
};

/** Values that probe edges: wrong types, boundaries, huge and odd numbers, odd strings. */
const INTERESTING: unknown[] = [
  null,
  true,
  false,
  0,
  -1,
  1,
  4096,
  4095,
  65536,
  1.5,
  -0,
  1e308,
  -1e308,
  2 ** 53,
  2 ** 53 - 1,
  2 ** 31,
  3_600_001,
  '',
  'off',
  'on',
  '0',
  '127.0.0.1:0',
  '[::1]:9464',
  '[::1]',
  ':80',
  'host:99999',
  'a'.repeat(200),
  'vm.ram',
  'odd.ram',
  'empty.ram',
  'missing.ram',
  '../../etc/passwd',
  '\u0000',
  '\ud800',
  'debug',
  'trace',
  '__proto__',
  [],
  [1, 2],
  {},
  { __proto__: null },
  { constructor: { prototype: {} } },
];

function randomValue(depth: number): unknown {
  const r = rand();
  if (r < 0.45 || depth > 3) return pick(INTERESTING);
  if (r < 0.6) return Math.floor((rand() - 0.3) * 2 ** int(60));
  if (r < 0.7) return String.fromCharCode(...Array.from({ length: int(12) }, () => int(0x3000)));
  if (r < 0.85) return Array.from({ length: int(4) }, () => randomValue(depth + 1));
  const o: Record<string, unknown> = {};
  const keys = [...Object.keys(VALID_DEST), ...Object.keys(VALID_SOURCE), 'id', 'image', 'x'];
  for (let i = int(5); i > 0; i--) o[pick(keys)] = randomValue(depth + 1);
  return o;
}

/** Changes one spot of a JSON value: replace, delete, add or retype. */
function mutate(v: unknown, depth = 0): unknown {
  if (v === null || typeof v !== 'object' || (depth > 0 && rand() < 0.25)) {
    return randomValue(depth);
  }
  if (Array.isArray(v)) {
    const a = [...(v as unknown[])];
    const r = rand();
    if (r < 0.2) a.push(rand() < 0.5 && a.length ? structuredClone(pick(a)) : randomValue(depth));
    else if (r < 0.35 && a.length) a.splice(int(a.length), 1);
    else if (a.length) {
      const i = int(a.length);
      a[i] = mutate(a[i], depth + 1);
    } else a.push(randomValue(depth));
    return a;
  }
  const o = { ...(v as Record<string, unknown>) };
  const keys = Object.keys(o);
  const r = rand();
  if (r < 0.15 && keys.length) delete o[pick(keys)];
  else if (r < 0.25)
    o[pick(['extra', 'socketpath', 'migrations', 'listen', 'regions'])] = randomValue(depth);
  else if (keys.length) {
    const k = pick(keys);
    o[k] = mutate(o[k], depth + 1);
  }
  return o;
}

/** Byte-level damage to JSON text: truncation, a flipped byte, an inserted character. */
function damage(text: string): string {
  const r = rand();
  const at = int(text.length + 1);
  if (r < 0.3) return text.slice(0, at);
  if (r < 0.6) {
    const c = text.charCodeAt(Math.min(at, text.length - 1)) ^ (1 << int(7));
    return text.slice(0, at) + String.fromCharCode(c) + text.slice(at + 1);
  }
  return (
    text.slice(0, at) + pick(['{', '}', '"', ',', ':', '\\', ' ', '\n', 'null']) + text.slice(at)
  );
}

type Outcome = 'ok' | string;
function attempt(load: () => DestConfig | SourceConfig, doc: string): Outcome {
  try {
    load();
    return 'ok';
  } catch (err) {
    if (err instanceof ConfigError && CODES.has(err.code) && typeof err.message === 'string') {
      return err.code;
    }
    throw new Error(`not a ConfigError; document: ${doc.slice(0, 2000)}`, { cause: err });
  }
}

function fuzz(
  t: Test,
  name: string,
  valid: unknown,
  load: (f: string) => DestConfig | SourceConfig,
  n: number,
): void {
  const outcomes = new Map<string, number>();
  for (let i = 0; i < n; i++) {
    let doc: unknown = valid;
    const kind = rand();
    let text: string;
    if (kind < 0.1) {
      text = JSON.stringify(randomValue(0));
    } else {
      for (let m = 1 + int(3); m > 0; m--) doc = mutate(doc);
      text = JSON.stringify(doc) ?? 'undefined';
      if (kind > 0.85) text = damage(text);
    }
    writeFileSync(file, text);
    const o = attempt(() => load(file), text);
    outcomes.set(o, (outcomes.get(o) ?? 0) + 1);
  }
  t.comment(`${name}: ${JSON.stringify(Object.fromEntries(outcomes))}`);
  t.ok((outcomes.get('ok') ?? 0) > 0, `${name}: some documents load`);
  t.ok((outcomes.get('CONFIG_INVALID') ?? 0) > 0, `${name}: some are invalid`);
  t.ok((outcomes.get('CONFIG_BAD_JSON') ?? 0) > 0, `${name}: some are not JSON`);
  t.equal(
    [...outcomes.keys()].filter((k) => k !== 'ok' && !CODES.has(k)).length,
    0,
    `${name}: ${n} documents, only documented codes`,
  );
}

t.test('the valid documents load', async (t) => {
  writeFileSync(file, JSON.stringify(VALID_DEST));
  t.equal(
    attempt(() => loadDestConfig({ file }), ''),
    'ok',
  );
  writeFileSync(file, JSON.stringify(VALID_SOURCE));
  t.equal(
    attempt(() => loadSourceConfig({ file }), ''),
    'ok',
  );
  t.equal(
    attempt(() => loadDestConfig({ file: join(dir, 'nope.json') }), ''),
    'CONFIG_NOT_FOUND',
  );
  t.equal(
    attempt(() => loadSourceConfig({ file: dir }), ''),
    'CONFIG_NOT_FOUND',
    'a directory',
  );
});

t.test('dest config fuzz', async (t) => {
  fuzz(t, 'dest', VALID_DEST, (f) => loadDestConfig({ file: f }), 4000);
});

t.test('source config fuzz', async (t) => {
  fuzz(t, 'source', VALID_SOURCE, (f) => loadSourceConfig({ file: f }), 4000);
});

t.test('flags, environment and computed values are fuzzed too', async (t) => {
  // Flags and variables arrive as text (or true, for a bare boolean flag); `extra` as values.
  const text = (): string | boolean => {
    if (rand() < 0.1) return true;
    const v = randomValue(1);
    return typeof v === 'string' ? v : (JSON.stringify(v) ?? '');
  };
  const flag = (key: string): string => key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
  const env = (key: string): string =>
    `YABUSAME_${key.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`;
  let ok = 0;
  for (const [valid, load] of [
    [VALID_DEST, loadDestConfig],
    [VALID_SOURCE, loadSourceConfig],
  ] as const) {
    writeFileSync(file, JSON.stringify(valid));
    for (let i = 0; i < 1000; i++) {
      const key = pick(Object.keys(valid));
      const value = text();
      const input =
        i % 3 === 0
          ? { file, flags: { [flag(key)]: value } }
          : i % 3 === 1
            ? { file, env: { [env(key)]: String(value) } }
            : { file, extra: { [key]: randomValue(1) } };
      if (attempt(() => load(input), key) === 'ok') ok++;
    }
  }
  t.pass(`${ok} of 2000 overridden documents loaded; the rest threw a documented ConfigError`);
});
