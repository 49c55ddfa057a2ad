// The daemons driven by c-vmm, a VMM written in C from protocol/README.md alone (no code shared
// with vm-sim, so not its blind spots): real `yabusame source` and `yabusame dest` processes,
// real userfaultfd, SCM_RIGHTS and ws on loopback. Each scenario asserts the behaviour the
// protocol promises, and every migration that completes is verified byte for byte by c-vmm.
// After the scenarios that make a session fail, the same dests must still migrate a VM.
import t, { type Test } from 'tap';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { cpuSeconds } from '../../scripts/bench/proc.js';
import { generateImage } from '../../scripts/image/gen-image.js';
import {
  buildCVmm,
  runCVmm,
  type CVmmOptions,
  type CVmmResult,
} from '../../scripts/c-vmm/c-vmm.js';
import {
  startDest,
  startSource,
  writeSourceConfig,
  type Daemon,
} from '../../scripts/lib/daemons.js';
import { reserveHugePages } from '../../scripts/lib/hugepages.js';
import { writeHugePageFile } from '../helpers/huge-image.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const HUGE_PAGE = 2 * MiB;
const dir = mkdtempSync('/dev/shm/yabusame-cvmm-');
const daemons: Daemon[] = [];
t.teardown(async () => {
  await Promise.all(daemons.map((d) => d.stop()));
  rmSync(dir, { recursive: true, force: true });
});

let source: Awaited<ReturnType<typeof startSource>>;
let dest: Awaited<ReturnType<typeof startDest>>;
/**
 * A dest that holds its background stream back for a few seconds. The write-protect scenario
 * needs a session that is still running while its write waits: the daemon unregisters every
 * range when it completes, and that alone would release the write.
 */
let heldDest: Awaited<ReturnType<typeof startDest>>;

let seed = 1;
const isZero = (b: Buffer): boolean => b.every((x) => x === 0);

async function image(name: string, sizeBytes: number): Promise<string> {
  const path = join(dir, `${name}.ram`);
  await generateImage({ path, sizeBytes, seed: seed++ });
  return path;
}

/** An image of 2 MiB pages, one letter per page (tests/helpers/huge-image.ts). */
async function hugePageImage(name: string, pages: string): Promise<string> {
  const path = join(dir, `${name}.ram`);
  await writeHugePageFile(path, pages, seed++);
  return path;
}

const HUGE_PAGES = 'DZHDDHHZDDDDZHDDDHZDDDDHHDZDDDDH';
/** The several-regions scenario: image offsets = file offsets, with gaps between regions. */
const MULTI = [
  { offset: 1 * MiB, sizeBytes: 8 * MiB, backing: 'shm' as const },
  { offset: 12 * MiB, sizeBytes: 4 * MiB, backing: 'anon' as const },
  { offset: 20 * MiB, sizeBytes: 6 * MiB, backing: 'anon' as const },
];

const images: Record<string, string> = {};

t.before(async () => {
  await buildCVmm();
  images['oracle'] = await image('oracle', 4 * MiB);
  images['oracleWrong'] = await image('oracle-wrong', 4 * MiB);
  images['split'] = await image('split', 128 * MiB);
  images['huge'] = await hugePageImage('huge', HUGE_PAGES);
  images['small'] = await image('small', 16 * MiB);
  images['balloon'] = await image('balloon', 32 * MiB);
  images['multi'] = await image('multi', 32 * MiB);
  const whole = (id: string, img: string) => ({ id, image: img, frozen: true });
  const migrations = [
    whole('cvmm-oracle', images['oracle']),
    whole('cvmm-split', images['split']),
    ...['cvmm-huge', 'cvmm-huge-small-window'].map((id) => ({
      id,
      image: images['huge']!,
      frozen: true,
      regions: [
        {
          name: 'ram0',
          offset: 0,
          sizeBytes: HUGE_PAGES.length * HUGE_PAGE,
          fileOffset: 0,
          pageSizeBytes: HUGE_PAGE,
        },
      ],
    })),
    whole('cvmm-wp-before', images['small']),
    whole('cvmm-wp-after', images['small']),
    whole('cvmm-unmapped', images['small']),
    whole('cvmm-balloon', images['balloon']),
    {
      id: 'cvmm-multi',
      image: images['multi'],
      frozen: true,
      regions: MULTI.map((r, i) => ({
        name: `ram${i}`,
        offset: r.offset,
        sizeBytes: r.sizeBytes,
        fileOffset: r.offset,
        pageSizeBytes: 4096,
      })),
    },
    whole('cvmm-good', images['small']),
    whole('cvmm-good-held', images['small']),
  ];
  const config = writeSourceConfig(dir, 'source', migrations);
  source = await startSource(dir, ['--config', config.path], 'source', {
    secrets: config.secrets,
  });
  daemons.push(source);
  // A session that cannot reach its source fails after 2 s instead of 2 minutes, so a failing
  // scenario ends quickly.
  const destConfig = join(dir, 'dest.json');
  writeFileSync(destConfig, JSON.stringify({ reconnectTimeoutMs: 2000 }));
  dest = await startDest(dir, ['--config', destConfig]);
  daemons.push(dest);
  const heldConfig = join(dir, 'held-dest.json');
  writeFileSync(heldConfig, JSON.stringify({ reconnectTimeoutMs: 2000, backgroundDelayMs: 3000 }));
  heldDest = await startDest(dir, ['--config', heldConfig], 'held-dest');
  daemons.push(heldDest);
});

