/**
 * A memory image: a file holding guest RAM, read-only, plus a region table mapping the image
 * address space (what the page protocol speaks) to file offsets. Pages are numbered globally:
 * region r owns page indices [firstPage, firstPage + pageCount), so one Uint8Array holds a byte of
 * state per page for the whole image (no per-page JS objects).
 */
import { fstatSync } from 'node:fs';
import { isAbsolute, resolve, sep } from 'node:path';
import {
  O_DIRECTORY,
  O_NONBLOCK,
  O_PATH,
  O_RDONLY,
  RESOLVE_BENEATH,
  RESOLVE_NO_MAGICLINKS,
} from '../linux/abi.js';
import { ERRNO, errnoName } from '../linux/errors.js';
import { close, open, pread, tryOpenat2 } from '../linux/sys.js';
import { Limits, type PageRange, type RegionInfo } from '../../protocol/wire.js';
import { regionIndexAt, splitRange } from '../../protocol/ranges.js';
import { SourceError } from './errors.js';
import { scanExtents } from './extents.js';

export interface ImageRegionSpec {
  name: string;
  /** Start in the image address space, bytes. */
  offset: number;
  sizeBytes: number;
  /** Where the region's first byte lies in the file, bytes. */
  fileOffset: number;
  /** A power of two, 4096 .. 16 MiB (a page must fit in one DATA frame). */
  pageSizeBytes: number;
}

export interface ImageRegion extends ImageRegionSpec {
  /** Global index of the region's first page. */
  firstPage: number;
  pageCount: number;
}

/** Global pages [page, page + count) of region `region` (see MemoryImage.resolve). */
export interface PagePiece {
  region: number;
  page: number;
  count: number;
}

/** Per-page content class, learned once: holes at open, data/zero when a page is first read. */
export const PageClass = {
  /** Not read yet (lies in a data extent). */
  UNKNOWN: 0,
  DATA: 1,
  /** Read, and all zero. */
  ZERO: 2,
  /** Entirely inside a file hole: never read. */
  HOLE: 3,
} as const;

const MIN_PAGE_BYTES = 4096;

/** Zero pages to compare with, one per page size (Buffer.equals is memcmp). */
const zeroPages = new Map<number, Buffer>();
function zeroPage(sizeBytes: number): Buffer {
  let z = zeroPages.get(sizeBytes);
  if (!z) {
    z = Buffer.alloc(sizeBytes);
    zeroPages.set(sizeBytes, z);
  }
  return z;
}

