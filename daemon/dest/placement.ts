/**
 * The one owner of a session's userfaultfd and page map: it checks the handed-over ranges, reads
 * every uffd event, and places every page (demand answers, background runs, zeros), on one
 * thread, so each page's state has one writer and every rule below lives here only.
 *
 * Placement (https://docs.kernel.org/admin-guide/mm/userfaultfd.html):
 *  - a run of the image is split over the regions that cover it, each region over its VMAs
 *    (a copy across a VMA boundary fails with ENOENT), and only unsettled pages are written,
 *    one ioctl per contiguous run;
 *  - zeros are placed only where a fault or prefetch awaits them: the other pages of a ZERO run
 *    are settled unplaced (PageState.ZERO_UNPLACED), as the guest reads zeros there anyway once
 *    the ranges are unregistered, before the VMM hears `complete`. On shared memory and hugetlbfs
 *    a placed zero page is a page allocated and cleared, as costly as a copy; unplaced, it costs
 *    the host no memory until the guest touches it (as in a guest that never migrated). Not for
 *    Firecracker (`lazyZeros` false): it hears no `complete`, and its guest memory is whole when
 *    the handler lets go, as it always was (anonymous memory maps zeros to the kernel's shared
 *    zero page, which costs nothing anyway). Placed zeros go by UFFDIO_ZEROPAGE where the
 *    region offers it, else (hugetlbfs) by UFFDIO_COPY from a zero mapping; a huge page is
 *    always placed whole (runs are whole pages);
 *  - kernel answers are data: a partial copy continues after the bytes copied; EEXIST settles
 *    that page as already present; EAGAIN (a REMOVE or UNMAP event pending) reads the events, so
 *    discarded pages are skipped, then retries, and after MAX_IMMEDIATE_RETRIES retries on a
 *    timer with backoff; ENOENT on a run re-learns the VMA boundaries, and on a single page means
 *    the VMM unmapped it (REGION_UNMAPPED); ESRCH means the VMM is gone (VMM_GONE); anything
 *    else ends the session with PLACE_FAILED, naming the ioctl, range and errno.
 *
 * Faults:
 *  - on a missing page: the session is told (it requests the page on the demand channel);
 *  - on a requested page: the session is told (the placement that answers the first fault, or
 *    the prefetch that asked for it, wakes them all; the session only starts waiting on it);
 *  - on a discarded page, or a zero page left unplaced: zeros (a page the guest freed reads as
 *    zero, never as source data);
 *  - on a page already placed: zeros are placed, which the kernel refuses (EEXIST) when the
 *    page is there (the fault was queued before its placement woke it: wake it again), and
 *    accepts when the page was zapped without a REMOVE event (MADV_DONTNEED with no
 *    UFFD_FEATURE_EVENT_REMOVE: zeros are what such a page reads as);
 *  - a fault that cannot be resolved that way (write-protect or minor faults, the same page
 *    faulting again and again, an address outside every region) ends the session with a code:
 *    the daemon never spins on a fault.
 */
import { performance } from 'node:perf_hooks';
import * as uffd from '../uffd/uffd.js';
import * as sys from '../linux/sys.js';
import { UFFD_IOCTL_BIT_COPY, UFFD_IOCTL_BIT_WAKE, UFFD_IOCTL_BIT_ZEROPAGE } from '../linux/abi.js';
import type { Logger } from '../ops/log.js';
import type { DestMetrics, PagePath } from '../ops/metric-ports.js';
import { PageMap, PageState, type PlacedState } from './page-map.js';
import type { GuestRegion, RegionTable } from './regions.js';
import { SessionError, type SessionEndCode } from './session-error.js';

const EVENT_BATCH = 64; // uffd_msg per read(2)
/** EAGAIN retries (each after reading the events) before a placement waits on a timer. */
const MAX_IMMEDIATE_RETRIES = 8;
const RETRY_FIRST_MS = 1;
const RETRY_MAX_MS = 64;
/** How long a VMA probe keeps reading events and trying again while it meets EAGAIN. */
const PROBE_RETRY_MS = 250;
/** Faults on one already-placed page, within one SPURIOUS_WINDOW_MS, that mean a loop. */
const MAX_SPURIOUS_FAULTS = 3;
const SPURIOUS_WINDOW_MS = 1000;

