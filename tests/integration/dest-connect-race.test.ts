// A VMM that leaves while the dest is still connecting to the source: the connections that
// complete afterwards are closed at once, not kept open forever.
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
import { FrameType } from '../../protocol/wire.js';
import { connectHandoff, sendRaw } from '../helpers/vmm-client.js';

const SIZE = 1 << 20;

t.test('connections that open after the VMM left are closed', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-race-'));
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, path: '/v1/pages' });
  await once(wss, 'listening');
  const port = (wss.address() as { port: number }).port;
  // The source holds its WELCOME until told to answer.
  const held: Array<{ ws: WebSocket; channel: 1 | 2 }> = [];
  let heldChanged: () => void = () => {};
  wss.on('connection', (ws) => {
    ws.once('message', (data: Buffer) => {
      const hello = decodeFrame(data);
      if (hello.type !== FrameType.HELLO) return;
      held.push({ ws, channel: hello.channel });
      heldChanged();
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
      migrationId: 'vm-race',
      source: `ws://127.0.0.1:${port}`,
      regions: [{ name: 'ram0', base, sizeBytes: SIZE, offset: 0, pageSizeBytes: 4096 }],
    }),
    [fd],
  );
  // Both channels said HELLO; the VMM leaves before the source answers.
  while (held.length < 2) await new Promise<void>((r) => (heldChanged = r));
  c.close();
  sys.close(fd);
  while (daemon.ended().length === 0) await new Promise((r) => setImmediate(r));
  t.equal(daemon.ended()[0]?.error?.code, 'VMM_GONE', 'the session ended with VMM_GONE');

  // Now the source answers: the dest must hang up both connections.
  const closed = held.map(({ ws }) => once(ws, 'close'));
  for (const { ws, channel } of held) {
    ws.send(
      encodeWelcome(channel, 1, new Uint8Array(16), [
        { offset: 0, sizeBytes: SIZE, pageSizeBytes: 4096, name: 'ram0' },
      ]),
    );
  }
  await Promise.all(closed);
  t.pass('both late connections were closed by the dest');
  sys.munmap(base, SIZE);
});
