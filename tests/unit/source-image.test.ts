import { SlabPool } from '../../daemon/source/slab-pool.js';
import t from 'tap';
import {
  closeSync,
  mkdirSync,
  mkdtempSync,
  symlinkSync,
  openSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { makeExtents } from '../../daemon/source/extents.js';
import {
  ImageRoot,
  openImage as openBeneath,
  PageClass,
  validateRegions,
  type ImageRegionSpec,
} from '../../daemon/source/image.js';
import {
  newPendingZero,
  newSpanStats,
  PageWriter,
  type SpanStats,
} from '../../daemon/source/page-writer.js';
import { SourceError } from '../../daemon/source/errors.js';
import { decodeFrame } from '../../protocol/page-codec.js';
import { DataFlag, FrameType, type Frame } from '../../protocol/wire.js';
import { writeTestImage } from '../fixtures/memory-image.js';

/** Opens `path` beneath its own folder (the root is what the source's config names). */
function openImage(
  path: string,
  regions?: readonly ImageRegionSpec[],
): ReturnType<typeof openBeneath> {
  const root = new ImageRoot(dirname(path));
  try {
    return openBeneath(root, basename(path), regions);
  } finally {
    root.close();
  }
}

const img = writeTestImage();
t.teardown(() => img.remove());
const sparse = statSync(img.path).blocks * 512 < img.fileSizeBytes;

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof SourceError ? err.code : `not a SourceError: ${String(err)}`;
  }
  return undefined;
}

t.test('the test file is sparse (holes exist on this filesystem)', async (t) => {
  t.ok(sparse, `allocated ${statSync(img.path).blocks * 512} of ${img.fileSizeBytes} bytes`);
});

t.test(
  'page classes: holes from SEEK_DATA/SEEK_HOLE at the scan, nothing else known before a read',
  async (t) => {
    const image = openImage(img.path, img.regions);
    t.teardown(() => image.close());
    t.equal(image.totalPages, img.totalPages);
    t.equal(image.totalBytes, 48 * 4096 + 8 * 16384);
    t.ok(
      image.pageClass.every((c) => c === PageClass.UNKNOWN),
      'nothing is known before the scan',
    );
    image.scanHoles();
    const expected = img.layouts
      .map((l) => l.pages.replace(/[DZ]/g, '0').replace(/H/g, '3'))
      .join('');
    t.equal(Array.from(image.pageClass).join(''), expected, 'holes and only holes are marked');
    t.equal(image.pageClass[8], PageClass.HOLE, 'ram0 pages 8..15 are a hole');
    t.equal(image.pageClass[7], PageClass.UNKNOWN, 'page 7 is written zeros, not a hole');
    t.equal(image.pageClass[48 + 3], PageClass.HOLE, 'ram1 pages 3..5 are a hole');
  },
);

t.test('a hole written before the scan is data: holes are learned at the freeze', async (t) => {
  // A running VM writes into its RAM file between registration and freeze.
  const path = join(mkdtempSync(join(tmpdir(), 'yabusame-holes-')), 'ram');
  writeFileSync(path, Buffer.alloc(0));
  truncateSync(path, 16 * 4096);
  const image = openImage(path, [
    { name: 'ram0', offset: 0, sizeBytes: 16 * 4096, fileOffset: 0, pageSizeBytes: 4096 },
  ]);
  t.teardown(() => {
    image.close();
    rmSync(path, { force: true });
  });
  const fd = openSync(path, 'r+');
  writeSync(fd, Buffer.alloc(4096, 0xab), 0, 4096, 5 * 4096);
  closeSync(fd);
  image.scanHoles();
  t.equal(image.pageClass[5], PageClass.UNKNOWN, 'the page written after open will be read');
  t.equal(image.pageClass[4], PageClass.HOLE, 'its neighbour is still a hole');
});

