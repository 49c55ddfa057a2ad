/**
 * Which pages of a VM are present: one byte of state per page, per region (no per-page objects;
 * 1 byte per 4 KiB page is 0.024% of guest RAM). Regions come from the handoff: a host virtual
 * range in the VMM and where it sits in the image address space.
 */
import type { HandoffRegion } from '../../protocol/handoff.js';

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
  ) {
    this.name = r.name ?? `region${index}`;
    this.base = r.base;
    this.sizeBytes = r.sizeBytes;
    this.offset = r.offset;
    this.pageSizeBytes = r.pageSizeBytes;
    this.pages = r.sizeBytes / r.pageSizeBytes;
    this.state = new Uint8Array(this.pages);
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

export class PageMap {
  readonly regions: RegionMap[];
  private readonly byBase: RegionMap[];
  private readonly byOffset: RegionMap[];
  readonly totalPages: number;
  /** Pages PRESENT or DISCARDED: nothing more to fetch for them. */
  settledPages = 0;

  constructor(regions: readonly HandoffRegion[]) {
    this.regions = regions.map((r, i) => new RegionMap(r, i));
    this.byBase = [...this.regions].sort((a, b) => a.base - b.base);
    this.byOffset = [...this.regions].sort((a, b) => a.offset - b.offset);
    this.totalPages = this.regions.reduce((n, r) => n + r.pages, 0);
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
    const settledTo = to === PageState.PRESENT || to === PageState.DISCARDED;
    for (let p = first; p < first + count; p++) {
      const from = r.state[p]!;
      const settledFrom = from === PageState.PRESENT || from === PageState.DISCARDED;
      if (settledFrom !== settledTo) this.settledPages += settledTo ? 1 : -1;
      r.state[p] = to;
    }
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
