/**
 * Turns a span of pages into DATA and ZERO frames, in address order. Holes and pages already
 * known to be zero are never read; other pages are pread in chunks straight into the buffer that
 * goes to the socket, 24 bytes after its start, so each DATA frame is a view of that buffer with
 * its header in front: no copy between pread and the socket. Zero pages found in a chunk become
 * ZERO runs; the DATA frame after such a run writes its header into the last 24 bytes of the zero
 * page before it, which is never sent.
 */
import { performance } from 'node:perf_hooks';
import { encodeDataHeaderInto, encodeZero, stampSourceTimes } from '../../protocol/page-codec.js';
import { DataFlag, HeaderSize } from '../../protocol/wire.js';
import { PageClass, type ImageRegion, type MemoryImage } from './image.js';
import type { SlabPool } from './slab-pool.js';

/**
 * Hands one frame to the socket. `onWritten`, when given, must be called once the frame's bytes
 * are no longer needed (written, or the connection gone): its buffer is then reused.
 */
export type FrameSink = (frame: Uint8Array, onWritten?: () => void) => void;

/** What a span cost; callers accumulate across spans. */
export interface SpanStats {
  dataPages: number;
  zeroPages: number;
  /** DATA payload bytes. */
  payloadBytes: number;
  zeroFrames: number;
  /** Every byte of every frame (headers included). */
  frameBytes: number;
  /** Bytes read from the image (data pages, and zero pages found only by reading them). */
  readBytes: number;
}

/**
 * A zero run not sent yet, carried from one write() to the next so that runs split only by
 * span or chunk boundaries go out as one ZERO frame (one UFFDIO_ZEROPAGE on the dest). Whoever
 * carries one must flushZero() it before the turn ends.
 */
export interface PendingZero {
  region: ImageRegion | null;
  start: number;
  count: number;
  flags: number;
}

export const newPendingZero = (): PendingZero => ({ region: null, start: 0, count: 0, flags: 0 });

export const newSpanStats = (): SpanStats => ({
  dataPages: 0,
  zeroPages: 0,
  payloadBytes: 0,
  zeroFrames: 0,
  frameBytes: 0,
  readBytes: 0,
});

/** ZERO frames carry a u32 length. */
const MAX_ZERO_RUN_BYTES = 0xffffffff;

const isSkip = (cls: number): boolean => cls === PageClass.HOLE || cls === PageClass.ZERO;

export class PageWriter {
  /**
   * While a demand answer is written: performance.now() when its REQUEST arrived, and when its
   * last pages were read (the source times of protocol/README.md); -1 otherwise.
   */
  private since = -1;
  private readAt = -1;

  constructor(
    private readonly image: MemoryImage,
    private readonly pool: SlabPool,
  ) {}

  /** Sends the pending zero run, if any (its frame and pages count in `stats`). */
  flushZero(z: PendingZero, sink: FrameSink, stats: SpanStats): void {
    if (z.count === 0 || !z.region) return;
    const size = z.region.pageSizeBytes;
    const frame = encodeZero(z.flags, this.image.pageOffset(z.region, z.start), z.count * size);
    if (this.since >= 0 && z.flags & DataFlag.DEMAND) this.stamp(frame, 0);
    sink(frame);
    stats.zeroFrames++;
    stats.zeroPages += z.count;
    stats.frameBytes += HeaderSize.ZERO;
    z.count = 0;
  }

  /**
   * Emits `count` pages of region `r` from global page `page`. DATA frames carry at most
   * max(`readBytes`, one page) of payload. Zero pages at the end stay in `carry` when given (the
   * caller flushes it), so the next write can extend the run. `since` (performance.now() when
   * the REQUEST arrived) stamps the source times into DEMAND frames. Throws SourceError
   * IMAGE_IO / IMAGE_CLOSED.
   */
  write(
    r: ImageRegion,
    page: number,
    count: number,
    flags: number,
    readBytes: number,
    sink: FrameSink,
    stats: SpanStats,
    carry?: PendingZero,
    since = -1,
  ): void {
    this.since = since;
    try {
      this.writeSpan(r, page, count, flags, readBytes, sink, stats, carry);
    } finally {
      this.since = -1;
    }
  }

  /** `readTime`: since the REQUEST's arrival to the pages read (0: none read); `sendTime`: to now. */
  private stamp(frame: Uint8Array, readTime: number): void {
    const now = performance.now();
    const read = readTime > 0 ? readTime - this.since : 0;
    stampSourceTimes(frame, read, now - (readTime > 0 ? readTime : this.since));
  }

  private writeSpan(
    r: ImageRegion,
    page: number,
    count: number,
    flags: number,
    readBytes: number,
    sink: FrameSink,
    stats: SpanStats,
    carry?: PendingZero,
  ): void {
    const image = this.image;
    const cls = image.pageClass;
    const size = r.pageSizeBytes;
    const maxZeroPages = Math.floor(MAX_ZERO_RUN_BYTES / size);
    const readPages = Math.max(1, Math.floor(readBytes / size));
    const z = carry ?? newPendingZero();

    const flushZero = (): void => this.flushZero(z, sink, stats);
    const addZero = (p: number): void => {
      if (
        z.count > 0 &&
        z.region === r &&
        z.flags === flags &&
        z.start + z.count === p &&
        z.count < maxZeroPages
      ) {
        z.count++;
        return;
      }
      flushZero();
      z.region = r;
      z.flags = flags;
      z.start = p;
      z.count = 1;
    };

    const end = page + count;
    let p = page;
    while (p < end) {
      if (isSkip(cls[p]!)) {
        addZero(p);
        p++;
        continue;
      }
      let q = p + 1;
      while (q < end && q - p < readPages && !isSkip(cls[q]!)) q++;
      const n = q - p;
      // Not zero-filled: every byte that is sent is overwritten by pread or a header first.
      const slab = this.pool.acquire(HeaderSize.DATA + n * size);
      const buf = slab.buf;
      try {
        image.read(image.pageOffset(r, p), n * size, buf, HeaderSize.DATA);
      } catch (err) {
        slab.release();
        throw err;
      }
      if (this.since >= 0) this.readAt = performance.now();
      stats.readBytes += n * size;
      image.classify(r, p, n, buf, HeaderSize.DATA);
      let i = 0;
      while (i < n) {
        if (cls[p + i] === PageClass.ZERO) {
          addZero(p + i);
          i++;
          continue;
        }
        let j = i + 1;
        while (j < n && cls[p + j] === PageClass.DATA) j++;
        flushZero();
        // Header goes in the 24 bytes before page i: the buffer's head (i = 0) or the tail of
        // zero page i - 1, which is not sent.
        const frame = buf.subarray(i * size, HeaderSize.DATA + j * size);
        encodeDataHeaderInto(frame, flags, image.pageOffset(r, p + i));
        if (this.since >= 0 && flags & DataFlag.DEMAND) this.stamp(frame, this.readAt);
        sink(frame, slab.retain().release);
        stats.dataPages += j - i;
        stats.payloadBytes += (j - i) * size;
        stats.frameBytes += frame.byteLength;
        i = j;
      }
      slab.release();
      p = q;
    }
    if (!carry) flushZero();
  }
}
