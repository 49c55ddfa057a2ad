import t from 'tap';
import http from 'node:http';
import { createHash } from 'node:crypto';
import type { Socket } from 'node:net';
import {
  closeSync,
  mkdtempSync,
  openSync,
  rmSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import WebSocket from 'ws';
import { startSourceServer, type SourceServer } from '../../daemon/source/server.js';
import { startControlServer } from '../../daemon/source/control-api.js';
import type { SourceServerOptions } from '../../daemon/source/server.js';
import { silentLogger } from '../../daemon/ops/log.js';
import { noopSourceMetrics } from '../../daemon/ops/metric-ports.js';
import {
  encodeComplete,
  encodeCredit,
  encodeHave,
  encodeRequest,
} from '../../protocol/page-codec.js';
import {
  Channel,
  DataFlag,
  FrameType,
  HaveFlag,
  HeaderSize,
  ProgressFlag,
  PROTOCOL_VERSION,
  type Frame,
  type FrameOf,
} from '../../protocol/wire.js';
import { RawDest } from '../fixtures/raw-dest.js';
import { wsFrame } from '../fixtures/ws-frame.js';
import { writeTestImage } from '../fixtures/memory-image.js';

const img = writeTestImage();
t.teardown(() => img.remove());
const PAGE = 4096;
const RAM1 = 1024 * 1024;
const TOTAL_PAGES = img.totalPages;

/** Each server's control socket, by its page port (api() below speaks to it). */
const controls = new Map<number, string>();
const controlDir = mkdtempSync(join(tmpdir(), 'yabusame-control-'));
t.teardown(() => rmSync(controlDir, { recursive: true, force: true }));

/** A source with authentication on, images beneath the temp folder, its control API beside. */
async function start(t: Tap, opts: Partial<SourceServerOptions> = {}): Promise<SourceServer> {
  const server = await startSourceServer({
    listen: { host: '127.0.0.1', port: 0 },
    authRequired: true,
    imageRoot: tmpdir(),
    maxMigrations: 64,
    metrics: noopSourceMetrics,
    log: silentLogger,
    ...opts,
  });
  const path = join(controlDir, `${server.port}.sock`);
  const control = await startControlServer(server.registry, silentLogger, {
    socket: { path, mode: 0o600 },
  });
  controls.set(server.port, path);
  t.teardown(async () => {
    await control.close();
    await server.close();
  });
  return server;
}

/** The secret of a test migration (HELLOs of RawDest prove it). */
function secretFor(id: string): string {
  const secret = createHash('sha256').update(id).digest('hex');
  RawDest.secrets.set(id, Buffer.from(secret, 'hex'));
  return secret;
}
/** The assertions the helpers below use (tap's subtest type is not exported by name). */
interface Tap {
  equal(found: unknown, wanted: unknown, message: string): unknown;
  equal(found: unknown, wanted: unknown): unknown;
  ok(value: unknown, message: string): unknown;
  teardown(fn: () => unknown): void;
}

/** Control API answers as the tests read them (a field absent at run time fails its assertion). */
interface ApiBody {
  state: string;
  pendingRequests: number;
  connections: { demand: boolean; background: boolean };
  pages: { total: number; sent: number; background: number };
  migrations: unknown[];
  error: { code: string; message: string };
  secret: string;
}

/** A control API request to the source whose page port is `port`. */
function api(
  port: number,
  method: string,
  path: string,
  body?: unknown,
  headers: Record<string, string> = body === undefined
    ? {}
    : { 'content-type': 'application/json' },
): Promise<{ status: number; json: ApiBody }> {
  return new Promise((resolve, reject) => {
    const socketPath = controls.get(port)!;
    const req = http.request({ socketPath, method, path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        let json: unknown = text;
        try {
          json = JSON.parse(text);
        } catch {
          /* plain text */
        }
        resolve({ status: res.statusCode ?? 0, json: json as ApiBody });
      });
    });
    req.on('error', reject);
    if (body !== undefined) req.end(typeof body === 'string' ? body : JSON.stringify(body));
    else req.end();
  });
}

async function register(port: number, id: string, frozen = false): Promise<void> {
  const res = await api(port, 'POST', '/v1/migrations', {
    id,
    image: img.path,
    regions: img.regions,
    frozen,
    secret: secretFor(id),
  });
  if (res.status !== 201)
    throw new Error(`register ${id}: ${res.status} ${JSON.stringify(res.json)}`);
}

