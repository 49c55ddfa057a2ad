/**
 * Which pages of a VM are present: one byte of state per page, per region (no per-page objects;
 * 1 byte per 4 KiB page is 0.024% of guest RAM). Regions come from the handoff: a host virtual
 * range in the VMM and where it sits in the image address space.
 *
 * The bytes live in SharedArrayBuffers because two threads write them: the main thread (faults,
 * demand pages, discards) and the bulk thread (background pages). Every transition is a
 * compare-and-swap, and the settled count is one shared counter, so neither thread can undo the
 * other's step. The bulk thread only ever moves an unsettled page to PRESENT (markPlaced).
 *
 * The placement gate closes the one window the states cannot: the kernel refuses copies into a
 * range the guest discarded (EAGAIN) only while its REMOVE event is queued. Once the main thread
 * has read the event, a copy succeeds again, and the range is DISCARDED in the map only when the
 * main thread has handled the event; a bulk copy in between would put source data where the
 * guest must read zeros. So the main thread holds the gate from reading events until it has
 * marked them, and the bulk thread holds it around each placement (check, ioctl, mark): a
 * placement then either ends before the read (and the kernel zaps it or refuses it) or sees the
 * DISCARDED marks. The bulk thread holds it for one run, tens of microseconds.
 */
import type { HandoffRegion } from '../../protocol/handoff.js';
import { ProtocolError } from '../../protocol/errors.js';
import { FrameType, type FrameOf, type PageRange, type RegionInfo } from '../../protocol/wire.js';

export const PageState = {
  /** Not placed, nobody asked yet. */
  MISSING: 0,
  /** A fault asked for it on the demand channel; the answer is awaited. */
  REQUESTED: 1,
  /** Placed (UFFDIO_COPY or UFFDIO_ZEROPAGE succeeded, or the kernel said it exists). */
  PRESENT: 2,
  /** The guest discarded it (UFFD_EVENT_REMOVE): source data must never land here again. */
  DISCARDED: 3,
} as const;
export type PageStateValue = (typeof PageState)[keyof typeof PageState];

export class RegionMap {
  readonly name: string;
  /** Host virtual address in the VMM, bytes. */
  readonly base: number;
  readonly sizeBytes: number;
  /** Start in the image address space, bytes. */
  readonly offset: number;
  readonly pageSizeBytes: number;
  readonly pages: number;
  readonly state: Uint8Array;

  constructor(
    r: HandoffRegion,
    readonly index: number,
    shared?: SharedArrayBuffer,
  ) {
    this.name = r.name ?? `region${index}`;
    this.base = r.base;
    this.sizeBytes = r.sizeBytes;
    this.offset = r.offset;
    this.pageSizeBytes = r.pageSizeBytes;
    this.pages = r.sizeBytes / r.pageSizeBytes;
    this.state = new Uint8Array(shared ?? new SharedArrayBuffer(this.pages));
    if (this.state.length !== this.pages) throw new RangeError(`region ${this.name}: state size`);
  }

  /** Host address of page `page`. */
  address(page: number): number {
    return this.base + page * this.pageSizeBytes;
  }

  /** Image offset of page `page`. */
  imageOffset(page: number): number {
    return this.offset + page * this.pageSizeBytes;
  }
}

/** Who holds the placement gate. */
export const Gate = { FREE: 0, EVENTS: 1, BULK: 2 } as const;
export type GateHolder = typeof Gate.EVENTS | typeof Gate.BULK;

/** What another thread needs to open the same page map (structured-cloneable). */
export interface SharedPageMap {
  regions: readonly HandoffRegion[];
  states: readonly SharedArrayBuffer[];
  /** Int32 words: [SETTLED] the settled count, [GATE] the placement gate. */
  words: SharedArrayBuffer;
}

const SETTLED = 0;
const GATE = 1;
/** Compare-and-swap attempts before sleeping on a held gate (a holder keeps it for µs). */
const GATE_SPINS = 100;

const isSettled = (s: number): boolean => s >= PageState.PRESENT;

