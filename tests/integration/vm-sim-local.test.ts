/**
 * vm-sim against the in-process local handler: real userfaultfd, real worker threads faulting
 * on guest RAM, the handler serving them on this (main) thread's event loop.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { generateImage, PageClass, planImage } from '../../scripts/image/gen-image.js';
import {
  startLocalHandler,
  type LocalHandler,
  type LocalHandlerOptions,
} from '../../scripts/local-floor/local-handler.js';
import { runVmSim, type HandoffFn, VmSimError } from '../../scripts/vm-sim/vm-sim.js';
import * as sys from '../../daemon/linux/sys.js';
import type { HandoffRequest } from '../../protocol/handoff.js';
import { startHandoffListener } from '../../daemon/handoff/listener.js';
import { silentLogger } from '../../daemon/ops/log.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const SEED = 7;
const dir = fs.mkdtempSync('/dev/shm/yabusame-vmsim-');
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const image = await generateImage({ path: join(dir, 'image'), sizeBytes: SIZE, seed: SEED });

const common = {
  image: image.path,
  migrationId: 'vmsim-local',
  source: 'ws://127.0.0.1:1',
  workers: 4,
  pattern: 'mixed' as const,
  timeoutMs: 120_000,
};

/** A handoff that serves the uffd in this process; `last` exposes the handler for assertions. */
function localHandoff(extra: Partial<LocalHandlerOptions> = {}): {
  handoff: HandoffFn;
  last: () => LocalHandler;
} {
  let handler: LocalHandler | undefined;
  return {
    handoff: (request, uffdFd, sink) => {
      handler = startLocalHandler({
        uffdFd,
        request,
        imagePath: image.path,
        // Let the workers fault a good number of pages before the background stream begins.
        backgroundAfterFaults: 512,
        backgroundPagesPerTick: 16,
        onReply: (r) => sink.reply(r),
        ...extra,
      });
      return { close: () => handler!.close() };
    },
    last: () => handler!,
  };
}

t.test('64 MiB, 4 workers, mixed: every page verified', async (t) => {
  const local = localHandoff();
  const progress: number[] = [];
  const r = await runVmSim({
    ...common,
    handoff: local.handoff,
    onProgress: (p) => progress.push(p.presentPages),
  });
  const stats = local.last().stats;
  t.equal(r.totalPages, SIZE / 4096);
  t.equal(r.pagesVerified, r.totalPages, 'every page verified');
  t.equal(r.mismatchCount, 0);
  t.same(r.mismatches, []);
  t.equal(r.missingPages, 0);
  t.ok(r.writtenPages > 0, `${r.writtenPages} pages written by the workload`);
  t.ok(stats.demandPages >= 512, `${stats.demandPages} demand faults served`);
  t.ok(r.workload.faults > 0 && r.faultLatencyUs.count === r.workload.faults);
  t.ok(r.faultLatencyUs.p50 > 0 && r.faultLatencyUs.p50 <= r.faultLatencyUs.max);
  t.equal(r.daemonReport.totalPages, r.totalPages);
  t.equal(r.daemonReport.demandPages + r.daemonReport.backgroundPages, r.totalPages);
  t.ok(progress.length > 2 && progress[progress.length - 1] === r.totalPages, 'progress reported');
  // Faults come from the worker threads, never from the thread serving them (tid = pid).
  t.ok(stats.faultThreadIds.size >= 1);
  t.notOk(stats.faultThreadIds.has(process.pid), 'no fault from the serving thread');
  const sorted = [...stats.serviceUs].sort((a, b) => a - b);
  t.comment(
    `faults ${r.faultLatencyUs.count} p50 ${r.faultLatencyUs.p50} µs p99 ` +
      `${r.faultLatencyUs.p99} µs; handler service p50 ` +
      `${sorted[sorted.length >> 1]?.toFixed(1)} µs; migration ${r.elapsedMs} ms, ` +
      `verify ${r.verifyMs} ms, ${r.workload.ops} ops`,
  );
});

t.test('a start gate holds the workload until it opens, then every page verifies', async (t) => {
  const local = localHandoff();
  let atGate = -1;
  let beforeOpen = -1;
  const r = await runVmSim({
    ...common,
    sizeBytes: 16 * MiB,
    touches: 512,
    handoff: local.handoff,
    startGate: async () => {
      atGate = local.last().stats.demandPages;
      // Time the workers would need to fault many pages, were they running.
      await new Promise((resolve) => setTimeout(resolve, 300));
      beforeOpen = local.last().stats.demandPages;
    },
  });
  t.equal(atGate, 0, 'no fault before the gate');
  t.equal(beforeOpen, 0, 'none while it is closed');
  t.ok(local.last().stats.demandPages > 0, 'faults once it opened');
  t.equal(r.pagesVerified, r.totalPages, 'every page verified');
  t.equal(r.mismatchCount, 0);
});

t.test('a start gate that fails fails the run', async (t) => {
  const local = localHandoff();
  await t.rejects(
    runVmSim({
      ...common,
      sizeBytes: MiB,
      handoff: local.handoff,
      startGate: () => Promise.reject(new Error('gate broken')),
    }),
    { message: 'gate broken' },
  );
});

