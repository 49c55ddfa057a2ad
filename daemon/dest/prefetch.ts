/**
 * When a fault's neighbours are worth asking for (demandPrefetchBytes). Measured with
 * `npm run bench` (the link's prefetch rows, e.g. link/rtt100/prefetch): asking for the 64 KiB
 * after every faulting page made a vCPU that sweeps memory in order finish 5-10× sooner (RTT
 * 0-500 µs), but made random first touches up to 1.45× slower, each fault waiting behind its
 * predecessor's unwanted neighbours. So, as the kernel's readahead does, a fault prefetches only
 * when it continues a stream: it lies right at (or one page from) where an earlier fault's
 * request, prefetch included, ended. A run of random faults then asks for nothing more; a sweep
 * pays one fault without prefetch and then one fault per window.
 *
 * And, as readahead does, a stream's window grows: it doubles with each fault that continues the
 * stream, up to MAX_GROWTH windows and MAX_WINDOW_BYTES. A vCPU that keeps sweeping (reading or
 * zeroing a large buffer in order) then waits for a round trip per 1 MiB instead of per 64 KiB,
 * while a stream that stops after a few faults asked for little more than before.
 */

/** Recent request ends remembered: one per stream a guest may sweep at once (vCPUs). */
const STREAMS = 16;
/** Largest window of a stream, in multiples of the first. */
export const MAX_GROWTH = 16;
/**
 * Largest window in bytes: an answer this big already keeps the vCPU's next fault of the same VM
 * waiting a while on the demand connection. demandPrefetchBytes, the first window, is at most
 * this (config.ts), so only the growth is cut.
 */
export const MAX_WINDOW_BYTES = 1024 * 1024;

/** The bytes to prefetch for `windows` windows of `firstBytes` (continues() says how many). */
export function windowBytes(windows: number, firstBytes: number): number {
  return Math.min(windows * firstBytes, MAX_WINDOW_BYTES);
}

export class StreamDetector {
  /** Region index and the page after the last page asked, per remembered stream (-1: none). */
  private readonly region = new Int32Array(STREAMS).fill(-1);
  private readonly next = new Float64Array(STREAMS);
  /** Each stream's window, in multiples of the first (0: it has not continued yet). */
  private readonly growth = new Int32Array(STREAMS);
  private cursor = 0;

  /**
   * A fault on `page` of region `region` (it is remembered): 0 when it continues no stream,
   * otherwise how many windows to prefetch after it (1, 2, 4, ... MAX_GROWTH).
   */
  continues(region: number, page: number): number {
    for (let i = 0; i < STREAMS; i++) {
      if (this.region[i] === region && Math.abs(page - this.next[i]!) <= 1) {
        this.next[i] = page + 1;
        const g = this.growth[i]!;
        return (this.growth[i] = g === 0 ? 1 : Math.min(2 * g, MAX_GROWTH));
      }
    }
    const i = this.cursor;
    this.cursor = (i + 1) % STREAMS;
    this.region[i] = region;
    this.next[i] = page + 1;
    this.growth[i] = 0;
    return 0;
  }

  /** The request for a stream's fault ended before `end` (its prefetch included). */
  extend(region: number, page: number, end: number): void {
    for (let i = 0; i < STREAMS; i++) {
      if (this.region[i] === region && this.next[i] === page + 1) {
        this.next[i] = end;
        return;
      }
    }
  }
}