type DataFrame = FrameOf<typeof FrameType.DATA>;
type ZeroFrame = FrameOf<typeof FrameType.ZERO>;
const isPage = (f: Frame): f is DataFrame | ZeroFrame =>
  f.type === FrameType.DATA || f.type === FrameType.ZERO;

function expectError(t: Tap, f: Frame | undefined, code: string): void {
  t.equal(f?.type, FrameType.ERROR, `an ERROR frame (${code})`);
  if (f?.type === FrameType.ERROR) t.equal(f.code, code);
}

/** Checks every page frame against the file; returns bytes covered. */
function checkPages(t: Tap, frames: Frame[]): number {
  let covered = 0;
  for (const f of frames.filter(isPage)) {
    if (f.type === FrameType.DATA) {
      t.ok(
        Buffer.from(f.payload).equals(img.expected(f.offset, f.payload.length)),
        `DATA at ${f.offset} equals the file`,
      );
      covered += f.payload.length;
    } else {
      t.ok(
        img.expected(f.offset, f.length).every((b) => b === 0),
        `ZERO at ${f.offset} covers zeros`,
      );
      covered += f.length;
    }
  }
  return covered;
}

t.test('HELLO gets a WELCOME with channel echo, nonce and the region table', async (t) => {
  const server = await start(t);
  await register(server.port, 'm1');
  const a = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  const b = await RawDest.open(server.port, Channel.BACKGROUND, 'm1');
  t.equal(a.welcome.version, PROTOCOL_VERSION);
  t.equal(a.welcome.channel, Channel.DEMAND);
  t.equal(b.welcome.channel, Channel.BACKGROUND);
  t.equal(a.welcome.nonce.length, 16);
  t.not(
    Buffer.from(a.welcome.nonce).toString('hex'),
    Buffer.from(b.welcome.nonce).toString('hex'),
    'nonces differ',
  );
  t.same(
    a.welcome.regions,
    img.regions.map(({ fileOffset: _f, ...r }) => r),
  );
  const status = await api(server.port, 'GET', '/v1/migrations/m1');
  t.same(status.json.connections, { demand: true, background: true });
  t.equal(status.json.state, 'registered');
});

t.test('unknown migration, bad version, non-HELLO first frame: ERROR and close', async (t) => {
  const server = await start(t);
  await register(server.port, 'm1');
  const unknown = await RawDest.hello(server.port, Channel.DEMAND, 'nope');
  expectError(t, unknown.answer, 'UNKNOWN_MIGRATION');
  t.ok((await unknown.dest.closed).code > 0, 'closed');
  for (const v of [0, 1]) {
    const version = await RawDest.hello(server.port, Channel.DEMAND, 'm1', v);
    expectError(t, version.answer, 'VERSION_UNSUPPORTED');
    await version.dest.closed;
  }
  const newer = await RawDest.hello(server.port, Channel.DEMAND, 'm1', PROTOCOL_VERSION + 1);
  t.equal(newer.answer.type, FrameType.WELCOME, 'a newer dest is answered in our version');
  if (newer.answer.type === FrameType.WELCOME) t.equal(newer.answer.version, PROTOCOL_VERSION);
  newer.dest.ws.close();
  const early = await RawDest.connect(server.port);
  early.send(encodeCredit(4096));
  expectError(t, await early.frameAt(0), 'BAD_STATE');
  await early.closed;
  const magic = await RawDest.connect(server.port);
  const hello = magic.helloFrame(Channel.DEMAND, 'm1');
  hello[4] = 0;
  magic.send(hello);
  expectError(t, await magic.frameAt(0), 'FRAME_BAD_MAGIC');
  await magic.closed;
});