export interface PlacementHooks {
  /** A fault on a page nobody had asked for: it is REQUESTED now; fetch it. */
  missing(r: GuestRegion, page: number, faultedAt: number): void;
  /** A fault on a page already asked for (by another fault, or prefetched): it is in flight. */
  inFlight(r: GuestRegion, page: number, faultedAt: number): void;
  /** Pages were settled (a placement, a discard): awaited faults and completion may be done. */
  settled(): void;
  /** Every queued uffd event was handled (send the requests its faults queued). */
  drained(): void;
  /** The session cannot go on. */
  fail(code: SessionEndCode, message: string): void;
}

/** A run of image bytes to place: data (a view on its frame), or zeros (`data` null). */
export interface Run {
  offset: number;
  length: number;
  data: Buffer | null;
  path: PagePath;
}

export class Placement {
  readonly map: PageMap;
  private watch: sys.FdWatch | null = null;
  private readonly eventBuf = Buffer.alloc(32 * EVENT_BATCH);
  private readonly events: uffd.UffdEvent[] = [];
  /** Events the last pump() read. */
  private pumped = 0;
  /** Something to Atomics.wait on: a probe's 1 ms sleep (retrying). */
  private readonly nap = new Int32Array(new SharedArrayBuffer(4));
  /** Zero placements that faults asked for while events were being handled. */
  private readonly zeroFaults: Array<{ r: GuestRegion; page: number }> = [];
  private depth = 0;
  private stopped = false;
  private readonly retryTimers = new Set<NodeJS.Timeout>();
  /** Faults on already-placed pages in the current window, by address. */
  private spurious = new Map<number, number>();
  private spuriousSince = 0;

  constructor(
    private readonly fd: number,
    readonly table: RegionTable,
    private readonly hooks: PlacementHooks,
    private readonly log: Logger,
    private readonly metrics: DestMetrics,
    /** Leave the zero pages nobody awaits unplaced (see the top); else every page is placed. */
    private readonly lazyZeros = true,
  ) {
    this.map = new PageMap(table);
  }

  /**
   * Checks every handed-over region before the VMM is acked: registered (MISSING) with the
   * ioctls placement needs, not write-protect registered, and mapped page for page (learning
   * its VMA boundaries). Throws SessionError with a HANDOFF_* code.
   */
  check(): void {
    for (const r of this.table.regions) {
      let ioctls: number;
      try {
        ioctls = uffd.registerMissing(this.fd, r.base, r.sizeBytes);
      } catch (err) {
        throw new SessionError(
          'HANDOFF_REGISTER_FAILED',
          `region ${r.name}: ${(err as Error).message}`,
          { cause: err },
        );
      }
      const needed = UFFD_IOCTL_BIT_COPY | UFFD_IOCTL_BIT_WAKE;
      if ((ioctls & needed) !== needed) {
        throw new SessionError(
          'HANDOFF_REGISTER_FAILED',
          `region ${r.name}: UFFDIO_COPY/WAKE unavailable (ioctls 0x${ioctls.toString(16)})`,
        );
      }
      r.zeropage = (ioctls & UFFD_IOCTL_BIT_ZEROPAGE) !== 0;
      this.learnSegments(r, 0, r.pages, 'HANDOFF_REGION_UNMAPPED');
      for (const first of r.segmentStarts) {
        const wp = this.retrying(() =>
          uffd.isWriteProtectRegistered(this.fd, r.address(first), r.pageSizeBytes),
        );
        if (wp === 'gone') throw new SessionError('VMM_GONE', "the VMM's address space is gone");
        if (wp === true) {
          throw new SessionError(
            'HANDOFF_WP_UNSUPPORTED',
            `region ${r.name} is registered in write-protect mode; yabusame resolves missing-page faults only`,
          );
        }
      }
    }
  }

