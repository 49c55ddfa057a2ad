/**
 * Which pages went out at least once (by demand or background), a byte per global page index
 * (0 = not yet). Uint8Array.indexOf(0) finds the next unsent page natively. A second byte map,
 * never reset, records every page this source ever sent or heard the dest holds (a HAVE): it
 * is what the source checks before it lets go of an image on COMPLETE.
 *
 * Shared memory: the main thread marks demand answers, the bulk thread background pages and HAVE
 * syncs. Each mark is a compare-and-swap, so a page is counted once. The counts are for status
 * and PROGRESS only: a reset (HAVE sync) racing a demand mark may leave them off by that page.
 * What is unsent is always read from the bytes themselves.
 */

/** What another thread needs to open the same map. */
export interface SharedSentMap {
  sent: SharedArrayBuffer;
  covered: SharedArrayBuffer;
  /** Int32 words: [SENT] pages sent, [SENT_4K] sent bytes / 4096. */
  counts: SharedArrayBuffer;
}

const SENT = 0;
const SENT_4K = 1;

export class SentMap {
  private readonly sent: Uint8Array;
  private readonly covered: Uint8Array;
  private readonly counts: Int32Array;

  constructor(totalPages: number, shared?: SharedSentMap) {
    this.sent = new Uint8Array(shared?.sent ?? new SharedArrayBuffer(totalPages));
    this.covered = new Uint8Array(shared?.covered ?? new SharedArrayBuffer(totalPages));
    this.counts = new Int32Array(shared?.counts ?? new SharedArrayBuffer(8));
    if (this.sent.length !== totalPages) throw new RangeError('sent map: size mismatch');
  }

  share(): SharedSentMap {
    return {
      sent: this.sent.buffer as SharedArrayBuffer,
      covered: this.covered.buffer as SharedArrayBuffer,
      counts: this.counts.buffer as SharedArrayBuffer,
    };
  }

  get sentPages(): number {
    return Atomics.load(this.counts, SENT);
  }

  /** Image bytes covered by sent pages (page sizes are multiples of 4 KiB). */
  get sentBytes(): number {
    return Atomics.load(this.counts, SENT_4K) * 4096;
  }

  isSent(page: number): boolean {
    return this.sent[page] === 1;
  }

  /** Marks `count` pages from `page` (all in one region of `pageSizeBytes`) as sent. */
  mark(page: number, count: number, pageSizeBytes: number): void {
    this.covered.fill(1, page, page + count);
    let marked = 0;
    for (let i = page; i < page + count; i++) {
      if (this.sent[i] === 0 && Atomics.compareExchange(this.sent, i, 0, 1) === 0) marked++;
    }
    if (marked === 0) return;
    Atomics.add(this.counts, SENT, marked);
    Atomics.add(this.counts, SENT_4K, marked * (pageSizeBytes / 4096));
  }

  /** The first unsent page at or after `from`, wrapping around; -1 when every page was sent. */
  nextUnsent(from: number): number {
    const start = from >= this.sent.length ? 0 : from;
    const i = this.sent.indexOf(0, start);
    return i >= 0 ? i : this.sent.subarray(0, start).indexOf(0);
  }

  /**
   * Pages never sent nor reported held since this source opened the image: the dest cannot
   * hold them (a COMPLETE that says otherwise is refused). 0 when every page is covered.
   */
  uncoveredPages(): number {
    let n = 0;
    for (let i = this.covered.indexOf(0); i >= 0; i = this.covered.indexOf(0, i + 1)) n++;
    return n;
  }

  /** Forgets everything (a new background connection cannot trust what the old one delivered). */
  reset(): void {
    this.sent.fill(0);
    Atomics.store(this.counts, SENT, 0);
    Atomics.store(this.counts, SENT_4K, 0);
  }
}
