/**
 * The page protocol's range rules (protocol/ranges.ts): one rule for REQUEST and HAVE entries
 * (split at region boundaries, whole pages of each region, nothing outside), and the stricter
 * one for DATA/ZERO runs (inside one region).
 */
import t from 'tap';
import { checkRun, splitRange, type RangePiece } from '../../protocol/ranges.js';

const K = 1024;
// Adjacent regions with different page sizes, then a gap, then a third.
const regions = [
  { name: 'a', offset: 0, sizeBytes: 64 * K, pageSizeBytes: 4 * K },
  { name: 'b', offset: 64 * K, sizeBytes: 64 * K, pageSizeBytes: 16 * K },
  { name: 'c', offset: 256 * K, sizeBytes: 32 * K, pageSizeBytes: 4 * K },
];

function split(offset: number, length: number): RangePiece[] {
  const out: RangePiece[] = [];
  splitRange(regions, offset, length, (p) => out.push(p));
  return out;
}

t.test('splitRange: an entry may cross into the next region, whole pages of each', async (t) => {
  t.same(split(60 * K, 20 * K), [
    { region: 0, offset: 60 * K, length: 4 * K },
    { region: 1, offset: 64 * K, length: 16 * K },
  ]);
  t.same(split(256 * K, 32 * K), [{ region: 2, offset: 256 * K, length: 32 * K }]);
});

t.test('splitRange: outside, across a gap, or not whole pages: OUT_OF_RANGE', async (t) => {
  const out = { code: 'OUT_OF_RANGE' };
  t.throws(() => split(120 * K, 16 * K), out, 'into the gap after b');
  t.throws(() => split(288 * K, 4 * K), out, 'past the end');
  t.throws(() => split(64 * K, 20 * K), out, 'an end inside a 16 KiB page');
  t.throws(() => split(68 * K, 16 * K), out, 'a start inside a 16 KiB page');
  t.throws(() => split(2 * K, 4 * K), out, 'a start inside a 4 KiB page');
});

t.test('checkRun: a DATA or ZERO run stays inside one region', async (t) => {
  t.equal(checkRun(regions, 64 * K, 32 * K), 1);
  t.throws(() => checkRun(regions, 60 * K, 20 * K), { code: 'OUT_OF_RANGE' }, 'across regions');
  t.throws(() => checkRun(regions, 300 * K, 4 * K), { code: 'OUT_OF_RANGE' }, 'outside');
  t.throws(() => checkRun(regions, 68 * K, 16 * K), { code: 'FRAME_BAD_VALUE' }, 'misaligned');
});