t.test('one wrong page is reported, and only that page', async (t) => {
  // A non-zero page far from the start, so the workers may or may not read it online.
  const plan = planImage({ sizeBytes: SIZE, seed: SEED });
  let bad = 9000;
  while (plan[bad]! <= PageClass.Zero) bad++;
  const local = localHandoff({
    tamper: (page, data) => {
      if (page === bad) data[2000] = data[2000]! ^ 0x5a; // past the 16-byte stamp a write could cover
    },
  });
  const r = await runVmSim({ ...common, handoff: local.handoff });
  t.same([...new Set(r.mismatches.map((m) => m.page))], [bad], 'exactly the tampered page');
  t.ok(
    r.mismatches.some((m) => m.worker === undefined && /byte 2000/.test(m.reason)),
    'the final verification names the byte',
  );
  t.equal(r.pagesVerified, r.totalPages - 1);
});

t.test('a daemon that claims complete without placing pages cannot hang the oracle', async (t) => {
  const handoff: HandoffFn = (request: HandoffRequest, _fd, sink) => {
    const totalPages = request.regions[0]!.sizeBytes / 4096;
    setImmediate(() => {
      sink.reply({ type: 'ack', migrationId: request.migrationId, totalPages });
      sink.reply({
        type: 'complete',
        totalPages,
        demandPages: 0,
        backgroundPages: totalPages,
        zeroPages: 0,
        existedPages: 0,
        discardedPages: 0,
      });
    });
    return { close: () => undefined };
  };
  const r = await runVmSim({ ...common, sizeBytes: MiB, handoff, opsAfterComplete: 10 });
  // Absent pages read as zeros once the oracle unregisters its RAM: right where the image is
  // zero (a daemon may leave those unplaced), missing everywhere else.
  const img = fs.readFileSync(image.path).subarray(0, MiB);
  let zeroPages = 0;
  for (let off = 0; off < MiB; off += 4096) {
    if (img.subarray(off, off + 4096).every((b) => b === 0)) zeroPages++;
  }
  t.ok(zeroPages > 0 && zeroPages < 256, `${zeroPages} of the 256 pages are zero in the image`);
  t.equal(r.missingPages, 256 - zeroPages, 'every page that is not zero is missing');
  t.equal(r.pagesVerified, zeroPages, 'the zero pages read as zeros (stamped or not)');
  t.ok(r.mismatches.some((m) => m.reason.startsWith('missing')));
});

t.test('an error reply fails the run with its code', async (t) => {
  const handoff: HandoffFn = (request, _fd, sink) => {
    setImmediate(() => {
      sink.reply({ type: 'ack', migrationId: request.migrationId, totalPages: 256 });
      sink.reply({ type: 'error', code: 'SOURCE_UNREACHABLE', message: 'no route' });
    });
    return { close: () => undefined };
  };
  await t.rejects(runVmSim({ ...common, sizeBytes: MiB, handoff }), {
    name: 'VmSimError',
    code: 'SOURCE_UNREACHABLE',
  });
});

t.test('default socket handoff: sends one handoff line, reads replies', async (t) => {
  const path = join(dir, 'dest.sock');
  let received = '';
  const server = net.createServer((conn) => {
    conn.setEncoding('utf8');
    conn.on('data', (d: string) => {
      received += d;
      if (!received.includes('\n')) return;
      conn.write('{"type":"ack","migrationId":"vmsim-local","totalPages":256}\n');
      conn.write('{"type":"error","code":"DEST_BUSY","message":"try later"}\n');
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  t.teardown(() => server.close());
  const err = await runVmSim({ ...common, sizeBytes: MiB, destSocket: path }).catch((e) => e);
  t.ok(err instanceof VmSimError);
  t.equal(err.code, 'DEST_BUSY');
  const req = JSON.parse(received.trim());
  t.match(req, {
    type: 'handoff',
    version: 1,
    migrationId: 'vmsim-local',
    regions: [{ name: 'ram0', offset: 0, sizeBytes: MiB, pageSizeBytes: 4096 }],
  });
  await t.rejects(runVmSim({ ...common, sizeBytes: MiB, destSocket: join(dir, 'nobody.sock') }), {
    code: 'VMSIM_HANDOFF_FAILED',
  });
});

t.test(
  "SCM_RIGHTS end to end: the daemon's listener receives the uffd, a local handler serves it",
  async (t) => {
    const path = join(dir, 'dest-fd.sock');
    let handler: LocalHandler | undefined;
    let receivedFd = -1;
    // The dest's own handoff listener (SCM_RIGHTS, checks), with the local handler behind it.
    const listener = await startHandoffListener({
      path,
      timeoutMs: 5000,
      log: silentLogger,
      onHandoff: (h) => {
        receivedFd = h.uffd;
        handler = startLocalHandler({
          uffdFd: h.uffd,
          request: h.request,
          imagePath: image.path,
          onReply: (r) => h.conn.reply(r),
        });
        h.conn.onClose(() => handler!.close());
      },
    });
    t.teardown(() => {
      handler?.close();
      if (receivedFd >= 0) sys.close(receivedFd);
      listener.close();
    });
    const r = await runVmSim({ ...common, sizeBytes: 16 * MiB, destSocket: path });
    t.ok(receivedFd >= 0, 'one fd received');
    t.equal(r.pagesVerified, r.totalPages, 'every page verified');
    t.equal(r.mismatchCount, 0);
    t.equal(r.daemonReport.totalPages, 4096);
  },
);
