// A source that sends malformed frames ends only its own migration, with a coded error to the
// VMM; the daemon keeps serving.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { WebSocketServer, type WebSocket } from 'ws';
import * as sys from '../../daemon/linux/sys.js';
import type { DestDaemon } from '../../daemon/dest/daemon.js';
import { guestRam, startTestDest } from '../helpers/dest.js';
import { encodeHandoff } from '../../protocol/handoff.js';
import { decodeFrame, encodeData, encodeWelcome, encodeZero } from '../../protocol/page-codec.js';
import { FrameType, PROTOCOL_VERSION } from '../../protocol/wire.js';
import { connectHandoff, sendRaw } from '../helpers/vmm-client.js';

const SIZE = 1 << 20;
const dir = mkdtempSync(join(tmpdir(), 'yabusame-badsrc-'));
const socketPath = join(dir, 'dest.sock');
let daemon: DestDaemon;
let wss: WebSocketServer;
let port = 0;
/** What the scripted source sends on the background channel after WELCOME, per migration id. */
const scripts = new Map<string, (ws: WebSocket) => void>();

t.before(async () => {
  wss = new WebSocketServer({ host: '127.0.0.1', port: 0, path: '/v1/pages' });
  await once(wss, 'listening');
  port = (wss.address() as { port: number }).port;
  wss.on('connection', (ws) => {
    ws.once('message', (data: Buffer) => {
      const hello = decodeFrame(data);
      if (hello.type !== FrameType.HELLO) return;
      ws.send(
        encodeWelcome(hello.channel, PROTOCOL_VERSION, new Uint8Array(16), [
          { offset: 0, sizeBytes: SIZE, pageSizeBytes: 4096, name: 'ram0' },
        ]),
      );
      if (hello.channel === 2) scripts.get(hello.migrationId)?.(ws);
    });
  });
  daemon = await startTestDest(socketPath);
});
t.teardown(async () => {
  await daemon.close();
  wss.close();
  rmSync(dir, { recursive: true, force: true });
});

async function migrate(
  id: string,
  dest = socketPath,
): Promise<{ replies: Awaited<ReturnType<typeof connectHandoff>>; fd: number }> {
  const { base, fd } = guestRam(SIZE);
  const c = await connectHandoff(dest);
  sendRaw(
    c,
    encodeHandoff({
      type: 'handoff',
      version: 1,
      migrationId: id,
      source: `ws://127.0.0.1:${port}`,
      regions: [{ name: 'ram0', base, sizeBytes: SIZE, offset: 0, pageSizeBytes: 4096 }],
    }),
    [fd],
  );
  return { replies: c, fd };
}

const cases: Array<[string, string, (ws: WebSocket) => void]> = [
  ['unknown frame type', 'FRAME_UNKNOWN_TYPE', (ws) => ws.send(Buffer.from([0x7f, 0, 0, 0]))],
  [
    'DATA whose length field lies',
    'FRAME_BAD_LENGTH',
    (ws) => {
      const f = encodeData(0, 0, Buffer.alloc(4096, 1));
      f.writeUInt32LE(8192, 4);
      ws.send(f);
    },
  ],
  ['a text message', 'FRAME_TEXT', (ws) => ws.send('hello')],
  ['a zero run outside the image', 'OUT_OF_RANGE', (ws) => ws.send(encodeZero(0, SIZE, 4096))],
  ['an unaligned run', 'FRAME_BAD_VALUE', (ws) => ws.send(encodeZero(0, 100, 4096))],
  [
    'a frame only the dest may send',
    'BAD_STATE',
    (ws) => ws.send(Buffer.from([FrameType.CREDIT, 0, 0, 0, 0, 0, 0, 0])),
  ],
];

for (const [name, code, script] of cases) {
  t.test(name, async (t) => {
    const id = `bad-${code.toLowerCase().replace(/_/g, '-')}`;
    scripts.set(id, script);
    const { replies, fd } = await migrate(id);
    const ack = await replies.next();
    t.equal(ack.type, 'ack', `the handoff was accepted: ${JSON.stringify(ack)}`);
    const err = await replies.next();
    t.equal(
      err.type === 'error' && err.code,
      code,
      `the VMM hears ${code}: ${JSON.stringify(err)}`,
    );
    await replies.closed;
    sys.close(fd);
  });
}

t.test('a good migration after all the bad ones still completes', async (t) => {
  scripts.set('good', (ws) => {
    let sent = false;
    ws.on('message', (data: Buffer) => {
      const f = decodeFrame(data);
      if (f.type === FrameType.COMPLETE) ws.send(data);
      // Pages go out only within the credit the dest grants after its HAVE sync (a frame
      // beyond it is BAD_STATE).
      if (f.type === FrameType.CREDIT && !sent) {
        sent = true;
        ws.send(encodeZero(0, 0, SIZE));
      }
    });
  });
  const { replies, fd } = await migrate('good');
  t.equal((await replies.next()).type, 'ack');
  let reply = await replies.next();
  while (reply.type === 'progress') reply = await replies.next();
  t.equal(reply.type, 'complete');
  t.equal(
    reply.type === 'complete' && reply.zeroPages,
    SIZE / 4096,
    'every page placed as a zero page',
  );
  sys.close(fd);
});

