// The placement ioctls against the real kernel. sys.ts writes their arguments into memory of its
// own and passes a Buffer's address to UFFDIO_COPY itself (koffi's struct marshalling cost more
// than the ioctl). So every kind of source a placement uses is placed here and read back: a
// fresh Buffer, a view at an odd offset in a larger one, a SharedArrayBuffer (the payload ring),
// with the JS heap churning between copies, and every kernel answer is checked as data.
import t, { type Test } from 'tap';
import * as abi from '../../daemon/linux/abi.js';
import * as sys from '../../daemon/linux/sys.js';
import * as uffd from '../../daemon/uffd/uffd.js';

const PAGE = 4096;

/** An anonymous mapping of `pages` registered MISSING with a new uffd of this process. */
function registeredRange(t: Test, pages: number): { fd: number; base: number } {
  const { fd } = uffd.create(0);
  const base = sys.mmap(
    pages * PAGE,
    abi.PROT_READ | abi.PROT_WRITE,
    abi.MAP_PRIVATE | abi.MAP_ANONYMOUS,
  );
  t.teardown(() => {
    sys.munmap(base, pages * PAGE);
    sys.close(fd);
  });
  uffd.registerMissing(fd, base, pages * PAGE);
  return { fd, base };
}

/** Page `i`'s expected bytes: its index and a per-page pattern, so a page from elsewhere shows. */
function fillPage(dst: Uint8Array, i: number): void {
  for (let b = 0; b < PAGE; b++) dst[b] = (i * 131 + b * 7) & 0xff;
  new DataView(dst.buffer, dst.byteOffset, 8).setUint32(0, i, true);
}

t.test('UFFDIO_COPY places the bytes of every kind of source a placement uses', (t) => {
  const pages = 768;
  const { fd, base } = registeredRange(t, pages);
  const big = Buffer.alloc(64 * PAGE + 100);
  const ring = new SharedArrayBuffer(16 * PAGE);
  let garbage: unknown[] = [];
  for (let i = 0; i < pages; i++) {
    let src: Buffer;
    if (i % 3 === 0) src = Buffer.alloc(PAGE);
    else if (i % 3 === 1) src = big.subarray(100 + (i % 64) * PAGE, 100 + (i % 64) * PAGE + PAGE);
    else src = Buffer.from(ring, (i % 16) * PAGE, PAGE);
    fillPage(src, i);
    const r = uffd.copy(fd, base + i * PAGE, src, PAGE);
    if (r.kind !== 'placed' || r.bytes !== PAGE) t.fail(`page ${i}: ${JSON.stringify(r)}`);
    // Young-generation garbage between copies, so scavenges run while sources are in use.
    garbage.push(new Array(64).fill(i), Buffer.alloc(32), { i });
    if (garbage.length > 3000) garbage = [];
  }
  const got = Buffer.alloc(PAGE);
  const want = Buffer.alloc(PAGE);
  const wrong: number[] = [];
  for (let i = 0; i < pages; i++) {
    sys.readMemory(base + i * PAGE, got);
    fillPage(want, i);
    if (!got.equals(want)) wrong.push(i);
  }
  t.same(wrong, [], `${pages} pages read back as placed`);
  t.end();
});

t.test("a run, and the kernel's answers as data", (t) => {
  const { fd, base } = registeredRange(t, 16);
  const run = Buffer.alloc(4 * PAGE);
  for (let i = 0; i < 4; i++) fillPage(run.subarray(i * PAGE, (i + 1) * PAGE), 100 + i);
  t.same(uffd.copy(fd, base, run, 4 * PAGE), { kind: 'placed', bytes: 4 * PAGE }, 'a 4-page run');
  const got = Buffer.alloc(4 * PAGE);
  sys.readMemory(base, got);
  t.ok(got.equals(run), 'the run reads back');
  // A negative s64 comes back from the argument's `copy` field as -EEXIST.
  t.same(uffd.copy(fd, base + PAGE, run, PAGE), { kind: 'exists' }, 'EEXIST on a present page');
  t.same(uffd.copy(fd, base + 4 * PAGE, run, 2 * PAGE), { kind: 'placed', bytes: 2 * PAGE });
  t.same(
    uffd.zeropage(fd, base + 6 * PAGE, 3 * PAGE),
    { kind: 'placed', bytes: 3 * PAGE },
    'zeropage',
  );
  t.same(uffd.zeropage(fd, base + 6 * PAGE, PAGE), { kind: 'exists' }, 'zeropage on a zero page');
  t.same(uffd.copyZeros(fd, base + 9 * PAGE, 2 * PAGE), { kind: 'placed', bytes: 2 * PAGE });
  sys.readMemory(base + 6 * PAGE, got);
  t.ok(got.equals(Buffer.alloc(4 * PAGE)), 'zeropage and copyZeros pages read back as zeros');
  t.same(uffd.copy(fd, base + 16 * PAGE, run, PAGE), { kind: 'unmapped' }, 'ENOENT past the range');
  t.equal(uffd.probeRange(fd, base + 11 * PAGE, 5 * PAGE), 'inside', 'a probe of missing pages');
  t.equal(uffd.probeRange(fd, base + 15 * PAGE, 2 * PAGE), 'outside', 'a probe across the end');
  t.throws(() => uffd.copy(fd, base + 12 * PAGE, run, 5 * PAGE), RangeError, 'len beyond src');
  uffd.wake(fd, base, 16 * PAGE);
  t.equal(uffd.isWriteProtectRegistered(fd, base, PAGE), false, 'not WP-registered');
  t.ok(uffd.unregister(fd, base, 16 * PAGE), 'unregister');
  t.same(uffd.copy(fd, base + 13 * PAGE, run, PAGE), { kind: 'unmapped' }, 'ENOENT after it');
  t.end();
});