  /** Starts reading faults and events (uv_poll on the uffd, in the event loop). */
  start(onHangup: () => void): void {
    this.watch = sys.watchReadable(this.fd, (hangup) => {
      if (this.stopped) return;
      const status = this.enter(() => this.pump());
      if (status === 'gone' || (hangup && !this.stopped)) onHangup();
      else this.hooks.drained();
    });
  }

  /** Wakes every range: threads blocked on faults a previous daemon read fault again, to us. */
  wakeAll(): void {
    for (const r of this.table.regions) uffd.wake(this.fd, r.base, r.sizeBytes);
  }

  /** Stops reading and placing (the session ended); the uffd itself is the session's. */
  stop(): void {
    this.stopped = true;
    this.watch?.stop();
    this.watch = null;
    for (const t of this.retryTimers) clearTimeout(t);
    this.retryTimers.clear();
  }

  /**
   * Places a run of the image. The run was checked against the source's region table (inside
   * one region, whole pages); here it is split over the handed-over regions. `run.data` is only
   * read during the call (it may be reused after it returns: see placeRegion's retry).
   */
  place(run: Run): void {
    if (this.stopped) return;
    this.enter(() => {
      this.table.pieces(run.offset, run.length, (r, first, count, at) => {
        const data = run.data?.subarray(at, at + count * r.pageSizeBytes) ?? null;
        this.placeRegion(r, first, first + count, data, run.path, 0);
      });
      return 'ok';
    });
  }

  /**
   * Unregisters every range (the migration is complete: the guest owns its memory again), then
   * reads the events still queued: a thread of the VMM that discarded memory (MADV_DONTNEED with
   * UFFD_FEATURE_EVENT_REMOVE) waits in the kernel until its REMOVE event is read, unregistered
   * or not, and no event can be queued once the ranges are unregistered.
   */
  unregisterAll(): void {
    for (const r of this.table.regions) uffd.unregister(this.fd, r.base, r.sizeBytes);
    const events: uffd.UffdEvent[] = [];
    uffd.drainEvents(this.fd, this.eventBuf, events);
    for (const e of events) if (e.kind === 'fork') sys.close(e.ufd);
  }

  // --- events ---

  /**
   * Runs `fn` as the outermost step of a turn: zero placements that faults asked for while
   * events were handled run once, at the end, never nested inside another placement.
   */
  private enter<T>(fn: () => T): T {
    this.depth++;
    try {
      return fn();
    } finally {
      if (--this.depth === 0) this.flushZeroFaults();
    }
  }

  /** Reads every queued event and acts on it; 'gone' when the address space went away. */
  private pump(): 'ok' | 'gone' {
    // A nested call (a placement's EAGAIN) must not reuse the array an outer one is walking.
    const events = this.depth > 1 ? [] : this.events;
    events.length = 0;
    const status = uffd.drainEvents(this.fd, this.eventBuf, events);
    this.pumped = events.length;
    const now = performance.now();
    let discarded = false;
    for (const e of events) {
      if (this.stopped) break;
      switch (e.kind) {
        case 'pagefault':
          this.onFault(e, now);
          break;
        case 'remove':
        case 'unmap':
          this.discard(e.start, e.end);
          discarded = true;
          break;
        case 'remap':
          this.hooks.fail(
            'REGION_UNMAPPED',
            `the VMM moved guest memory (mremap of ${e.len} bytes from 0x${e.from.toString(16)}); handed-over regions must stay put`,
          );
          break;
        case 'fork':
          // Only with UFFD_FEATURE_EVENT_FORK: the child's uffd is not ours to serve.
          sys.close(e.ufd);
          break;
        case 'unknown':
          this.log.warn('unknown userfaultfd event', { event: e.event });
          break;
      }
    }
    if (discarded) this.hooks.settled();
    return status;
  }

