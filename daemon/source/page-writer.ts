/**
 * Turns a span of pages into DATA and ZERO frames, in address order. Holes and pages already
 * known to be zero are never read; other pages are pread in chunks straight into the buffer that
 * goes to the socket, 24 bytes after its start, so each DATA frame is a view of that buffer with
 * its header in front: no copy between pread and the socket. Zero pages found in a chunk become
 * ZERO runs; the DATA frame after such a run writes its header into the last 24 bytes of the zero
 * page before it, which is never sent.
 */
import { encodeDataHeaderInto, encodeZero } from '../../protocol/page-codec.js';
import { HeaderSize } from '../../protocol/wire.js';
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
}

export const newSpanStats = (): SpanStats => ({
  dataPages: 0,
  zeroPages: 0,
  payloadBytes: 0,
  zeroFrames: 0,
  frameBytes: 0,
});

/** ZERO frames carry a u32 length. */
const MAX_ZERO_RUN_BYTES = 0xffffffff;

const isSkip = (cls: number): boolean => cls === PageClass.HOLE || cls === PageClass.ZERO;

export class PageWriter {
  constructor(
    private readonly image: MemoryImage,
    private readonly pool: SlabPool,
  ) {}

  /**
   * Emits `count` pages of region `r` from global page `page`. DATA frames carry at most
   * max(`readBytes`, one page) of payload. Throws SourceError IMAGE_IO / IMAGE_CLOSED.
   */
  write(
    r: ImageRegion,
    page: number,
    count: number,
    flags: number,
    readBytes: number,
    sink: FrameSink,
    stats: SpanStats,
  ): void {
    const image = this.image;
    const cls = image.pageClass;
    const size = r.pageSizeBytes;
    const maxZeroPages = Math.floor(MAX_ZERO_RUN_BYTES / size);
    const readPages = Math.max(1, Math.floor(readBytes / size));
    let zeroStart = 0;
    let zeroCount = 0;

    const flushZero = (): void => {
      if (zeroCount === 0) return;
      sink(encodeZero(flags, image.pageOffset(r, zeroStart), zeroCount * size));
      stats.zeroFrames++;
      stats.zeroPages += zeroCount;
      stats.frameBytes += HeaderSize.ZERO;
      zeroCount = 0;
    };
    const addZero = (p: number): void => {
      if (zeroCount > 0 && zeroStart + zeroCount === p && zeroCount < maxZeroPages) {
        zeroCount++;
        return;
      }
      flushZero();
      zeroStart = p;
      zeroCount = 1;
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
        sink(frame, slab.retain().release);
        stats.dataPages += j - i;
        stats.payloadBytes += (j - i) * size;
        stats.frameBytes += frame.byteLength;
        i = j;
      }
      slab.release();
      p = q;
    }
    flushZero();
  }
}
