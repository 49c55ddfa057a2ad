/**
 * Which pages of a VM are present, and how each got there: one byte per page, per region (no
 * per-page objects; a byte per 4 KiB page is 0.024% of guest RAM). One thread owns it (the
 * session's placement, on the main thread), so a transition is a plain write and the counts are
 * exact: every settled page is counted in exactly one bucket, so the buckets of `complete` add
 * up to the number of pages (protocol/README.md, `complete`).
 *
 *   MISSING ──fault or prefetch──► REQUESTED ──demand connection lost, not awaited──► MISSING
 *      └──────────────────┴──placed──► DEMAND | BACKGROUND | ZERO | EXISTED
 *   MISSING ──ZERO run──► ZERO_UNPLACED (not placed; REQUESTED pages in the run are placed: ZERO)
 *   any ──REMOVE event──► DISCARDED (stays so: a later touch gets zeros, counted as discarded)
 */
import type { PageRange } from '../../protocol/wire.js';
import type { GuestRegion, RegionTable } from './regions.js';

export const PageState = {
  /** Not placed, nobody asked yet. */
  MISSING: 0,
  /** A fault (or a fault's prefetch) asked for it on the demand channel; the answer is awaited. */
  REQUESTED: 1,
  /** Settled: data from a demand answer. */
  DEMAND: 2,
  /** Settled: data from the background stream. */
  BACKGROUND: 3,
  /** Settled: zeros (a ZERO run from either channel). */
  ZERO: 4,
  /** Settled: the kernel said it was already present (placed before a resume, or by the VMM). */
  EXISTED: 5,
  /** Settled: the guest discarded it (UFFD_EVENT_REMOVE): source data never lands here again. */
  DISCARDED: 6,
  /**
   * Settled: zeros (a ZERO run) for a page nobody asked for, left unplaced. Guest memory there
   * is still missing: a fault before completion gets zeros placed then (placement.ts), and
   * after completion the ranges are unregistered and the kernel's own zero fill answers.
   */
  ZERO_UNPLACED: 7,
} as const;
export type PageStateValue = (typeof PageState)[keyof typeof PageState];
/** The states a placement settles a page in. */
export type PlacedState =
  | typeof PageState.DEMAND
  | typeof PageState.BACKGROUND
  | typeof PageState.ZERO
  | typeof PageState.EXISTED;

export const isSettled = (s: number): boolean => s >= PageState.DEMAND;

/** Settled pages by how they were settled; they add up to the settled count. */
export interface SettledCounts {
  demand: number;
  background: number;
  zero: number;
  existed: number;
  discarded: number;
}

export class PageMap {
  /** One state byte per page, by region index. */
  private readonly states: Uint8Array[];
  /** Pages in each PageState. */
  private readonly byState = new Float64Array(8);
  readonly totalPages: number;

  constructor(readonly table: RegionTable) {
    this.states = table.regions.map((r) => new Uint8Array(r.pages));
    this.totalPages = table.totalPages;
    this.byState[PageState.MISSING] = this.totalPages;
  }

  state(r: GuestRegion, page: number): PageStateValue {
    return this.states[r.index]![page] as PageStateValue;
  }

  /** Pages nothing more needs to be fetched for. */
  get settledPages(): number {
    return this.totalPages - this.byState[PageState.MISSING]! - this.byState[PageState.REQUESTED]!;
  }

  get complete(): boolean {
    return this.settledPages === this.totalPages;
  }

  counts(): SettledCounts {
    const b = this.byState;
    return {
      demand: b[PageState.DEMAND]!,
      background: b[PageState.BACKGROUND]!,
      zero: b[PageState.ZERO]! + b[PageState.ZERO_UNPLACED]!,
      existed: b[PageState.EXISTED]!,
      discarded: b[PageState.DISCARDED]!,
    };
  }

  private set(s: Uint8Array, page: number, to: PageStateValue): void {
    this.byState[s[page]!]!--;
    this.byState[to]!++;
    s[page] = to;
  }

  /** MISSING → REQUESTED; returns the state the page had (it changes only if MISSING). */
  request(r: GuestRegion, page: number): PageStateValue {
    const s = this.states[r.index]!;
    const from = s[page] as PageStateValue;
    if (from === PageState.MISSING) this.set(s, page, PageState.REQUESTED);
    return from;
  }

  /** REQUESTED → MISSING (a prefetch lost with its demand connection); other states stay. */
  unrequest(r: GuestRegion, page: number): void {
    const s = this.states[r.index]!;
    if (s[page] === PageState.REQUESTED) this.set(s, page, PageState.MISSING);
  }

  /** Settles pages [first, first + count), all unsettled (the placer checked), as `how`. */
  settle(r: GuestRegion, first: number, count: number, how: PlacedState): void {
    const s = this.states[r.index]!;
    for (let p = first; p < first + count; p++) this.set(s, p, how);
  }

  /**
   * MISSING pages in [from, end) of `r` → ZERO_UNPLACED (a ZERO run nobody awaits: see the
   * state); REQUESTED ones are left for the placer. Returns how many were settled so.
   */
  settleMissingAsZero(r: GuestRegion, from: number, end: number): number {
    const s = this.states[r.index]!;
    let n = 0;
    for (let p = from; p < end; p++) {
      if (s[p] === PageState.MISSING) {
        s[p] = PageState.ZERO_UNPLACED;
        n++;
      }
    }
    this.byState[PageState.MISSING]! -= n;
    this.byState[PageState.ZERO_UNPLACED]! += n;
    return n;
  }

  /** Pages [first, first + count) were discarded by the guest, whatever they were. */
  discard(r: GuestRegion, first: number, count: number): void {
    const s = this.states[r.index]!;
    for (let p = first; p < first + count; p++) {
      if (s[p] !== PageState.DISCARDED) this.set(s, p, PageState.DISCARDED);
    }
  }

  /**
   * The first run of unsettled pages in [from, end) of `r`, as [start, stop), or null when every
   * page there is settled.
   */
  unsettledRun(r: GuestRegion, from: number, end: number): [number, number] | null {
    const s = this.states[r.index]!;
    let p = from;
    while (p < end && isSettled(s[p]!)) p++;
    if (p >= end) return null;
    let q = p + 1;
    while (q < end && !isSettled(s[q]!)) q++;
    return [p, q];
  }

  /** The settled pages as image ranges (what a HAVE sync tells the source). */
  settledRanges(): PageRange[] {
    const ranges: PageRange[] = [];
    for (const r of this.table.regions) {
      const s = this.states[r.index]!;
      let p = 0;
      while (p < r.pages) {
        while (p < r.pages && !isSettled(s[p]!)) p++;
        if (p >= r.pages) break;
        const first = p;
        while (p < r.pages && isSettled(s[p]!)) p++;
        ranges.push({ offset: r.imageOffset(first), length: (p - first) * r.pageSizeBytes });
      }
    }
    return ranges;
  }
}