function tail(text: string, lines = 40): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

/** What a failed assertion shows: c-vmm's own account and the end of the daemon's log. */
function diagnostics(r: CVmmResult, d: Daemon): Record<string, unknown> {
  let log: string;
  try {
    log = tail(readFileSync(d.logPath, 'utf8'));
  } catch (err) {
    log = `(no log: ${(err as Error).message})`;
  }
  return {
    cvmm: { code: r.code, message: r.message, mismatches: r.mismatches, stderr: tail(r.stderr) },
    daemonLog: log,
  };
}

async function migrate(
  d: Daemon & { socket: string },
  o: Omit<CVmmOptions, 'socket' | 'source'>,
): Promise<CVmmResult> {
  return runCVmm({
    socket: d.socket,
    source: source.ws,
    secret: source.secretOf(o.id),
    timeoutMs: 30_000,
    ...o,
  });
}

function assertVerified(t: Test, r: CVmmResult, d: Daemon): void {
  const diag = diagnostics(r, d);
  if (r.outcome !== 'complete') {
    t.fail(
      `the migration ended ${r.outcome} (${r.code}: ${r.message}) instead of completing`,
      diag,
    );
    return;
  }
  t.equal(r.missingPages, 0, 'no page missing after complete', diag);
  t.equal(r.mismatchCount, 0, 'no page differs from what it must hold', diag);
  t.equal(r.pagesVerified, r.totalPages, `all ${r.totalPages} pages verified byte for byte`, diag);
  t.equal(r.strandedThreads, 0, 'no guest thread left blocked in a fault after complete', diag);
  t.equal(r.exitCode, 0, 'c-vmm exits 0', diag);
  const c = r.complete!;
  t.equal(c.totalPages, r.totalPages, 'complete counts the pages the handoff described', diag);
  t.equal(
    c.demandPages + c.backgroundPages + c.zeroPages + c.existedPages + c.discardedPages,
    c.totalPages,
    `complete adds up: ${JSON.stringify(c)}`,
    diag,
  );
}

function assertEnded(
  t: Test,
  r: CVmmResult,
  d: Daemon,
  outcome: 'refused' | 'failed',
  code: string,
): void {
  const diag = diagnostics(r, d);
  t.equal(r.outcome, outcome, `the session ended: ${outcome}`, diag);
  const got = r.code ? `${r.code}: ${r.message}` : r.outcome;
  t.equal(r.code, code, `with ${code} (got ${got})`, diag);
  t.equal(r.exitCode, 3, 'c-vmm exits 3', diag);
}

t.test('c-vmm reports exactly the pages that differ from its image', async (t) => {
  // The source serves one image while c-vmm compares with another of the same size: the oracle
  // must flag every page where the two differ, and only those. An idle guest keeps the count
  // exact (a vCPU would report a page it touched a second time).
  const served = readFileSync(images['oracle']!);
  const other = readFileSync(images['oracleWrong']!);
  let differing = 0;
  // Where the served page is zero the dest leaves it unplaced: c-vmm finds it absent, and
  // missing if its own image says it is not zero.
  let differingServedZero = 0;
  for (let off = 0; off < served.length; off += 4096) {
    if (served.compare(other, off, off + 4096, off, off + 4096) === 0) continue;
    differing++;
    if (isZero(served.subarray(off, off + 4096))) differingServedZero++;
  }
  t.ok(differing > 0, `${differing} pages differ between the two images`);
  t.ok(differingServedZero > 0, `${differingServedZero} of them are zero in the served image`);
  const r = await migrate(dest, { id: 'cvmm-oracle', image: images['oracleWrong']!, vcpus: 0 });
  t.equal(r.outcome, 'complete', 'the daemon completed the migration', diagnostics(r, dest));
  t.equal(r.missingPages, differingServedZero, 'served zeros it expected data in are missing');
  t.equal(
    r.mismatchCount,
    differing - differingServedZero,
    'c-vmm reports each other differing page once',
  );
  t.equal(r.pagesVerified, r.totalPages - differing, 'and verifies every other page');
  t.equal(r.exitCode, 1, 'c-vmm exits 1');
  t.match(r.mismatches[0]?.reason, /^byte \d+: 0x[0-9a-f]{2}, expected 0x[0-9a-f]{2} \(image\)$/);
});