t.test('garbage, text and frames illegal for the channel close that connection only', async (t) => {
  const server = await start(t, {});
  await register(server.port, 'm1', true);
  await register(server.port, 'm2', true);
  const keeper = await RawDest.open(server.port, Channel.DEMAND, 'm2');

  const text = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  text.dest.send('hello?');
  expectError(t, await text.dest.frameAt(1), 'FRAME_TEXT');
  await text.dest.closed;

  const garbage = await RawDest.open(server.port, Channel.BACKGROUND, 'm1');
  garbage.dest.send(Buffer.from([0xff, 1, 2, 3]));
  expectError(t, await garbage.dest.frameAt(1), 'FRAME_UNKNOWN_TYPE');
  await garbage.dest.closed;

  const truncated = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  truncated.dest.send(encodeRequest([{ offset: 0, length: PAGE }]).subarray(0, 12));
  expectError(t, await truncated.dest.frameAt(1), 'FRAME_BAD_LENGTH');
  await truncated.dest.closed;

  const illegal = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  illegal.dest.send(encodeCredit(1 << 20));
  expectError(t, await illegal.dest.frameAt(1), 'BAD_STATE');
  await illegal.dest.closed;

  const bgRequest = await RawDest.open(server.port, Channel.BACKGROUND, 'm1');
  bgRequest.dest.send(encodeRequest([{ offset: 0, length: PAGE }]));
  expectError(t, await bgRequest.dest.frameAt(1), 'BAD_STATE');
  await bgRequest.dest.closed;

  const second = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  second.dest.send(second.dest.helloFrame(Channel.DEMAND, 'm1'));
  expectError(t, await second.dest.frameAt(1), 'BAD_STATE');
  await second.dest.closed;

  const outside = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  outside.dest.send(encodeRequest([{ offset: 48 * PAGE, length: PAGE }]));
  expectError(t, await outside.dest.frameAt(1), 'OUT_OF_RANGE');
  await outside.dest.closed;

  const misaligned = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  misaligned.dest.send(encodeRequest([{ offset: RAM1 + PAGE, length: PAGE }]));
  expectError(t, await misaligned.dest.frameAt(1), 'OUT_OF_RANGE');
  await misaligned.dest.closed;

  // HAVE follows the same rule as REQUEST: an end inside a 16 KiB page is refused, not rounded.
  const have = await RawDest.open(server.port, Channel.BACKGROUND, 'm1');
  have.dest.send(encodeHave(HaveFlag.LAST, [{ offset: RAM1, length: 16384 + PAGE }]));
  expectError(t, await have.dest.frameAt(1), 'OUT_OF_RANGE');
  await have.dest.closed;

  // The other migration's connection still works.
  keeper.dest.send(encodeRequest([{ offset: 0, length: PAGE }]));
  const f = await keeper.dest.frameAt(1);
  t.equal(f.type, FrameType.DATA, 'm2 still served');
  t.equal(checkPages(t, [f]), PAGE);
  const list = await api(server.port, 'GET', '/v1/migrations');
  t.equal(list.json.migrations.length, 2, 'server still answers HTTP');
});

/** The socket under a RawDest's ws: bytes written here bypass ws's own framing. */
const socketOf = (dest: RawDest): Socket => (dest.ws as unknown as { _socket: Socket })._socket;

t.test(
  'a demand connection read with recv(2): masked frames cut anywhere, pings, a bad frame',
  async (t) => {
    const server = await start(t);
    await register(server.port, 'm1', true);
    const { dest } = await RawDest.open(server.port, Channel.DEMAND, 'm1');
    // 40 REQUESTs, some of one page (a short frame), some of 12 ranges (a 16-bit length), with
    // two pings among them, written in pieces of 1 to 40 bytes.
    const asked: number[] = [];
    const frames: Buffer[] = [];
    for (let i = 0; i < 40; i++) {
      const pages = i % 3 === 0 ? 12 : 1;
      const ranges = Array.from({ length: pages }, (_, k) => ({
        offset: ((i * 7 + k * 13) % 48) * PAGE, // ram0: 48 pages
        length: PAGE,
      }));
      asked.push(...ranges.map((r) => r.offset));
      frames.push(wsFrame(0x2, encodeRequest(ranges), { mask: true }));
      if (i === 10 || i === 25) frames.push(wsFrame(0x9, Buffer.from(`ping ${i}`), { mask: true }));
    }
    let pongs = 0;
    dest.ws.on('pong', () => pongs++);
    const bytes = Buffer.concat(frames);
    const socket = socketOf(dest);
    for (let at = 0, k = 0; at < bytes.length; k++) {
      const n = 1 + ((k * 17) % 40);
      socket.write(bytes.subarray(at, at + n));
      at += n;
      if (k % 25 === 0) await new Promise((r) => setTimeout(r, 1));
    }
    // WELCOME is frame 0; then one DATA or ZERO frame per page asked for (runs never merge
    // across ranges a REQUEST lists apart, and these are never adjacent).
    await dest.until(() => pageOffsets(dest).length >= asked.length);
    t.same(pageOffsets(dest), asked, 'every page asked for, answered in order');
    t.equal(checkPages(t, dest.frames.slice(1)), asked.length * PAGE, 'every byte as the file');
    await dest.roundTrip();
    t.equal(pongs, 3, 'both pings answered (and the round trip)');

    // An unmasked frame breaks RFC 6455: that connection goes, the server serves on.
    socket.write(wsFrame(0x2, encodeRequest([{ offset: 0, length: PAGE }])));
    const closed = await dest.closed;
    t.equal(closed.code, 1002, 'the bad connection is closed: protocol error');
    const next = await RawDest.open(server.port, Channel.DEMAND, 'm1');
    next.dest.send(encodeRequest([{ offset: 0, length: PAGE }]));
    t.ok(isPage(await next.dest.frameAt(1)), 'a new connection is served');
    // A close from the dest is answered with a close: the dest sees a clean close.
    t.equal((await next.dest.close()).code, 1000, 'a close handshake, answered');
  },
);

