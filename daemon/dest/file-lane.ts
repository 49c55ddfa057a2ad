/**
 * A session's background stream when its pages come from a memory file on this host (a
 * Firecracker snapshot, local-source.ts): the bulk thread's counterpart of a background
 * connection. It reads the file with pread straight into the payload ring and sends the main
 * thread the same verified runs a connection would, under the same credit: the main thread
 * places them from the daemon-wide queue, between faults, and grants back what it placed.
 *
 * Order, as `yabusame source` streams an image:
 *  1. the pages of `first` (a working set recorded on an earlier restore), in that order;
 *  2. then every other page, in file order from a cursor that follows the demand reads (after
 *     pages [P, P + n) were read on demand, the stream continues from P + n), wrapping once.
 * The working set goes at start(), before the window opens (backgroundDelayMs): it stands for
 * the demand to come; the sweep waits for openWindow(), as a connection waits for its first
 * CREDIT. A page read on demand is never streamed again. Zeros are not read where the file has holes
 * (lseek SEEK_DATA/SEEK_HOLE, once) and are sent as zero runs; pages read and found all zero are
 * zero runs too (placed with UFFDIO_ZEROPAGE: no memory), and give their ring space back.
 *
 * While any fault in the daemon awaits its page, reading pauses (up to FAULT_PRIORITY_MS at a
 * time), as background connections stop reading: the CPU goes to the fault first.
 */
import * as sys from '../linux/sys.js';
import { HeaderSize, type PageRange, type RegionInfo } from '../../protocol/wire.js';
import { regionIndexAt } from '../../protocol/ranges.js';
import { scanExtents } from '../source/extents.js';
import type { BulkFileInit, FromBulk } from './bulk.js';
import type { PayloadRing } from './payload-ring.js';

/** Longest the stream pauses while faults await their pages, ms (as for connections). */
const FAULT_PRIORITY_MS = 2;
/** Largest data run read at once, bytes (at least one page). */
const READ_BYTES = 256 * 1024;
/** Largest zero run sent at once, bytes (at least one page; the main thread slices it). */
const ZERO_RUN_BYTES = 64 * 1024 * 1024;
/** Runs in flight per lane at most (zero runs cost little credit; this bounds the queue). */
const MAX_RUNS_IN_FLIGHT = 256;
/** Bytes read per turn of the thread's event loop, so connections and other lanes get turns. */
const TURN_BYTES = 2 * 1024 * 1024;

export interface FileLaneDeps {
  ring: PayloadRing;
  post(m: FromBulk): void;
  /** [0]: faults awaited daemon-wide. */
  faults: Int32Array;
}

interface Pos {
  region: number;
  page: number;
}

/** Pages [pos, pos + count) of one region, all in a hole or none; `list`: from `first`. */
interface NextRun {
  pos: Pos;
  count: number;
  hole: boolean;
  /** Entries of `first` it takes (0: from the sweep). */
  listEntries: number;
}

export class FileLane {
  private readonly regions: RegionInfo[];
  /** One byte per page, by region: sent (streamed, or read on demand). */
  private readonly sent: Uint8Array[];
  private unsent: number;
  /** Data extents of the file: [start, end) pairs, sorted. */
  private readonly data: Float64Array;
  /** The next entry of `first` to stream. */
  private firstAt = 0;
  /** Where the sweep looks for the next unsent page. */
  private cursor: Pos = { region: 0, page: 0 };
  private windowOpen = false;
  private started = false;
  private closed = false;
  private doneSent = false;
  private inFlightBytes = 0;
  private runsInFlight = 0;
  private scheduled = false;
  /** A zero run being built (sent before the lane yields). */
  private zero: { region: number; page: number; count: number } | null = null;
  private readonly zeroPage = new Map<number, Buffer>();

  constructor(
    private readonly key: number,
    private readonly init: BulkFileInit,
    private readonly deps: FileLaneDeps,
  ) {
    this.regions = init.regions;
    this.sent = init.regions.map((r) => new Uint8Array(r.sizeBytes / r.pageSizeBytes));
    this.unsent = this.sent.reduce((n, s) => n + s.length, 0);
    const end = init.regions.reduce((n, r) => Math.max(n, r.offset + r.sizeBytes), 0);
    this.data = scanExtents(init.fd, 0, end).bounds;
  }

