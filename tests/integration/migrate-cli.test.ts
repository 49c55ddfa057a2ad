/**
 * `yabusame migrate` as a user runs it (a process, its exit code and JSON lines), against a real
 * `yabusame source` and fake QEMU monitors: usage errors exit 2; a failure names its step and
 * exits 1; before the switch-over a failure leaves the source VM running and as it was (its
 * migration settings put back, the migration unregistered). The whole migration of a real QEMU
 * is tests/integration/qemu.test.ts.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { call } from '../../daemon/cli/common.js';
import { CLI, startSource, type SourceDaemon } from '../../scripts/lib/daemons.js';
import { inspectDestCommand, parseQmpAddress } from '../../daemon/cli/migrate.js';
import { FakeQemu, type CommandHook } from '../helpers/fake-qemu.js';

const dir = mkdtempSync(join(tmpdir(), 'yabusame-migrate-cli-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const image = join(dir, 'guest.ram');
writeFileSync(image, Buffer.alloc(1 << 20));

interface Run {
  code: number | null;
  lines: Record<string, unknown>[];
  stderr: string;
}

function migrate(args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, 'migrate', '--json', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('exit', (code) =>
      resolve({
        code,
        stderr,
        lines: out
          .split('\n')
          .filter(Boolean)
          .map((l) => JSON.parse(l) as Record<string, unknown>),
      }),
    );
  });
}

/** A QEMU whose guest RAM is `image` (qom), with migration parameters and commands stubbed. */
async function qemu(
  t: Test,
  vm: Partial<FakeQemu['vm']>,
  opts: { share?: boolean; on?: CommandHook } = {},
): Promise<FakeQemu> {
  const q = await FakeQemu.start(t, vm);
  const params = { 'max-bandwidth': 33554432 };
  q.hook = (name, args) => {
    const mine = opts.on?.(name, args);
    if (mine) return mine;
    switch (name) {
      case 'qom-list':
        return {
          return: [
            { name: 'type', type: 'string' },
            { name: 'ram0', type: 'child<memory-backend-file>' },
          ],
        };
      case 'qom-get': {
        const prop = args?.['property'];
        const values: Record<string, unknown> = {
          'mem-path': image,
          size: 1 << 20,
          share: opts.share ?? true,
        };
        return { return: values[String(prop)] };
      }
      case 'query-migrate-parameters':
        return { return: params };
      case 'migrate-set-parameters':
        Object.assign(params, args);
        return { return: {} };
      case 'migrate-incoming':
        return { return: {} };
      case 'migrate_cancel':
        return { return: {} };
      default:
        return undefined;
    }
  };
  return q;
}

let source: SourceDaemon;
t.before(async () => {
  source = await startSource(dir, ['--metrics-listen', 'off']);
});
t.teardown(() => source.stop());

const common = (src: FakeQemu): string[] => [
  '--source-qmp',
  src.path,
  '--control',
  source.control,
  '--page-url',
  source.ws,
];

/** A migration `id` to a destination QEMU already started (`dst`), with the secret it was given. */
const toStarted = (id: string, dst: FakeQemu, secretFile: string): string[] => [
  '--id',
  id,
  '--dest-qmp',
  dst.path,
  '--secret-file',
  secretFile,
];

async function migrations(): Promise<unknown[]> {
  const body = (await call({ socketPath: source.control }, 'GET', '/v1/migrations')) as {
    migrations: unknown[];
  };
  return body.migrations;
}

t.test('usage errors exit 2', async (t) => {
  const none = await migrate([]);
  t.equal(none.code, 2);
  t.match(none.stderr, /--page-url is required/);
  const noDest = await migrate(['--source-qmp', '/x', '--page-url', 'ws://127.0.0.1:1']);
  t.equal(noDest.code, 2);
  t.match(noDest.stderr, /a destination is required/);
  const noSecret = await migrate([
    '--source-qmp',
    '/x',
    '--page-url',
    'ws://127.0.0.1:1',
    '--dest-qmp',
    '/y',
  ]);
  t.equal(noSecret.code, 2);
  t.match(noSecret.stderr, /needs --secret-file/);
  const badUrl = await migrate(['--source-qmp', '/x', '--page-url', 'http://h:1/x', '--', 'q']);
  t.equal(badUrl.code, 2);
});

t.test('an unreachable source QEMU fails at step source', async (t) => {
  const r = await migrate([
    '--source-qmp',
    join(dir, 'absent.qmp'),
    '--control',
    source.control,
    '--page-url',
    source.ws,
    '--',
    'qemu-system-x86_64',
    '-qmp',
    'unix:/nowhere',
  ]);
  t.equal(r.code, 1);
  t.match(r.lines.at(-1), { event: 'error', step: 'source', code: 'QMP_CONNECT' });
  t.match(r.stderr, /QMP_CONNECT: step source/);
});