t.test('answers to a dest that stops reading queue in order, every byte intact', async (t) => {
  // Small answers leave by send(2) of the source's own while nothing waits, and by ws once
  // the socket is full: 6000 answers (24 MiB) to a dest that reads nothing until all are
  // asked fill the kernel's buffers, so both paths and the switch between them are taken.
  const server = await start(t);
  await register(server.port, 'm1', true);
  const { dest } = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  dest.ws.pause();
  const asked: number[] = [];
  for (let i = 0; i < 6000; i++) {
    const offset = ((i * 5) % 48) * PAGE; // ram0: 48 pages, some zero, some data
    asked.push(offset);
    dest.send(encodeRequest([{ offset, length: PAGE }]));
  }
  await new Promise((r) => setTimeout(r, 200));
  dest.ws.resume();
  await dest.until(() => pageOffsets(dest).length >= asked.length);
  t.same(pageOffsets(dest), asked, 'every answer, in the order asked');
  let bad = 0;
  for (const f of dest.frames.filter(isPage)) {
    const want = img.expected(f.offset, PAGE);
    const ok =
      f.type === FrameType.DATA ? Buffer.from(f.payload).equals(want) : want.every((b) => b === 0);
    if (!ok) bad++;
  }
  t.equal(bad, 0, 'every page as the file');
});

/** Offsets of the page frames (DATA and ZERO) a dest received, one per page. */
function pageOffsets(dest: RawDest): number[] {
  const out: number[] = [];
  for (const f of dest.frames.filter(isPage)) {
    const len = f.type === FrameType.DATA ? f.payload.length : f.length;
    for (let o = f.offset; o < f.offset + len; o += PAGE) out.push(o);
  }
  return out;
}

t.test('requests before the freeze wait, and are served in order after it', async (t) => {
  const server = await start(t);
  await register(server.port, 'm1');
  const { dest } = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  dest.send(encodeRequest([{ offset: 16 * PAGE, length: 2 * PAGE }]));
  dest.send(encodeRequest([{ offset: RAM1, length: 16384 }]));
  await dest.roundTrip(); // both REQUESTs were handled by now
  t.equal(dest.frames.length, 1, 'nothing but the WELCOME before the freeze');
  const before = await api(server.port, 'GET', '/v1/migrations/m1');
  t.equal(before.json.pendingRequests, 2);
  const frozen = await api(server.port, 'POST', '/v1/migrations/m1/freeze');
  t.equal(frozen.status, 200);
  t.equal(frozen.json.state, 'frozen');
  await dest.frameAt(2);
  const [a, b] = dest.frames.slice(1) as DataFrame[];
  t.equal(a!.type, FrameType.DATA);
  t.equal(a!.offset, 16 * PAGE, 'first request first');
  t.equal(a!.flags & DataFlag.DEMAND, DataFlag.DEMAND);
  t.equal(b!.offset, RAM1);
  t.equal(checkPages(t, [a!, b!]), 2 * PAGE + 16384);
  const again = await api(server.port, 'POST', '/v1/migrations/m1/freeze');
  t.equal(again.status, 409, 'freezing twice is illegal');
  t.equal(again.json.error.code, 'BAD_STATE');
});