  start(): void {
    this.started = true;
    this.schedule();
  }

  openWindow(): void {
    this.windowOpen = true;
    this.schedule();
  }

  close(): void {
    this.closed = true;
  }

  /** The main thread placed `bytes` of this lane's runs. */
  credit(bytes: number): void {
    this.inFlightBytes -= bytes;
    this.runsInFlight--;
    this.schedule();
  }

  /** Ring space may have been freed (any lane's run was placed): try again if waiting. */
  retry(): void {
    if (this.waitingForRing) this.schedule();
  }

  /** Pages the main thread read on demand: sent already; the stream continues after them. */
  demanded(ranges: readonly PageRange[]): void {
    let last: Pos | null = null;
    for (const r of ranges) {
      const p = this.markRange(r);
      if (p) last = p;
    }
    if (last) this.cursor = this.next(last);
    if (this.unsent === 0) this.schedule();
  }

  /** A resync: every page not in `ranges` (what the session holds) is streamed again. */
  have(ranges: readonly PageRange[]): void {
    for (const s of this.sent) s.fill(0);
    this.unsent = this.sent.reduce((n, s) => n + s.length, 0);
    for (const r of ranges) this.markRange(r);
    this.firstAt = this.init.first?.length ?? 0;
    this.cursor = { region: 0, page: 0 };
    this.doneSent = false;
    this.schedule();
  }

  private waitingForRing = false;

  private schedule(): void {
    if (this.scheduled || this.closed || !this.started) return;
    if (!this.windowOpen && !this.prefetching()) return;
    this.scheduled = true;
    const awaited = Atomics.load(this.deps.faults, 0);
    if (awaited > 0) {
      // Faults first: wait until none is awaited, or FAULT_PRIORITY_MS.
      const w = Atomics.waitAsync(this.deps.faults, 0, awaited, FAULT_PRIORITY_MS);
      const go = (): void => {
        this.scheduled = false;
        this.produce();
      };
      if (w.async) void w.value.then(go);
      else setImmediate(go);
      return;
    }
    setImmediate(() => {
      this.scheduled = false;
      this.produce();
    });
  }

  /** Reads and sends runs while the window and the ring allow, TURN_BYTES per turn. */
  private produce(): void {
    if (this.closed) return;
    this.waitingForRing = false;
    let budget = TURN_BYTES;
    try {
      while (
        budget > 0 &&
        !this.closed &&
        this.inFlightBytes < this.init.windowBytes &&
        this.runsInFlight < MAX_RUNS_IN_FLIGHT
      ) {
        const run = this.nextRun();
        if (!run) break;
        const read = this.send(run);
        if (read < 0) {
          // No ring space: the run is taken again when a placed run frees some (retry()).
          this.waitingForRing = true;
          break;
        }
        this.firstAt += run.listEntries;
        budget -= Math.max(read, 1);
      }
      this.flushZero();
    } catch (err) {
      this.closed = true;
      this.deps.post({
        t: 'fail',
        key: this.key,
        code: 'IMAGE_IO',
        message: `reading ${this.init.path}: ${(err as Error).message}`,
      });
      return;
    }
    if (this.unsent === 0 && !this.doneSent) {
      this.doneSent = true;
      this.deps.post({ t: 'sourceDone', key: this.key });
      return;
    }
    if (budget <= 0 && !this.waitingForRing) this.schedule();
  }

  /** Entries of the working set are left to stream. */
  private prefetching(): boolean {
    return this.firstAt < (this.init.first?.length ?? 0);
  }