t.test('c-vmm reports every page missing when complete comes without them', async (t) => {
  // A stand-in daemon that acknowledges the handoff and claims completion at once, having placed
  // nothing (it never even takes the uffd). An idle guest, so no fault waits on it.
  const socket = join(dir, 'liar.sock');
  const totalPages = (4 * MiB) / 4096;
  const server = createServer((conn) => {
    conn.once('data', () => {
      const counts = { demandPages: 0, backgroundPages: 0, zeroPages: 0, existedPages: 0 };
      conn.write(`${JSON.stringify({ type: 'ack', migrationId: 'cvmm-liar', totalPages })}\n`);
      conn.write(
        `${JSON.stringify({ type: 'complete', totalPages, ...counts, discardedPages: 0 })}\n`,
      );
    });
  });
  await new Promise<void>((resolve) => server.listen(socket, resolve));
  t.teardown(() => server.close());
  const r = await runCVmm({
    socket,
    id: 'cvmm-liar',
    source: source.ws,
    image: images['oracle']!,
    vcpus: 0,
  });
  // Absent pages read as zeros: right for the image's zero pages (as if left unplaced), missing
  // for every other one.
  const img = readFileSync(images['oracle']!);
  let zeroPages = 0;
  for (let off = 0; off < img.length; off += 4096) {
    if (isZero(img.subarray(off, off + 4096))) zeroPages++;
  }
  t.ok(zeroPages > 0 && zeroPages < totalPages, `${zeroPages} zero pages in the image`);
  t.equal(r.outcome, 'complete', 'c-vmm took the complete reply');
  t.equal(r.missingPages, totalPages - zeroPages, 'every page that is not zero is missing');
  t.equal(r.pagesVerified, zeroPages, 'the zero pages read as zeros');
  t.equal(r.exitCode, 1, 'c-vmm exits 1');
  t.match(r.mismatches[0]?.reason, /^missing: not present when complete arrived$/);
});

t.test('frames that span two handoff regions, idle guest', async (t) => {
  // One source region of 128 MiB, handed over as two regions split 12 KiB before its end. The
  // background stream's frames cross the split. Region 1 lies below region 0 in memory and is
  // listed second. No vCPU runs, so only the background stream can fill the pages.
  const split = 128 * MiB - 12 * KiB;
  const r = await migrate(dest, {
    id: 'cvmm-split',
    image: images['split']!,
    regions: [
      { offset: 0, sizeBytes: split },
      { offset: split, sizeBytes: 12 * KiB },
    ],
    order: 'image',
    vcpus: 0,
    timeoutMs: 20_000,
  });
  const [r0, r1] = r.regions;
  t.ok(r1!.base + r1!.sizeBytes < r0!.base, 'region 1 lies below region 0, apart from it');
  t.same(r.handoffOrder, ['ram0', 'ram1'], 'region 1 is listed second');
  assertVerified(t, r, dest);
});

t.test('2 MiB hugetlbfs pages, with zero huge pages and holes', async (t) => {
  const pool = reserveHugePages(HUGE_PAGES.length + 8, HUGE_PAGES.length);
  if ('skip' in pool) return t.plan(0, pool.skip);
  t.teardown(pool.release);
  const r = await migrate(dest, {
    id: 'cvmm-huge',
    image: images['huge']!,
    regions: [{ offset: 0, sizeBytes: HUGE_PAGES.length * HUGE_PAGE, page: '2m' }],
  });
  t.equal(r.regions[0]?.backing, 'hugetlb', 'guest RAM is hugetlbfs');
  assertVerified(t, r, dest);
});

