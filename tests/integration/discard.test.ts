// The guest frees memory during migration (madvise MADV_DONTNEED, as a balloon does): the dest
// sees UFFD_EVENT_REMOVE, never places source data there afterwards, and serves later faults
// there with zero pages. Every other page still arrives and equals the image.
import t from 'tap';
import { mkdtempSync, openSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as sys from '../../daemon/linux/sys.js';
import * as abi from '../../daemon/linux/abi.js';
import * as uffd from '../../daemon/uffd/uffd.js';
import { encodeHandoff, type HandoffReply } from '../../protocol/handoff.js';
import { generateImage } from '../../scripts/image/gen-image.js';
import {
  registerMigration,
  startDest,
  startSource,
  type Daemon,
} from '../../scripts/lib/daemons.js';
import { connectHandoff, sendRaw } from '../helpers/vmm-client.js';

const PAGE = 4096;
const SIZE = 16 << 20;
const dir = mkdtempSync('/dev/shm/yabusame-discard-');
const image = join(dir, 'vm.ram');
const daemons: Daemon[] = [];
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

t.test('discarded pages read as zeros; the rest equals the image', async (t) => {
  // No zero pages in this image: a zero read in the discarded range can only come from the discard.
  await generateImage({ path: image, sizeBytes: SIZE, seed: 11, zeroFraction: 0 });
  const source = await startSource(dir);
  daemons.push(source);
  await registerMigration(source, { id: 'vm-balloon', image, frozen: true });
  const config = join(dir, 'dest.json');
  // Hold the background back so the discard happens while pages are still missing.
  writeFileSync(config, JSON.stringify({ backgroundDelayMs: 1500 }));
  const dest = await startDest(dir, ['--config', config]);
  daemons.push(dest);

  const base = sys.mmap(SIZE, abi.PROT_READ | abi.PROT_WRITE, abi.MAP_PRIVATE | abi.MAP_ANONYMOUS);
  const { fd, features } = uffd.create(abi.UFFD_FEATURE_EVENT_REMOVE);
  t.ok(features & abi.UFFD_FEATURE_EVENT_REMOVE, 'the kernel grants UFFD_FEATURE_EVENT_REMOVE');
  uffd.registerMissing(fd, base, SIZE);
  const c = await connectHandoff(dest.socket);
  sendRaw(
    c,
    encodeHandoff({
      type: 'handoff',
      version: 1,
      migrationId: 'vm-balloon',
      secret: source.secretOf('vm-balloon'),
      source: source.ws,
      regions: [{ name: 'ram0', base, sizeBytes: SIZE, offset: 0, pageSizeBytes: PAGE }],
    }),
    [fd],
  );
  t.equal((await c.next()).type, 'ack');

  // A page outside the balloon, faulted in before the discard (served by demand).
  const page = Buffer.alloc(PAGE);
  const expected = Buffer.alloc(PAGE);
  const img = openSync(image, 'r');
  sys.readMemory(base + 3 * PAGE, page);
  readSync(img, expected, 0, PAGE, 3 * PAGE);
  t.ok(page.equals(expected), 'a demand page equals the image');

  // The balloon takes 1 MiB at 4 MiB, including a page that is already present.
  const balloon = { start: 4 << 20, len: 1 << 20 };
  sys.readMemory(base + balloon.start + PAGE, page);
  sys.madvise(base + balloon.start, balloon.len, abi.MADV_DONTNEED);
  sys.readMemory(base + balloon.start + 8 * PAGE, page);
  t.ok(page.equals(Buffer.alloc(PAGE)), 'a fault in the discarded range gets a zero page');

  let reply = await c.next();
  while (reply.type === 'progress') reply = await c.next();
  t.equal(reply.type, 'complete', `the migration completed: ${JSON.stringify(reply)}`);
  if (reply.type === 'complete') {
    // The page touched after the discard got zeros from the dest while the migration ran (the
    // read above returned before `complete`); it counts as discarded, as its whole range does.
    t.equal(reply.discardedPages, balloon.len / PAGE, 'the balloon counted once, as discarded');
    t.equal(reply.zeroPages, 0, 'no zero page besides the discarded ones (the image has none)');
    const sum =
      reply.demandPages +
      reply.backgroundPages +
      reply.zeroPages +
      reply.existedPages +
      reply.discardedPages;
    t.equal(sum, reply.totalPages, 'the counts add up to the pages of the VM');
  }

  // Every page: zeros inside the balloon, the image outside.
  const all = Buffer.alloc(SIZE);
  sys.readMemory(base, all);
  const want = Buffer.alloc(SIZE);
  readSync(img, want, 0, SIZE, 0);
  want.fill(0, balloon.start, balloon.start + balloon.len);
  let bad = 0;
  for (let off = 0; off < SIZE; off += PAGE) {
    if (!all.subarray(off, off + PAGE).equals(want.subarray(off, off + PAGE))) bad++;
  }
  t.equal(bad, 0, `all ${SIZE / PAGE} pages as expected (source data never landed in the balloon)`);
  c.close();
  sys.close(fd);
  sys.munmap(base, SIZE);
});

t.test(
  'discards racing the background stream: no source data lands in a discarded range',
  async (t) => {
    // The background is not held back: REMOVE events arrive while runs are being placed, so a
    // placement can meet EAGAIN, and the dest must skip what the events discarded. Pages are
    // discarded only once the dest placed them or while they are still missing, at random.
    const size = 64 << 20;
    const img = join(dir, 'race.ram');
    await generateImage({ path: img, sizeBytes: size, seed: 12, zeroFraction: 0 });
    const source = await startSource(dir, [], 'source-race');
    daemons.push(source);
    await registerMigration(source, { id: 'vm-race', image: img, frozen: true });
    const config = join(dir, 'dest-race.json');
    // A small window keeps the stream going for a while on a fast machine.
    writeFileSync(config, JSON.stringify({ backgroundWindowBytes: 256 * 1024 }));
    const dest = await startDest(dir, ['--config', config], 'dest-race');
    daemons.push(dest);

    const base = sys.mmap(
      size,
      abi.PROT_READ | abi.PROT_WRITE,
      abi.MAP_PRIVATE | abi.MAP_ANONYMOUS,
    );
    const { fd } = uffd.create(abi.UFFD_FEATURE_EVENT_REMOVE);
    uffd.registerMissing(fd, base, size);
    const c = await connectHandoff(dest.socket);
    sendRaw(
      c,
      encodeHandoff({
        type: 'handoff',
        version: 1,
        migrationId: 'vm-race',
        secret: source.secretOf('vm-race'),
        source: source.ws,
        regions: [{ name: 'ram0', base, sizeBytes: size, offset: 0, pageSizeBytes: PAGE }],
      }),
      [fd],
    );
    t.equal((await c.next()).type, 'ack');

    // Discard 64 KiB runs at pseudo-random places until the migration completes. Each madvise
    // blocks until the dest has read its REMOVE event, so every one races the stream.
    const discarded = new Uint8Array(size / PAGE);
    let replies: HandoffReply[] = [];
    let done = false;
    const collecting = (async () => {
      for (;;) {
        const r = await c.next();
        replies.push(r);
        if (r.type !== 'progress') {
          done = true;
          return;
        }
      }
    })();
    let seed = 99;
    let discards = 0;
    while (!done && discards < 256) {
      seed = (seed * 1103515245 + 12345) >>> 0;
      const first = (seed % (size / PAGE - 16)) & ~15;
      sys.madvise(base + first * PAGE, 16 * PAGE, abi.MADV_DONTNEED);
      discarded.fill(1, first, first + 16);
      discards++;
      await new Promise((r) => setTimeout(r, 1));
    }
    await collecting;
    const reply = replies.find((r) => r.type !== 'progress')!;
    replies = [];
    t.equal(
      reply.type,
      'complete',
      `complete after ${discards} discards: ${JSON.stringify(reply)}`,
    );
    if (reply.type === 'complete') {
      const sum =
        reply.demandPages +
        reply.backgroundPages +
        reply.zeroPages +
        reply.existedPages +
        reply.discardedPages;
      t.equal(sum, reply.totalPages, 'the counts add up');
      t.ok(reply.discardedPages > 0 && reply.backgroundPages > 0, 'both discards and a stream');
    }
    // Discarded pages read zero (never touched again here); every other page equals the image.
    const all = Buffer.alloc(size);
    sys.readMemory(base, all);
    const want = Buffer.alloc(size);
    const imgFd = openSync(img, 'r');
    readSync(imgFd, want, 0, size, 0);
    const zero = Buffer.alloc(PAGE);
    let bad = 0;
    for (let p = 0; p < size / PAGE; p++) {
      const got = all.subarray(p * PAGE, (p + 1) * PAGE);
      const expect = discarded[p] ? zero : want.subarray(p * PAGE, (p + 1) * PAGE);
      if (!got.equals(expect)) bad++;
    }
    t.equal(
      bad,
      0,
      `all ${size / PAGE} pages as expected (${discarded.reduce((n, x) => n + x, 0)} discarded)`,
    );
    c.close();
    sys.close(fd);
    sys.munmap(base, size);
  },
);
