/**
 * The page map shared by the dest's main thread and its bulk thread: state transitions and the
 * settled count stay exact when both threads mark the same pages at once (a real second thread,
 * a worker, racing the main one over shared memory).
 */
import t from 'tap';
import { Worker } from 'node:worker_threads';
import {
  Gate,
  PageMap,
  PageState,
  settledRanges,
  sourceMismatch,
} from '../../daemon/dest/page-map.js';

const region = (pages: number, base = 0x7000_0000_0000, offset = 0) => ({
  base,
  sizeBytes: pages * 4096,
  offset,
  pageSizeBytes: 4096,
});

t.test('markPlaced settles unsettled pages only, and never undoes a discard', async (t) => {
  const map = new PageMap([region(8)]);
  const r = map.regions[0]!;
  map.mark(r, 0, 1, PageState.REQUESTED);
  map.mark(r, 1, 1, PageState.DISCARDED);
  t.equal(map.settledPages, 1, 'a discarded page is settled');
  t.equal(map.markPlaced(r, 0, 4), 3, 'requested and missing pages moved; the discarded one not');
  t.equal(r.state[1], PageState.DISCARDED, 'the discard stands');
  t.equal(map.markPlaced(r, 0, 4), 0, 'placing again moves nothing');
  t.equal(map.settledPages, 4);
  t.equal(map.claim(r, 5, PageState.REQUESTED), PageState.MISSING, 'a missing page is claimed');
  t.equal(map.claim(r, 5, PageState.REQUESTED), PageState.REQUESTED, 'and only once');
  t.equal(map.claim(r, 0, PageState.REQUESTED), PageState.PRESENT, 'a present page is not');
  t.equal(r.state[0], PageState.PRESENT);
  t.same(settledRanges(map), [{ offset: 0, length: 4 * 4096 }]);
});

t.test('a map opened from share() is the same memory', async (t) => {
  const a = new PageMap([region(4), region(4, 0x7100_0000_0000, 4 * 4096)]);
  const b = new PageMap(a.share().regions, a.share());
  b.markPlaced(b.regions[1]!, 0, 2);
  t.equal(a.settledPages, 2);
  t.equal(a.regions[1]!.state[1], PageState.PRESENT);
  t.equal(b.regions[1]!.name, a.regions[1]!.name);
});

t.test('two threads marking the same pages keep the settled count exact', async (t) => {
  const pages = 1 << 16;
  const map = new PageMap([region(pages)]);
  const r = map.regions[0]!;
  // The worker places every page (as the bulk thread does) while this thread requests, places
  // and discards pages (as faults and REMOVE events do), all at once.
  const code = `
    const { workerData, parentPort } = require('node:worker_threads');
    import(workerData.url).then(({ PageMap }) => {
      const map = new PageMap(workerData.shared.regions, workerData.shared);
      const r = map.regions[0];
      parentPort.postMessage('ready');
      Atomics.wait(workerData.start, 0, 0); // both threads start together
      let moved = 0;
      for (let round = 0; round < 4; round++)
        for (let p = 0; p < r.pages; p += 16) moved += map.markPlaced(r, p, 16);
      parentPort.postMessage(moved);
    });`;
  const start = new Int32Array(new SharedArrayBuffer(4));
  const worker = new Worker(code, {
    eval: true,
    workerData: {
      url: new URL('../../daemon/dest/page-map.js', import.meta.url).href,
      shared: map.share(),
      start,
    },
  });
  const moved = new Promise<number>((resolve, reject) => {
    worker.on('message', (m: unknown) => {
      if (typeof m === 'number') resolve(m);
    });
    worker.on('error', reject);
  });
  await new Promise<void>((resolve) => worker.once('message', () => resolve()));
  Atomics.store(start, 0, 1);
  Atomics.notify(start, 0);
  let discarded = 0;
  let placedHere = 0;
  for (let round = 0; round < 4; round++) {
    for (let p = pages - 1; p >= 0; p--) {
      if (p % 7 === 0) {
        map.claim(r, p, PageState.REQUESTED);
      } else if (p % 11 === 0 && r.state[p] !== PageState.DISCARDED) {
        map.mark(r, p, 1, PageState.DISCARDED);
      } else {
        placedHere += map.markPlaced(r, p, 1);
      }
    }
  }
  const movedThere = await moved;
  await worker.terminate();
  let settled = 0;
  for (let p = 0; p < pages; p++) {
    if (r.state[p]! >= PageState.PRESENT) settled++;
    if (r.state[p] === PageState.DISCARDED) discarded++;
  }
  t.equal(settled, pages, 'every page ends settled');
  t.equal(map.settledPages, settled, 'the shared count equals the settled bytes');
  t.ok(discarded > 0, `${discarded} pages stayed discarded`);
  t.ok(placedHere + movedThere <= pages, 'no page was placed twice');
  t.ok(movedThere > 0 && placedHere > 0, `both threads placed (${movedThere} + ${placedHere})`);
});

