/**
 * Which pages went out at least once (by demand or background), a byte per global page index
 * (0 = not yet). Uint8Array.indexOf(0) finds the next unsent page natively.
 */
export class SentMap {
  private readonly sent: Uint8Array;
  private unsent: number;
  private bytes = 0;

  constructor(totalPages: number) {
    this.sent = new Uint8Array(totalPages);
    this.unsent = totalPages;
  }

  get unsentPages(): number {
    return this.unsent;
  }

  get sentPages(): number {
    return this.sent.length - this.unsent;
  }

  /** Image bytes covered by sent pages. */
  get sentBytes(): number {
    return this.bytes;
  }

  isSent(page: number): boolean {
    return this.sent[page] === 1;
  }

  /** Marks `count` pages from `page` (all in one region of `pageSizeBytes`) as sent. */
  mark(page: number, count: number, pageSizeBytes: number): void {
    for (let i = page; i < page + count; i++) {
      if (this.sent[i] === 0) {
        this.sent[i] = 1;
        this.unsent--;
        this.bytes += pageSizeBytes;
      }
    }
  }

  /** The first unsent page at or after `from`, wrapping around; -1 when every page was sent. */
  nextUnsent(from: number): number {
    if (this.unsent === 0) return -1;
    const start = from >= this.sent.length ? 0 : from;
    const i = this.sent.indexOf(0, start);
    return i >= 0 ? i : this.sent.indexOf(0);
  }

  /** Forgets everything (a new background connection cannot trust what the old one delivered). */
  reset(): void {
    this.sent.fill(0);
    this.unsent = this.sent.length;
    this.bytes = 0;
  }
}