t.test('read() preads image offsets into the buffer at an offset', async (t) => {
  const image = openImage(img.path, img.regions);
  t.teardown(() => image.close());
  const buf = Buffer.alloc(100 + 3 * 4096, 0xee);
  image.read(16 * 4096, 3 * 4096, buf, 100);
  t.same(buf.subarray(100), img.expected(16 * 4096, 3 * 4096), 'bytes equal the file');
  t.equal(buf[99], 0xee, 'bytes before `at` untouched');
  const big = Buffer.alloc(2 * 16384);
  image.read(1024 * 1024 + 6 * 16384, 2 * 16384, big, 0);
  t.same(
    big,
    img.expected(1024 * 1024 + 6 * 16384, 2 * 16384),
    'second region maps to its file offset',
  );
  t.throws(
    () => image.read(47 * 4096, 2 * 4096, buf, 0),
    RangeError,
    'a read may not leave its region',
  );
  image.close();
  t.equal(
    codeOf(() => image.read(0, 4096, buf, 0)),
    'IMAGE_CLOSED',
  );
  t.equal(image.closed, true);
});

t.test('zero detection compares each page with a zero page', async (t) => {
  const image = openImage(img.path, img.regions);
  t.teardown(() => image.close());
  const r = image.regions[0]!;
  const buf = Buffer.alloc(8 * 4096);
  image.read(0, 8 * 4096, buf, 0);
  image.classify(r, 0, 8, buf, 0);
  t.same(Array.from(image.pageClass.subarray(0, 8)), [1, 1, 1, 1, 2, 2, 2, 2]);
  const one = Buffer.alloc(4096);
  one[4095] = 1; // the last byte alone makes a page non-zero
  image.classify(r, 32, 1, one, 0);
  t.equal(image.pageClass[32], PageClass.DATA);
});

t.test('region validation errors are coded', async (t) => {
  const ok: ImageRegionSpec = {
    name: 'a',
    offset: 0,
    sizeBytes: 8192,
    fileOffset: 0,
    pageSizeBytes: 4096,
  };
  const v = (specs: ImageRegionSpec[], size = 1 << 20): string | undefined =>
    codeOf(() => validateRegions(specs, size));
  t.equal(v([ok]), undefined, 'a valid table passes');
  t.equal(v([]), 'IMAGE_NO_REGIONS');
  t.equal(v([{ ...ok, offset: 100 }]), 'IMAGE_REGION_MISALIGNED');
  t.equal(v([{ ...ok, fileOffset: 4095 }]), 'IMAGE_REGION_MISALIGNED');
  t.equal(v([{ ...ok, sizeBytes: 6000 }]), 'IMAGE_REGION_MISALIGNED');
  t.equal(v([{ ...ok, pageSizeBytes: 3000 }]), 'IMAGE_REGION_PAGE_SIZE');
  t.equal(v([{ ...ok, pageSizeBytes: 12288 }]), 'IMAGE_REGION_PAGE_SIZE', 'not a power of two');
  t.equal(v([{ ...ok, pageSizeBytes: 2048, sizeBytes: 2048 }]), 'IMAGE_REGION_PAGE_SIZE');
  t.equal(
    v([{ ...ok, pageSizeBytes: 1 << 30, sizeBytes: 1 << 30 }], 2 ** 31),
    'IMAGE_REGION_PAGE_SIZE',
    'a 1 GiB page does not fit in a DATA frame',
  );
  t.equal(v([{ ...ok, sizeBytes: 0 }]), 'IMAGE_REGION_EMPTY');
  t.equal(v([{ ...ok, fileOffset: 1 << 20 }]), 'IMAGE_REGION_OUTSIDE_FILE');
  t.equal(v([ok], 4096), 'IMAGE_REGION_OUTSIDE_FILE');
  t.equal(v([ok, { ...ok, name: 'b', offset: 4096 }]), 'IMAGE_REGION_OVERLAP');
  t.equal(v([ok, { ...ok, offset: 8192 }]), 'IMAGE_REGION_NAME', 'names are unique');
  const sorted = validateRegions([{ ...ok, name: 'b', offset: 65536 }, ok], 1 << 20);
  t.same(
    sorted.map((r) => [r.name, r.firstPage, r.pageCount]),
    [
      ['a', 0, 2],
      ['b', 2, 2],
    ],
    'sorted by offset, pages numbered globally',
  );
  t.equal(
    codeOf(() => openImage('/nonexistent/image', [ok])),
    'IMAGE_ROOT',
  );
  t.equal(
    codeOf(() => openImage(img.path, [{ ...ok, sizeBytes: 1 << 30 }])),
    'IMAGE_REGION_OUTSIDE_FILE',
  );
});