t.test('a background connection gets its HAVE sync, then one window of credit', async (t) => {
  const got: Array<{ type: number; bytes: number }> = [];
  scripts.set('credit-once', (ws) => {
    ws.on('message', (data: Buffer) => {
      const f = decodeFrame(data);
      got.push({ type: f.type, bytes: f.type === FrameType.CREDIT ? f.bytes : 0 });
    });
  });
  const { replies, fd } = await migrate('credit-once');
  t.equal((await replies.next()).type, 'ack');
  await new Promise((r) => setTimeout(r, 300));
  t.equal(got[0]?.type, FrameType.HAVE, 'the HAVE sync comes first');
  const credit = got.filter((f) => f.type === FrameType.CREDIT).reduce((n, f) => n + f.bytes, 0);
  // startTestDest's backgroundWindowBytes: a second grant would let 2 MiB be in flight.
  t.equal(credit, 1 << 20, 'one window (1 MiB) and no more before any data arrived');
  replies.close();
  await replies.closed;
  sys.close(fd);
});

t.test('sessions share the payload ring: the credit granted never exceeds it', async (t) => {
  // A second dest whose window (8 MiB) is half the ring (16 MiB). The scripted source sends no
  // page, so nothing is placed and no credit comes back: the first two sessions get their whole
  // window and fill the ring, the third and fourth only the least share (512 KiB). Once the
  // first closes, its 8 MiB go to the others, up to their shares (16/3 MiB each now): the ring
  // is full again, and no more.
  const sock = join(dir, 'share.sock');
  const shared = await startTestDest(sock, { backgroundWindowBytes: 8 << 20 });
  t.teardown(() => shared.close());
  const MiB = 1 << 20;
  const want = [8 * MiB, 8 * MiB, MiB / 2, MiB / 2];
  const credit = want.map(() => 0);
  const settle = (): Promise<unknown> => new Promise((r) => setTimeout(r, 200)); // late grants
  const open: Array<{ close(): void; closed: Promise<unknown>; fd: number }> = [];
  for (let i = 0; i < want.length; i++) {
    const id = `share-${i}`;
    const first = new Promise<void>((resolve) => {
      scripts.set(id, (ws) => {
        ws.on('message', (data: Buffer) => {
          const f = decodeFrame(data);
          if (f.type !== FrameType.CREDIT) return;
          credit[i]! += f.bytes;
          resolve();
        });
      });
    });
    const { replies: c, fd } = await migrate(id, sock);
    t.equal((await c.next()).type, 'ack');
    await first;
    await settle();
    t.equal(credit[i], want[i], `session ${i + 1}: ${credit[i]} bytes of credit`);
    open.push({ close: () => c.close(), closed: c.closed, fd });
  }
  open[0]!.close();
  await open[0]!.closed;
  // Until the freed credit has come (however slow the machine), then a while for any excess.
  const deadline = Date.now() + 10_000;
  while (credit[1]! + credit[2]! + credit[3]! < 16 * MiB && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 10));
  }
  await settle();
  t.equal(credit[1], 8 * MiB, 'session 2 is past its share now: nothing more');
  t.ok(credit[2]! > MiB / 2 && credit[3]! > MiB / 2, `sessions 3 and 4 got more: ${credit}`);
  t.ok(credit[2]! <= (16 * MiB) / 3 && credit[3]! <= (16 * MiB) / 3, 'within their shares');
  t.equal(credit[1]! + credit[2]! + credit[3]!, 16 * MiB, 'the ring is full, and no more');
  for (const o of open) {
    o.close();
    await o.closed;
    sys.close(o.fd);
  }
});

t.test(
  'a dest stopped while a source keeps its background socket busy exits cleanly',
  async (t) => {
    // Pings keep the socket readable (they need no credit) while the daemon stops, and this
    // source reads nothing, so the dest's close handshake never ends: the bulk thread must stop
    // reading before node tears it down, or node aborts the whole process.
    const path = join(dir, 'busy.sock');
    const busy = await startTestDest(path);
    let pinging = 0;
    scripts.set('busy-pings', (ws) => {
      ws.pause();
      const timer = setInterval(() => {
        if (ws.readyState !== ws.OPEN) return clearInterval(timer);
        for (let i = 0; i < 50; i++) ws.ping();
        pinging++;
      }, 1);
    });
    const { replies, fd } = await migrate('busy-pings', path);
    t.equal((await replies.next()).type, 'ack');
    while (pinging < 20) await new Promise((r) => setTimeout(r, 5));
    await busy.close();
    t.pass('the daemon stopped; this process is alive');
    sys.close(fd);
  },
);
