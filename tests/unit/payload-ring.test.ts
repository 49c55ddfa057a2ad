/**
 * The dest's payload ring (bulk thread → main thread): space is reused only after release, a
 * payload never wraps, and a full ring says so instead of overwriting. The second half runs the
 * writer on a real worker thread, as the bulk thread does.
 */
import t from 'tap';
import { Worker } from 'node:worker_threads';
import { PayloadRing } from '../../daemon/dest/payload-ring.js';

const fill = (n: number, byte: number): Uint8Array => new Uint8Array(n).fill(byte);

t.test('put, view, release; full is -1; a payload that would wrap starts at 0', async (t) => {
  const ring = new PayloadRing(100);
  const a = ring.put(fill(40, 1));
  const b = ring.put(fill(40, 2));
  t.same([a, b], [0, 40]);
  t.equal(ring.put(fill(40, 3)), -1, 'no room for a third: the ring says so');
  t.ok(
    ring.view(a, 40).every((x) => x === 1),
    'the first payload is intact',
  );
  ring.release(a + 40);
  // 20 bytes remain before the end: a 40-byte payload skips them and starts at offset 0.
  const c = ring.put(fill(40, 3));
  t.equal(c, 100, 'position 100 is offset 0');
  t.ok(
    ring.view(b, 40).every((x) => x === 2),
    'the unreleased payload was not overwritten',
  );
  t.ok(ring.view(c, 40).every((x) => x === 3));
  t.equal(ring.put(fill(1, 4)), -1, 'b is still held');
  ring.release(b + 40);
  ring.release(c + 40);
  t.equal(ring.put(fill(101, 5)), -1, 'a payload larger than the ring never fits');
  t.equal(ring.put(fill(60, 6)), 140);
});

t.test('a writer thread and this reader: every payload read back intact, in order', async (t) => {
  const ring = new PayloadRing(64 * 1024);
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    import(workerData.url).then(({ PayloadRing }) => {
      const ring = new PayloadRing(workerData.shared);
      let i = 0;
      const next = () => {
        while (i < 2000) {
          const n = 1024 + (i * 7919) % 8192;
          const p = ring.put(new Uint8Array(n).fill(i & 0xff));
          if (p < 0) return setImmediate(next); // full: wait for the reader
          parentPort.postMessage([p, n, i & 0xff]);
          i++;
        }
        parentPort.postMessage('done');
      };
      next();
    });`;
  const worker = new Worker(code, {
    eval: true,
    workerData: {
      url: new URL('../../daemon/dest/payload-ring.js', import.meta.url).href,
      shared: ring.share(),
    },
  });
  let bad = 0;
  let got = 0;
  await new Promise<void>((resolve, reject) => {
    worker.on('error', reject);
    worker.on('message', (m: 'done' | [number, number, number]) => {
      if (m === 'done') return resolve();
      const [p, n, byte] = m;
      if (!ring.view(p, n).every((x) => x === byte)) bad++;
      got++;
      ring.release(p + n);
    });
  });
  await worker.terminate();
  t.equal(got, 2000);
  t.equal(bad, 0, 'no payload was overwritten before its release');
});