  private onFault(e: Extract<uffd.UffdEvent, { kind: 'pagefault' }>, now: number): void {
    this.metrics.fault();
    const r = this.table.at(e.address);
    if (!r) {
      this.hooks.fail(
        'FAULT_OUTSIDE_REGIONS',
        `a fault at 0x${e.address.toString(16)} lies outside every handed-over region`,
      );
      return;
    }
    if (e.wp || e.minor) {
      this.hooks.fail(
        'FAULT_UNRESOLVABLE',
        `a ${e.wp ? 'write-protect' : 'minor'} fault at 0x${e.address.toString(16)} (region ${r.name}); yabusame resolves missing-page faults only`,
      );
      return;
    }
    const page = r.pageAt(e.address);
    const state = this.map.request(r, page);
    if (state === PageState.MISSING) this.hooks.missing(r, page, now);
    else if (state === PageState.REQUESTED) this.hooks.inFlight(r, page, now);
    else this.settledFault(r, page, now);
  }

  /** A fault on a settled page (see the top of this file): zeros, or a wake; never a loop. */
  private settledFault(r: GuestRegion, page: number, now: number): void {
    const state = this.map.state(r, page);
    if (state !== PageState.DISCARDED && state !== PageState.ZERO_UNPLACED) {
      if (now - this.spuriousSince > SPURIOUS_WINDOW_MS) {
        this.spurious = new Map();
        this.spuriousSince = now;
      }
      const addr = r.address(page);
      const n = (this.spurious.get(addr) ?? 0) + 1;
      this.spurious.set(addr, n);
      if (n > MAX_SPURIOUS_FAULTS) {
        this.hooks.fail(
          'FAULT_UNRESOLVABLE',
          `page 0x${addr.toString(16)} (region ${r.name}) faulted ${n} times within ${SPURIOUS_WINDOW_MS} ms although it is present`,
        );
        return;
      }
    }
    this.zeroFaults.push({ r, page });
  }

  private flushZeroFaults(): void {
    while (this.zeroFaults.length > 0 && !this.stopped) {
      const { r, page } = this.zeroFaults.shift()!;
      this.depth++;
      try {
        const placed = this.placeZerosAt(r, page);
        // Present already (EEXIST): the fault was queued before its page was placed.
        if (placed === 'exists') uffd.wake(this.fd, r.address(page), r.pageSizeBytes);
      } finally {
        this.depth--;
      }
    }
  }

  /**
   * Zeros on one settled page, whatever its state says (a discarded page touched again, or a
   * page the VMM zapped without an event); its state and counts stay as they are.
   */
  private placeZerosAt(r: GuestRegion, page: number): 'placed' | 'exists' | 'failed' {
    for (let attempt = 0; ; attempt++) {
      const res = this.zeros(r, page, 1);
      if (res.kind === 'placed') return 'placed';
      if (res.kind === 'exists') return 'exists';
      if (res.kind === 'retry' && attempt < MAX_IMMEDIATE_RETRIES) {
        if (this.pump() === 'gone') return this.failPlacement(r, page, 1, null, { kind: 'gone' });
        continue;
      }
      if (res.kind === 'retry') {
        this.later(() => this.zeroFaults.push({ r, page }), attempt);
        return 'failed';
      }
      return this.failPlacement(r, page, 1, null, res);
    }
  }

  private discard(start: number, end: number): void {
    for (let addr = start; addr < end;) {
      const r = this.table.at(addr);
      if (!r) {
        // Memory we were not handed (or a gap between regions): nothing to forget there.
        const next = this.table.regions
          .map((x) => x.base)
          .filter((b) => b > addr)
          .reduce((a, b) => Math.min(a, b), Infinity);
        if (next >= end) return;
        addr = next;
        continue;
      }
      const first = r.pageAt(addr);
      const last = Math.min(
        r.pages,
        Math.ceil((Math.min(end, r.base + r.sizeBytes) - r.base) / r.pageSizeBytes),
      );
      this.map.discard(r, first, last - first);
      addr = r.base + last * r.pageSizeBytes;
    }
  }

  // --- placement ---

