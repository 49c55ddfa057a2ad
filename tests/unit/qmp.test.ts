/**
 * The QMP client against a fake QMP server on a real UNIX socket, speaking QEMU's wire format:
 * the greeting, `\r\n`-terminated replies carrying the command's id, error replies, events with
 * timestamps, and lines cut at arbitrary points across writes.
 */
import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connectQmp, QmpError, type QmpEvent } from '../../daemon/qemu/qmp.js';

// QEMU 7.2's greeting, as Debian's build sends it.
const GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n';

interface FakeQmp {
  path: string;
  /** Commands received, in order. */
  commands: Record<string, unknown>[];
  /** The connected client's socket (the latest one). */
  peer: () => net.Socket;
}

type Handler = (cmd: Record<string, unknown>, peer: net.Socket) => void;

/** Replies `{"return": {}}` to everything unless `handler` writes something itself. */
async function fakeQmp(t: Test, handler?: Handler, greeting = GREETING): Promise<FakeQmp> {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-qmp-'));
  const path = join(dir, 'qmp.sock');
  const commands: Record<string, unknown>[] = [];
  let last: net.Socket | null = null;
  const server = net.createServer((sock) => {
    last = sock;
    sock.write(greeting);
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const cmd = JSON.parse(buf.slice(0, nl)) as Record<string, unknown>;
        buf = buf.slice(nl + 1);
        commands.push(cmd);
        if (cmd['execute'] === 'qmp_capabilities' || !handler) {
          sock.write(`{"return": {}, "id": ${JSON.stringify(cmd['id'])}}\r\n`);
        } else {
          handler(cmd, sock);
        }
      }
    });
    sock.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(path, r));
  t.teardown(async () => {
    last?.destroy();
    await new Promise((r) => server.close(r));
    rmSync(dir, { recursive: true, force: true });
  });
  return { path, commands, peer: () => last! };
}

async function rejection(p: Promise<unknown>): Promise<QmpError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof QmpError) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

t.test('greeting, qmp_capabilities, then a command with arguments', async (t) => {
  const fake = await fakeQmp(t, (cmd, sock) => {
    if (cmd['execute'] === 'query-status') {
      sock.write(
        `{"return": {"status": "running", "singlestep": false, "running": true}, "id": ${cmd['id']}}\r\n`,
      );
    } else {
      sock.write(`{"return": {}, "id": ${cmd['id']}}\r\n`);
    }
  });
  const qmp = await connectQmp(fake.path);
  t.equal(qmp.greeting.version.qemu.major, 7);
  t.same(qmp.greeting.capabilities, ['oob']);
  t.same(await qmp.execute('query-status'), {
    status: 'running',
    singlestep: false,
    running: true,
  });
  t.same(
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [{ capability: 'x-ignore-shared', state: true }],
    }),
    {},
  );
  t.same(fake.commands[0], { execute: 'qmp_capabilities', id: 1 });
  t.same(fake.commands[2], {
    execute: 'migrate-set-capabilities',
    id: 3,
    arguments: { capabilities: [{ capability: 'x-ignore-shared', state: true }] },
  });
  await qmp.close();
  t.ok(qmp.closed);
});

t.test('an error reply rejects that command with QMP_COMMAND and its class', async (t) => {
  const fake = await fakeQmp(t, (cmd, sock) => {
    sock.write(
      `{"id": ${cmd['id']}, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\r\n`,
    );
  });
  const qmp = await connectQmp(fake.path);
  const err = await rejection(qmp.execute('nope'));
  t.equal(err.code, 'QMP_COMMAND');
  t.equal(err.qmpClass, 'CommandNotFound');
  t.match(err.message, /^nope: The command nope has not been found/);
  t.notOk(qmp.closed, 'an error reply leaves the connection usable');
  await qmp.close();
});