t.test('a hole the VM writes before the freeze is served as data', async (t) => {
  // A stock QEMU's guest writes into its RAM file after the migration is registered (the
  // destination needs it registered to be handed over) and before it stops: holes are only
  // final at the freeze.
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-holes-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'ram');
  writeFileSync(path, Buffer.alloc(0));
  truncateSync(path, 64 * PAGE);
  const server = await start(t);
  const res = await api(server.port, 'POST', '/v1/migrations', { id: 'late', image: path });
  t.equal(res.status, 201);
  t.match(res.json.secret, /^[0-9a-f]{64}$/, 'no secret given: one is generated, told once');
  RawDest.secrets.set('late', Buffer.from(res.json.secret, 'hex'));
  const status = await api(server.port, 'GET', '/v1/migrations/late');
  t.equal(status.json.secret, undefined, 'and never again');
  const fd = openSync(path, 'r+');
  writeSync(fd, Buffer.alloc(PAGE, 0xc3), 0, PAGE, 9 * PAGE);
  closeSync(fd);
  t.equal((await api(server.port, 'POST', '/v1/migrations/late/freeze')).status, 200);
  const { dest } = await RawDest.open(server.port, Channel.DEMAND, 'late');
  dest.send(encodeRequest([{ offset: 8 * PAGE, length: 2 * PAGE }]));
  await dest.frameAt(2);
  const [zero, data] = dest.frames.slice(1);
  t.ok(zero?.type === FrameType.ZERO && zero.offset === 8 * PAGE, 'the hole next to it is zeros');
  t.ok(
    data?.type === FrameType.DATA &&
      data.offset === 9 * PAGE &&
      Buffer.from(data.payload).equals(Buffer.alloc(PAGE, 0xc3)),
    'the page written before the freeze arrives with what was written',
  );
});

t.test(
  'demand answers: file bytes, ZERO runs for zeros and holes, repeated pages answered again',
  async (t) => {
    const server = await start(t);
    await register(server.port, 'm1', true);
    const { dest } = await RawDest.open(server.port, Channel.DEMAND, 'm1');
    // pages 2..17: D D Z Z Z Z H*8 D D ; plus ram1 pages 1..3 (D Z H, 16 KiB pages)
    dest.send(
      encodeRequest([
        { offset: 2 * PAGE, length: 16 * PAGE },
        { offset: RAM1 + 16384, length: 3 * 16384 },
      ]),
    );
    await dest.roundTrip();
    const frames = dest.frames.slice(1);
    const summary = frames.map((f) =>
      f.type === FrameType.DATA
        ? `D${f.offset}+${f.payload.length}`
        : f.type === FrameType.ZERO
          ? `Z${f.offset}+${f.length}`
          : `?${f.type}`,
    );
    t.same(summary, [
      `D${2 * PAGE}+${2 * PAGE}`,
      `Z${4 * PAGE}+${12 * PAGE}`,
      `D${16 * PAGE}+${2 * PAGE}`,
      `D${RAM1 + 16384}+16384`,
      `Z${RAM1 + 32768}+32768`,
    ]);
    t.ok(
      frames.every((f) => isPage(f) && (f.flags & DataFlag.DEMAND) !== 0),
      'all flagged DEMAND',
    );
    t.equal(checkPages(t, frames), 16 * PAGE + 3 * 16384);
    dest.send(encodeRequest([{ offset: 2 * PAGE, length: PAGE }]));
    await dest.roundTrip();
    const last = dest.frames[dest.frames.length - 1]!;
    t.ok(
      last.type === FrameType.DATA && last.offset === 2 * PAGE,
      'a page sent before is sent again on demand',
    );
  },
);

/** Streams the background with `credit` granted as payload is consumed; checks the credit rule. */
async function streamAll(
  t: Tap,
  dest: RawDest,
  grantBytes: number,
): Promise<{ frames: Frame[]; grantedBytes: number; consumedBytes: number }> {
  let granted = 0;
  let consumed = 0;
  let seen = 1; // WELCOME
  let violations = 0;
  const grant = (): void => {
    granted += grantBytes;
    dest.send(encodeCredit(grantBytes));
  };
  grant();
  await dest.until(() => {
    for (; seen < dest.frames.length; seen++) {
      const f = dest.frames[seen]!;
      if (f.type === FrameType.DATA) consumed += f.payload.length;
      if (f.type === FrameType.ZERO) consumed += HeaderSize.ZERO;
      if (consumed > granted) violations++;
      if (f.type === FrameType.PROGRESS && f.flags & ProgressFlag.DONE) return true;
    }
    // The source waits once the rest cannot hold the next page (16 KiB pages in ram1).
    while (granted - consumed < 16384) grant();
    return false;
  });
  t.equal(
    violations,
    0,
    `never more than the granted credit in flight (${consumed} of ${granted})`,
  );
  return { frames: dest.frames.slice(1), grantedBytes: granted, consumedBytes: consumed };
}

/** Rebuilds the image from page frames (zeros stay zero) and compares it with the file. */
function reassemble(t: Tap, frames: Frame[]): void {
  const out = Buffer.alloc(img.fileSizeBytes, 0x5a);
  const covered = new Uint8Array(img.fileSizeBytes);
  for (const f of frames.filter(isPage)) {
    const region = img.regions.find(
      (r) => f.offset >= r.offset && f.offset < r.offset + r.sizeBytes,
    )!;
    const at = region.fileOffset + f.offset - region.offset;
    const len = f.type === FrameType.DATA ? f.payload.length : f.length;
    if (f.type === FrameType.DATA) out.set(f.payload, at);
    else out.fill(0, at, at + len);
    covered.fill(1, at, at + len);
  }
  t.equal(covered.indexOf(0), -1, 'DATA and ZERO frames cover every byte of the image');
  t.ok(out.equals(img.bytes), 'reassembled image equals the file byte for byte');
}