export class PageMap {
  readonly regions: RegionMap[];
  private readonly byBase: RegionMap[];
  private readonly byOffset: RegionMap[];
  readonly totalPages: number;
  /** [SETTLED]: pages PRESENT or DISCARDED (nothing more to fetch); [GATE]: its holder. */
  private readonly words: Int32Array;

  constructor(regions: readonly HandoffRegion[], shared?: SharedPageMap) {
    this.regions = regions.map((r, i) => new RegionMap(r, i, shared?.states[i]));
    this.byBase = [...this.regions].sort((a, b) => a.base - b.base);
    this.byOffset = [...this.regions].sort((a, b) => a.offset - b.offset);
    this.totalPages = this.regions.reduce((n, r) => n + r.pages, 0);
    this.words = new Int32Array(shared?.words ?? new SharedArrayBuffer(8));
  }

  /** The same map, for another thread. */
  share(): SharedPageMap {
    return {
      regions: this.regions.map((r) => ({
        name: r.name,
        base: r.base,
        sizeBytes: r.sizeBytes,
        offset: r.offset,
        pageSizeBytes: r.pageSizeBytes,
      })),
      states: this.regions.map((r) => r.state.buffer as SharedArrayBuffer),
      words: this.words.buffer as SharedArrayBuffer,
    };
  }

  /** Takes the placement gate (see the top of this file), waiting while the other thread has it. */
  enterGate(who: GateHolder): void {
    const w = this.words;
    for (let spins = 0; ; spins++) {
      const holder = Atomics.compareExchange(w, GATE, Gate.FREE, who);
      if (holder === Gate.FREE) return;
      if (holder === who) throw new Error('placement gate: already held by this thread');
      if (spins >= GATE_SPINS) Atomics.wait(w, GATE, holder, 1);
    }
  }

  leaveGate(): void {
    Atomics.store(this.words, GATE, Gate.FREE);
    Atomics.notify(this.words, GATE);
  }

  /** Pages PRESENT or DISCARDED: nothing more to fetch for them. */
  get settledPages(): number {
    return Atomics.load(this.words, SETTLED);
  }

  get complete(): boolean {
    return this.settledPages === this.totalPages;
  }

  /** The region holding host address `addr`, or undefined. */
  regionAt(addr: number): RegionMap | undefined {
    return find(this.byBase, addr, (r) => r.base);
  }

  /** The region holding image offset `off`, or undefined. */
  regionAtOffset(off: number): RegionMap | undefined {
    return find(this.byOffset, off, (r) => r.offset);
  }

  /** Sets pages [first, first+count) of `r` to `to`, keeping settledPages right. */
  mark(r: RegionMap, first: number, count: number, to: PageStateValue): void {
    const state = r.state;
    let delta = 0;
    for (let p = first; p < first + count; p++) {
      let from = Atomics.load(state, p);
      for (;;) {
        const seen = Atomics.compareExchange(state, p, from, to);
        if (seen === from) break;
        from = seen;
      }
      if (isSettled(from) !== isSettled(to)) delta += isSettled(to) ? 1 : -1;
    }
    if (delta !== 0) Atomics.add(this.words, SETTLED, delta);
  }

  /**
   * Marks pages [first, first+count) PRESENT where they are still unsettled (placed by this
   * thread); a page the other thread settled meanwhile (present, or discarded by the guest) keeps
   * its state. Returns how many pages it moved.
   */
  markPlaced(r: RegionMap, first: number, count: number): number {
    const state = r.state;
    let moved = 0;
    for (let p = first; p < first + count; p++) {
      let from = Atomics.load(state, p);
      while (!isSettled(from)) {
        const seen = Atomics.compareExchange(state, p, from, PageState.PRESENT);
        if (seen === from) {
          moved++;
          break;
        }
        from = seen;
      }
    }
    if (moved !== 0) Atomics.add(this.words, SETTLED, moved);
    return moved;
  }

