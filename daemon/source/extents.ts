/**
 * The data extents of a file range, found once with lseek(SEEK_DATA / SEEK_HOLE) (lseek(2)).
 * Everything outside the extents is a hole: it reads as zeros and is never read (sent as a ZERO
 * run instead), which saves the read and, for a shared mapping of the file, allocating the page.
 */
import { ERRNO } from '../linux/errors.js';
import { SEEK_DATA, SEEK_HOLE } from '../linux/abi.js';
import { tryLseek } from '../linux/sys.js';
import { SourceError } from './errors.js';

export interface DataExtents {
  /** Sorted, disjoint [start, end) pairs of file offsets, flattened: start0, end0, start1, ... */
  readonly bounds: Float64Array;
  /** True when [start, end) contains no data byte. */
  isHole(start: number, end: number): boolean;
}

/** Scans [start, end) of `fd`. A filesystem without SEEK_DATA support reports it all as data. */
export function scanExtents(fd: number, start: number, end: number): DataExtents {
  const out: number[] = [];
  let pos = start;
  while (pos < end) {
    const data = tryLseek(fd, pos, SEEK_DATA);
    if (data === -ERRNO.ENXIO) break; // no data at or after pos
    if (data === -ERRNO.EINVAL || data === -ERRNO.EOPNOTSUPP) {
      out.length = 0;
      out.push(start, end);
      break;
    }
    if (data < 0) throw new SourceError('IMAGE_IO', `lseek(SEEK_DATA) failed: errno ${-data}`);
    if (data >= end) break;
    let hole = tryLseek(fd, data, SEEK_HOLE);
    if (hole < 0) hole = end; // cannot happen for a regular file: EOF is a hole
    out.push(data, Math.min(hole, end));
    pos = hole;
  }
  return makeExtents(Float64Array.from(out));
}

export function makeExtents(bounds: Float64Array): DataExtents {
  return {
    bounds,
    isHole(start: number, end: number): boolean {
      // First extent whose end is > start; the range is a hole unless that extent begins < end.
      let lo = 0;
      let hi = bounds.length / 2;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (bounds[2 * mid + 1]! <= start) lo = mid + 1;
        else hi = mid;
      }
      return lo === bounds.length / 2 || bounds[2 * lo]! >= end;
    },
  };
}
