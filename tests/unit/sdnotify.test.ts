import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as sys from '../../daemon/linux/sys.js';
import { SUN_PATH_OFFSET } from '../../daemon/linux/abi.js';
import { ERRNO } from '../../daemon/linux/errors.js';
import {
  SD_LISTEN_FDS_START,
  fdStore,
  listenFds,
  notify,
  ready,
  status,
  stopping,
  watchdog,
  watchdogIntervalMs,
} from '../../daemon/ops/sdnotify.js';

/**
 * A stand-in for systemd's notification socket: a real non-blocking AF_UNIX datagram socket.
 * sendto(2) on a datagram socket queues the whole datagram before it returns, so the receiver
 * reads it right after the call, without waiting.
 */
function listener(t: Test, name: string): { next(): string | null } {
  const fd = sys.socketUnixDgram(true);
  t.teardown(() => sys.close(fd));
  sys.bindUnix(fd, name);
  const buf = Buffer.alloc(4096);
  return {
    next() {
      const n = sys.tryRecv(fd, buf);
      if (n === -ERRNO.EAGAIN) return null;
      if (n < 0) throw new Error(`recv failed: ${n}`);
      return buf.subarray(0, n).toString('utf8');
    },
  };
}

function tempDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-sdnotify-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

const uniqueAbstract = (): string =>
  `@yabusame-test-${process.pid}-${Math.random().toString(36).slice(2)}`;

t.test('READY=1 reaches a path socket named by $NOTIFY_SOCKET', async (t) => {
  const path = join(tempDir(t), 'notify.sock');
  const l = listener(t, path);
  const saved = process.env['NOTIFY_SOCKET'];
  process.env['NOTIFY_SOCKET'] = path;
  t.teardown(() => {
    if (saved === undefined) delete process.env['NOTIFY_SOCKET'];
    else process.env['NOTIFY_SOCKET'] = saved;
  });
  t.equal(ready(), true, 'sent');
  t.equal(l.next(), 'READY=1');
  t.equal(l.next(), null, 'exactly one datagram');
});

t.test('abstract socket (@name)', async (t) => {
  const name = uniqueAbstract();
  const l = listener(t, name);
  const env = { NOTIFY_SOCKET: name };
  t.equal(ready(env), true);
  t.equal(stopping(env), true);
  t.equal(watchdog(env), true);
  t.equal(status('placing pages\nof vm1', env), true);
  t.equal(l.next(), 'READY=1');
  t.equal(l.next(), 'STOPPING=1');
  t.equal(l.next(), 'WATCHDOG=1');
  t.equal(l.next(), 'STATUS=placing pages of vm1', 'a newline would start a new field');
  t.equal(l.next(), null);
});

t.test('the abstract name is exactly the bytes after @ (no trailing NUL)', async (t) => {
  const name = uniqueAbstract();
  const l = listener(t, name);
  // A receiver bound to "name\0" would be a different abstract socket: the send must not reach it.
  const padded = listener(t, `${name}\0`);
  t.equal(notify('A=1', [], { NOTIFY_SOCKET: name }), true);
  t.equal(l.next(), 'A=1');
  t.equal(padded.next(), null);
  const { len } = sys.sockaddrUn(name);
  t.equal(len, SUN_PATH_OFFSET + Buffer.byteLength(name), 'family + NUL + name');
  t.equal(sys.sockaddrUn('/run/x').len, SUN_PATH_OFFSET + 7, 'path: NUL counted');
});

t.test('no NOTIFY_SOCKET: a no-op that says so', async (t) => {
  t.equal(ready({}), false);
  t.equal(notify('READY=1', [], { NOTIFY_SOCKET: '' }), false);
});

t.test('failures are errors, not silence', async (t) => {
  const missing = join(tempDir(t), 'nobody-listens.sock');
  t.throws(() => ready({ NOTIFY_SOCKET: missing }), { name: 'SyscallError', code: 'ENOENT' });
  t.throws(() => ready({ NOTIFY_SOCKET: 'vsock:2:1234' }), { code: 'EAFNOSUPPORT' });
  t.throws(() => ready({ NOTIFY_SOCKET: '/' + 'x'.repeat(200) }), { code: 'ENAMETOOLONG' });
  t.throws(() => fdStore('a:b', [], { NOTIFY_SOCKET: '@x' }), { code: 'EINVAL' });
});

t.test('FDSTORE=1 passes a working descriptor', async (t) => {
  const name = uniqueAbstract();
  const fd = sys.socketUnixDgram(true);
  t.teardown(() => sys.close(fd));
  sys.bindUnix(fd, name);
  const [a, b] = sys.socketpair();
  t.teardown(() => {
    sys.close(a);
    sys.close(b);
  });
  t.equal(fdStore('session-vm1', [a], { NOTIFY_SOCKET: name }), true);
  const buf = Buffer.alloc(256);
  const got = sys.tryRecvWithFds(fd, buf, 4);
  if (typeof got === 'number') throw new Error(`recvmsg failed: ${got}`);
  t.equal(buf.subarray(0, got.bytes).toString(), 'FDSTORE=1\nFDNAME=session-vm1');
  t.equal(got.fds.length, 1, 'one fd arrived');
  const stored = got.fds[0]!;
  t.not(stored, a, 'a duplicate, not the same number');
  sys.write(stored, Buffer.from('ping'));
  sys.close(stored);
  const out = Buffer.alloc(8);
  t.equal(sys.tryRead(b, out), 4);
  t.equal(out.subarray(0, 4).toString(), 'ping', 'the stored fd is the same socket');
});

t.test('watchdogIntervalMs', async (t) => {
  t.equal(watchdogIntervalMs({}), null);
  t.equal(watchdogIntervalMs({ WATCHDOG_USEC: '20000000' }, 42), 20000);
  t.equal(watchdogIntervalMs({ WATCHDOG_USEC: '20000000', WATCHDOG_PID: '42' }, 42), 20000);
  t.equal(watchdogIntervalMs({ WATCHDOG_USEC: '20000000', WATCHDOG_PID: '7' }, 42), null);
  t.equal(watchdogIntervalMs({ WATCHDOG_USEC: 'x' }, 42), null);
});

t.test('listenFds (socket activation)', async (t) => {
  t.same(listenFds({}, 42), []);
  t.same(listenFds({ LISTEN_PID: '7', LISTEN_FDS: '1' }, 42), [], 'meant for another process');
  t.same(
    listenFds({ LISTEN_PID: '42', LISTEN_FDS: '3', LISTEN_FDNAMES: 'handoff:session-a' }, 42),
    [
      { fd: SD_LISTEN_FDS_START, name: 'handoff' },
      { fd: SD_LISTEN_FDS_START + 1, name: 'session-a' },
      { fd: SD_LISTEN_FDS_START + 2, name: 'unknown' },
    ],
  );
});
