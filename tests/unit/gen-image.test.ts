import t from 'tap';
import * as fs from 'node:fs';
import { join } from 'node:path';
import * as abi from '../../daemon/linux/abi.js';
import * as sys from '../../daemon/linux/sys.js';
import {
  PageClass,
  countPages,
  generateImage,
  parseSize,
  planImage,
} from '../../scripts/image/gen-image.js';
import { singleRegion } from '../../scripts/image/regions.js';

const P = 4096;
const MiB = 1024 * 1024;

const dir = fs.mkdtempSync('/dev/shm/yabusame-gen-image-');
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Hole bytes of a file, found with SEEK_HOLE / SEEK_DATA. */
function holeBytes(path: string, size: number): number {
  const fd = sys.open(path, abi.O_RDONLY);
  try {
    let holes = 0;
    let off = 0;
    while (off < size) {
      const hole = sys.tryLseek(fd, off, abi.SEEK_HOLE);
      if (hole < 0 || hole >= size) break;
      const data = sys.tryLseek(fd, hole, abi.SEEK_DATA);
      const end = data < 0 ? size : data; // ENXIO: a hole up to the end of the file
      holes += end - hole;
      off = end;
    }
    return holes;
  } finally {
    sys.close(fd);
  }
}

const isText = (page: Buffer): boolean => page.every((b) => b === 0x0a || (b >= 0x20 && b < 0x7f));

t.test('same seed => same bytes; another seed => other bytes', async (t) => {
  const a = await generateImage({ path: join(dir, 'a'), sizeBytes: 8 * MiB, seed: 3 });
  const b = await generateImage({ path: join(dir, 'b'), sizeBytes: 8 * MiB, seed: 3 });
  const c = await generateImage({ path: join(dir, 'c'), sizeBytes: 8 * MiB, seed: 4 });
  t.same(a.pages, b.pages);
  t.ok(fs.readFileSync(a.path).equals(fs.readFileSync(b.path)), 'identical files');
  t.notOk(fs.readFileSync(a.path).equals(fs.readFileSync(c.path)), 'a different seed differs');
  t.same(planImage({ sizeBytes: 8 * MiB, seed: 3 }), planImage({ sizeBytes: 8 * MiB, seed: 3 }));
});

t.test('fractions, page contents and clustering match the plan', async (t) => {
  const sizeBytes = 32 * MiB;
  const img = await generateImage({ path: join(dir, 'mix'), sizeBytes, seed: 11 });
  const pages = sizeBytes / P;
  const { zero, hole, text, random } = img.pages;
  t.equal(zero + text + random, pages, 'every page has one class');
  const near = (got: number, want: number, what: string): void => {
    t.ok(Math.abs(got - want) <= 0.02 * pages, `${what}: ${got} pages, target ${Math.round(want)}`);
  };
  near(zero, 0.4 * pages, 'zero');
  near(hole, 0.5 * 0.4 * pages, 'hole');
  near(text, 0.3 * pages, 'text');
  near(random, 0.3 * pages, 'random');

  const plan = planImage({ sizeBytes, seed: 11 });
  t.same(countPages(plan), img.pages);
  const bytes = fs.readFileSync(img.path);
  t.equal(bytes.length, sizeBytes);
  const zeroPage = Buffer.alloc(P);
  let wrong = 0;
  for (let i = 0; i < pages; i++) {
    const page = bytes.subarray(i * P, (i + 1) * P);
    const cls = plan[i];
    const ok =
      cls === PageClass.Hole || cls === PageClass.Zero
        ? page.equals(zeroPage)
        : cls === PageClass.Text
          ? isText(page) &&
            page.toString('latin1', 0, 15) === `[page ${i.toString(16).padStart(8, '0')}]`
          : !page.equals(zeroPage) && !isText(page);
    if (!ok) wrong++;
  }
  t.equal(wrong, 0, 'each page holds what its class says');

  // Zero pages come in runs, not scattered: far fewer zero runs than zero pages.
  let zeroRuns = 0;
  for (let i = 0; i < pages; i++) {
    const z = plan[i]! <= PageClass.Zero;
    if (z && (i === 0 || plan[i - 1]! > PageClass.Zero)) zeroRuns++;
  }
  t.ok(zero / zeroRuns >= 8, `mean zero run ${(zero / zeroRuns).toFixed(1)} pages`);
  t.ok(zeroRuns >= 20, `${zeroRuns} zero runs of varying length`);
});

t.test('holes are real file holes', async (t) => {
  const sizeBytes = 16 * MiB;
  const img = await generateImage({ path: join(dir, 'sparse'), sizeBytes, seed: 5 });
  t.ok(img.pages.hole > 0);
  t.equal(holeBytes(img.path, sizeBytes), img.pages.hole * P, 'SEEK_HOLE finds every hole page');
  t.equal(
    fs.statSync(img.path).blocks * 512,
    sizeBytes - img.pages.hole * P,
    'allocated blocks = non-hole pages',
  );
});

t.test('edge fractions and bad options', async (t) => {
  const all = await generateImage({
    path: join(dir, 'text'),
    sizeBytes: MiB,
    seed: 1,
    zeroFraction: 0,
    textFraction: 1,
  });
  t.same(all.pages, { zero: 0, hole: 0, text: 256, random: 0 });
  const zeros = await generateImage({
    path: join(dir, 'zeros'),
    sizeBytes: MiB,
    seed: 1,
    zeroFraction: 1,
    holeFraction: 1,
    textFraction: 0,
  });
  t.same(zeros.pages, { zero: 256, hole: 256, text: 0, random: 0 });
  t.equal(fs.statSync(zeros.path).size, MiB, 'an all-hole file keeps its length');
  t.equal(fs.statSync(zeros.path).blocks, 0);
  t.throws(() => planImage({ sizeBytes: 4095, seed: 1 }), RangeError);
  t.throws(() => planImage({ sizeBytes: MiB, seed: 1, zeroFraction: 0.8, textFraction: 0.3 }));
  t.throws(() => planImage({ sizeBytes: MiB, seed: 1, holeFraction: 2 }));
});

t.test('parseSize and the single-region description', async (t) => {
  t.equal(parseSize('4096'), 4096);
  t.equal(parseSize('64K'), 64 * 1024);
  t.equal(parseSize('256M'), 256 * MiB);
  t.equal(parseSize('1G'), 1024 * MiB);
  t.equal(parseSize('2GiB'), 2048 * MiB);
  t.throws(() => parseSize('1.5G'));
  t.throws(() => parseSize('lots'));
  t.same(singleRegion(64 * MiB), [
    { name: 'ram0', offset: 0, sizeBytes: 64 * MiB, pageSizeBytes: 4096 },
  ]);
});
