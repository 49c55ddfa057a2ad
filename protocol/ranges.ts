/**
 * The page protocol's range rules (README.md, "Image address space"), as pure functions over a
 * region table sorted by offset (a WELCOME's, or the source's image):
 *  - a DATA or ZERO run lies inside ONE region, starts on a page boundary of it and covers whole
 *    pages (checkRun);
 *  - a REQUEST or HAVE entry may cross from one region into the next: it is split at region
 *    boundaries, and every piece must start on a page boundary of its region and cover whole
 *    pages of it; a byte outside every region is an error (splitRange). Both the source's demand
 *    server and its HAVE handling use this one rule.
 */
import { ProtocolError } from './errors.js';

/** What the rules need of a region (RegionInfo and the source's image regions both fit). */
export interface SizedRegion {
  readonly offset: number;
  readonly sizeBytes: number;
  readonly pageSizeBytes: number;
  readonly name: string;
}

/** Index of the region holding image offset `offset` in `regions` (sorted by offset), or -1. */
export function regionIndexAt(regions: readonly SizedRegion[], offset: number): number {
  let lo = 0;
  let hi = regions.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const r = regions[mid]!;
    if (offset < r.offset) hi = mid - 1;
    else if (offset >= r.offset + r.sizeBytes) lo = mid + 1;
    else return mid;
  }
  return -1;
}

/**
 * Checks a DATA/ZERO run: inside one region, page-aligned, whole pages. Returns the region's
 * index; throws ProtocolError OUT_OF_RANGE (outside, or across a region's end) or
 * FRAME_BAD_VALUE (misaligned).
 */
export function checkRun(regions: readonly SizedRegion[], offset: number, length: number): number {
  const i = regionIndexAt(regions, offset);
  const r = regions[i];
  if (!r || offset + length > r.offset + r.sizeBytes) {
    throw new ProtocolError(
      'OUT_OF_RANGE',
      `pages at ${offset}+${length} are not inside one region of the image`,
    );
  }
  if ((offset - r.offset) % r.pageSizeBytes !== 0 || length % r.pageSizeBytes !== 0) {
    throw new ProtocolError(
      'FRAME_BAD_VALUE',
      `run at ${offset}+${length} is not whole ${r.pageSizeBytes}-byte pages of region ${r.name}`,
    );
  }
  return i;
}

/** One region's part of a range. */
export interface RangePiece {
  region: number;
  /** Image offset of the piece (page-aligned in its region). */
  offset: number;
  /** Bytes, whole pages of the region. */
  length: number;
}

/**
 * Splits `[offset, offset + length)` at region boundaries (the REQUEST/HAVE rule above) and
 * calls `piece` for each part in order. Throws ProtocolError OUT_OF_RANGE for a byte outside
 * every region or a piece that is not whole pages of its region.
 */
export function splitRange(
  regions: readonly SizedRegion[],
  offset: number,
  length: number,
  piece: (p: RangePiece) => void,
): void {
  const end = offset + length;
  let pos = offset;
  let i = regionIndexAt(regions, pos);
  while (pos < end) {
    const r = regions[i];
    if (!r || pos < r.offset || pos >= r.offset + r.sizeBytes) {
      throw new ProtocolError(
        'OUT_OF_RANGE',
        `byte ${pos} of [${offset}, ${end}) is outside every region of the image`,
      );
    }
    const stop = Math.min(end, r.offset + r.sizeBytes);
    if ((pos - r.offset) % r.pageSizeBytes !== 0 || (stop - r.offset) % r.pageSizeBytes !== 0) {
      throw new ProtocolError(
        'OUT_OF_RANGE',
        `[${offset}, ${end}) is not whole ${r.pageSizeBytes}-byte pages of region ${r.name}`,
      );
    }
    piece({ region: i, offset: pos, length: stop - pos });
    pos = stop;
    i++;
  }
}
