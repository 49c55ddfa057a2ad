// The background channel's receiving half read with recv(2) (daemon/transport/raw-receive.ts),
// against a WebSocket peer written here byte by byte: the handshake by hand, every frame built
// from RFC 6455, sent in pieces of every size and with pauses, so each path of the parser runs
// on a real loopback connection.
import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { createServer, type Server } from 'node:http';
import type { Socket } from 'node:net';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  connectPageChannel,
  type CloseInfo,
  type PageChannel,
} from '../../daemon/transport/client.js';
import type { PayloadSink } from '../../daemon/transport/raw-receive.js';
import {
  decodeFrame,
  encodeCredit,
  encodeData,
  encodeHave,
  encodeProgress,
  encodeWelcome,
  encodeZero,
} from '../../protocol/page-codec.js';
import {
  Channel,
  FrameType,
  HeaderSize,
  PROTOCOL_VERSION,
  type Frame,
} from '../../protocol/wire.js';
import { wsFrame } from '../fixtures/ws-frame.js';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const REGION = { offset: 0, sizeBytes: 64 << 20, pageSizeBytes: 4096, name: 'ram0' };

const binary = (payload: Uint8Array): Buffer => wsFrame(0x2, payload);

/** The client's frames (masked), as they arrive on the peer's socket. */
class ClientFrames {
  private buf = Buffer.alloc(0);
  readonly frames: Array<{ op: number; payload: Buffer }> = [];
  private waiters: Array<() => void> = [];
  constructor(socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      for (;;) {
        if (this.buf.length < 2) break;
        let n = this.buf[1]! & 0x7f;
        let off = 2;
        if (n === 126) {
          n = this.buf.readUInt16BE(2);
          off = 4;
        } else if (n === 127) {
          n = this.buf.readUInt32BE(6);
          off = 10;
        }
        if (this.buf.length < off + 4 + n) break;
        const key = this.buf.subarray(off, off + 4);
        const payload = Buffer.from(this.buf.subarray(off + 4, off + 4 + n));
        for (let i = 0; i < n; i++) payload[i]! ^= key[i % 4]!;
        this.frames.push({ op: this.buf[0]! & 0x0f, payload });
        this.buf = this.buf.subarray(off + 4 + n);
        for (const w of this.waiters.splice(0)) w();
      }
    });
  }
  async next(pred: (f: { op: number; payload: Buffer }) => boolean): Promise<Buffer> {
    for (;;) {
      const f = this.frames.find(pred);
      if (f) return f.payload;
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }
}

interface Peer {
  socket: Socket;
  client: ClientFrames;
}

let server: Server;
let port = 0;
/** What the peer does after WELCOME, by migration id. */
const scripts = new Map<string, (p: Peer) => void | Promise<void>>();
/** Bytes the peer sends in the same write as WELCOME, by migration id. */
const behindWelcome = new Map<string, Buffer>();

