/**
 * The dest's region table and page map, as pure logic: runs split over regions handed over in
 * any order and at any addresses, VMA segments, the source check, and counts that add up to the
 * number of pages whatever happens to a page (placed, discarded, discarded again).
 */
import t from 'tap';
import { PageMap, PageState } from '../../daemon/dest/page-map.js';
import { RegionTable } from '../../daemon/dest/regions.js';
import { FaultTracker } from '../../daemon/dest/faults.js';
import { MAX_GROWTH, StreamDetector, windowBytes } from '../../daemon/dest/prefetch.js';
import { prng } from '../../scripts/chaos/proxy.js';

const P = 4096;
const region = (name: string, pages: number, base: number, offset: number, ps = P) => ({
  name,
  base,
  sizeBytes: pages * ps,
  offset,
  pageSizeBytes: ps,
});

t.test(
  'pieces: a run split over two regions at unrelated addresses, listed out of order',
  async (t) => {
    // Image [0, 32 pages): region "hi" holds pages 0..28 at a high address, "lo" the last 3 pages
    // at a lower one, listed first (the layout that broke the dest with OUT_OF_RANGE).
    const table = new RegionTable([
      region('lo', 3, 0x7000_0000_0000, 29 * P),
      region('hi', 29, 0x7f00_0000_0000, 0),
    ]);
    const seen: Array<[string, number, number, number]> = [];
    table.pieces(24 * P, 8 * P, (r, first, count, at) => seen.push([r.name, first, count, at]));
    t.same(seen, [
      ['hi', 24, 5, 0],
      ['lo', 0, 3, 5 * P],
    ]);
    t.equal(table.at(0x7000_0000_0000 + 2 * P + 17)?.name, 'lo');
    t.equal(table.at(0x7000_0000_0000 + 3 * P), undefined, 'one past the end of lo');
    t.equal(table.atOffset(28 * P)?.name, 'hi');
    t.equal(table.totalPages, 32);
    t.throws(
      () => table.pieces(30 * P, 4 * P, () => {}),
      { code: 'OUT_OF_RANGE' },
      'bytes beyond every region are OUT_OF_RANGE',
    );
  },
);

t.test('pieces: huge-page regions take whole pages only', async (t) => {
  const H = 2 << 20;
  const table = new RegionTable([region('huge', 4, 0x7e00_0000_0000, 0, H)]);
  const seen: number[][] = [];
  table.pieces(H, 2 * H, (_r, first, count) => seen.push([first, count]));
  t.same(seen, [[1, 2]]);
  t.throws(() => table.pieces(H + P, H, () => {}), /not a page|OUT_OF_RANGE/);
});

t.test('segments: placement never crosses a VMA boundary it knows of', async (t) => {
  const table = new RegionTable([region('ram', 100, 0x7000_0000_0000, 0)]);
  const r = table.regions[0]!;
  t.equal(r.segmentEnd(0), 100);
  r.addSegmentStart(40);
  r.addSegmentStart(10);
  r.addSegmentStart(40);
  r.addSegmentStart(0); // not a boundary
  t.same(r.segmentStarts, [0, 10, 40]);
  t.equal(r.segmentEnd(0), 10);
  t.equal(r.segmentEnd(10), 40);
  t.equal(r.segmentEnd(39), 40);
  t.equal(r.segmentEnd(99), 100);
});

t.test('sourceMismatch names what does not fit', async (t) => {
  const table = new RegionTable([region('a', 4, 0x7000_0000_0000, 0)]);
  const src = (pages: number, ps = P) => [
    { name: 'ram', offset: 0, sizeBytes: pages * P, pageSizeBytes: ps },
  ];
  t.equal(table.sourceMismatch(src(4)), null);
  t.match(table.sourceMismatch(src(8)), /covers 4 pages but the source image has 8/);
  t.match(table.sourceMismatch(src(4, 2 << 20)), /page size/);
  t.match(
    table.sourceMismatch([{ name: 'x', offset: 4 * P, sizeBytes: 4 * P, pageSizeBytes: P }]),
    /not inside the source image/,
  );
});