  /** The next run of unsent pages to stream, or null. Changes nothing but skipped entries. */
  private nextRun(): NextRun | null {
    const first = this.init.first;
    while (first && this.firstAt < first.length) {
      const pos = this.at(first[this.firstAt]!);
      if (!pos || this.sent[pos.region]![pos.page]) {
        this.firstAt++;
        continue;
      }
      // Consecutive entries of the list that are consecutive pages go as one run.
      const r = this.regions[pos.region]!;
      const hole = this.inHole(pos);
      const max = hole ? ZERO_RUN_BYTES : this.readBytes(r);
      let count = 1;
      while (
        this.firstAt + count < first.length &&
        (count + 1) * r.pageSizeBytes <= max &&
        first[this.firstAt + count] === this.offsetOf(pos) + count * r.pageSizeBytes &&
        pos.page + count < this.sent[pos.region]!.length &&
        !this.sent[pos.region]![pos.page + count] &&
        this.inHole({ region: pos.region, page: pos.page + count }) === hole
      ) {
        count++;
      }
      return { pos, count, hole, listEntries: count };
    }
    if (this.unsent === 0 || !this.windowOpen) return null;
    const pos = this.findUnsent(this.cursor);
    if (!pos) return null;
    const r = this.regions[pos.region]!;
    const sent = this.sent[pos.region]!;
    const hole = this.inHole(pos);
    const max = hole ? ZERO_RUN_BYTES : this.readBytes(r);
    // Stop at the end of the data extent (or hole) the run starts in.
    const boundary = this.boundaryAfter(this.offsetOf(pos));
    let count = 1;
    while (
      pos.page + count < sent.length &&
      (count + 1) * r.pageSizeBytes <= max &&
      !sent[pos.page + count] &&
      this.offsetOf(pos) + (count + 1) * r.pageSizeBytes <= boundary
    ) {
      count++;
    }
    // The sweep goes on from here: the pages of this run are marked sent when they go.
    this.cursor = pos;
    return { pos, count, hole, listEntries: 0 };
  }

  /**
   * Sends a run: zeros for a hole, else the pages read into the ring (all-zero pages become zero
   * runs). Returns the bytes read, or -1 when the ring has no room now (nothing was sent).
   */
  private send(run: NextRun): number {
    const { pos, count } = run;
    const r = this.regions[pos.region]!;
    const ps = r.pageSizeBytes;
    if (run.hole) {
      for (let i = 0; i < count; i++) this.addZero({ region: pos.region, page: pos.page + i });
      return 0;
    }
    const n = count * ps;
    const ring = this.deps.ring;
    const at = ring.reserve(n);
    if (at < 0) return -1;
    const buf = ring.view(at, n);
    const fileOffset = this.offsetOf(pos);
    for (let done = 0; done < n;) {
      const got = sys.pread(this.init.fd, buf.subarray(done), n - done, fileOffset + done);
      if (got === 0) throw new Error(`the file ends at ${fileOffset + done}: truncated?`);
      done += got;
    }
    const zero = this.zeroOf(ps);
    let i = 0;
    while (i < count) {
      if (zero.compare(buf, i * ps, (i + 1) * ps) === 0) {
        this.addZero({ region: pos.region, page: pos.page + i });
        i++;
        continue;
      }
      let j = i + 1;
      while (j < count && zero.compare(buf, j * ps, (j + 1) * ps) !== 0) j++;
      this.flushZero();
      // Taken up to the end of these pages; trailing zero pages give their space back.
      ring.commit(at + j * ps);
      for (let k = i; k < j; k++) this.markSent(pos.region, pos.page + k);
      this.postRun(fileOffset + i * ps, (j - i) * ps, at + i * ps, ps);
      i = j;
    }
    return n;
  }

  private postRun(offset: number, length: number, ringAt: number, pageSizeBytes: number): void {
    const credit = ringAt >= 0 ? length : HeaderSize.ZERO;
    this.inFlightBytes += credit;
    this.runsInFlight++;
    this.deps.post({
      t: 'run',
      key: this.key,
      serial: 1,
      offset,
      length,
      bytes: 0,
      credit,
      ring: ringAt,
      buf: null,
      at: 0,
      pageSizeBytes,
    });
  }

  private addZero(pos: Pos): void {
    this.markSent(pos.region, pos.page);
    const z = this.zero;
    const r = this.regions[pos.region]!;
    if (
      z &&
      z.region === pos.region &&
      z.page + z.count === pos.page &&
      (z.count + 1) * r.pageSizeBytes <= ZERO_RUN_BYTES
    ) {
      z.count++;
      return;
    }
    this.flushZero();
    this.zero = { region: pos.region, page: pos.page, count: 1 };
  }