t.test('extent lookup', async (t) => {
  const ext = makeExtents(Float64Array.from([4096, 8192, 16384, 20480]));
  t.equal(ext.isHole(0, 4096), true);
  t.equal(ext.isHole(0, 4097), false);
  t.equal(ext.isHole(8192, 16384), true);
  t.equal(ext.isHole(8191, 8192), false);
  t.equal(ext.isHole(20480, 1 << 20), true, 'after the last extent');
  t.equal(makeExtents(new Float64Array(0)).isHole(0, 10), true, 'no extents: all hole');
});

t.test(
  'page writer: DATA for data pages, merged ZERO runs for zeros and holes, in order',
  async (t) => {
    const image = openImage(img.path, img.regions);
    t.teardown(() => image.close());
    image.scanHoles(); // as at the freeze: holes are never read
    const writer = new PageWriter(image, new SlabPool(24 + 256 * 1024, 4));
    const frames: Frame[] = [];
    const stats = newSpanStats();
    // ram0 pages 0..47 whole, 16 KiB reads.
    writer.write(
      image.regions[0]!,
      0,
      48,
      DataFlag.DEMAND,
      16384,
      (f) => frames.push(decodeFrame(f)),
      stats,
    );
    const summary = frames.map((f) =>
      f.type === FrameType.DATA
        ? `D${f.offset / 4096}+${f.payload.length / 4096}`
        : f.type === FrameType.ZERO
          ? `Z${f.offset / 4096}+${f.length / 4096}`
          : '?',
    );
    t.same(summary, [
      'D0+4',
      'Z4+12',
      'D16+4',
      'D20+4',
      'D24+4',
      'D28+4',
      'Z32+1',
      'D33+1',
      'Z34+6',
      'D40+4',
      'D44+4',
    ]);
    for (const f of frames) {
      t.equal(
        f.type === FrameType.DATA || f.type === FrameType.ZERO ? f.flags : -1,
        DataFlag.DEMAND,
      );
      if (f.type === FrameType.DATA) {
        t.same(
          Buffer.from(f.payload),
          img.expected(f.offset, f.payload.length),
          `DATA at ${f.offset} = file`,
        );
      }
    }
    t.equal(stats.dataPages, 29);
    t.equal(stats.zeroPages, 19);
    t.equal(stats.zeroFrames, 3);
    t.equal(stats.payloadBytes, 29 * 4096);
    // Zeros found by reading are remembered: a second pass reads only data pages.
    t.equal(image.pageClass[4], PageClass.ZERO);
    t.equal(image.pageClass[33], PageClass.DATA);
  },
);

t.test('page writer: a carried zero run spans write() calls as one ZERO frame', async (t) => {
  const image = openImage(img.path, img.regions);
  t.teardown(() => image.close());
  image.scanHoles();
  const writer = new PageWriter(image, new SlabPool(24 + 256 * 1024, 4));
  const summarize = (carry: boolean): { frames: string[]; stats: SpanStats } => {
    const frames: string[] = [];
    const sink = (f: Uint8Array): void => {
      const d = decodeFrame(f);
      if (d.type === FrameType.DATA) frames.push(`D${d.offset / 4096}+${d.payload.length / 4096}`);
      if (d.type === FrameType.ZERO) frames.push(`Z${d.offset / 4096}+${d.length / 4096}`);
    };
    const stats = newSpanStats();
    const z = newPendingZero();
    // Pages 4..15 are zero (see above): split the run over three calls, as background spans do.
    for (const [first, count] of [
      [4, 3],
      [7, 5],
      [12, 6],
    ] as const) {
      writer.write(image.regions[0]!, first, count, 0, 16384, sink, stats, carry ? z : undefined);
    }
    writer.flushZero(z, sink, stats);
    return { frames, stats };
  };
  const carried = summarize(true);
  t.same(carried.frames, ['Z4+12', 'D16+2'], 'one ZERO frame for the whole run');
  t.equal(carried.stats.zeroFrames, 1);
  t.equal(carried.stats.zeroPages, 12);
  const plain = summarize(false);
  t.same(plain.frames, ['Z4+3', 'Z7+5', 'Z12+4', 'D16+2'], 'without a carry: one per call');
  t.equal(plain.stats.zeroPages, 12, 'the same pages either way');
});

