// The chaos proxy against a local echo server: it forwards both ways intact, and cuts, stalls and
// corrupts exactly as told (and counts it).
import t from 'tap';
import * as net from 'node:net';
import { randomBytes } from 'node:crypto';
import { ChaosProxy, isLoopback, prng } from '../../scripts/chaos/proxy.js';

let echo: net.Server;
let echoPort = 0;
const proxies: ChaosProxy[] = [];

t.before(async () => {
  echo = net.createServer({ allowHalfOpen: true }, (s) => {
    s.on('error', () => undefined);
    s.pipe(s);
  });
  await new Promise<void>((r) => echo.listen(0, '127.0.0.1', () => r()));
  echoPort = (echo.address() as net.AddressInfo).port;
});
t.teardown(async () => {
  await Promise.all(proxies.map((p) => p.close()));
  await new Promise<void>((r) => echo.close(() => r()));
});

async function proxy(opts: Partial<Parameters<typeof ChaosProxy.start>[0]> = {}) {
  const p = await ChaosProxy.start({ target: { port: echoPort }, ...opts });
  proxies.push(p);
  return p;
}

async function connect(port: number): Promise<net.Socket> {
  const s = net.connect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => {
    s.once('connect', resolve);
    s.once('error', reject);
  });
  return s;
}

/** Reads exactly n bytes (or rejects when the socket closes first). */
function readN(s: net.Socket, n: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let got = 0;
    const onData = (c: Buffer): void => {
      chunks.push(c);
      got += c.length;
      if (got >= n) {
        cleanup();
        resolve(Buffer.concat(chunks).subarray(0, n));
      }
    };
    const onClose = (): void => {
      cleanup();
      reject(new Error(`closed after ${got} of ${n} bytes`));
    };
    const cleanup = (): void => {
      s.off('data', onData);
      s.off('close', onClose);
    };
    s.on('data', onData);
    s.on('close', onClose);
  });
}

const closed = (s: net.Socket): Promise<void> =>
  s.destroyed ? Promise.resolve() : new Promise((r) => s.once('close', () => r()));

t.test('loopback only', async (t) => {
  t.ok(isLoopback('127.0.0.1') && isLoopback('127.9.8.7') && isLoopback('::1'));
  t.ok(isLoopback('localhost') && isLoopback('::ffff:127.0.0.1'));
  t.notOk(isLoopback('10.0.0.1') || isLoopback('example.com') || isLoopback('0.0.0.0'));
  await t.rejects(ChaosProxy.start({ target: { host: '192.0.2.1', port: 80 } }), /not loopback/);
  await t.rejects(ChaosProxy.start({ target: { host: 'example.com', port: 80 } }), /not loopback/);
});

t.test('the PRNG is seeded', async (t) => {
  const a = prng(7);
  const b = prng(7);
  const c = prng(8);
  const xs = Array.from({ length: 5 }, () => a());
  t.same(
    Array.from({ length: 5 }, () => b()),
    xs,
  );
  t.not(c(), xs[0]);
  t.ok(xs.every((x) => x >= 0 && x < 1));
});

t.test('forwards both ways, byte for byte', async (t) => {
  const p = await proxy();
  const s = await connect(p.port);
  const data = randomBytes(4 << 20);
  s.write(data);
  const back = await readN(s, data.length);
  t.ok(back.equals(data), '4 MiB echoed intact');
  t.equal(p.connections().length, 1);
  t.equal(p.stats().bytesUp, data.length);
  t.equal(p.stats().bytesDown, data.length);
  s.end();
  await closed(s);
  await p.waitFor((c) => c.length === 0);
  t.equal(p.stats().cuts, 0, 'an orderly close is no fault');
});

t.test('a paced link forwards source to dest no faster than its rate, intact', async (t) => {
  const rate = 4 << 20; // bytes per second
  const p = await proxy({ downBytesPerSec: rate });
  const s = await connect(p.port);
  const data = randomBytes(2 << 20);
  const t0 = performance.now();
  s.write(data);
  const back = await readN(s, data.length);
  const ms = performance.now() - t0;
  t.ok(back.equals(data), '2 MiB echoed intact');
  // The first chunk passes at once; everything after it waits for its share of the rate.
  const floorMs = ((data.length - 256 * 1024) * 1000) / rate;
  t.ok(ms >= floorMs, `took ${ms.toFixed(0)} ms, at least ${floorMs.toFixed(0)} ms`);
  s.destroy();
});

t.test('cut destroys both sockets', async (t) => {
  const p = await proxy();
  const [a, b] = await Promise.all([connect(p.port), connect(p.port)]);
  await p.waitFor((c) => c.length === 2);
  const id = p.connections()[0]!.id;
  t.ok(p.cut(id));
  await p.waitFor((c) => c.length === 1);
  t.equal(p.cutAll(), 1);
  await Promise.all([closed(a), closed(b)]);
  t.equal(p.stats().cuts, 2);
  t.same(
    p.faults().map((f) => f.kind),
    ['cut', 'cut'],
  );
  // The proxy still serves new connections.
  const c = await connect(p.port);
  c.write('again');
  t.equal((await readN(c, 5)).toString(), 'again');
  c.destroy();
});

t.test('stall holds both directions for N ms, then delivers in order', async (t) => {
  const p = await proxy();
  const s = await connect(p.port);
  s.write('x');
  await readN(s, 1);
  const ms = 300;
  const t0 = Date.now();
  t.equal(p.stallAll(ms), 1);
  t.ok(p.connections()[0]!.stalled);
  const data = randomBytes(256 << 10);
  s.write(data);
  const back = await readN(s, data.length);
  t.ok(
    Date.now() - t0 >= ms - 5,
    `nothing came back before the stall ended (${Date.now() - t0} ms)`,
  );
  t.ok(back.equals(data), 'held bytes delivered intact');
  t.equal(p.stats().stalls, 1);
  s.destroy();
});