t.test('background streams every page within credit, zero pages never as DATA', async (t) => {
  const server = await start(t, { backgroundFrameBytes: 16384 });
  await register(server.port, 'm1', true);
  const { dest } = await RawDest.open(server.port, Channel.BACKGROUND, 'm1');
  const { frames } = await streamAll(t, dest, 10_000);
  reassemble(t, frames);
  const data = frames.filter((f): f is DataFrame => f.type === FrameType.DATA);
  t.ok(
    data.every((f) => f.payload.length <= 16384),
    'DATA frames within backgroundFrameBytes',
  );
  t.ok(
    data.every((f) => (f.flags & DataFlag.DEMAND) === 0),
    'background frames are not flagged DEMAND',
  );
  const zeroPage4k = Buffer.alloc(PAGE);
  let zeroInData = 0;
  for (const f of data) {
    for (let o = 0; o < f.payload.length; o += PAGE)
      if (zeroPage4k.equals(f.payload.subarray(o, o + PAGE))) zeroInData++;
  }
  t.equal(zeroInData, 0, 'no all-zero page in any DATA payload');
  const done = frames[frames.length - 1]!;
  t.ok(
    done.type === FrameType.PROGRESS &&
      done.sentBytes === done.totalBytes &&
      done.totalBytes === 48 * PAGE + 8 * 16384,
    'PROGRESS DONE carries totals',
  );
  const status = await api(server.port, 'GET', '/v1/migrations/m1');
  t.equal(status.json.pages.sent, TOTAL_PAGES);
  t.equal(status.json.pages.background, TOTAL_PAGES);
});

t.test(
  'after a demand request for [P, P+n) the background continues at P+n, then wraps',
  async (t) => {
    const server = await start(t, { backgroundFrameBytes: 8192 });
    await register(server.port, 'm1', true);
    const bg = await RawDest.open(server.port, Channel.BACKGROUND, 'm1');
    // The HAVE sync first (the bulk thread reads it): a sync forgets every page sent before it,
    // demand answers included, so a request racing it may be streamed again (harmless).
    await bg.dest.roundTrip();
    const dm = await RawDest.open(server.port, Channel.DEMAND, 'm1');
    dm.dest.send(encodeRequest([{ offset: 20 * PAGE, length: 2 * PAGE }]));
    await dm.dest.frameAt(1);
    await bg.dest.roundTrip();
    t.equal(bg.dest.frames.length, 1, 'no background frame without credit');
    const { frames } = await streamAll(t, bg.dest, 1 << 20);
    const first = frames.find(isPage)!;
    t.equal(
      first.offset,
      22 * PAGE,
      'first background frame starts right after the demanded range',
    );
    const offsets = frames.filter(isPage).map((f) => f.offset);
    t.notOk(offsets.includes(20 * PAGE), 'demanded pages are not streamed again');
    reassemble(t, [...dm.dest.frames.slice(1), ...frames]);
  },
);

t.test('COMPLETE is acknowledged, the image released and the migration complete', async (t) => {
  const server = await start(t);
  await register(server.port, 'm1');
  const events: string[] = [];
  server.registry.onEvent((e) => events.push(`${e.type}:${e.id}`));
  const dm = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  dm.dest.send(encodeComplete(TOTAL_PAGES));
  expectError(t, await dm.dest.frameAt(1), 'BAD_STATE');
  await dm.dest.closed;
  await api(server.port, 'POST', '/v1/migrations/m1/freeze');
  const bg = await RawDest.open(server.port, Channel.BACKGROUND, 'm1');
  await streamAll(t, bg.dest, 1 << 20);
  const wrong = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  wrong.dest.send(encodeComplete(TOTAL_PAGES - 1));
  expectError(t, await wrong.dest.frameAt(1), 'BAD_STATE');
  t.equal(server.registry.get('m1')!.image.closed, false, 'not released on a wrong COMPLETE');
  // COMPLETE belongs to the demand channel: on the background one it is refused.
  bg.dest.send(encodeComplete(TOTAL_PAGES));
  expectError(t, await bg.dest.frameAt(bg.dest.frames.length), 'BAD_STATE');
  await bg.dest.closed;
  t.equal(server.registry.get('m1')!.state, 'frozen', 'a refused COMPLETE changes nothing');
  const dm2 = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  dm2.dest.send(encodeComplete(TOTAL_PAGES));
  const ack = await dm2.dest.frameAt(1);
  t.ok(ack.type === FrameType.COMPLETE && ack.pages === TOTAL_PAGES, 'COMPLETE answered');
  await dm2.dest.closed;
  const m = server.registry.get('m1')!;
  t.equal(m.state, 'complete');
  await m.released();
  t.equal(m.image.closed, true, 'image fd closed once the bulk thread let go');
  t.same(events, ['frozen:m1', 'complete:m1']);
  const hello = await RawDest.hello(server.port, Channel.DEMAND, 'm1');
  expectError(t, hello.answer, 'BAD_STATE');
  const del = await api(server.port, 'DELETE', '/v1/migrations/m1');
  t.equal(del.json.state, 'complete', 'DELETE forgets a complete migration');
  t.equal((await api(server.port, 'GET', '/v1/migrations/m1')).status, 404);
});

