/**
 * When a fault's neighbours are worth asking for (demandPrefetchBytes). Measured with
 * `npm run bench` (the link's prefetch rows, e.g. link/rtt100/prefetch): asking for the 64 KiB
 * after every faulting page made a vCPU that sweeps memory in order finish 5-10× sooner (RTT
 * 0-500 µs), but made random first touches up to 1.45× slower, each fault waiting behind its
 * predecessor's unwanted neighbours. So, as the kernel's readahead does, a fault prefetches only
 * when it continues a stream: it lies right at (or one page from) where an earlier fault's
 * request, prefetch included, ended. A run of random faults then asks for nothing more; a sweep
 * pays one fault without prefetch and then one fault per window.
 */

/** Recent request ends remembered: one per stream a guest may sweep at once (vCPUs). */
const STREAMS = 16;

export class StreamDetector {
  /** Region index and the page after the last page asked, per remembered stream (-1: none). */
  private readonly region = new Int32Array(STREAMS).fill(-1);
  private readonly next = new Float64Array(STREAMS);
  private cursor = 0;

  /** A fault on `page` of region `region`: does it continue a stream? (It is remembered.) */
  continues(region: number, page: number): boolean {
    for (let i = 0; i < STREAMS; i++) {
      if (this.region[i] === region && Math.abs(page - this.next[i]!) <= 1) {
        this.next[i] = page + 1;
        return true;
      }
    }
    const i = this.cursor;
    this.cursor = (i + 1) % STREAMS;
    this.region[i] = region;
    this.next[i] = page + 1;
    return false;
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