  /**
   * Places pages [from, end) of `r` (`data` holds exactly those pages, or null for zeros),
   * skipping settled pages, one ioctl per contiguous run within a VMA.
   */
  private placeRegion(
    r: GuestRegion,
    from: number,
    end: number,
    data: Buffer | null,
    path: PagePath,
    attempt: number,
  ): void {
    const ps = r.pageSizeBytes;
    if (!data && this.lazyZeros) {
      // Zeros nobody awaits stay unplaced (see the top); awaited ones are placed below.
      const unplaced = this.map.settleMissingAsZero(r, from, end);
      if (unplaced > 0) this.metrics.pagesPlaced(path, 'zero', unplaced);
    }
    let p = from;
    while (p < end && !this.stopped) {
      const run = this.map.unsettledRun(r, p, Math.min(end, r.segmentEnd(p)));
      if (!run) {
        p = r.segmentEnd(p);
        continue;
      }
      const [start, stop] = run;
      const src = data?.subarray((start - from) * ps, (stop - from) * ps) ?? null;
      const res = src
        ? uffd.copy(this.fd, r.address(start), src, (stop - start) * ps)
        : this.zeros(r, start, stop - start);
      switch (res.kind) {
        case 'placed': {
          const pages = Math.floor(res.bytes / ps);
          this.settle(r, start, pages, path, src !== null);
          p = start + pages;
          attempt = 0;
          break;
        }
        case 'exists':
          this.map.settle(r, start, 1, PageState.EXISTED);
          this.metrics.placeExists();
          p = start + 1;
          break;
        case 'retry':
          this.metrics.placeRetry();
          if (this.pump() === 'gone') {
            this.failPlacement(r, start, stop - start, src, { kind: 'gone' });
            return;
          }
          if (++attempt > MAX_IMMEDIATE_RETRIES) {
            // Still EAGAIN with every event read: an mm change is under way. Try again shortly,
            // with a copy of the bytes: a run's data may be a view on the bulk thread's payload
            // ring, whose space is reused as soon as this call returns.
            const rest = data ? Buffer.from(data.subarray((start - from) * ps)) : null;
            this.later(() => this.placeRegion(r, start, end, rest, path, attempt), attempt);
            this.hooks.settled();
            return;
          }
          p = start; // the events may have discarded some of these pages
          break;
        case 'unmapped':
          if (stop - start > 1 && this.learnSegments(r, start, stop, 'REGION_UNMAPPED')) {
            p = start; // a VMA boundary appeared since the handoff: split there
            break;
          }
          this.failPlacement(r, start, stop - start, src, res);
          return;
        default:
          this.failPlacement(r, start, stop - start, src, res);
          return;
      }
    }
    this.hooks.settled();
  }

  /** Zeros on pages [first, first + count) of `r`: one ioctl (zeropage, or a copy of zeros). */
  private zeros(r: GuestRegion, first: number, count: number): uffd.PlaceResult {
    const len = count * r.pageSizeBytes;
    if (r.zeropage) return uffd.zeropage(this.fd, r.address(first), len);
    // No UFFDIO_ZEROPAGE (hugetlbfs): copy from the zero mapping, at most its size at a time.
    const max = Math.floor(uffd.ZERO_SOURCE_BYTES / r.pageSizeBytes) * r.pageSizeBytes;
    return uffd.copyZeros(this.fd, r.address(first), Math.min(len, max));
  }

  private settle(
    r: GuestRegion,
    first: number,
    pages: number,
    path: PagePath,
    data: boolean,
  ): void {
    if (pages === 0) return;
    const how: PlacedState = !data
      ? PageState.ZERO
      : path === 'demand'
        ? PageState.DEMAND
        : PageState.BACKGROUND;
    this.map.settle(r, first, pages, how);
    this.metrics.pagesPlaced(path, data ? 'data' : 'zero', pages);
  }

  private later(fn: () => void, attempt: number): void {
    const delayMs = Math.min(
      RETRY_MAX_MS,
      RETRY_FIRST_MS * 2 ** Math.max(0, attempt - MAX_IMMEDIATE_RETRIES),
    );
    const timer = setTimeout(() => {
      this.retryTimers.delete(timer);
      if (!this.stopped) this.enter(fn);
    }, delayMs);
    this.retryTimers.add(timer);
  }