t.test('guest RAM that is not a shared file is refused before anything changes', async (t) => {
  const src = await qemu(t, {}, { share: false });
  const r = await migrate([...common(src), '--', 'qemu', '-qmp', 'unix:/nowhere']);
  t.equal(r.code, 1);
  t.match(r.lines.at(-1), { event: 'error', step: 'source', code: 'RAM_NOT_SHARED' });
  t.notOk(src.executed().includes('migrate-set-capabilities'));
  t.same(await migrations(), []);
});

t.test('a destination that is not waiting for a migration: undone, source untouched', async (t) => {
  const src = await qemu(t, {});
  const dst = await qemu(t, {});
  const secret = join(dir, 'secret');
  writeFileSync(secret, 'ab'.repeat(32), { mode: 0o600 });
  const r = await migrate([...common(src), ...toStarted('vm-dest', dst, secret)]);
  t.equal(r.code, 1);
  t.match(r.lines.at(-1), {
    event: 'error',
    step: 'destination',
    code: 'VM_STATE',
    sourceRunning: true,
  });
  t.ok(
    r.lines.some((l) => l['step'] === 'register'),
    'it had registered the migration',
  );
  t.same(await migrations(), [], 'and unregistered it');
  t.notOk(src.executed().includes('migrate'), 'the source never migrated');
});

t.test('QEMU refusing to migrate: settings put back, migration unregistered', async (t) => {
  const src = await qemu(
    t,
    {},
    {
      on: (name) =>
        name === 'migrate'
          ? { error: { class: 'GenericError', desc: 'Failed to connect socket' } }
          : undefined,
    },
  );
  const dst = await qemu(t, { running: false, status: 'inmigrate' });
  // migrate-incoming on port 0: the destination says which port it listens on.
  const inner = dst.hook!;
  dst.hook = (name, args) =>
    name === 'query-migrate'
      ? { return: { 'socket-address': [{ type: 'inet', host: '127.0.0.1', port: '4444' }] } }
      : inner(name, args);
  const secret = join(dir, 'secret2');
  writeFileSync(secret, 'cd'.repeat(32), { mode: 0o600 });
  const r = await migrate([
    ...common(src),
    ...toStarted('vm-refused', dst, secret),
    '--follow-qmp',
    join(dir, 'follow-absent.qmp'),
  ]);
  // The source cannot follow an absent socket: that fails at register, before any change.
  t.equal(r.code, 1);
  t.match(r.lines.at(-1), { step: 'register', code: 'QMP_CONNECT' });
  t.same(await migrations(), []);

  const r2 = await migrate([...common(src), ...toStarted('vm-refused', dst, secret)]);
  t.equal(r2.code, 1);
  t.match(r2.lines.at(-1), {
    event: 'error',
    step: 'migrate',
    code: 'QMP_COMMAND',
    sourceRunning: true,
  });
  t.match(String(r2.lines.at(-1)?.['message']), /Failed to connect socket/);
  t.equal(src.vm.capabilities['x-ignore-shared'], false, 'x-ignore-shared put back');
  t.equal(src.vm.capabilities['events'], false, 'events put back');
  const sets = src.commands.filter((c) => c.execute === 'migrate-set-parameters');
  t.same(sets.at(-1)?.arguments, { 'max-bandwidth': 33554432 }, 'max-bandwidth put back');
  t.ok(src.executed().includes('migrate_cancel'));
  t.same(await migrations(), [], 'unregistered');
  t.match(dst.commands.find((c) => c.execute === 'migrate-incoming')?.arguments, {
    uri: 'tcp:127.0.0.1:0',
  });
});

t.test('the pieces: QMP addresses, destination command lines', async (t) => {
  t.same(parseQmpAddress('tcp:10.0.0.5:4444'), { host: '10.0.0.5', port: 4444 });
  t.same(parseQmpAddress('tcp:[::1]:4444'), { host: '::1', port: 4444 });
  t.equal(parseQmpAddress('/run/vm.qmp'), '/run/vm.qmp');
  t.same(
    inspectDestCommand([
      'qemu-system-x86_64',
      '-object',
      'memory-backend-file,id=ram0,size=1G,mem-path=/dev/shm/vm.ram,share=on',
      '-qmp',
      'unix:/run/vm.qmp,server=on,wait=off',
      '-incoming',
      'defer',
    ]),
    { qmpPath: '/run/vm.qmp', ramPath: '/dev/shm/vm.ram', shared: true, incomingDefer: true },
  );
  t.same(inspectDestCommand(['qemu', '-incoming', 'tcp:0:4444']), {
    shared: false,
    incomingDefer: false,
  });
});
