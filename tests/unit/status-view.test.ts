// `yabusame status`'s rendering, from the daemons' JSON to text, without daemons: the states a
// person must be told apart (reconnecting is not running; a failed session is shown with its
// code), rates and ETAs, the source's `pages.total`, the table for pipes, and a terminal frame
// that never wraps and never outgrows the screen.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  bytes,
  destModel,
  duration,
  percent,
  renderTable,
  renderTerminal,
  sourceModel,
  type RateSample,
} from '../../daemon/cli/status-view.js';
import { statusOptions } from '../../daemon/cli/status.js';
import { UsageError } from '../../daemon/cli/common.js';

const CLI = fileURLToPath(new URL('../../daemon/cli.js', import.meta.url));
const NOW = 1_700_000_100_000;
const link = (state: string, since = NOW - 3000) => ({ state, since });

/** A session as the dest's /v1/sessions lists it. */
function session(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    migrationId: 'vm1',
    state: 'running',
    totalPages: 1000,
    presentPages: 250,
    demandPages: 50,
    backgroundPages: 100,
    zeroPages: 100,
    existedPages: 0,
    discardedPages: 0,
    faults: 60,
    faultsWaiting: 2,
    reconnects: 0,
    links: { demand: link('up'), background: link('up') },
    totalBytes: 1000 * 4096,
    receivedBytes: 200 * 4096,
    startedAt: NOW - 10_000,
    elapsedMs: 10_000,
    ...over,
  };
}

const ESC = String.fromCharCode(27);
/** What a terminal shows of a line: escape sequences take no room. */
const visible = (s: string): string => s.replace(new RegExp(`${ESC}\\[[0-9;?]*[A-Za-z]`, 'g'), '');

t.test('dest: states a person must tell apart', async (t) => {
  const m = destModel(
    {
      active: [
        session({ migrationId: 'ok' }),
        session({
          migrationId: 'lost',
          links: { demand: link('reconnecting'), background: link('up') },
        }),
      ],
      ended: [
        session({
          migrationId: 'bad',
          state: 'failed',
          error: { code: 'SOURCE_UNREACHABLE', message: 'no source for 120000 ms' },
        }),
        session({ migrationId: 'fine', state: 'done', presentPages: 1000 }),
      ],
    },
    { target: 'sock', nowMs: NOW },
  );
  t.same(
    m.rows.map((r) => [r.id, r.state]),
    [
      ['ok', 'running'],
      ['lost', 'reconnecting'],
      ['fine', 'done'],
      ['bad', 'failed'],
    ],
    'active first; a running session with a link down is reconnecting; ended newest first',
  );
  const lost = m.rows[1]!;
  t.match(lost.details.join(' · '), /links: demand reconnecting 3\.0s, background up/);
  t.match(m.rows[3]!.error, { code: 'SOURCE_UNREACHABLE' });
  t.equal(m.rows[2]!.etaSeconds, null, 'no ETA once ended');
  t.equal(m.rows[2]!.rate, null, 'no rate once ended');
});

t.test('dest: a failed session alone is shown, not "no migrations"', async (t) => {
  const body = {
    active: [],
    ended: [
      session({
        state: 'failed',
        presentPages: 0,
        error: { code: 'AUTH_FAILED', message: 'wrong proof' },
      }),
    ],
  };
  const table = renderTable(destModel(body, { target: 's', nowMs: NOW }));
  t.notMatch(table, /no migrations/);
  t.match(table, /^vm1\s+failed\s+0\s+1000\s+0\.0%.*AUTH_FAILED: wrong proof$/m);
});

t.test('dest: rate and ETA, averaged for one reading, smoothed over polls', async (t) => {
  // 250 pages of 4 KiB in 10 s: 100 KiB/s; 750 pages left: 30 s.
  const one = destModel({ active: [session()], ended: [] }, { target: 's', nowMs: NOW }).rows[0]!;
  t.equal(one.rate, (250 * 4096) / 10);
  t.equal(one.etaSeconds, 30);

  const rates = new Map<string, RateSample>();
  destModel({ active: [session()], ended: [] }, { target: 's', nowMs: NOW, rates });
  const next = destModel(
    { active: [session({ presentPages: 350 })], ended: [] },
    { target: 's', nowMs: NOW + 1000, rates },
  ).rows[0]!;
  const average = (250 * 4096) / 10;
  const now = 100 * 4096; // 100 pages in the last second
  t.equal(next.rate, average + 0.3 * (now - average), 'the newest interval weighs 0.3');
  destModel({ active: [], ended: [] }, { target: 's', nowMs: NOW + 2000, rates });
  t.equal(rates.size, 0, 'readings of ended migrations are forgotten');
});