function isPowerOfTwo(n: number): boolean {
  return n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

/** Checks a region table against a file of `fileSizeBytes`; returns the regions sorted by offset. */
export function validateRegions(
  specs: readonly ImageRegionSpec[],
  fileSizeBytes: number,
): ImageRegion[] {
  if (specs.length === 0) throw new SourceError('IMAGE_NO_REGIONS', 'the region table is empty');
  if (specs.length > Limits.MAX_REGIONS) {
    throw new SourceError(
      'IMAGE_NO_REGIONS',
      `${specs.length} regions; at most ${Limits.MAX_REGIONS}`,
    );
  }
  const names = new Set<string>();
  for (const r of specs) {
    const nameBytes = Buffer.byteLength(r.name);
    if (nameBytes === 0 || nameBytes > Limits.MAX_REGION_NAME_BYTES || names.has(r.name)) {
      throw new SourceError(
        'IMAGE_REGION_NAME',
        `region name "${r.name}" is empty, too long or repeated`,
      );
    }
    names.add(r.name);
    const p = r.pageSizeBytes;
    if (
      !Number.isSafeInteger(p) ||
      p < MIN_PAGE_BYTES ||
      p > Limits.MAX_DATA_BYTES ||
      !isPowerOfTwo(p)
    ) {
      throw new SourceError(
        'IMAGE_REGION_PAGE_SIZE',
        `region ${r.name}: page size ${p} is not a power of two in [4096, ${Limits.MAX_DATA_BYTES}]`,
      );
    }
    for (const [field, v] of [
      ['offset', r.offset],
      ['sizeBytes', r.sizeBytes],
      ['fileOffset', r.fileOffset],
    ] as const) {
      if (!Number.isSafeInteger(v) || v < 0 || v % p !== 0) {
        throw new SourceError(
          'IMAGE_REGION_MISALIGNED',
          `region ${r.name}: ${field} ${v} is not a multiple of ${p}`,
        );
      }
    }
    if (r.sizeBytes === 0) throw new SourceError('IMAGE_REGION_EMPTY', `region ${r.name} is empty`);
    if (
      !Number.isSafeInteger(r.offset + r.sizeBytes) ||
      r.fileOffset + r.sizeBytes > fileSizeBytes
    ) {
      throw new SourceError(
        'IMAGE_REGION_OUTSIDE_FILE',
        `region ${r.name}: file bytes [${r.fileOffset}, ${r.fileOffset + r.sizeBytes}) exceed the file (${fileSizeBytes} bytes)`,
      );
    }
  }
  const sorted = [...specs].sort((a, b) => a.offset - b.offset);
  let firstPage = 0;
  return sorted.map((r, i) => {
    const prev = sorted[i - 1];
    if (prev && prev.offset + prev.sizeBytes > r.offset) {
      throw new SourceError('IMAGE_REGION_OVERLAP', `regions ${prev.name} and ${r.name} overlap`);
    }
    const region: ImageRegion = {
      name: r.name,
      offset: r.offset,
      sizeBytes: r.sizeBytes,
      fileOffset: r.fileOffset,
      pageSizeBytes: r.pageSizeBytes,
      firstPage,
      pageCount: r.sizeBytes / r.pageSizeBytes,
    };
    firstPage += region.pageCount;
    return region;
  });
}

/**
 * What another thread needs to serve the same image (structured-cloneable): the fd is shared by
 * the threads of the process, the page classes are shared memory.
 */
export interface SharedImage {
  path: string;
  fd: number;
  regions: ImageRegion[];
  fileSizeBytes: number;
  pageClass: SharedArrayBuffer;
}

export class MemoryImage {
  readonly regions: readonly ImageRegion[];
  readonly totalPages: number;
  readonly totalBytes: number;
  /** One PageClass per global page index (shared memory: both source threads classify). */
  readonly pageClass: Uint8Array;
  private fd: number;

  constructor(
    readonly path: string,
    fd: number,
    regions: ImageRegion[],
    readonly fileSizeBytes: number,
    shared?: Pick<SharedImage, 'pageClass'>,
  ) {
    this.fd = fd;
    this.regions = regions;
    const last = regions[regions.length - 1]!;
    this.totalPages = last.firstPage + last.pageCount;
    this.totalBytes = regions.reduce((n, r) => n + r.sizeBytes, 0);
    this.pageClass = new Uint8Array(shared?.pageClass ?? new SharedArrayBuffer(this.totalPages));
  }

  /**
   * Marks the pages that lie wholly in file holes (lseek SEEK_DATA/SEEK_HOLE, once per region):
   * they are sent as zero runs and never read. Only once the image can no longer change: a VM
   * that still runs writes pages that were holes (found with a stock QEMU, whose guest wrote
   * into its RAM file between the registration and the freeze), so this runs at the freeze.
   */
  scanHoles(): void {
    if (this.fd < 0) throw new SourceError('IMAGE_CLOSED', `image ${this.path} was released`);
    for (const r of this.regions) {
      const b = scanExtents(this.fd, r.fileOffset, r.fileOffset + r.sizeBytes).bounds;
      // Pages are holes unless some data extent touches them.
      const cls = this.pageClass.subarray(r.firstPage, r.firstPage + r.pageCount);
      cls.fill(PageClass.HOLE);
      for (let i = 0; i < b.length; i += 2) {
        const first = Math.floor((b[i]! - r.fileOffset) / r.pageSizeBytes);
        const end = Math.ceil((b[i + 1]! - r.fileOffset) / r.pageSizeBytes);
        cls.fill(PageClass.UNKNOWN, first, end);
      }
    }
  }

  /** The same image for another thread; only this one closes the fd (after that one let go). */
  share(): SharedImage {
    return {
      path: this.path,
      fd: this.fd,
      regions: [...this.regions],
      fileSizeBytes: this.fileSizeBytes,
      pageClass: this.pageClass.buffer as SharedArrayBuffer,
    };
  }

  /** An image another thread shared; release() it instead of close(). */
  static fromShared(s: SharedImage): MemoryImage {
    return new MemoryImage(s.path, s.fd, s.regions, s.fileSizeBytes, s);
  }

  /** Stops reading without closing the fd (an image from fromShared, whose owner closes it). */
  release(): void {
    this.fd = -1;
  }

  get closed(): boolean {
    return this.fd < 0;
  }

  /** The region table as the WELCOME frame carries it. */
  regionTable(): RegionInfo[] {
    return this.regions.map((r) => ({
      name: r.name,
      offset: r.offset,
      sizeBytes: r.sizeBytes,
      pageSizeBytes: r.pageSizeBytes,
    }));
  }

  /** Index of the region containing image offset `offset`, or -1. */
  regionIndexAt(offset: number): number {
    return regionIndexAt(this.regions, offset);
  }

  /**
   * The pages of REQUEST or HAVE ranges, by region: the protocol's one rule for both
   * (protocol/ranges.ts, splitRange). Throws ProtocolError OUT_OF_RANGE.
   */
  resolve(ranges: readonly PageRange[], piece: (p: PagePiece) => void): void {
    for (const range of ranges) {
      splitRange(this.regions, range.offset, range.length, (p) => {
        const r = this.regions[p.region]!;
        piece({
          region: p.region,
          page: r.firstPage + (p.offset - r.offset) / r.pageSizeBytes,
          count: p.length / r.pageSizeBytes,
        });
      });
    }
  }

  /** Index of the region owning global page `page` (0 <= page < totalPages). */
  regionIndexOfPage(page: number): number {
    let lo = 0;
    let hi = this.regions.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (this.regions[mid]!.firstPage <= page) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** Image offset of global page `page` in region `r`. */
  pageOffset(r: ImageRegion, page: number): number {
    return r.offset + (page - r.firstPage) * r.pageSizeBytes;
  }

  /**
   * Reads image bytes [offset, offset + length), which must lie inside one region, into
   * `into[at ..]` with pread (no intermediate buffer). Throws IMAGE_IO on a short read.
   */
  read(offset: number, length: number, into: Buffer, at: number): void {
    if (this.fd < 0) throw new SourceError('IMAGE_CLOSED', `image ${this.path} was released`);
    const idx = this.regionIndexAt(offset);
    const r = idx < 0 ? undefined : this.regions[idx];
    if (!r || offset + length > r.offset + r.sizeBytes || at + length > into.length) {
      throw new RangeError(
        `read of [${offset}, +${length}) is not inside one region or the buffer`,
      );
    }
    let done = 0;
    const fileOffset = r.fileOffset + (offset - r.offset);
    while (done < length) {
      let n: number;
      try {
        n = pread(this.fd, into.subarray(at + done), length - done, fileOffset + done);
      } catch (err) {
        throw new SourceError('IMAGE_IO', `reading ${this.path} failed`, { cause: err });
      }
      if (n === 0) {
        throw new SourceError('IMAGE_IO', `${this.path} ended at ${fileOffset + done}: truncated?`);
      }
      done += n;
    }
  }

  /**
   * Classifies `count` pages of region `r` starting at global page `page`, whose bytes were just
   * read into `buf[at ..]`: records DATA or ZERO in pageClass. memcmp against a zero page.
   */
  classify(r: ImageRegion, page: number, count: number, buf: Buffer, at: number): void {
    const size = r.pageSizeBytes;
    const zero = zeroPage(size);
    for (let i = 0; i < count; i++) {
      const start = at + i * size;
      const isZero = zero.compare(buf, start, start + size) === 0;
      this.pageClass[page + i] = isZero ? PageClass.ZERO : PageClass.DATA;
    }
  }

  /** Closes the file. Reads after this throw IMAGE_CLOSED. Idempotent. */
  close(): void {
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    close(fd);
  }
}

/** The default region of an image given without one: `ram0`, the whole file, 4 KiB pages. */
export const DEFAULT_PAGE_SIZE_BYTES = 4096;

/**
 * The one directory images are read from. Every image is opened beneath it with openat2
 * (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS: no "..", absolute symlink or /proc link leads out),
 * non-blocking (a FIFO or device does not hang the source), then must be a regular file. Errors
 * say nothing of what lies outside the root.
 */
export class ImageRoot {
  private readonly fd: number;

  constructor(readonly path: string) {
    this.path = resolve(path);
    try {
      this.fd = open(this.path, O_PATH | O_DIRECTORY);
    } catch (err) {
      throw new SourceError('IMAGE_ROOT', `the image root ${this.path} cannot be opened`, {
        cause: err,
      });
    }
  }

  /** Opens `image` (absolute beneath the root, or relative to it); returns its fd. */
  open(image: string): number {
    const outside = (): SourceError =>
      new SourceError('IMAGE_OUTSIDE_ROOT', `image ${image} is not beneath the image root`);
    let rel = image;
    if (isAbsolute(image)) {
      const abs = resolve(image);
      if (!abs.startsWith(this.path + sep)) throw outside();
      rel = abs.slice(this.path.length + 1);
    }
    const fd = tryOpenat2(
      this.fd,
      rel,
      O_RDONLY | O_NONBLOCK,
      RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    );
    if (fd === -ERRNO.EXDEV || fd === -ERRNO.ELOOP) throw outside();
    if (fd === -ERRNO.ENOENT || fd === -ERRNO.ENOTDIR) {
      throw new SourceError('IMAGE_NOT_FOUND', `no image ${image} beneath the image root`);
    }
    if (fd < 0) {
      throw new SourceError('IMAGE_OPEN', `cannot open image ${image}: ${errnoName(-fd)}`);
    }
    return fd;
  }

  close(): void {
    close(this.fd);
  }
}

/**
 * Opens `image` beneath `root` read-only, checks it is a regular file, validates `regions`
 * against it (default: one region `ram0` over the whole file, 4 KiB pages) and returns it. Its
 * holes are learned at the freeze (scanHoles).
 */
export function openImage(
  root: ImageRoot,
  image: string,
  regions?: readonly ImageRegionSpec[],
): MemoryImage {
  const fd = root.open(image);
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new SourceError('IMAGE_NOT_REGULAR', `${image} is not a regular file`);
    const specs = regions ?? [
      {
        name: 'ram0',
        offset: 0,
        sizeBytes: st.size,
        fileOffset: 0,
        pageSizeBytes: DEFAULT_PAGE_SIZE_BYTES,
      },
    ];
    return new MemoryImage(image, fd, validateRegions(specs, st.size), st.size);
  } catch (err) {
    close(fd);
    throw err;
  }
}