t.before(async () => {
  server = createServer();
  server.on('upgrade', (req, socket: Socket) => {
    const accept = createHash('sha1')
      .update(`${String(req.headers['sec-websocket-key'])}${GUID}`)
      .digest('base64');
    socket.write(
      'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
        `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
    );
    const client = new ClientFrames(socket);
    void client
      .next((f) => f.op === 0x2)
      .then((hello) => {
        const f = decodeFrame(hello);
        if (f.type !== FrameType.HELLO) throw new Error('no HELLO');
        const welcome = binary(
          encodeWelcome(f.channel, PROTOCOL_VERSION, new Uint8Array(16), [REGION]),
        );
        socket.write(Buffer.concat([welcome, behindWelcome.get(f.migrationId) ?? Buffer.alloc(0)]));
        // The script starts once the client has sent CREDIT, after it took over reading:
        // otherwise its first bytes could come in one read with WELCOME, and ws would keep them.
        return client
          .next((x) => x.op === 0x2 && x.payload[0] === FrameType.CREDIT)
          .then(() => scripts.get(f.migrationId)?.({ socket, client }));
      });
    socket.on('error', () => {});
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  port = (server.address() as { port: number }).port;
});
t.teardown(() => server.close());

/** A sink over one buffer, reused from its start whenever a payload does not fit after the last. */
function testSink(bytes: number, refuse = false): PayloadSink & { buf: Buffer; commits: number } {
  let at = 0;
  let reservedEnd = 0;
  return {
    buf: Buffer.alloc(bytes),
    commits: 0,
    reserve(n) {
      if (refuse || n > bytes) return null;
      const p = at + n > bytes ? 0 : at;
      reservedEnd = p + n;
      return this.buf.subarray(p, p + n);
    },
    commit() {
      at = reservedEnd;
      this.commits++;
    },
  };
}

interface Got {
  ch: PageChannel;
  frames: Array<{
    frame: Frame;
    inSink: boolean;
    payload: Buffer | null;
    message: Buffer;
    /** The memory the message was delivered in (the receiver's own, reused). */
    memory: ArrayBufferLike;
  }>;
  closed: Promise<CloseInfo>;
}

/** A channel read with recv(2): into `sink`, or (null) whole messages only. */
async function open(
  id: string,
  sink: ReturnType<typeof testSink> | null,
  each?: (got: Got) => void,
): Promise<Got> {
  const ch = await connectPageChannel({
    source: { scheme: 'ws', host: '127.0.0.1', port },
    migrationId: id,
    channel: Channel.BACKGROUND,
    secret: null,
    timeoutMs: 5000,
    ...(sink ? { payloads: sink } : { receive: 'raw' as const }),
  });
  const frames: Got['frames'] = [];
  let got: Got | null = null;
  const closed = new Promise<CloseInfo>((resolve) =>
    ch.attach((frame, message) => {
      const payload = frame.type === FrameType.DATA ? frame.payload : null;
      frames.push({
        frame,
        inSink: payload !== null && payload.buffer === sink?.buf.buffer,
        // The sink's room and the staging buffer are reused: keep copies.
        payload: payload ? Buffer.from(payload) : null,
        message: Buffer.from(message),
        memory: message.buffer,
      });
      if (got) each?.(got);
    }, resolve),
  );
  got = { ch, frames, closed };
  ch.send(encodeCredit(1 << 20));
  return got;
}

async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await sleep(5);
}

/** Writes `bytes` in pieces of random sizes (1 byte to 100 KiB), pausing now and then. */
async function dribble(socket: Socket, bytes: Buffer, seed: number): Promise<void> {
  let x = seed;
  const rnd = (): number => (x = (x * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (let at = 0; at < bytes.length;) {
    const n = Math.max(1, Math.floor(rnd() ** 3 * 100 * 1024));
    socket.write(bytes.subarray(at, at + n));
    at += n;
    if (rnd() < 0.2) await sleep(2);
  }
}

for (const withSink of [true, false]) {
  const how = withSink ? 'payloads into a sink' : 'whole messages, no sink';
  t.test(
    `${how}: every DATA and ZERO frame arrives whole, in order, sent in pieces of any size`,
    async (t) => {
      const sizes = [4096, 256 * 1024, 64 * 1024, 3 * 1024 * 1024, 8192, 2 * 1024 * 1024];
      const payloads = sizes.map((n) => randomBytes(n));
      const stream: Buffer[] = [];
      let offset = 0;
      const expected: Array<{ type: number; offset: number; payload?: Buffer }> = [];
      payloads.forEach((p, i) => {
        stream.push(binary(encodeData(0, offset, p)));
        expected.push({ type: FrameType.DATA, offset, payload: p });
        offset += p.length;
        for (let z = 0; z < 50 * i; z++) {
          stream.push(binary(encodeZero(0, offset, 4096)));
          expected.push({ type: FrameType.ZERO, offset });
          offset += 4096;
        }
      });
      stream.push(binary(encodeProgress(0, offset, offset)));
      expected.push({ type: FrameType.PROGRESS, offset: -1 });
      const id = `pieces-${withSink}`;
      scripts.set(id, ({ socket }) => dribble(socket, Buffer.concat(stream), 7));
      const sink = withSink ? testSink(8 << 20) : null;
      const got = await open(id, sink);
      await until(() => got.frames.length === expected.length);
      t.same(
        got.frames.map(({ frame }) => frame.type),
        expected.map((e) => e.type),
        'frame types in order',
      );
      let inSink = 0;
      let whole = 0;
      got.frames.forEach(({ frame, payload, inSink: s, message }, i) => {
        const e = expected[i]!;
        if (frame.type === FrameType.DATA) {
          t.equal(frame.offset, e.offset, `DATA ${i} offset`);
          t.ok(payload!.equals(e.payload!), `DATA ${i}: ${payload!.length} bytes, every byte`);
          if (s) inSink++;
          // A whole message: the frame's header, then its payload, as ws delivers it.
          if (message.length === HeaderSize.DATA + payload!.length) {
            if (message.subarray(HeaderSize.DATA).equals(payload!)) whole++;
          }
        }
      });
      t.same(
        got.frames.map(({ frame }) => (frame.type === FrameType.ZERO ? frame.offset : -1)),
        expected.map((e) => (e.type === FrameType.ZERO ? e.offset : -1)),
        'ZERO runs, every offset',
      );
      if (sink) {
        // The sink has room for each: a payload received apart from it (not all queued at
        // once, or too large to wait for) is moved into it, so every one ends there,
        // committed once.
        t.equal(inSink, sizes.length, 'every payload delivered in the sink');
        t.equal(sink.commits, sizes.length, 'one commit per payload');
      } else {
        t.equal(whole, sizes.length, 'every DATA frame delivered as its whole message');
        // Messages too large for staging are received into one scratch buffer, reused while
        // large enough: the 64 KiB one lands where the 256 KiB one did, not in fresh memory.
        const memoryOf = (n: number): ArrayBufferLike | undefined =>
          got.frames.find(({ payload }) => payload?.length === n)?.memory;
        t.equal(memoryOf(64 * 1024), memoryOf(256 * 1024), 'a large message reuses the memory');
      }
      got.ch.close();
    },
  );
}

t.test('a sink without room: payloads come in buffers of their own, intact', async (t) => {
  const p = randomBytes(128 * 1024);
  scripts.set('no-room', ({ socket }) => {
    socket.write(binary(encodeData(0, 4096, p)));
  });
  const sink = testSink(1 << 20, true);
  const got = await open('no-room', sink);
  await until(() => got.frames.length === 1);
  t.equal(sink.commits, 0);
  t.notOk(got.frames[0]!.inSink);
  t.ok(got.frames[0]!.payload!.equals(p));
  got.ch.close();
});

t.test(
  'pings are answered with their payload; fragments are reassembled around them',
  async (t) => {
    const p = randomBytes(20_000);
    const whole = encodeData(0, 8192, p);
    let peer: Peer | null = null;
    scripts.set('fragments', (x) => {
      peer = x;
      x.socket.write(wsFrame(0x9, Buffer.from('are you there')));
      x.socket.write(wsFrame(0x2, whole.subarray(0, 7), { fin: false }));
      x.socket.write(wsFrame(0x9, Buffer.from('still')));
      x.socket.write(wsFrame(0x0, whole.subarray(7, 15_000), { fin: false }));
      x.socket.write(wsFrame(0x0, whole.subarray(15_000), { fin: true }));
    });
    const got = await open('fragments', testSink(1 << 20));
    await until(() => got.frames.length === 1 && peer !== null);
    const f = got.frames[0]!;
    t.equal(f.frame.type, FrameType.DATA);
    t.ok(f.payload!.equals(p), 'the reassembled payload, every byte');
    const pongs = (): Buffer[] =>
      peer!.client.frames.filter((x) => x.op === 0xa).map((x) => x.payload);
    await until(() => pongs().length === 2);
    t.same(
      pongs().map((b) => b.toString()),
      ['are you there', 'still'],
      'each ping answered with its payload',
    );
    got.ch.close();
  },
);

t.test('pause holds frames back until resume, staged ones included', async (t) => {
  const zeros = Buffer.concat(
    Array.from({ length: 40 }, (_, i) => binary(encodeZero(0, i * 4096, 4096))),
  );
  scripts.set('pause', ({ socket }) => {
    socket.write(zeros);
  });
  // Paused from inside the first delivery, as the bulk thread yields to faults.
  const got = await open('pause', testSink(1 << 20), (g) => {
    if (g.frames.length === 1) g.ch.pause();
  });
  await until(() => got.frames.length >= 1);
  await sleep(100);
  t.equal(got.frames.length, 1, 'nothing delivered while paused (39 frames staged)');
  got.ch.resume();
  await until(() => got.frames.length === 40);
  t.same(
    got.frames.map(({ frame }) => (frame.type === FrameType.ZERO ? frame.offset : -1)),
    Array.from({ length: 40 }, (_, i) => i * 4096),
    'then all, in order',
  );
  got.ch.close();
});

t.test('bytes right behind WELCOME: ws keeps reading, nothing is lost', async (t) => {
  const p = randomBytes(50_000);
  behindWelcome.set('behind', binary(encodeData(0, 0, p)));
  const sink = testSink(1 << 20);
  const got = await open('behind', sink);
  await until(() => got.frames.length === 1);
  t.notOk(got.frames[0]!.inSink, 'read by ws, not into the sink');
  t.ok(got.frames[0]!.payload!.equals(p));
  got.ch.close();
});

const bad: Array<[string, (s: Socket) => void, string, RegExp]> = [
  [
    'a checksum that does not match',
    (s) => {
      const f = encodeData(0, 0, randomBytes(8192));
      f[100]! ^= 1;
      s.write(binary(f));
    },
    'FRAME_CHECKSUM',
    /checksum/,
  ],
  [
    'a DATA length other than the message',
    (s) => {
      const f = encodeData(0, 0, randomBytes(8192));
      s.write(binary(Buffer.concat([f, Buffer.alloc(4096)])));
    },
    'FRAME_BAD_LENGTH',
    /must be/,
  ],
  [
    'a masked frame',
    (s) => s.write(wsFrame(0x2, encodeZero(0, 0, 4096), { mask: true })),
    'SOURCE_IO',
    /masked/,
  ],
  [
    'RSV bits',
    (s) => s.write(wsFrame(0x2, encodeZero(0, 0, 4096), { rsv: 4 })),
    'SOURCE_IO',
    /RSV/,
  ],
  ['an unknown opcode', (s) => s.write(wsFrame(0x3, Buffer.alloc(4))), 'SOURCE_IO', /opcode/],
  ['a text message', (s) => s.write(wsFrame(0x1, Buffer.from('hi'))), 'FRAME_TEXT', /text/],
  [
    'a close frame',
    (s) =>
      s.write(wsFrame(0x8, Buffer.concat([Buffer.from([0x03, 0xe9]), Buffer.from('going away')]))),
    'SOURCE_CLOSED',
    /1001 going away/,
  ],
  [
    'EOF inside a payload',
    (s) => {
      const f = binary(encodeData(0, 0, randomBytes(100_000)));
      s.end(f.subarray(0, 60_000));
    },
    'SOURCE_CLOSED',
    /closed/,
  ],
  [
    'a message over the protocol limit',
    (s) => {
      const h = Buffer.alloc(10);
      h[0] = 0x82;
      h[1] = 127;
      h.writeUInt32BE(64 << 20, 6);
      s.write(h);
    },
    'SOURCE_IO',
    /Max payload/,
  ],
];
for (const [name, send, code, message] of bad) {
  t.test(`${name}: the channel closes with ${code}, the frames before it delivered`, async (t) => {
    const id = `bad-${name.replace(/\W+/g, '-')}`;
    scripts.set(id, ({ socket }) => {
      socket.write(binary(encodeZero(0, 0, 4096)));
      send(socket);
    });
    const got = await open(id, testSink(1 << 20));
    const info = await got.closed;
    t.equal(info.code, code);
    t.match(info.message, message);
    t.equal(got.frames.length, 1, 'the frame before it');
    t.notOk(got.ch.isOpen);
  });
}

t.test('frames the dest sends keep their order and bytes, whoever writes them', async (t) => {
  // A short frame leaves by send(2) of the channel's own (masked) while nothing waits to be
  // written, and through ws once the socket is full: a peer that reads nothing while 12000
  // HAVE frames of about 1 KiB (12 MiB) are sent makes both happen, and the switch between them.
  let peer: Peer | null = null;
  scripts.set('send-order', (p) => {
    p.socket.pause();
    peer = p;
  });
  const got = await open('send-order', null);
  await until(() => peer !== null);
  const sent: Buffer[] = [];
  let refused = 0;
  for (let i = 0; i < 12000; i++) {
    const ranges = Array.from({ length: 60 }, (_, k) => ({
      offset: (i * 60 + k) * 8192,
      length: 4096,
    }));
    const frame = encodeHave(0, ranges);
    sent.push(frame);
    if (!got.ch.send(frame)) refused++;
  }
  t.equal(refused, 0, 'every frame taken');
  const p = peer!;
  // Each frame: 2 + 2 bytes of length + a 4-byte key in front (a corrupted stream would leave
  // the parser waiting, so the wait is for the bytes).
  const expected = sent.reduce((n, f) => n + 8 + f.length, 0);
  let received = 0;
  p.socket.on('data', (d: Buffer) => (received += d.length));
  p.socket.resume();
  await until(() => received >= expected);
  await sleep(10);
  const haves = p.client.frames.filter((x) => x.op === 0x2 && x.payload[0] === FrameType.HAVE);
  t.equal(haves.length, sent.length, 'as many frames as sent');
  const bad = haves.filter((x, i) => !x.payload.equals(sent[i]!)).length;
  t.equal(bad, 0, `all ${sent.length} frames arrived unmasked as sent, in order`);
  got.ch.close();
});

t.test('a close with bytes still unread ends in a clean close, not a reset', async (t) => {
  let resetSeen: Error | null = null;
  let ended: Promise<boolean> | null = null;
  scripts.set('close-unread', ({ socket, client }) => {
    socket.on('error', (err) => (resetSeen = err));
    ended = new Promise((resolve) => socket.on('close', resolve));
    // 4 MiB the client will not read, then the close handshake once the client starts it.
    for (let i = 0; i < 64; i++) socket.write(binary(encodeData(0, i * 65536, randomBytes(65536))));
    void client
      .next((f) => f.op === 0x8)
      .then(() => socket.end(wsFrame(0x8, Buffer.from([3, 232]))));
  });
  const got = await open('close-unread', testSink(1 << 20), (g) => {
    if (g.frames.length === 1) g.ch.pause();
  });
  await until(() => got.frames.length === 1 && ended !== null);
  got.ch.close('BAD_STATE', 'the test ends it');
  t.equal((await got.closed).code, 'BAD_STATE');
  t.equal(await ended!, false, 'the peer saw the connection close without an error');
  t.equal(resetSeen, null, 'no ECONNRESET');
});

t.test('a close from inside a delivery delivers nothing after it', async (t) => {
  // 64-byte frames (this consumer takes any frame; a WELCOME with a 14-byte region name is
  // 64 bytes with its ws header), 320 KB of them: more than one recv takes, and a recv of
  // 64 KiB ends on a frame boundary, so what stays queued in the socket parses.
  const frame = binary(
    encodeWelcome(Channel.BACKGROUND, PROTOCOL_VERSION, new Uint8Array(16), [
      { offset: 0, sizeBytes: 4096, pageSizeBytes: 4096, name: 'fourteen-chars' },
    ]),
  );
  t.equal(frame.length, 64);
  scripts.set('close-inside', ({ socket }) => {
    socket.write(Buffer.concat(Array.from({ length: 5000 }, () => frame)));
  });
  // Paused at the first frame until all of it is queued; closed at the second.
  const got = await open('close-inside', testSink(1 << 20), (g) => {
    if (g.frames.length === 1) g.ch.pause();
    if (g.frames.length === 2) g.ch.close('BAD_STATE', 'closed by the consumer');
  });
  await until(() => got.frames.length === 1);
  await sleep(100);
  got.ch.resume();
  await got.closed;
  await sleep(50);
  t.equal(got.frames.length, 2, 'none of the frames behind it was delivered');
});