t.test('dest: only the 10 most recent ended sessions unless asked', async (t) => {
  const ended = Array.from({ length: 15 }, (_, i) =>
    session({ migrationId: `e${i}`, state: 'done', presentPages: 1000 }),
  );
  const m = destModel({ active: [], ended }, { target: 's', nowMs: NOW });
  t.equal(m.rows.length, 10);
  t.equal(m.rows[0]!.id, 'e14', 'newest first');
  t.equal(m.hidden, 5);
  t.match(renderTable(m), /5 older ended migrations not shown: --all/);
  const all = destModel({ active: [], ended }, { target: 's', nowMs: NOW, endedShown: Infinity });
  t.equal(all.rows.length, 15);
});

t.test(
  "source: pages.total and pages.sent (not 0/0), states, the dest's connections",
  async (t) => {
    const mig = (over: Record<string, unknown>) => ({
      id: 'm',
      state: 'frozen',
      image: '/img',
      regions: [],
      pages: { total: 4096, sent: 1024, demand: 24, background: 1000, zero: 300 },
      bytes: { total: 4096 * 4096, sent: 1024 * 4096 },
      connections: { demand: true, background: false },
      pendingRequests: 0,
      registeredAt: NOW - 20_000,
      frozenAt: NOW - 4000,
      ...over,
    });
    const m = sourceModel(
      {
        migrations: [
          mig({ id: 'a' }),
          mig({ id: 'b', state: 'registered', frozenAt: null, pendingRequests: 3 }),
          mig({ id: 'c', state: 'complete' }),
          // Registered with qmp: the QEMU it follows for the freeze could not be reached.
          mig({
            id: 'd',
            state: 'registered',
            frozenAt: null,
            qmp: { state: 'failed', error: { code: 'QMP_CONNECT', message: 'no such socket' } },
          }),
        ],
      },
      { target: 's', nowMs: NOW },
    );
    const [a, b, c, d] = ['a', 'b', 'c', 'd'].map((id) => m.rows.find((r) => r.id === id));
    t.match(a, { id: 'a', state: 'frozen', done: 1024, total: 4096 });
    t.equal(a!.rate, (1024 * 4096) / 4, 'since the freeze');
    t.match(a!.details.join(' · '), /dest: demand connected, background not connected/);
    t.match(b, { state: 'registered', rate: null });
    t.match(b!.details.join(' · '), /waiting for the freeze · requests held 3/);
    t.match(c, { state: 'complete', done: 4096, ended: true });
    t.match(d, { state: 'registered', error: { code: 'QMP_CONNECT' } });
    t.match(d!.details.join(' · '), /QEMU's QMP: failed/);
    t.notOk(a!.error, 'no QMP follower, no error');
    const table = renderTable(m);
    t.match(table, /^MIGRATION\s+STATE\s+SENT\s+TOTAL\s+PCT\s+RATE\s+ETA\s+CONNECTIONS\s+HELD$/m);
    t.match(table, /^a\s+frozen\s+1024\s+4096\s+25\.0%.*demand=up,background=down\s+0$/m);
    t.match(table, /^c\s+complete\s+4096\s+4096\s+100\.0%/m);
  },
);

t.test('terminal frame: fits the width, the height, one bar per migration', async (t) => {
  const active = Array.from({ length: 12 }, (_, i) =>
    session({ migrationId: `vm-with-a-long-name-${i}`, presentPages: i * 80 }),
  );
  const m = destModel({ active, ended: [] }, { target: '/run/yabusame/dest.sock', nowMs: NOW });
  for (const columns of [40, 80, 200]) {
    const lines = renderTerminal(m, {
      columns,
      rows: 20,
      color: true,
      unicode: true,
      footer: 'every 1s · Ctrl-C to quit',
    });
    t.ok(lines.length <= 19, `${columns} columns: ${lines.length} lines fit 20 rows`);
    const longest = Math.max(...lines.map((l) => visible(l).length));
    t.ok(longest <= columns - 1, `${columns} columns: the longest line has ${longest}`);
    t.match(lines.at(-2), /^… \d+ more \(a taller terminal, or --json\)$/, 'what was left out');
    t.equal(lines.at(-1), 'every 1s · Ctrl-C to quit');
  }
  const plain = renderTerminal(m, { columns: 120, rows: 100, color: false, unicode: false });
  t.notOk(plain.join('\n').includes(ESC), 'no escape codes without colour');
  const bars = plain.filter((l) => /\[[#-]+\]/.test(l));
  t.equal(bars.length, 12, 'one bar per migration');
  const first = /\[([#-]+)\]/.exec(bars[1]!)![1]!; // 80 of 1000 pages
  t.equal(first.replace(/-/g, '').length, Math.floor((first.length * 80) / 1000));
  t.same(new Set(bars.map((l) => l.indexOf('['))).size, 1, 'the bars line up');
});

t.test('terminal frame: a failed session with its error, an empty dest', async (t) => {
  const failed = destModel(
    {
      active: [],
      ended: [session({ state: 'failed', error: { code: 'VMM_GONE', message: 'closed' } })],
    },
    { target: 's', nowMs: NOW },
  );
  const lines = renderTerminal(failed, { columns: 100, rows: 30, color: false, unicode: true });
  t.match(lines[1], /^vm1\s+failed\s+\[█+░+\]\s+25\.0%/);
  t.ok(lines.some((l) => /^\s+VMM_GONE: closed$/.test(l)));
  const empty = destModel({ active: [], ended: [] }, { target: 's', nowMs: NOW });
  t.same(renderTerminal(empty, { columns: 100, rows: 30, color: false, unicode: true }), [
    'yabusame dest s: no migrations',
    'no migrations',
  ]);
  t.equal(renderTable(empty), 'no migrations\n');
});

t.test('formatting', async (t) => {
  t.equal(bytes(512), '512 B');
  t.equal(bytes(1536), '1.5 KiB');
  t.equal(bytes(300 * 1024 * 1024), '300 MiB');
  t.equal(duration(0.42), '0.4s');
  t.equal(duration(75), '1m15s');
  t.equal(duration(3725), '1h02m');
  t.equal(percent(999_999, 1_000_000), '99.9%', 'never 100% before the last page');
  t.equal(percent(5, 5), '100.0%');
  t.equal(percent(0, 0), '-');
});

t.test('options', async (t) => {
  t.match(statusOptions([]), {
    kind: 'dest',
    target: { socketPath: '/run/yabusame/dest-control.sock' },
    watch: false,
    intervalMs: 1000,
    endedShown: 10,
  });
  t.match(statusOptions(['--source', '/s', '-w', '-n', '0.25', '--all']), {
    kind: 'source',
    target: { socketPath: '/s' },
    watch: true,
    intervalMs: 250,
    endedShown: Infinity,
  });
  for (const bad of [
    ['--watch', '--interval', '0'],
    ['--watch', '--interval', 'soon'],
    ['--interval', '2'],
    ['--dest', '/d', '--source', '/s'],
    ['--frobnicate'],
  ]) {
    let thrown: unknown;
    try {
      statusOptions(bad);
    } catch (err) {
      thrown = err;
    }
    t.ok(thrown instanceof UsageError, `${bad.join(' ')}: a usage error (exit 2)`);
  }
});

t.test('the command without a terminal: one shot, --watch, an unreachable daemon', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-status-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const missing = join(dir, 'nothing.sock');
  const once = spawnSync(process.execPath, [CLI, 'status', '--dest', missing], {
    encoding: 'utf8',
  });
  t.equal(once.status, 1, 'one shot: exit 1 when the daemon cannot be reached');
  t.match(once.stderr, /UNREACHABLE: cannot reach .*nothing\.sock/);

  // --watch keeps trying, one timestamped line per poll, until SIGINT ends it with 0.
  for (const json of [false, true]) {
    const args = ['status', '--watch', '-n', '0.1', '--dest', missing, ...(json ? ['--json'] : [])];
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    let out = '';
    child.stdout.setEncoding('utf8');
    const twoPolls = new Promise<void>((resolve) =>
      child.stdout.on('data', (s: string) => {
        out += s;
        if (out.split('\n').length > 2) resolve();
      }),
    );
    // A watch that exits on its own is a failure, not a wait for the test's timeout.
    const first = await Promise.race([twoPolls.then(() => 'polled'), exited.then(() => 'exited')]);
    t.equal(first, 'polled', `${args.join(' ')}: still watching after two polls`);
    child.kill('SIGINT');
    t.equal(await exited, 0, `${args.join(' ')}: SIGINT exits 0`);
    const lines = out.trimEnd().split('\n');
    t.ok(lines.length >= 2, 'polled more than once');
    t.notOk(out.includes(ESC), 'no escape codes without a terminal');
    if (json) {
      for (const l of lines)
        t.match(JSON.parse(l), { error: { code: 'UNREACHABLE', message: /^cannot reach / } });
    } else {
      for (const l of lines) t.match(l, /^# \d{4}-\d\d-\d\dT\S+ UNREACHABLE: cannot reach /);
    }
  }
});
