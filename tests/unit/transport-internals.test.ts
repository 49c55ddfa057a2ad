/**
 * The private internals of node and ws that daemon/transport/internals.ts reads: if an upgrade
 * of either changes them, these fail here, with the name of what changed.
 */
import t from 'tap';
import { once } from 'node:events';
import { createServer, connect, type Socket } from 'node:net';
import { mkdtempSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket, { WebSocketServer } from 'ws';
import { socketFd, takeOverReading, wsSocket } from '../../daemon/transport/internals.js';
import { MSG_DONTWAIT } from '../../daemon/linux/abi.js';
import { setTimeout as sleep } from 'node:timers/promises';
import * as sys from '../../daemon/linux/sys.js';

t.test('socketFd: the fd of an accepted and of a connected socket', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-internals-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 's.sock');
  const server = createServer();
  server.listen(path);
  await once(server, 'listening');
  t.teardown(() => server.close());
  const client = connect(path);
  const [accepted] = (await once(server, 'connection')) as [Socket];
  await once(client, 'connect').catch(() => undefined);
  for (const [name, s] of [
    ['accepted', accepted],
    ['connected', client],
  ] as const) {
    const fd = socketFd(s);
    t.match(readlinkSync(`/proc/self/fd/${fd}`), /^socket:\[\d+\]$/, `${name}: a socket fd`);
    // SO_PEERCRED on a UNIX socket names the peer: this very process, both ways.
    t.equal(sys.peerCred(fd).pid, process.pid, `${name}: the fd is this connection`);
  }
  client.destroy();
  accepted.destroy();
});

t.test('wsSocket: the socket under a ws client, corkable', async (t) => {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  t.teardown(() => wss.close());
  const port = (wss.address() as { port: number }).port;
  const ws = new WebSocket(`ws://127.0.0.1:${port}`);
  await once(ws, 'open');
  const s = wsSocket(ws);
  t.equal(s.remotePort, port, 'the connection to the server');
  s.cork();
  s.uncork();
  ws.close();
});

t.test('takeOverReading: node stops reading, every later byte waits on the fd', async (t) => {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  t.teardown(() => wss.close());
  const port = (wss.address() as { port: number }).port;
  wss.on('connection', (peer) => {
    peer.send('first');
    peer.once('message', () => peer.send(Buffer.alloc(1000, 7)));
  });
  const ws = new WebSocket(`ws://127.0.0.1:${port}`);
  let later = 0;
  const fd = await new Promise<number | null>((resolve) =>
    ws.once('message', () => {
      resolve(takeOverReading(ws));
      ws.on('message', () => later++);
    }),
  );
  t.type(fd, 'number', 'nothing after the first message: taken over');
  ws.send('go');
  // The server's answer: 1000 bytes and a 4-byte ws header, all on the fd, none through ws.
  const buf = Buffer.alloc(2000);
  let got = 0;
  while (got < 1004) {
    const n = sys.tryRecv(fd!, buf.subarray(got), MSG_DONTWAIT);
    if (n > 0) got += n;
    else await sleep(5);
  }
  t.equal(got, 1004);
  t.equal(buf[4 + 999], 7);
  t.equal(later, 0, 'ws delivered nothing more');
  ws.terminate();
});

t.test('they throw a clear error when the internal is gone', async (t) => {
  t.throws(() => socketFd({} as never), /socket\._handle\.fd/);
  t.throws(() => wsSocket({} as never), /ws\._socket/);
  const socket = { cork() {}, uncork() {}, readableLength: 0 };
  t.throws(() => takeOverReading({ _socket: socket } as never), /_bufferedBytes/);
  t.throws(
    () => takeOverReading({ _socket: socket, _receiver: { _bufferedBytes: 0 } } as never),
    /readStop/,
  );
});
