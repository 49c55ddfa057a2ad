/**
 * The source's QMP follower against a fake QEMU monitor on a real UNIX socket: which VM states
 * freeze a migration (a migration's stop) and which never do (an operator's pause, a lost or
 * absent QMP socket), and a VM that runs again after the freeze aborting the migration.
 */
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLogger } from '../../daemon/ops/log.js';
import { QmpFollower, type QmpFollowCode } from '../../daemon/source/qmp-follow.js';
import { FakeQemu } from '../helpers/fake-qemu.js';

interface Harness {
  follower: QmpFollower;
  /** What the follower asked of the migration, in order. */
  calls: string[];
  state: { frozen: boolean };
  errors: QmpFollowCode[];
  logs: Record<string, unknown>[];
  /** Resolves after the follower has handled the next event named `name`. */
  handled(name: string): Promise<void>;
  /** Resolves at the next log line whose message contains `text`. */
  logged(text: string): Promise<void>;
  /** Resolves once the follower froze the migration. */
  frozen: Promise<void>;
  /** Resolves once the follower has started (connected and read the VM's state, or failed). */
  started: Promise<void>;
}

function follow(t: Test, path: string, frozen = false, timeoutMs = 5000): Harness {
  const logs: Record<string, unknown>[] = [];
  const waiters: { match: (rec: Record<string, unknown>) => boolean; resolve: () => void }[] = [];
  const log = createLogger('debug', {}, (line) => {
    const rec = JSON.parse(line) as Record<string, unknown>;
    logs.push(rec);
    const i = waiters.findIndex((w) => w.match(rec));
    if (i >= 0) waiters.splice(i, 1)[0]!.resolve();
  });
  const wait = (match: (rec: Record<string, unknown>) => boolean): Promise<void> =>
    new Promise((resolve) => waiters.push({ match, resolve }));
  const calls: string[] = [];
  const errors: QmpFollowCode[] = [];
  const state = { frozen };
  let onFrozen!: () => void;
  const frozenP = new Promise<void>((r) => (onFrozen = r));
  const follower = new QmpFollower(
    path,
    {
      freeze: (why) => {
        calls.push(`freeze: ${why}`);
        state.frozen = true;
        onFrozen();
      },
      abort: (code) => calls.push(`abort ${code}`),
      isFrozen: () => state.frozen,
      error: (code) => errors.push(code),
      log,
    },
    { timeoutMs },
  );
  t.teardown(() => follower.close());
  return {
    follower,
    calls,
    state,
    errors,
    logs,
    handled: (name) => wait((r) => r['msg'] === 'QMP event' && r['event'] === name),
    logged: (text) => wait((r) => String(r['msg']).includes(text)),
    frozen: frozenP,
    started: follower.start(),
  };
}

t.test('a running VM: frozen by its migration stop, not before', async (t) => {
  const qemu = await FakeQemu.start(t);
  const h = follow(t, qemu.path);
  await h.started;
  t.equal(h.follower.state, 'following');
  t.equal(qemu.vm.capabilities['events'], true, 'the follower turned on the events capability');
  t.same(qemu.executed(), [
    'query-status',
    'query-migrate',
    'query-migrate-capabilities',
    'migrate-set-capabilities',
  ]);
  let seen = h.handled('MIGRATION');
  qemu.migration('setup');
  await seen;
  seen = h.handled('MIGRATION');
  qemu.migration('active');
  await seen;
  t.same(h.calls, [], 'a migration that runs does not freeze a running VM');
  qemu.stop('finish-migrate');
  await h.frozen;
  t.equal(h.calls.length, 1);
  t.match(h.calls[0], /^freeze: QMP STOP event/);
  t.equal(h.follower.state, 'frozen');
  t.match(h.follower.status(), {
    path: qemu.path,
    state: 'frozen',
    migration: 'active',
  });
  seen = h.handled('MIGRATION');
  qemu.migration('completed');
  await seen;
  t.equal(h.calls.length, 1, 'frozen once');
  t.same(h.errors, []);
});

t.test("an operator's pause never freezes; a migration of the paused VM does", async (t) => {
  const qemu = await FakeQemu.start(t);
  const h = follow(t, qemu.path);
  await h.started;
  let seen = h.handled('STOP');
  qemu.stop('paused');
  await seen;
  seen = h.handled('RESUME');
  qemu.resume();
  await seen;
  t.same(h.calls, [], 'stop and cont without a migration: not frozen, not aborted');
  seen = h.handled('STOP');
  qemu.stop('paused');
  await seen;
  t.same(h.calls, []);
  qemu.migration('setup');
  qemu.migration('active');
  await h.frozen;
  t.match(h.calls, [/^freeze: QMP MIGRATION event/]);
});