t.test('events: emitter and async iterator, with QEMU timestamps', async (t) => {
  const fake = await fakeQmp(t);
  const qmp = await connectQmp(fake.path);
  const seen: QmpEvent[] = [];
  qmp.on('event', (ev) => seen.push(ev));
  const it = qmp.events();
  const stop = qmp.waitEvent('STOP', { timeoutMs: 5000 });
  fake
    .peer()
    .write(
      '{"timestamp": {"seconds": 1764433595, "microseconds": 123456}, "event": "MIGRATION", "data": {"status": "postcopy-active"}}\r\n' +
        '{"timestamp": {"seconds": 1764433595, "microseconds": 200000}, "event": "STOP"}\r\n',
    );
  const first = await it.next();
  t.same(first.value, {
    event: 'MIGRATION',
    data: { status: 'postcopy-active' },
    timestampMs: 1764433595123.456,
  });
  const ev = await stop;
  t.equal(ev.event, 'STOP');
  t.same(ev.data, {});
  t.equal((await it.next()).value?.event, 'STOP');
  t.same(
    seen.map((e) => e.event),
    ['MIGRATION', 'STOP'],
  );
  await qmp.close();
  t.equal((await it.next()).done, true, 'the iterator ends when the client closes');
});

t.test('lines cut at every byte, and several lines in one write', async (t) => {
  const fake = await fakeQmp(t, (cmd, sock) => {
    const reply =
      '{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}\r\n' +
      `{"return": {"status": "completed", "total-time": 1234}, "id": ${cmd['id']}}\r\n`;
    // One byte per write, each after a turn of the event loop: the client must reassemble.
    let i = 0;
    const next = (): void => {
      if (i >= reply.length) return;
      sock.write(reply[i++]!);
      setImmediate(next);
    };
    next();
  });
  const qmp = await connectQmp(fake.path);
  const resumed = qmp.waitEvent('RESUME', { timeoutMs: 5000 });
  t.same(await qmp.execute('query-migrate'), { status: 'completed', 'total-time': 1234 });
  t.equal((await resumed).timestampMs, 1000.002);
  // Two replies and an event in one write.
  const fake2 = await fakeQmp(t, (cmd, sock) => {
    if (cmd['id'] === 3) {
      sock.write(
        `{"return": 2, "id": 2}\r\n{"event": "X", "timestamp": {"seconds": 0, "microseconds": 0}}\r\n{"return": 3, "id": 3}\r\n`,
      );
    }
  });
  const qmp2 = await connectQmp(fake2.path);
  const [a, b] = await Promise.all([qmp2.execute('a'), qmp2.execute('b')]);
  t.same([a, b], [2, 3]);
  await qmp.close();
  await qmp2.close();
});

t.test('the server closing rejects pending commands with QMP_CLOSED', async (t) => {
  const fake = await fakeQmp(t, (_cmd, sock) => sock.end());
  const qmp = await connectQmp(fake.path);
  const closed = new Promise<QmpError | undefined>((r) => qmp.once('close', r));
  const err = await rejection(qmp.execute('quit'));
  t.equal(err.code, 'QMP_CLOSED');
  t.equal((await closed)?.code, 'QMP_CLOSED');
  t.equal((await rejection(qmp.execute('query-status'))).code, 'QMP_CLOSED');
  t.equal((await rejection(qmp.waitEvent('STOP'))).code, 'QMP_CLOSED');
});

t.test('the client closing rejects pending commands and reports no error', async (t) => {
  const fake = await fakeQmp(t, () => {});
  const qmp = await connectQmp(fake.path);
  const closed = new Promise<QmpError | undefined>((r) => qmp.once('close', r));
  const pending = qmp.execute('query-migrate');
  await qmp.close();
  t.equal((await rejection(pending)).code, 'QMP_CLOSED');
  t.equal(await closed, undefined);
});

t.test('connect failures are coded', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-qmp-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  t.equal((await rejection(connectQmp(join(dir, 'absent.sock')))).code, 'QMP_CONNECT');
  const notQmp = await fakeQmp(t, undefined, '{"hello": "world"}\r\n');
  t.equal((await rejection(connectQmp(notQmp.path))).code, 'QMP_GREETING');
  const silent = await fakeQmp(t, undefined, '');
  t.equal((await rejection(connectQmp(silent.path, { timeoutMs: 100 }))).code, 'QMP_TIMEOUT');
  const garbage = await fakeQmp(t, (_cmd, sock) => sock.write('not json\r\n'));
  const qmp = await connectQmp(garbage.path);
  t.equal((await rejection(qmp.execute('x'))).code, 'QMP_CLOSED');
});