  /** Moves page `p` from MISSING to `to` if nobody changed it first; returns the state it saw. */
  claim(r: RegionMap, p: number, to: PageStateValue): number {
    const seen = Atomics.compareExchange(r.state, p, PageState.MISSING, to);
    if (seen === PageState.MISSING && isSettled(to)) Atomics.add(this.words, SETTLED, 1);
    return seen;
  }
}

function find(
  sorted: readonly RegionMap[],
  value: number,
  start: (r: RegionMap) => number,
): RegionMap | undefined {
  let lo = 0;
  let hi = sorted.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const r = sorted[mid]!;
    if (value < start(r)) hi = mid - 1;
    else if (value >= start(r) + r.sizeBytes) lo = mid + 1;
    else return r;
  }
  return undefined;
}

/** The settled pages of `map` as image ranges (what a HAVE sync tells the source). */
export function settledRanges(map: PageMap): PageRange[] {
  const ranges: PageRange[] = [];
  for (const r of map.regions) {
    let p = 0;
    while (p < r.pages) {
      while (p < r.pages && r.state[p]! < PageState.PRESENT) p++;
      if (p >= r.pages) break;
      const first = p;
      while (p < r.pages && r.state[p]! >= PageState.PRESENT) p++;
      ranges.push({ offset: r.imageOffset(first), length: (p - first) * r.pageSizeBytes });
    }
  }
  return ranges;
}

/** What a DATA or ZERO frame places: its pages, and their bytes (null for a zero run). */
export interface FrameRun {
  r: RegionMap;
  first: number;
  count: number;
  data: Buffer | null;
  length: number;
}

/** The run a DATA or ZERO frame carries (a view on its payload, no copy); see locateRun. */
export function frameRun(
  map: PageMap,
  frame: FrameOf<typeof FrameType.DATA | typeof FrameType.ZERO>,
): FrameRun {
  if (frame.type === FrameType.ZERO) {
    return { ...locateRun(map, frame.offset, frame.length), data: null, length: frame.length };
  }
  const p = frame.payload;
  const data = Buffer.from(p.buffer, p.byteOffset, p.byteLength);
  return { ...locateRun(map, frame.offset, data.byteLength), data, length: data.byteLength };
}

/** The pages of a DATA/ZERO run: its region and page span; a coded ProtocolError if it is bad. */
export function locateRun(
  map: PageMap,
  offset: number,
  length: number,
): { r: RegionMap; first: number; count: number } {
  const r = map.regionAtOffset(offset);
  if (!r || offset + length > r.offset + r.sizeBytes) {
    throw new ProtocolError(
      'OUT_OF_RANGE',
      `pages at ${offset}+${length} are outside every region`,
    );
  }
  const rel = offset - r.offset;
  if (rel % r.pageSizeBytes || length % r.pageSizeBytes) {
    throw new ProtocolError('FRAME_BAD_VALUE', `run at ${offset}+${length} is not page-aligned`);
  }
  return { r, first: rel / r.pageSizeBytes, count: length / r.pageSizeBytes };
}

/**
 * Why the source's regions cannot serve `map`, or null if they can: every handed-off region must
 * lie inside one source region with the same page size, and together they must cover the whole
 * image (the source releases its image only on a COMPLETE that counts every one of its pages).
 */
export function sourceMismatch(map: PageMap, source: readonly RegionInfo[]): string | null {
  for (const r of map.regions) {
    const s = source.find(
      (x) => r.offset >= x.offset && r.offset + r.sizeBytes <= x.offset + x.sizeBytes,
    );
    if (!s)
      return `region ${r.name} (image ${r.offset}+${r.sizeBytes}) is not inside the source image`;
    if (s.pageSizeBytes !== r.pageSizeBytes) {
      return `region ${r.name}: page size ${r.pageSizeBytes} but the source has ${s.pageSizeBytes}`;
    }
  }
  // Handoff regions never overlap (checked at the handoff), so equal page counts mean full cover.
  const sourcePages = source.reduce((n, x) => n + x.sizeBytes / x.pageSizeBytes, 0);
  if (sourcePages !== map.totalPages) {
    return `the handoff covers ${map.totalPages} pages but the source image has ${sourcePages}`;
  }
  return null;
}