t.test('the state at connect', async (t) => {
  const cases: [string, Partial<FakeQemu['vm']>, boolean][] = [
    ['postmigrate: a migration stopped it', { running: false, status: 'postmigrate' }, true],
    ['finish-migrate', { running: false, status: 'finish-migrate' }, true],
    [
      'paused with a migration under way',
      { running: false, status: 'paused', migration: 'active' },
      true,
    ],
    ['paused by an operator', { running: false, status: 'paused' }, false],
    [
      'paused, an earlier migration completed',
      { running: false, status: 'paused', migration: 'completed' },
      false,
    ],
    ['running, migration active', { migration: 'active' }, false],
    ['io-error', { running: false, status: 'io-error' }, false],
  ];
  for (const [name, vm, frozen] of cases) {
    await t.test(name, async (t) => {
      const qemu = await FakeQemu.start(t, vm);
      const h = follow(t, qemu.path);
      await h.started;
      t.equal(h.calls.length, frozen ? 1 : 0, frozen ? 'frozen at once' : 'not frozen');
      t.equal(h.follower.state, frozen ? 'frozen' : 'following');
      t.equal(h.follower.status().runState, vm.status ?? 'running');
      if (vm.migration === 'active') {
        t.notOk(
          qemu.executed().includes('migrate-set-capabilities'),
          'events are not changed while a migration runs',
        );
      }
    });
  }
});

t.test('the VM running again after the freeze aborts the migration', async (t) => {
  const qemu = await FakeQemu.start(t);
  const h = follow(t, qemu.path);
  await h.started;
  qemu.migration('active');
  qemu.stop('finish-migrate');
  await h.frozen;
  const seen = h.handled('RESUME');
  qemu.migration('failed');
  qemu.resume();
  await seen;
  t.equal(h.calls[1], 'abort QMP_VM_RESUMED');
  t.equal(h.follower.state, 'failed');
  t.equal(h.follower.status().error?.code, 'QMP_VM_RESUMED');
  t.same(h.errors, ['QMP_VM_RESUMED']);
  t.ok(h.logs.some((l) => l['level'] === 'error' && l['code'] === 'QMP_VM_RESUMED'));

  // A migration frozen by other means (registered frozen) whose VM is found running.
  const running = await FakeQemu.start(t);
  const h2 = follow(t, running.path, true);
  await h2.started;
  t.same(h2.calls, ['abort QMP_VM_RESUMED'], 'frozen, yet the VM runs: aborted at connect');
});

t.test('errors are coded, logged, shown, and never freeze', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-qmp-follow-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const absent = follow(t, join(dir, 'absent.sock'));
  await absent.started;
  t.equal(absent.follower.state, 'failed');
  t.equal(absent.follower.status().error?.code, 'QMP_CONNECT');
  t.same(absent.errors, ['QMP_CONNECT']);
  t.ok(absent.logs.some((l) => l['level'] === 'warn' && l['code'] === 'QMP_CONNECT'));
  t.same(absent.calls, []);

  // The connection lost before the stop: not frozen, and a later STOP cannot freeze it either.
  const qemu = await FakeQemu.start(t);
  const lost = follow(t, qemu.path);
  await lost.started;
  qemu.migration('active');
  const closed = lost.logged('cannot follow the source QEMU');
  qemu.dropClient();
  await closed;
  t.equal(lost.follower.status().error?.code, 'QMP_CLOSED');
  t.match(lost.follower.status().error?.message, /stays unfrozen/);
  t.same(lost.calls, [], 'a lost connection does not freeze');
  t.same(lost.errors, ['QMP_CLOSED']);

  // Lost after the freeze: nothing to decide any more.
  const q2 = await FakeQemu.start(t);
  const after = follow(t, q2.path);
  await after.started;
  q2.migration('active');
  q2.stop('finish-migrate');
  await after.frozen;
  const closedAfter = after.logged('closed after the freeze');
  q2.dropClient();
  await closedAfter;
  t.equal(after.follower.state, 'closed');
  t.same(after.errors, []);
  t.equal(after.calls.length, 1);

  // The events capability refused while no migration runs: a coded failure.
  const q3 = await FakeQemu.start(t);
  q3.hook = (name) =>
    name === 'migrate-set-capabilities'
      ? { error: { class: 'GenericError', desc: 'nope' } }
      : undefined;
  const refused = follow(t, q3.path);
  await refused.started;
  t.equal(refused.follower.status().error?.code, 'QMP_COMMAND');
  t.match(refused.follower.status().error?.message, /events/);

  // Not a QMP socket at all.
  const q4 = await FakeQemu.start(t);
  q4.hook = (name) => (name === 'query-status' ? 'no-reply' : undefined);
  const silent = follow(t, q4.path, false, 200);
  await silent.started;
  t.equal(silent.follower.status().error?.code, 'QMP_TIMEOUT');
});

t.test('close() while connecting or following ends quietly', async (t) => {
  const qemu = await FakeQemu.start(t);
  const h = follow(t, qemu.path);
  h.follower.close();
  await h.started;
  t.equal(h.follower.state, 'closed');
  t.same(h.errors, []);
  const q2 = await FakeQemu.start(t);
  const h2 = follow(t, q2.path);
  await h2.started;
  h2.follower.close();
  t.equal(h2.follower.state, 'closed');
  q2.stop('finish-migrate');
  t.same(h2.calls, []);
});
