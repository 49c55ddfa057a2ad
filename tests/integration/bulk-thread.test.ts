/**
 * The dest's bulk thread (background pages) runs at the nice value it is given (bulkThreadNice)
 * while the main thread keeps its own, and goes away with the daemon. Read from /proc: the
 * kernel's view, not the daemon's.
 */
import t from 'tap';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { BulkThread } from '../../daemon/dest/bulk.js';
import { silentLogger } from '../../daemon/ops/log.js';
import { startTestDest } from '../helpers/dest.js';
import { generateImage } from '../../scripts/image/gen-image.js';
import { registerMigration, startSource } from '../../scripts/lib/daemons.js';
import { runVmSimTouches } from '../../scripts/vm-sim/vm-sim.js';

/** Nice value of every thread of this process, by thread id. */
function threadNices(): Map<number, number> {
  const out = new Map<number, number>();
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      out.set(Number(tid), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]));
    } catch {
      // the thread ended while we looked
    }
  }
  return out;
}

/** Polls `what` (a worker's start, loading koffi, can take seconds on a loaded machine). */
async function waitFor(what: () => boolean, ms = 20_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (what()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return what();
}

t.test(
  'bulkNice 10: the bulk thread runs at nice 10 beside a main thread at 0, and stops with the daemon',
  async (t) => {
    const niced = (): number[] =>
      [...threadNices()].filter(([, n]) => n === 10).map(([tid]) => tid);
    t.same(niced(), [], 'no niced thread before the daemon');
    const dir = mkdtempSync(join(tmpdir(), 'yabusame-bulk-'));
    // The daemon is up once its bulk thread is (it reported ready after taking its nice value).
    const dest = await startTestDest(join(dir, 'dest.sock'), { bulkNice: 10 });
    t.same(niced().length, 1, `one thread at nice 10 (${niced().join(',')})`);
    t.equal(threadNices().get(process.pid), 0, 'the main thread keeps nice 0');
    await dest.close();
    t.ok(await waitFor(() => niced().length === 0), 'the bulk thread ended with the daemon');
  },
);

t.test(
  'a bulk thread that dies fails its sessions with a code, and the next one gets a new thread',
  async (t) => {
    // A stand-in worker that dies on its first message, as a crashed bulk thread would.
    const dir = mkdtempSync(join(tmpdir(), 'yabusame-bulk-'));
    const script = join(dir, 'dies.mjs');
    writeFileSync(
      script,
      "import { parentPort } from 'node:worker_threads';\n" +
        "parentPort.postMessage({ t: 'ready' });\n" +
        "parentPort.on('message', () => process.exit(7));\n",
    );
    const bulk = new BulkThread({
      nice: 0,
      logLevel: 'error',
      log: silentLogger,
      workerUrl: pathToFileURL(script),
    });
    t.teardown(() => bulk.stop());
    // The thread is unref'd (a daemon's sockets keep it alive); here a timer does.
    const keepAlive = setInterval(() => {}, 1000);
    t.teardown(() => clearInterval(keepAlive));
    const init = {
      migrationId: 'vm-bulk-dies',
      secret: null,
      tls: undefined,
      policy: { allowed: [], allowPlaintext: false, loopbackOnly: true },
      windowBytes: 1 << 20,
      connectTimeoutMs: 1000,
      heartbeatMs: 0,
      reconnectTimeoutMs: 1000,
      retryFirst: false,
    };
    for (const round of [1, 2]) {
      const failures: string[] = [];
      const lane = bulk.lane(init, {
        connected: () => {},
        run: () => {},
        lost: () => {},
        error: () => {},
        sourceDone: () => {},
        fail: (code) => failures.push(code),
      });
      const opened = await lane.open({ scheme: 'ws', host: '127.0.0.1', port: 1 }).then(
        () => 'opened',
        (err: { code?: string }) => err.code,
      );
      t.equal(opened, 'INTERNAL_ERROR', `round ${round}: open fails with INTERNAL_ERROR`);
      t.same(failures, ['INTERNAL_ERROR'], `round ${round}: the session hears INTERNAL_ERROR`);
      await lane.close(); // resolves: a dead thread holds no uffd
      t.pass(`round ${round}: close resolved`);
    }
  },
);

t.test('faults never wait on the bulk thread: served while it is wedged at nice 19', async (t) => {
  // The worst case of a priority inversion: the bulk thread, niced, spins forever once its
  // session starts and never answers again. Faults and demand answers, on the main thread,
  // must not depend on it in any way.
  const dir = mkdtempSync('/dev/shm/yabusame-bulk-wedged-');
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const image = join(dir, 'vm.ram');
  const size = 16 << 20;
  await generateImage({ path: image, sizeBytes: size, seed: 5 });
  const source = await startSource(dir);
  t.teardown(() => source.stop());
  const secret = await registerMigration(source, { id: 'vm-wedged', image, frozen: true });
  const regions = [{ offset: 0, sizeBytes: size, pageSizeBytes: 4096, name: 'ram0' }];
  const sysUrl = new URL('../../daemon/linux/sys.js', import.meta.url).href;
  const script = join(dir, 'wedged.mjs');
  writeFileSync(
    script,
    `import { parentPort } from 'node:worker_threads';
import { setThreadNice } from ${JSON.stringify(sysUrl)};
setThreadNice(19);
parentPort.postMessage({ t: 'ready' });
parentPort.on('message', (m) => {
  if (m.t === 'open') parentPort.postMessage({ t: 'opened', key: m.key, regions: ${JSON.stringify(regions)} });
  if (m.t === 'start') for (;;);
});
`,
  );
  const dest = await startTestDest(join(dir, 'dest.sock'), {
    bulkWorkerUrl: pathToFileURL(script),
    timeoutMs: 5000,
  });
  t.teardown(() => dest.close());
  const r = await runVmSimTouches({
    image,
    migrationId: 'vm-wedged',
    secret,
    source: source.ws,
    destSocket: join(dir, 'dest.sock'),
    workers: 2,
    touches: 512,
    timeoutMs: 60_000,
  });
  t.ok(r.partial, 'the migration cannot complete: the background never arrives');
  t.equal(r.workload.firstTouches, 512, 'every touch got its page');
  t.equal(r.mismatchCount, 0, 'every placed page equals the image');
  t.ok(r.presentPages >= 512, `${r.presentPages} pages present, all by demand`);
});