t.test('the counts of every settled page add up to the number of pages', async (t) => {
  const table = new RegionTable([
    region('a', 8, 0x7000_0000_0000, 0),
    region('b', 8, 0x7100_0000_0000, 8 * P),
  ]);
  const [a, b] = table.regions as [(typeof table.regions)[0], (typeof table.regions)[0]];
  const map = new PageMap(table);
  const sum = (): number => {
    const c = map.counts();
    return c.demand + c.background + c.zero + c.existed + c.discarded;
  };
  t.equal(map.request(a, 0), PageState.MISSING, 'a missing page is requested');
  t.equal(map.request(a, 0), PageState.REQUESTED, 'and only once');
  t.equal(map.settledPages, 0, 'a requested page is not settled');
  map.settle(a, 0, 1, PageState.DEMAND);
  map.settle(a, 1, 3, PageState.BACKGROUND);
  map.settle(a, 4, 2, PageState.ZERO);
  map.settle(b, 0, 1, PageState.EXISTED);
  t.same(map.unsettledRun(a, 0, 8), [6, 8]);
  t.equal(map.unsettledRun(a, 0, 6), null);
  t.equal(map.settledPages, 7);
  t.equal(sum(), 7);
  // A balloon discards a placed page and a missing one, then the same range again.
  map.discard(a, 3, 4);
  map.discard(a, 3, 4);
  t.equal(map.state(a, 3), PageState.DISCARDED);
  t.equal(map.settledPages, 8, 'a discarded page is settled');
  t.same(map.counts(), { demand: 1, background: 2, zero: 0, existed: 1, discarded: 4 });
  t.equal(sum(), map.settledPages, 'each settled page is in exactly one bucket');
  t.equal(
    map.request(a, 4),
    PageState.DISCARDED,
    'a fault on a discarded page leaves it discarded',
  );
  map.settle(a, 7, 1, PageState.BACKGROUND);
  map.settle(b, 1, 7, PageState.ZERO);
  t.ok(map.complete);
  t.equal(sum(), map.totalPages, 'the complete reply adds up');
  t.same(map.settledRanges(), [
    { offset: 0, length: 8 * P },
    { offset: 8 * P, length: 8 * P },
  ]);
});

t.test('a ZERO run settles missing pages unplaced and leaves requested ones', async (t) => {
  const table = new RegionTable([region('a', 8, 0x7000_0000_0000, 0)]);
  const map = new PageMap(table);
  const a = table.regions[0]!;
  map.request(a, 2); // a fault awaits page 2: the placer must place its zeros
  map.settle(a, 5, 1, PageState.BACKGROUND);
  t.equal(map.settleMissingAsZero(a, 1, 7), 4, 'pages 1, 3, 4 and 6');
  t.equal(map.state(a, 2), PageState.REQUESTED, 'the awaited page is left to the placer');
  t.equal(map.state(a, 5), PageState.BACKGROUND, 'a settled page keeps its state');
  t.equal(map.state(a, 3), PageState.ZERO_UNPLACED);
  t.same(map.unsettledRun(a, 0, 8), [0, 1], 'unplaced zeros count as settled');
  t.same(map.unsettledRun(a, 1, 8), [2, 3]);
  t.same(map.counts(), { demand: 0, background: 1, zero: 4, existed: 0, discarded: 0 });
  t.equal(map.request(a, 3), PageState.ZERO_UNPLACED, 'a fault there finds it settled');
  map.discard(a, 3, 1);
  t.same(map.counts(), { demand: 0, background: 1, zero: 3, existed: 0, discarded: 1 });
  t.equal(map.settleMissingAsZero(a, 0, 8), 2, 'pages 0 and 7');
  map.settle(a, 2, 1, PageState.ZERO);
  t.ok(map.complete);
  const c = map.counts();
  t.equal(c.demand + c.background + c.zero + c.existed + c.discarded, 8, 'the buckets add up');
});

t.test('settledRanges leaves out unsettled pages, region by region', async (t) => {
  const table = new RegionTable([region('a', 8, 0x7000_0000_0000, 16 * P)]);
  const map = new PageMap(table);
  const a = table.regions[0]!;
  map.settle(a, 1, 2, PageState.ZERO);
  map.request(a, 3);
  map.discard(a, 5, 1);
  t.same(map.settledRanges(), [
    { offset: 17 * P, length: 2 * P },
    { offset: 21 * P, length: P },
  ]);
});

