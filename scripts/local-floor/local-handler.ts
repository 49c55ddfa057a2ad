/**
 * The "local floor": the smallest correct userfaultfd handler, serving pages straight from a
 * memory image file in this process, with no network and no daemon. Benchmarks compare the real
 * daemon against it; vm-sim tests use it as an in-process `handoff`.
 *
 * It runs on the event loop of the thread that starts it (uv_poll through sys.watchReadable), so
 * the faults it serves must come from other threads (vm-sim's workers); a fault raised by this
 * thread would deadlock it.
 *
 * Demand: each page fault is served at once (UFFDIO_ZEROPAGE for an all-zero image page,
 * UFFDIO_COPY otherwise). Background: one batch per event-loop turn (setImmediate, so pending
 * faults are served between batches), contiguous zero / non-zero runs in one ioctl each, the
 * cursor continuing after the last demand fault as QEMU does. When every page is present it
 * replies `complete`. Replies follow the handoff protocol (ack, progress, complete, error).
 */
import * as fs from 'node:fs';
import * as abi from '../../daemon/linux/abi.js';
import * as sys from '../../daemon/linux/sys.js';
import * as uffd from '../../daemon/uffd/uffd.js';
import type { HandoffReply, HandoffRequest } from '../../protocol/handoff.js';

export interface LocalHandlerOptions {
  /** The uffd (not owned: the caller closes it after close()). */
  uffdFd: number;
  request: HandoffRequest;
  imagePath: string;
  /** Pages placed per background batch (one batch per event-loop turn); default 64 (256 KiB). */
  backgroundPagesPerTick?: number;
  /** Start the background stream only after this many demand faults; default 0. */
  backgroundAfterFaults?: number;
  /** Test hook: may alter a page's bytes (in place) before it is placed with UFFDIO_COPY. */
  tamper?: (page: number, data: Buffer) => void;
  onReply: (reply: HandoffReply) => void;
}

export interface LocalHandlerStats {
  demandPages: number;
  backgroundPages: number;
  zeroPages: number;
  /** Distinct thread ids that raised faults (UFFD_FEATURE_THREAD_ID), at most 64 kept. */
  faultThreadIds: Set<number>;
  /** Time from reading a fault event to placing its page, microseconds (every fault). */
  serviceUs: number[];
}

export interface LocalHandler {
  readonly stats: LocalHandlerStats;
  close(): void;
}