t.test('a stall until cut, ended by a cut or by a peer leaving', async (t) => {
  const p = await proxy();
  const s = await connect(p.port);
  await p.waitFor((c) => c.length === 1);
  p.stallAll(Infinity);
  s.write('lost');
  t.equal(p.cutAll(), 1);
  await closed(s);
  t.equal(s.bytesRead, 0, 'nothing got through');

  const s2 = await connect(p.port);
  await p.waitFor((c) => c.length === 1);
  p.stallAll(Infinity);
  s2.end(); // the dest gives up on a silent connection
  await p.waitFor((c) => c.length === 0);
  t.equal(p.stats().cuts, 1, 'a peer leaving a stall is no injected cut');
});

t.test('corruption flips one bit, source to dest, past the skipped prefix', async (t) => {
  const skip = 512;
  const p = await proxy({ corruptSkipBytes: skip, seed: 42 });
  const s = await connect(p.port);
  await p.waitFor((c) => c.length === 1);
  const clean = randomBytes(64 << 10);
  p.corruptNext(3);
  s.write(clean);
  const back = await readN(s, clean.length);
  let bits = 0;
  let first = -1;
  for (let i = 0; i < clean.length; i++) {
    const x = clean[i]! ^ back[i]!;
    if (x) {
      if (first < 0) first = i;
      for (let b = x; b; b &= b - 1) bits++;
    }
  }
  const applied = p.stats().corruptions;
  t.ok(applied >= 1 && applied <= 3, `${applied} flips applied (one per chunk)`);
  t.equal(bits, applied, 'exactly one bit per applied corruption');
  t.ok(first >= skip, `no flip in the first ${skip} bytes (first at ${first})`);
  t.equal(p.corruptionsPending, 3 - applied);
  for (const f of p.faults()) t.ok(f.detail! >= skip);
  s.destroy();
});

t.test('knows the channel from the HELLO, masked or not', async (t) => {
  const p = await proxy();
  const hello = (channel: number, mask: boolean): Buffer => {
    const id = Buffer.from('vm1');
    const payload = Buffer.alloc(12 + id.length);
    payload[0] = 0x01;
    payload[1] = channel;
    payload.writeUInt16LE(1, 2);
    payload.writeUInt32LE(0x4d534259, 4);
    payload.writeUInt16LE(id.length, 8);
    id.copy(payload, 12);
    const key = Buffer.from([0x12, 0x34, 0x56, 0x78]);
    const head = Buffer.from([0x82, (mask ? 0x80 : 0) | payload.length]);
    const body = mask ? payload.map((b, i) => b ^ key[i % 4]!) : payload;
    return Buffer.concat([
      Buffer.from('GET /v1/pages HTTP/1.1\r\nHost: x\r\n\r\n'),
      head,
      ...(mask ? [key] : []),
      body,
    ]);
  };
  const d = await connect(p.port);
  const b = await connect(p.port);
  // The echo comes back: consume it, so that the close is seen.
  d.resume();
  b.resume();
  const bytes = hello(2, true);
  b.write(bytes.subarray(0, 20)); // split across chunks
  d.write(hello(1, false));
  await p.waitFor((c) => c.filter((x) => x.channel).length === 1);
  b.write(bytes.subarray(20));
  await p.waitFor((c) => c.filter((x) => x.channel).length === 2);
  t.equal(p.connections({ channel: 'demand' }).length, 1);
  t.equal(p.connections({ channel: 'background' }).length, 1);
  t.equal(p.cutAll({ channel: 'background' }), 1);
  await closed(b);
  t.equal(p.connections().length, 1);
  d.destroy();
});

t.test('random mode injects every kind, and stops', async (t) => {
  const p = await proxy({ seed: 3 });
  const sockets: net.Socket[] = [];
  const keep = async (): Promise<void> => {
    for (let i = sockets.filter((s) => !s.destroyed).length; i < 4; i++) {
      const s = await connect(p.port);
      s.on('error', () => undefined);
      s.on('data', () => undefined);
      sockets.push(s);
    }
  };
  await keep();
  p.setRandom({ cutPerSec: 5, stallPerSec: 10, corruptPerSec: 20, stallMs: [20, 60], tickMs: 10 });
  const deadline = Date.now() + 10_000;
  for (;;) {
    await keep();
    for (const s of sockets) if (!s.destroyed) s.write(randomBytes(2048));
    const st = p.stats();
    if (st.cuts > 0 && st.stalls > 0 && st.corruptions > 0) break;
    if (Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 10));
  }
  p.setRandom(null);
  const st = p.stats();
  t.ok(st.cuts > 0, `cuts ${st.cuts}`);
  t.ok(st.stalls > 0, `stalls ${st.stalls}`);
  t.ok(st.corruptions > 0, `corruptions ${st.corruptions}`);
  t.ok(
    p.faults().every((f) => f.random),
    'all marked random',
  );
  for (const s of sockets) s.destroy();
});

t.test('a refused upstream closes the client', async (t) => {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  const p = await proxy({ target: { port } });
  const s = await connect(p.port);
  s.on('error', () => undefined);
  await closed(s);
  await p.waitFor((c) => c.length === 0);
  t.equal(p.stats().upstreamRefused, 1);
});