t.test(
  'the placement gate: a bulk placement waits while the main thread handles events',
  async (t) => {
    const map = new PageMap([region(4)]);
    const r = map.regions[0]!;
    // The worker plays the bulk thread: gate, then place page 0, as bulk-worker.ts does.
    const code = `
    const { workerData, parentPort } = require('node:worker_threads');
    import(workerData.url).then(({ PageMap, Gate }) => {
      const map = new PageMap(workerData.shared.regions, workerData.shared);
      parentPort.postMessage('trying');
      map.enterGate(Gate.BULK);
      const moved = map.markPlaced(map.regions[0], 0, 2);
      map.leaveGate();
      parentPort.postMessage(moved);
    });`;
    // As the main thread does from reading a REMOVE event until its range is marked.
    map.enterGate(Gate.EVENTS);
    t.throws(() => map.enterGate(Gate.EVENTS), /already held/, 'not re-entrant by mistake');
    const worker = new Worker(code, {
      eval: true,
      workerData: {
        url: new URL('../../daemon/dest/page-map.js', import.meta.url).href,
        shared: map.share(),
      },
    });
    const messages: unknown[] = [];
    const moved = new Promise<number>((resolve, reject) => {
      worker.on('message', (m: unknown) => {
        messages.push(m);
        if (typeof m === 'number') resolve(m);
      });
      worker.on('error', reject);
    });
    const deadline = Date.now() + 5000;
    while (!messages.includes('trying') && Date.now() < deadline) {
      await new Promise((res) => setTimeout(res, 5));
    }
    await new Promise((res) => setTimeout(res, 100));
    t.same(messages, ['trying'], 'the worker waits at the gate');
    t.equal(r.state[0], PageState.MISSING, 'nothing placed while the gate is held');
    map.mark(r, 0, 1, PageState.DISCARDED); // the event's range, marked before the gate opens
    map.leaveGate();
    t.equal(await moved, 1, 'after the gate: only the page that was not discarded');
    t.equal(r.state[0], PageState.DISCARDED, 'the discard stands');
    t.equal(r.state[1], PageState.PRESENT);
    await worker.terminate();
  },
);

t.test('sourceMismatch names what does not fit', async (t) => {
  const map = new PageMap([region(4)]);
  t.equal(
    sourceMismatch(map, [{ name: 'ram', offset: 0, sizeBytes: 4 * 4096, pageSizeBytes: 4096 }]),
    null,
  );
  t.match(
    sourceMismatch(map, [{ name: 'ram', offset: 0, sizeBytes: 8 * 4096, pageSizeBytes: 4096 }]),
    /covers 4 pages but the source image has 8/,
  );
  t.match(
    sourceMismatch(map, [{ name: 'ram', offset: 0, sizeBytes: 4 * 4096, pageSizeBytes: 2 << 20 }]),
    /page size/,
  );
});