t.test('a window smaller than a huge page still streams huge pages', async (t) => {
  // A source sends a page only with credit for all of it. The dest raises a session's window
  // to four of its largest pages, and its share of the ring never drops below two of them
  // (credit-share.test covers the share with many sessions): with a 1 MiB window and only 2 MiB
  // pages, a grant of the window alone would never let one out, and the pages no vCPU touched
  // would never arrive. With both guards removed this test times out.
  const pool = reserveHugePages(HUGE_PAGES.length + 8, HUGE_PAGES.length);
  if ('skip' in pool) return t.plan(0, pool.skip);
  t.teardown(pool.release);
  const config = join(dir, 'small-window-dest.json');
  writeFileSync(
    config,
    JSON.stringify({ reconnectTimeoutMs: 2000, backgroundWindowBytes: 1 * MiB }),
  );
  const small = await startDest(dir, ['--config', config], 'small-window-dest');
  t.teardown(() => small.stop());
  const r = await migrate(small, {
    id: 'cvmm-huge-small-window',
    image: images['huge']!,
    regions: [{ offset: 0, sizeBytes: HUGE_PAGES.length * HUGE_PAGE, page: '2m' }],
    vcpus: 1,
    touchFraction: 0.1,
  });
  assertVerified(t, r, small);
  t.ok(
    (r.complete?.backgroundPages ?? 0) > 0,
    `huge pages came by the background stream (${r.complete?.backgroundPages})`,
    diagnostics(r, small),
  );
});

t.test('write-protect registered before the handoff is refused', async (t) => {
  const r = await migrate(dest, { id: 'cvmm-wp-before', image: images['small']!, wp: 'before' });
  assertEnded(t, r, dest, 'refused', 'HANDOFF_WP_UNSUPPORTED');
});

t.test('a write-protect fault after ack ends the session; the dest does not spin', async (t) => {
  // c-vmm re-registers a region MISSING|WP, write-protects a page a vCPU has touched, writes to
  // it from a thread and waits 1 s: that window is where the dest's CPU time is measured, from
  // c-vmm's announcement of the write to its verdict.
  const samples: Array<{ cpu: number; atMs: number }> = [];
  const pid = heldDest.child.pid!;
  const r = await migrate(heldDest, {
    id: 'cvmm-wp-after',
    image: images['small']!,
    vcpus: 1,
    touchFraction: 0.02,
    writeFraction: 0,
    wp: 'after',
    wpWaitMs: 1000,
    onStderrLine: (line) => {
      if (/event wp-(write|verdict)/.test(line))
        samples.push({ cpu: cpuSeconds(pid), atMs: performance.now() });
    },
  });
  assertEnded(t, r, heldDest, 'failed', 'FAULT_UNRESOLVABLE');
  t.equal(r.wp?.writeCompleted, false, 'the write stayed blocked: nothing resolved it');
  t.equal(samples.length, 2, 'the write was issued and judged');
  const [from, to] = samples;
  if (from && to) {
    const perSecond = (to.cpu - from.cpu) / ((to.atMs - from.atMs) / 1000);
    t.ok(
      perSecond < 0.3,
      `the dest used ${perSecond.toFixed(2)} s of CPU per second while the write was blocked`,
      diagnostics(r, heldDest),
    );
  }
});

t.test('a region only partly mapped is refused', async (t) => {
  const r = await migrate(dest, {
    id: 'cvmm-unmapped',
    image: images['small']!,
    unmapTailBytes: 8 * MiB,
  });
  t.equal(r.regions[0]?.mappedBytes, 8 * MiB, 'half of the region is mapped');
  assertEnded(t, r, dest, 'refused', 'HANDOFF_REGION_UNMAPPED');
});

t.test('balloon discards during the migration: complete adds up', async (t) => {
  const r = await migrate(dest, { id: 'cvmm-balloon', image: images['balloon']!, balloon: 64 });
  t.equal(r.balloonRuns, 64, `the balloon discarded 64 runs (${r.discardedPages} pages)`);
  assertVerified(t, r, dest);
});

t.test('several regions, one of them shared memory, shuffled', async (t) => {
  const r = await migrate(dest, {
    id: 'cvmm-multi',
    image: images['multi']!,
    regions: MULTI,
    order: 'shuffle',
    seed: 7,
  });
  t.notSame(r.handoffOrder, ['ram0', 'ram1', 'ram2'], `listed as ${r.handoffOrder.join(', ')}`);
  t.equal(r.regions[0]?.backing, 'shm', 'region 0 is a shared memfd');
  assertVerified(t, r, dest);
});

t.test('after those failures, both dests still migrate a VM', async (t) => {
  const [good, held] = await Promise.all([
    migrate(dest, { id: 'cvmm-good', image: images['small']! }),
    migrate(heldDest, { id: 'cvmm-good-held', image: images['small']! }),
  ]);
  t.test('dest', async (t) => assertVerified(t, good, dest));
  t.test('the dest with its background held back', async (t) => assertVerified(t, held, heldDest));
});