export function startLocalHandler(o: LocalHandlerOptions): LocalHandler {
  const { request } = o;
  if (request.regions.length !== 1) throw new RangeError('the local handler serves one region');
  const region = request.regions[0]!;
  const P = region.pageSizeBytes;
  const totalPages = region.sizeBytes / P;
  const perTick = o.backgroundPagesPerTick ?? 64;
  const image = fs.openSync(o.imagePath, 'r');
  const present = new Uint8Array(totalPages);
  const zeroPage = Buffer.alloc(P);
  const pageBuf = Buffer.alloc(P);
  const batchBuf = Buffer.alloc(Math.max(1, perTick) * P);
  const evBuf = Buffer.alloc(abi.SIZEOF_uffd_msg * 64);
  const events: uffd.UffdEvent[] = [];
  const stats: LocalHandlerStats = {
    demandPages: 0,
    backgroundPages: 0,
    zeroPages: 0,
    faultThreadIds: new Set(),
    serviceUs: [],
  };
  let placed = 0;
  let cursor = 0;
  let closed = false;
  let backgroundScheduled = false;
  let nextProgress = 0;
  const progressStep = Math.max(1, Math.floor(totalPages / 50));

  const readImage = (buf: Buffer, page: number, pages: number): void => {
    const len = pages * P;
    let got = 0;
    while (got < len) {
      const n = fs.readSync(image, buf, got, len - got, region.offset + page * P + got);
      if (n === 0) {
        buf.fill(0, got, len);
        return;
      }
      got += n;
    }
  };

  const fail = (code: string, message: string): void => {
    if (closed) return;
    o.onReply({ type: 'error', code, message });
    close();
  };

  /** Places `pages` pages from `page` (data = null: zero pages). False when the VMM is gone. */
  const placeRun = (page: number, pages: number, data: Buffer | null): boolean => {
    let done = 0;
    const len = pages * P;
    while (done < len) {
      const dst = region.base + page * P + done;
      const r = data
        ? uffd.copy(o.uffdFd, dst, data.subarray(done), len - done)
        : uffd.zeropage(o.uffdFd, dst, len - done);
      if (r.kind === 'placed') done += r.bytes;
      else if (r.kind === 'exists')
        done += P; // raced with another placement: skip that page
      else if (r.kind !== 'retry') {
        fail('LOCAL_VMM_GONE', `placement failed: ${r.kind === 'failed' ? r.errno : r.kind}`);
        return false;
      } // 'retry': no non-cooperative events are requested, so just try again
    }
    for (let i = 0; i < pages; i++) present[page + i] = 1;
    placed += pages;
    if (!data) stats.zeroPages += pages;
    return true;
  };

  const reportProgress = (): void => {
    if (placed >= nextProgress && placed < totalPages) {
      nextProgress = placed + progressStep;
      o.onReply({ type: 'progress', presentPages: placed, totalPages });
    }
    if (placed === totalPages) {
      o.onReply({
        type: 'complete',
        totalPages,
        demandPages: stats.demandPages,
        backgroundPages: stats.backgroundPages,
        zeroPages: stats.zeroPages,
        existedPages: 0,
        discardedPages: 0,
      });
      background.stop = true;
    }
  };

  const serveFault = (address: number): boolean => {
    const page = Math.floor((address - region.base) / P);
    if (page < 0 || page >= totalPages) {
      fail('LOCAL_BAD_FAULT', `fault at 0x${address.toString(16)} outside the region`);
      return false;
    }
    if (present[page]) return true; // already placed; UFFDIO_COPY woke the faulting thread
    readImage(pageBuf, page, 1);
    const isZero = pageBuf.equals(zeroPage);
    if (!isZero) o.tamper?.(page, pageBuf);
    if (!placeRun(page, 1, isZero ? null : pageBuf)) return false;
    stats.demandPages++;
    if (page + 1 < totalPages) cursor = page + 1;
    return true;
  };

  const watch = sys.watchReadable(o.uffdFd, () => {
    if (closed) return;
    events.length = 0;
    const state = uffd.drainEvents(o.uffdFd, evBuf, events);
    for (const e of events) {
      if (e.kind !== 'pagefault') continue;
      const t0 = performance.now();
      if (!serveFault(e.address)) return;
      stats.serviceUs.push((performance.now() - t0) * 1000);
      if (stats.faultThreadIds.size < 64) stats.faultThreadIds.add(e.tid);
    }
    if (state === 'gone') return fail('LOCAL_VMM_GONE', 'the userfaultfd reports the VMM gone');
    if (events.length) reportProgress();
    maybeStartBackground();
  });

  const background = { stop: false };
  const backgroundBatch = (): void => {
    backgroundScheduled = false;
    if (closed || background.stop) return;
    // Find the next missing page from the cursor (wrapping), then place a batch from it.
    let start = cursor;
    let scanned = 0;
    while (present[start] && scanned < totalPages) {
      start = start + 1 === totalPages ? 0 : start + 1;
      scanned++;
    }
    if (scanned === totalPages) return;
    const pages = Math.min(perTick, totalPages - start);
    readImage(batchBuf, start, pages);
    let p = 0;
    while (p < pages) {
      if (present[start + p]) {
        p++;
        continue;
      }
      const isZero = batchBuf.subarray(p * P, (p + 1) * P).equals(zeroPage);
      let end = p + 1;
      while (
        end < pages &&
        !present[start + end] &&
        batchBuf.subarray(end * P, (end + 1) * P).equals(zeroPage) === isZero
      )
        end++;
      const run = batchBuf.subarray(p * P, end * P);
      if (!isZero && o.tamper) {
        for (let q = p; q < end; q++) o.tamper(start + q, batchBuf.subarray(q * P, (q + 1) * P));
      }
      if (!placeRun(start + p, end - p, isZero ? null : run)) return;
      stats.backgroundPages += end - p;
      p = end;
    }
    cursor = start + pages === totalPages ? 0 : start + pages;
    reportProgress();
    scheduleBackground();
  };
  const scheduleBackground = (): void => {
    if (backgroundScheduled || closed || background.stop || perTick <= 0) return;
    backgroundScheduled = true;
    setImmediate(backgroundBatch);
  };
  const maybeStartBackground = (): void => {
    if (stats.demandPages >= (o.backgroundAfterFaults ?? 0)) scheduleBackground();
  };

  function close(): void {
    if (closed) return;
    closed = true;
    watch.stop();
    fs.closeSync(image);
  }

  setImmediate(() => {
    if (closed) return;
    o.onReply({ type: 'ack', migrationId: request.migrationId, totalPages });
    maybeStartBackground();
  });
  return { stats, close };
}
