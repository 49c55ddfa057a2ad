/**
 * The guest's memory as a VMM handed it over: regions at arbitrary host addresses, each mapping
 * a range of the migration's image. Real VMMs split one image into several regions at unrelated
 * addresses, in any order (Firecracker's memory file, QEMU's RAM blocks), so a run of the image
 * is placed by splitting it over whichever regions cover it (pieces), and each region over the
 * kernel mappings (VMAs) it spans: UFFDIO_COPY and UFFDIO_ZEROPAGE refuse a range that crosses
 * a VMA boundary (ENOENT), so placement never asks for one.
 */
import type { HandoffRegion } from '../../protocol/handoff.js';
import { ProtocolError } from '../../protocol/errors.js';
import type { RegionInfo } from '../../protocol/wire.js';

export class GuestRegion {
  readonly name: string;
  /** Host virtual address in the VMM, bytes. */
  readonly base: number;
  readonly sizeBytes: number;
  /** Start in the image address space, bytes. */
  readonly offset: number;
  readonly pageSizeBytes: number;
  readonly pages: number;
  /** UFFDIO_ZEROPAGE works here (not on hugetlbfs: zeros are copied from a zero mapping). */
  zeropage = true;
  /**
   * First page of each VMA the region spans, ascending, starting with 0 (learned at the handoff
   * with uffd.probeRange, and again if a placement meets a boundary that appeared later).
   */
  segmentStarts: number[] = [0];

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
  }

  /** Host address of page `page`. */
  address(page: number): number {
    return this.base + page * this.pageSizeBytes;
  }

  /** Image offset of page `page`. */
  imageOffset(page: number): number {
    return this.offset + page * this.pageSizeBytes;
  }

  /** The page holding host address `addr` (inside the region). */
  pageAt(addr: number): number {
    return Math.floor((addr - this.base) / this.pageSizeBytes);
  }

  /** End (exclusive) of the VMA segment that holds page `page`. */
  segmentEnd(page: number): number {
    const s = this.segmentStarts;
    for (let i = 1; i < s.length; i++) if (s[i]! > page) return s[i]!;
    return this.pages;
  }

  /** Records a VMA boundary before page `page` (found when a placement met ENOENT). */
  addSegmentStart(page: number): void {
    if (page <= 0 || page >= this.pages || this.segmentStarts.includes(page)) return;
    this.segmentStarts.push(page);
    this.segmentStarts.sort((a, b) => a - b);
  }

  /** The handoff region this was made from (what a restarted daemon needs). */
  toHandoff(): HandoffRegion {
    return {
      name: this.name,
      base: this.base,
      sizeBytes: this.sizeBytes,
      offset: this.offset,
      pageSizeBytes: this.pageSizeBytes,
    };
  }
}

export class RegionTable {
  readonly regions: readonly GuestRegion[];
  private readonly byBase: readonly GuestRegion[];
  private readonly byOffset: readonly GuestRegion[];
  readonly totalPages: number;

  constructor(regions: readonly HandoffRegion[]) {
    this.regions = regions.map((r, i) => new GuestRegion(r, i));
    this.byBase = [...this.regions].sort((a, b) => a.base - b.base);
    this.byOffset = [...this.regions].sort((a, b) => a.offset - b.offset);
    this.totalPages = this.regions.reduce((n, r) => n + r.pages, 0);
  }

  /** The region holding host address `addr`, or undefined. */
  at(addr: number): GuestRegion | undefined {
    return find(this.byBase, addr, (r) => r.base);
  }

  /** The region holding image offset `off`, or undefined. */
  atOffset(off: number): GuestRegion | undefined {
    return find(this.byOffset, off, (r) => r.offset);
  }

  /**
   * Calls `fn` for each region's part of image bytes `[offset, offset + length)`, in image order:
   * its first page, its page count and where it starts in the range (bytes). The range must be
   * whole pages of the regions that cover it; an uncovered or misaligned byte is OUT_OF_RANGE.
   */
  pieces(
    offset: number,
    length: number,
    fn: (r: GuestRegion, first: number, count: number, at: number) => void,
  ): void {
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const r = this.atOffset(pos);
      const rel = r ? pos - r.offset : 0;
      if (!r || rel % r.pageSizeBytes !== 0) {
        throw new ProtocolError(
          'OUT_OF_RANGE',
          `image byte ${pos} of [${offset}, ${end}) is not a page of any handed-over region`,
        );
      }
      const stop = Math.min(end, r.offset + r.sizeBytes);
      const count = Math.ceil((stop - pos) / r.pageSizeBytes);
      if (pos + count * r.pageSizeBytes !== stop) {
        throw new ProtocolError('OUT_OF_RANGE', `[${offset}, ${end}) ends inside a page`);
      }
      fn(r, rel / r.pageSizeBytes, count, pos - offset);
      pos = stop;
    }
  }

  /**
   * Why the source's regions (its WELCOME) cannot serve these, or null if they can: every
   * handed-over region must lie inside one source region with the same page size, and together
   * they must cover the whole image (the source releases its image only on a COMPLETE that
   * counts every one of its pages).
   */
  sourceMismatch(source: readonly RegionInfo[]): string | null {
    for (const r of this.regions) {
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
    if (sourcePages !== this.totalPages) {
      return `the handoff covers ${this.totalPages} pages but the source image has ${sourcePages}`;
    }
    return null;
  }
}

function find(
  sorted: readonly GuestRegion[],
  value: number,
  start: (r: GuestRegion) => number,
): GuestRegion | undefined {
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