t.test(
  'fault tracker: prefetched entries follow every fault, a lost connection undoes them',
  async (t) => {
    const table = new RegionTable([region('ram', 64, 0x7f00_0000_0000, 0)]);
    const r = table.regions[0]!;
    const map = new PageMap(table);
    const faults = new FaultTracker();
    // Two faults (pages 3 and 20), each with the next 4 pages prefetched (as Session does).
    for (const page of [3, 20]) {
      t.equal(map.request(r, page), PageState.MISSING);
      faults.add(r, page, 1);
      for (let p = page + 1; p <= page + 4; p++) t.equal(map.request(r, p), PageState.MISSING);
      faults.prefetch(map, r, page + 1, 4);
    }
    // The faulting pages first (one entry each, not merged with their neighbours), then prefetch.
    t.same(faults.takeRequests(), [
      [
        { offset: 3 * P, length: P },
        { offset: 20 * P, length: P },
        { offset: 4 * P, length: 4 * P },
        { offset: 21 * P, length: 4 * P },
      ],
    ]);
    t.same(faults.takeRequests(), [], 'taken once');
    // A fault on a prefetched page waits for it without asking again; on an awaited page, no-op.
    t.ok(faults.addInFlight(r, 5, 2), 'page 5 (prefetched) is awaited now');
    t.notOk(faults.addInFlight(r, 3, 2), 'page 3 was awaited already');
    t.equal(faults.size, 3);
    // Page 21..24 arrive; the demand connection is lost before the rest.
    map.settle(r, 21, 4, PageState.DEMAND);
    faults.requeueAll(map);
    // Awaited pages are asked again; prefetched pages nobody waits for are MISSING again.
    t.same(faults.takeRequests(), [
      [
        { offset: 3 * P, length: P },
        { offset: 5 * P, length: P },
        { offset: 20 * P, length: P },
      ],
    ]);
    for (const p of [4, 6, 7])
      t.equal(map.state(r, p), PageState.MISSING, `page ${p} missing again`);
    for (const p of [3, 5, 20])
      t.equal(map.state(r, p), PageState.REQUESTED, `page ${p} requested`);
    for (const p of [21, 24]) t.equal(map.state(r, p), PageState.DEMAND, `page ${p} stays placed`);
    t.equal(map.settledPages, 4, 'only the four placed pages are settled');
    t.equal(map.counts().demand, 4);
  },
);

t.test(
  'stream detector: a sweep prefetches after its second fault, random faults never',
  async (t) => {
    const s = new StreamDetector();
    t.notOk(s.continues(0, 100), 'a first fault starts nothing');
    t.ok(s.continues(0, 101), 'the page after it continues the stream');
    s.extend(0, 101, 118); // pages 102..117 prefetched
    t.ok(s.continues(0, 118), 'the page after the prefetch window continues it');
    t.notOk(s.continues(1, 119), 'the same page number in another region does not');
    t.notOk(s.continues(0, 5000), 'a page far away does not');
    // Random faults over a 1 GiB region: next to none continue a stream.
    const rand = prng(20261129);
    let hits = 0;
    for (let i = 0; i < 10000; i++) if (s.continues(2, Math.floor(rand() * 262144))) hits++;
    t.ok(hits < 20, `${hits} of 10000 random faults looked like a sweep`);
    // Two sweeps at once (two vCPUs) are both followed.
    const two = new StreamDetector();
    let continued = 0;
    for (let i = 0; i < 100; i++) {
      if (two.continues(0, 1000 + i)) continued++;
      if (two.continues(0, 9000 + i)) continued++;
    }
    t.equal(continued, 198, 'every fault but the first of each sweep continues it');
  },
);

t.test("stream detector: a sweep's window doubles with each fault, up to MAX_GROWTH", async (t) => {
  const s = new StreamDetector();
  const windows: number[] = [s.continues(0, 0)];
  let next = 1;
  for (let i = 0; i < 7; i++) {
    const w = s.continues(0, next);
    windows.push(w);
    const end = next + 1 + w * 16; // the session prefetched w windows of 16 pages
    s.extend(0, next, end);
    next = end;
  }
  t.same(windows, [0, 1, 2, 4, 8, 16, 16, 16], 'windows asked at each fault of one sweep');
  t.equal(MAX_GROWTH, 16);
  t.equal(s.continues(0, 100_000), 0, 'a fault elsewhere starts a new stream');
  t.equal(s.continues(0, 100_001), 1, 'which starts again at one window');
  t.equal(s.continues(0, next), 16, 'the first sweep is still followed at its window');
  const K = 1024;
  t.same(
    [1, 2, 4, 8, 16].map((w) => windowBytes(w, 64 * K)),
    [64 * K, 128 * K, 256 * K, 512 * K, 1024 * K],
    'from 64 KiB the window doubles up to 1 MiB',
  );
  t.same(
    [1, 2, 4].map((w) => windowBytes(w, 512 * K)),
    [512 * K, 1024 * K, 1024 * K],
    'a larger first window stops at 1 MiB too',
  );
  t.equal(windowBytes(16, 1024 * K), 1024 * K, 'a 1 MiB window does not grow');
});