t.test(
  'each channel is served where its URL asks; a HELLO for the other one is refused',
  async (t) => {
    const server = await start(t);
    await register(server.port, 'm1', true);
    for (const [path, channel] of [
      ['/v1/pages', Channel.BACKGROUND],
      ['/v1/pages?channel=demand', Channel.BACKGROUND],
      ['/v1/pages?channel=background', Channel.DEMAND],
    ] as const) {
      const dest = await RawDest.connect(server.port, {}, path);
      dest.send(dest.helloFrame(channel, 'm1'));
      expectError(t, await dest.frameAt(0), 'BAD_STATE');
      await dest.closed;
    }
  },
);

t.test('the background streams while the main thread is blocked (its own thread)', async (t) => {
  const server = await start(t);
  await register(server.port, 'm1', true);
  const m = server.registry.get('m1')!;
  const { dest: bg } = await RawDest.open(server.port, Channel.BACKGROUND, 'm1');
  await bg.roundTrip(); // the HAVE sync is done; without credit nothing is sent
  t.equal(m.status().pages.background, 0, 'nothing before credit');
  bg.send(encodeCredit(img.fileSizeBytes)); // written to the socket at once
  // Block this thread (the source's main thread) for 300 ms: no event loop turn.
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 300);
  const during = m.status().pages.background;
  t.ok(during > 0, `${during} pages streamed meanwhile by the bulk thread`);
  await bg.until(() =>
    bg.frames.some((f) => f.type === FrameType.PROGRESS && (f.flags & ProgressFlag.DONE) !== 0),
  );
  t.equal(m.status().pages.sent, TOTAL_PAGES, 'and every page went out');
});

