/**
 * The bulk thread's file lane (daemon/dest/file-lane.ts) in this thread, with a real file, a real
 * payload ring and a stand-in for the main thread that "places" each run and grants its credit
 * back: every page is sent exactly once, data as it is in the file, holes and zero pages as zero
 * runs; a working set goes first, in its order, and does not wait for the window (the sweep
 * does); pages read on demand are not streamed; a full ring pauses the lane until space is freed.
 */
import t from 'tap';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { FileLane } from '../../daemon/dest/file-lane.js';
import { PayloadRing } from '../../daemon/dest/payload-ring.js';
import type { FromBulk, RunMessage } from '../../daemon/dest/bulk.js';
import type { RegionInfo } from '../../protocol/wire.js';

const PAGE = 4096;
const PAGES = 512; // 2 MiB
const dir = mkdtempSync('/dev/shm/yabusame-filelane-');
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

/**
 * A file of PAGES pages: page p holds the byte (p % 251) + 1 throughout, except pages that are
 * written as zeros (p % 7 === 3) and a hole of pages [300, 400) never written.
 */
const file = join(dir, 'mem');
const isHole = (p: number): boolean => p >= 300 && p < 400;
const isZero = (p: number): boolean => isHole(p) || p % 7 === 3;
{
  const fd = openSync(file, 'w');
  for (let p = 0; p < PAGES; p++) {
    if (isHole(p)) continue;
    writeSync(fd, Buffer.alloc(PAGE, isZero(p) ? 0 : (p % 251) + 1), 0, PAGE, p * PAGE);
  }
  ftruncateSync(fd, PAGES * PAGE);
  closeSync(fd);
}
// Two regions, as Firecracker's: [0, 1 MiB) and [1 MiB, 2 MiB), back to back in the file.
const regions: RegionInfo[] = [
  { name: 'region0', offset: 0, sizeBytes: 256 * PAGE, pageSizeBytes: PAGE },
  { name: 'region1', offset: 256 * PAGE, sizeBytes: 256 * PAGE, pageSizeBytes: PAGE },
];

interface Seen {
  /** Pages in the order their runs came. */
  order: number[];
  zero: number[];
  data: number[];
  bad: string[];
}

/** Runs a lane to its sourceDone, placing (checking) every run and granting its credit. */
async function stream(opts: {
  first?: number[];
  ringBytes?: number;
  windowBytes?: number;
  before?: (lane: FileLane) => void;
  /** Open the window only once this many pages were placed (the working set's length). */
  windowAfter?: number;
}): Promise<Seen> {
  const fd = openSync(file, 'r');
  const ring = new PayloadRing(opts.ringBytes ?? 1 << 20);
  const seen: Seen = { order: [], zero: [], data: [], bad: [] };
  const faults = new Int32Array(new SharedArrayBuffer(4));
  const listed = new Set(opts.first ?? []);
  let windowOpen = false;
  try {
    await new Promise<void>((resolve, reject) => {
      const lanes: FileLane[] = [];
      const post = (m: FromBulk): void => {
        if (m.t === 'fail') reject(new Error(m.message));
        // The main thread places runs later, in order (here, in a later turn), and hears
        // sourceDone behind the runs that came before it.
        if (m.t === 'sourceDone') setImmediate(resolve);
        if (m.t === 'run') {
          for (let p = m.offset / PAGE; p < (m.offset + m.length) / PAGE; p++) {
            if (!windowOpen && !listed.has(p)) seen.bad.push(`page ${p} sent before the window`);
          }
          setImmediate(() => place(m));
        }
      };
      const place = (m: RunMessage): void => {
        const first = m.offset / PAGE;
        const view = m.ring >= 0 ? ring.view(m.ring, m.length) : null;
        for (let i = 0; i < m.length / PAGE; i++) {
          const p = first + i;
          seen.order.push(p);
          if (!view) {
            seen.zero.push(p);
            if (!isZero(p)) seen.bad.push(`page ${p} sent as zeros`);
            continue;
          }
          seen.data.push(p);
          const want = isZero(p) ? 0 : (p % 251) + 1;
          const page = view.subarray(i * PAGE, (i + 1) * PAGE);
          if (isZero(p) || !page.every((b) => b === want)) seen.bad.push(`page ${p} wrong data`);
        }
        if (m.ring >= 0) ring.release(m.ring + m.length);
        lanes[0]!.credit(m.credit);
        lanes[0]!.retry();
        if (!windowOpen && seen.order.length >= (opts.windowAfter ?? 0)) {
          windowOpen = true;
          lanes[0]!.openWindow();
        }
      };
      const lane = new FileLane(
        1,
        {
          fd,
          path: file,
          regions,
          windowBytes: opts.windowBytes ?? 256 * 1024,
          first: opts.first ? Float64Array.from(opts.first, (p) => p * PAGE) : null,
        },
        { ring, post, faults },
      );
      lanes.push(lane);
      opts.before?.(lane);
      lane.start();
      if (opts.windowAfter === undefined) {
        windowOpen = true;
        lane.openWindow();
      }
    });
  } finally {
    closeSync(fd);
  }
  return seen;
}

const everyPageOnce = (t: Tap, seen: Seen, except: Set<number> = new Set()): void => {
  t.same(seen.bad, [], 'every run holds what the file holds');
  const counts = new Map<number, number>();
  for (const p of seen.order) counts.set(p, (counts.get(p) ?? 0) + 1);
  const wrong = [...Array(PAGES).keys()].filter(
    (p) => (counts.get(p) ?? 0) !== (except.has(p) ? 0 : 1),
  );
  t.same(
    wrong,
    [],
    `every page sent exactly once${except.size ? ', but those read on demand' : ''}`,
  );
};
type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

t.test('every page once: data as read, zeros and holes as zero runs', async (t) => {
  const seen = await stream({});
  everyPageOnce(t, seen);
  t.ok(seen.zero.filter(isHole).length === 100, 'the hole is sent as zeros (never read)');
  t.same(seen.order.slice(0, 8), [0, 1, 2, 3, 4, 5, 6, 7], 'file order without a working set');
});

t.test('a working set goes first, in its order', async (t) => {
  const first = [450, 451, 452, 17, 3, 310, 311, 200, 201, 199, 511];
  const seen = await stream({ first });
  everyPageOnce(t, seen);
  t.same(seen.order.slice(0, first.length), first, 'the list, in order, before anything else');
  t.same(
    seen.order.slice(first.length, first.length + 3),
    [0, 1, 2],
    'then the rest, from the start',
  );
});

t.test('the working set does not wait for the window; the rest does', async (t) => {
  const first = [450, 451, 452, 17, 3, 310, 311, 200, 201, 199, 511];
  const seen = await stream({ first, windowAfter: first.length });
  everyPageOnce(t, seen);
  t.same(seen.order.slice(0, first.length), first, 'the list streamed with the window shut');
});

t.test('pages read on demand are not streamed; the stream follows them', async (t) => {
  const demanded = new Set([100, 101, 102, 103]);
  const seen = await stream({
    before: (lane) => lane.demanded([{ offset: 100 * PAGE, length: 4 * PAGE }]),
  });
  everyPageOnce(t, seen, demanded);
  t.equal(seen.order[0], 104, 'the stream continues after the last page read on demand');
});

t.test('a ring smaller than the window: the lane waits for space, then goes on', async (t) => {
  const seen = await stream({ ringBytes: 96 * 1024, windowBytes: 1 << 20 });
  everyPageOnce(t, seen);
});