t.test('images open beneath the root only, and only regular files', async (t) => {
  const base = mkdtempSync(join(tmpdir(), 'yabusame-root-'));
  t.teardown(() => rmSync(base, { recursive: true, force: true }));
  const rootDir = join(base, 'images');
  mkdirSync(join(rootDir, 'sub'), { recursive: true });
  writeFileSync(join(rootDir, 'sub', 'vm.ram'), Buffer.alloc(4 * 4096, 7));
  writeFileSync(join(base, 'secret'), 'not an image');
  symlinkSync('vm.ram', join(rootDir, 'sub', 'inside-link'));
  symlinkSync(join(base, 'secret'), join(rootDir, 'abs-link'));
  symlinkSync('../secret', join(rootDir, 'rel-link'));
  symlinkSync('/proc/self/root/etc/passwd', join(rootDir, 'magic-link'));
  execFileSync('mkfifo', [join(rootDir, 'fifo')]);
  const root = new ImageRoot(rootDir);
  t.teardown(() => root.close());
  const code = (image: string): string | undefined =>
    codeOf(() => openBeneath(root, image).close());

  t.equal(code('sub/vm.ram'), undefined, 'a relative path beneath the root');
  t.equal(code(join(rootDir, 'sub', 'vm.ram')), undefined, 'an absolute path beneath it');
  t.equal(code('sub/inside-link'), undefined, 'a symlink that stays inside');
  const image = openBeneath(root, 'sub/vm.ram');
  t.equal(image.totalPages, 4, 'default region: the whole file');
  image.close();

  t.equal(code('../secret'), 'IMAGE_OUTSIDE_ROOT', '..');
  t.equal(code('sub/../../secret'), 'IMAGE_OUTSIDE_ROOT', '.. through a folder');
  t.equal(code(join(base, 'secret')), 'IMAGE_OUTSIDE_ROOT', 'an absolute path outside');
  t.equal(code(`${rootDir}/../secret`), 'IMAGE_OUTSIDE_ROOT', 'an absolute path with ..');
  t.equal(code(`${rootDir}x/secret`), 'IMAGE_OUTSIDE_ROOT', 'a sibling sharing the prefix');
  t.equal(code('abs-link'), 'IMAGE_OUTSIDE_ROOT', 'an absolute symlink');
  t.equal(code('rel-link'), 'IMAGE_OUTSIDE_ROOT', 'a symlink up and out');
  t.equal(code('magic-link'), 'IMAGE_OUTSIDE_ROOT', 'a /proc magic link');
  t.equal(code('fifo'), 'IMAGE_NOT_REGULAR', 'a FIFO: refused, and the open did not block');
  t.equal(code('sub'), 'IMAGE_NOT_REGULAR', 'a directory');
  t.equal(code('/dev/zero'), 'IMAGE_OUTSIDE_ROOT', 'a device');
  t.equal(code('absent'), 'IMAGE_NOT_FOUND');
  t.equal(code('sub/vm.ram/x'), 'IMAGE_NOT_FOUND', 'through a file');
  const err = (() => {
    try {
      openBeneath(root, '../secret');
    } catch (e) {
      return e as Error;
    }
    return undefined;
  })();
  t.notMatch(err?.message ?? '', /not an image|exists/, 'says nothing about what lies outside');
  t.equal(
    codeOf(() => new ImageRoot(join(base, 'absent'))),
    'IMAGE_ROOT',
  );
});