  /** Ends the session for a placement the kernel refused; returns 'failed'. */
  private failPlacement(
    r: GuestRegion,
    first: number,
    count: number,
    src: Buffer | null,
    res: uffd.PlaceResult,
  ): 'failed' {
    const op = src
      ? `UFFDIO_COPY from ${src.byteLength} bytes`
      : r.zeropage
        ? 'UFFDIO_ZEROPAGE'
        : 'UFFDIO_COPY of zeros';
    const what = `${op} of ${count * r.pageSizeBytes} bytes at 0x${r.address(first).toString(16)} (region ${r.name})`;
    if (res.kind === 'gone')
      this.hooks.fail('VMM_GONE', `${what}: the VMM's address space is gone (ESRCH)`);
    else if (res.kind === 'unmapped') {
      this.hooks.fail(
        'REGION_UNMAPPED',
        `${what}: the page is not mapped in the VMM any more (ENOENT)`,
      );
    } else {
      const errno = res.kind === 'failed' ? res.errno : res.kind;
      this.hooks.fail('PLACE_FAILED', `${what} failed: ${errno}`);
    }
    return 'failed';
  }

  // --- VMA boundaries ---

  /**
   * Learns the VMA boundaries of pages [from, to) of `r` with probeRange (binary search per
   * boundary). Returns true if it found a boundary inside; throws SessionError `unmappedCode`
   * for a page that is not mapped at all (at the handoff), or returns false (at run time: the
   * caller fails the session).
   */
  private learnSegments(
    r: GuestRegion,
    from: number,
    to: number,
    unmappedCode: 'HANDOFF_REGION_UNMAPPED' | 'REGION_UNMAPPED',
  ): boolean {
    const ps = r.pageSizeBytes;
    const inside = (first: number, count: number): boolean => {
      const res = this.retrying(() => uffd.probeRange(this.fd, r.address(first), count * ps));
      if (res === 'inside') return true;
      if (res === 'outside') return false;
      if (res === 'gone') throw new SessionError('VMM_GONE', "the VMM's address space is gone");
      throw new SessionError(
        'PLACE_FAILED',
        `probing region ${r.name} at 0x${r.address(first).toString(16)}: ${typeof res === 'string' ? res : res.errno}`,
      );
    };
    let found = false;
    let start = from;
    while (start < to) {
      if (inside(start, to - start)) break;
      if (!inside(start, 1)) {
        if (unmappedCode === 'REGION_UNMAPPED') return false;
        throw new SessionError(
          unmappedCode,
          `region ${r.name}: page at 0x${r.address(start).toString(16)} (${start * ps} bytes into the region) is not mapped in the VMM, or not registered with this userfaultfd`,
        );
      }
      // The longest prefix inside one VMA: [start, start + lo) is, [start, start + hi) is not.
      let lo = 1;
      let hi = to - start;
      while (hi - lo > 1) {
        const mid = (lo + hi) >>> 1;
        if (inside(start, mid)) lo = mid;
        else hi = mid;
      }
      start += lo;
      r.addSegmentStart(start);
      found = true;
    }
    return found;
  }

  /**
   * Runs a probe, reading pending events while it answers 'retry' (EAGAIN). After a REMOVE is
   * read, the kernel keeps answering EAGAIN until the thread that discarded (a balloon's) runs
   * again and finishes its madvise; and a balloon that discards run after run queues the next
   * REMOVE at once. So with nothing to read the probe sleeps 1 ms (that thread needs the CPU,
   * which spinning here would take), and it gives up after PROBE_RETRY_MS: a bound on how long
   * a VMM can hold the event loop here.
   */
  private retrying<T>(probe: () => T | 'retry'): T | 'retry' {
    const until = performance.now() + PROBE_RETRY_MS;
    for (;;) {
      const res = probe();
      if (res !== 'retry' || performance.now() > until) return res;
      this.pump();
      if (this.pumped === 0) Atomics.wait(this.nap, 0, 0, 1);
    }
  }
}