  private flushZero(): void {
    const z = this.zero;
    if (!z) return;
    this.zero = null;
    const r = this.regions[z.region]!;
    this.postRun(
      r.offset + z.page * r.pageSizeBytes,
      z.count * r.pageSizeBytes,
      -1,
      r.pageSizeBytes,
    );
  }

  /** Marks the pages of image range `range` sent; returns its last page (null if outside). */
  private markRange(range: PageRange): Pos | null {
    let last: Pos | null = null;
    const end = range.offset + range.length;
    for (let off = range.offset; off < end;) {
      const i = regionIndexAt(this.regions, off);
      if (i < 0) break; // the main thread checked the range against the same regions
      const r = this.regions[i]!;
      const stop = Math.min(end, r.offset + r.sizeBytes);
      const first = Math.floor((off - r.offset) / r.pageSizeBytes);
      const past = Math.ceil((stop - r.offset) / r.pageSizeBytes);
      for (let page = first; page < past; page++) this.markSent(i, page);
      last = { region: i, page: past - 1 };
      off = stop;
    }
    return last;
  }

  private markSent(region: number, page: number): void {
    const s = this.sent[region]!;
    if (s[page]) return;
    s[page] = 1;
    this.unsent--;
  }

  // --- positions ---

  private offsetOf(pos: Pos): number {
    const r = this.regions[pos.region]!;
    return r.offset + pos.page * r.pageSizeBytes;
  }

  /** The page holding image offset `offset`, or null outside every region. */
  private at(offset: number): Pos | null {
    const i = regionIndexAt(this.regions, offset);
    if (i < 0) return null;
    const r = this.regions[i]!;
    return { region: i, page: Math.floor((offset - r.offset) / r.pageSizeBytes) };
  }

  /** The page after `pos`, wrapping from the last page of the last region to the first. */
  private next(pos: Pos): Pos {
    if (pos.page + 1 < this.sent[pos.region]!.length)
      return { region: pos.region, page: pos.page + 1 };
    return { region: (pos.region + 1) % this.regions.length, page: 0 };
  }

  /** The first unsent page at or after `from`, wrapping once; null when every page is sent. */
  private findUnsent(from: Pos): Pos | null {
    for (let k = 0; k <= this.regions.length; k++) {
      const region = (from.region + k) % this.regions.length;
      const s = this.sent[region]!;
      const start = k === 0 ? from.page : 0;
      const end = k === this.regions.length ? from.page : s.length;
      const i = s.indexOf(0, start);
      if (i >= 0 && i < end) return { region, page: i };
    }
    return null;
  }

  /** Largest data run of region `r`: READ_BYTES, at most half the ring, at least a page. */
  private readBytes(r: RegionInfo): number {
    return Math.max(r.pageSizeBytes, Math.min(READ_BYTES, this.deps.ring.capacity / 2));
  }

  private zeroOf(size: number): Buffer {
    let z = this.zeroPage.get(size);
    if (!z) this.zeroPage.set(size, (z = Buffer.alloc(size)));
    return z;
  }

  // --- holes ---

  /** Index of the first data extent whose end is after `offset` (may start after it). */
  private extentAfter(offset: number): number {
    const b = this.data;
    let lo = 0;
    let hi = b.length / 2;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (b[2 * mid + 1]! <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** The page lies wholly in a hole of the file (it reads as zeros: not read). */
  private inHole(pos: Pos): boolean {
    const r = this.regions[pos.region]!;
    const start = this.offsetOf(pos);
    const i = this.extentAfter(start);
    return i === this.data.length / 2 || this.data[2 * i]! >= start + r.pageSizeBytes;
  }

  /** Where the data extent or hole that holds `offset` ends. */
  private boundaryAfter(offset: number): number {
    const i = this.extentAfter(offset);
    if (i === this.data.length / 2) return Infinity;
    const start = this.data[2 * i]!;
    return start > offset ? start : this.data[2 * i + 1]!;
  }
}