t.test(
  'a bulk thread that dies: demand goes on, its pending socket is closed, not leaked',
  async (t) => {
    // A stand-in bulk thread that dies on the first socket it is handed, before taking it over,
    // and answers releases (so the daemon's own bookkeeping can be checked after its death).
    const dir = mkdtempSync(join(tmpdir(), 'yabusame-bulk-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const script = join(dir, 'dies.mjs');
    writeFileSync(
      script,
      `import { parentPort } from 'node:worker_threads';
     parentPort.on('message', (m) => {
       if (m.t === 'socket') process.exit(7);
       if (m.t === 'release') parentPort.postMessage({ t: 'released', key: m.key });
     });`,
    );
    const server = await start(t, { bulkWorkerUrl: pathToFileURL(script) });
    await register(server.port, 'm1', true);
    const dm = await RawDest.open(server.port, Channel.DEMAND, 'm1');
    await t.rejects(
      RawDest.connect(server.port, {}, '/v1/pages?channel=background'),
      'the background connection ends instead of hanging',
    );
    dm.dest.send(encodeRequest([{ offset: 0, length: PAGE }]));
    t.equal((await dm.dest.frameAt(1)).type, FrameType.DATA, 'demand is still served');
    const del = await api(server.port, 'DELETE', '/v1/migrations/m1');
    t.equal(del.status, 200, 'the migration is released through the new thread');
    t.equal(server.registry.get('m1'), undefined);
  },
);

t.test('a second connection of the same kind replaces the first', async (t) => {
  const server = await start(t);
  await register(server.port, 'm1', true);
  const first = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  const second = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  await first.dest.closed;
  second.dest.send(encodeRequest([{ offset: 0, length: PAGE }]));
  t.equal((await second.dest.frameAt(1)).type, FrameType.DATA, 'the new connection is served');
});

t.test('abort releases the image and tells connected dests', async (t) => {
  const server = await start(t);
  await register(server.port, 'm1', true);
  const m = server.registry.get('m1')!;
  const dm = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  const res = await api(server.port, 'DELETE', '/v1/migrations/m1');
  t.equal(res.status, 200);
  t.equal(res.json.state, 'aborted');
  expectError(t, await dm.dest.frameAt(1), 'MIGRATION_ABORTED');
  t.equal(m.image.closed, true);
  const hello = await RawDest.hello(server.port, Channel.DEMAND, 'm1');
  expectError(t, hello.answer, 'UNKNOWN_MIGRATION');
});

t.test('control API: validation, coded errors, only on its socket', async (t) => {
  const server = await start(t);
  const p = server.port;
  const bad = await api(p, 'POST', '/v1/migrations', { id: 'x', image: img.path, regions: [] });
  t.equal(bad.status, 400);
  t.equal(bad.json.error.code, 'INVALID_REQUEST');
  const notJson = await api(p, 'POST', '/v1/migrations', '{nope');
  t.equal(notJson.json.error.code, 'INVALID_JSON');
  const misaligned = await api(p, 'POST', '/v1/migrations', {
    id: 'x',
    image: img.path,
    regions: [{ name: 'r', offset: 100, sizeBytes: PAGE }],
  });
  t.equal(misaligned.status, 400);
  t.equal(misaligned.json.error.code, 'IMAGE_REGION_MISALIGNED');
  const missing = await api(p, 'POST', '/v1/migrations', {
    id: 'x',
    image: join(tmpdir(), 'yabusame-absent-image'),
    regions: [{ name: 'r', offset: 0, sizeBytes: PAGE }],
  });
  t.equal(missing.status, 404);
  t.equal(missing.json.error.code, 'IMAGE_NOT_FOUND');
  const outside = await api(p, 'POST', '/v1/migrations', { id: 'x', image: '/etc/passwd' });
  t.equal(outside.status, 403);
  t.equal(outside.json.error.code, 'IMAGE_OUTSIDE_ROOT');
  const created = await api(p, 'POST', '/v1/migrations', {
    id: 'x',
    image: img.path,
    regions: [{ name: 'r', offset: 0, sizeBytes: 4 * PAGE }],
  });
  t.equal(created.status, 201);
  t.equal(created.json.pages.total, 4);
  const dup = await api(p, 'POST', '/v1/migrations', {
    id: 'x',
    image: img.path,
    regions: [{ name: 'r', offset: 0, sizeBytes: PAGE }],
  });
  t.equal(dup.status, 409);
  t.equal(dup.json.error.code, 'MIGRATION_EXISTS');
  const unknown = await api(p, 'POST', '/v1/migrations/nope/freeze');
  t.equal(unknown.status, 404);
  t.equal(unknown.json.error.code, 'UNKNOWN_MIGRATION');
  t.equal((await api(p, 'PUT', '/v1/migrations/x')).status, 405);
  const form = await api(p, 'POST', '/v1/migrations', 'id=x', {
    'content-type': 'application/x-www-form-urlencoded',
  });
  t.equal(form.status, 415, 'a form post (what a browser sends cross-origin) is refused');
  t.equal(form.json.error.code, 'UNSUPPORTED_MEDIA_TYPE');
  const onPagePort = await new Promise<number>((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port: p, path: '/v1/migrations' }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      })
      .on('error', reject);
  });
  t.equal(onPagePort, 404, 'the page port serves no control API');
});

t.test('ws upgrades only on /v1/pages; a peer that misses pongs is terminated', async (t) => {
  const server = await start(t, { heartbeatIntervalMs: 100 });
  await register(server.port, 'm1', true);
  await t.rejects(RawDest.connect(server.port, {}, '/other'), 'upgrade elsewhere refused');
  const silent = await RawDest.connect(server.port, { autoPong: false });
  silent.send(silent.helloFrame(Channel.DEMAND, 'm1'));
  await silent.frameAt(0);
  const closed = await silent.closed;
  t.equal(closed.code, 1006, 'terminated without a close frame');
  const lively = await RawDest.open(server.port, Channel.DEMAND, 'm1');
  lively.dest.send(encodeRequest([{ offset: 0, length: PAGE }]));
  t.equal((await lively.dest.frameAt(1)).type, FrameType.DATA, 'a peer answering pings stays');
  t.equal(lively.dest.ws.readyState, WebSocket.OPEN);
});
