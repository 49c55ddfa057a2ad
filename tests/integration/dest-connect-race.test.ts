// A VMM that leaves while the dest is still connecting to the source: the connections that
// complete afterwards are closed at once, not kept open forever. The dest opens the demand
// channel first and the background channel once the demand WELCOME told it where; the VMM
// leaves while either is pending.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { WebSocketServer, type WebSocket } from 'ws';
import * as sys from '../../daemon/linux/sys.js';
import { guestRam, startTestDest } from '../helpers/dest.js';
import { encodeHandoff } from '../../protocol/handoff.js';
import { decodeFrame, encodeWelcome } from '../../protocol/page-codec.js';
import { Channel, FrameType, PROTOCOL_VERSION } from '../../protocol/wire.js';
import { connectHandoff, sendRaw } from '../helpers/vmm-client.js';

const SIZE = 1 << 20;

const welcome = (channel: 1 | 2): Uint8Array =>
  encodeWelcome(channel, PROTOCOL_VERSION, new Uint8Array(16), [
    { offset: 0, sizeBytes: SIZE, pageSizeBytes: 4096, name: 'ram0' },
  ]);

for (const pending of [Channel.DEMAND, Channel.BACKGROUND] as const) {
  const name = pending === Channel.DEMAND ? 'demand' : 'background';
  t.test(`a ${name} connection that opens after the VMM left is closed`, async (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'yabusame-race-'));
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, path: '/v1/pages' });
    await once(wss, 'listening');
    const port = (wss.address() as { port: number }).port;
    // The source answers every HELLO at once, but holds the WELCOME of the `pending` channel.
    const sockets: WebSocket[] = [];
    let held: WebSocket | undefined;
    let heldArrived: () => void = () => {};
    wss.on('connection', (ws) => {
      sockets.push(ws);
      ws.once('message', (data: Buffer) => {
        const hello = decodeFrame(data);
        if (hello.type !== FrameType.HELLO) return;
        if (hello.channel !== pending) {
          ws.send(welcome(hello.channel));
          return;
        }
        held = ws;
        heldArrived();
      });
    });
    const daemon = await startTestDest(join(dir, 'dest.sock'), {
      connectTimeoutMs: 10_000,
      reconnectTimeoutMs: 1000,
    });
    t.teardown(async () => {
      await daemon.close();
      wss.close();
      rmSync(dir, { recursive: true, force: true });
    });

    const { base, fd } = guestRam(SIZE);
    const c = await connectHandoff(join(dir, 'dest.sock'));
    sendRaw(
      c,
      encodeHandoff({
        type: 'handoff',
        version: 1,
        migrationId: `vm-race-${name}`,
        source: `ws://127.0.0.1:${port}`,
        regions: [{ name: 'ram0', base, sizeBytes: SIZE, offset: 0, pageSizeBytes: 4096 }],
      }),
      [fd],
    );
    // The pending channel said HELLO; the VMM leaves before the source answers it.
    if (!held) await new Promise<void>((r) => (heldArrived = r));
    c.close();
    sys.close(fd);
    while (daemon.ended().length === 0) await new Promise((r) => setImmediate(r));
    t.equal(daemon.ended()[0]?.error?.code, 'VMM_GONE', 'the session ended with VMM_GONE');

    // Now the source answers: the dest must hang up every connection it has.
    const closed = sockets.map((ws) =>
      ws.readyState === ws.CLOSED ? Promise.resolve() : once(ws, 'close'),
    );
    held!.send(welcome(pending));
    await Promise.all(closed);
    t.equal(
      sockets.length,
      pending === Channel.DEMAND ? 1 : 2,
      pending === Channel.DEMAND
        ? 'no background connection was opened for a session that ended'
        : 'both connections were made, then closed',
    );
    t.pass('every late connection was closed by the dest');
    sys.munmap(base, SIZE);
  });
}
