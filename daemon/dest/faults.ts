/**
 * The faults a session is waiting on: each missing page a vCPU touched is requested once per
 * demand connection (adjacent pages coalesce into one REQUEST entry) and timed from the moment
 * its fault was read until its page is settled, by whichever channel. A new demand connection
 * asks again for every page still awaited (the lost one may have swallowed the request or its
 * answer).
 */
import { Limits, type PageRange } from '../../protocol/wire.js';
import type { PageMap } from './page-map.js';
import { isSettled } from './page-map.js';
import type { GuestRegion } from './regions.js';

/** A fault awaiting its page. */
export interface AwaitedFault {
  r: GuestRegion;
  page: number;
  /** Image offset of the page. */
  offset: number;
  /** performance.now() when the fault was read. */
  at: number;
  /** performance.now() when its page was first requested (0: not yet). */
  sentAt: number;
}

export class FaultTracker {
  /** By image offset of the page. */
  private readonly awaited = new Map<number, AwaitedFault>();
  private pending: PageRange[] = [];

  /** Faults awaiting their page. */
  get size(): number {
    return this.awaited.size;
  }

  /** A fault on a missing page (now REQUESTED in the map): request it at the next flush. */
  add(r: GuestRegion, page: number, at: number): void {
    const offset = r.imageOffset(page);
    this.awaited.set(offset, { r, page, offset, at, sentAt: 0 });
    this.queue(offset, r.pageSizeBytes);
  }

  /** The requests taken were handed to the demand connection at `now`. */
  requested(now: number): void {
    for (const a of this.awaited.values()) if (a.sentAt === 0) a.sentAt = now;
  }

  /** Queues every awaited page again (a new demand connection). */
  requeueAll(): void {
    this.pending = [];
    for (const [offset, a] of [...this.awaited].sort((x, y) => x[0] - y[0])) {
      this.queue(offset, a.r.pageSizeBytes);
    }
  }

  /** The queued requests, at most Limits.MAX_REQUEST_ENTRIES per REQUEST frame. */
  takeRequests(): PageRange[][] {
    if (this.pending.length === 0) return [];
    const out: PageRange[][] = [];
    for (let i = 0; i < this.pending.length; i += Limits.MAX_REQUEST_ENTRIES) {
      out.push(this.pending.slice(i, i + Limits.MAX_REQUEST_ENTRIES));
    }
    this.pending = [];
    return out;
  }

  /**
   * Forgets the awaited pages that are settled now, calling `served` with each fault (its vCPU
   * waited `now - at`). Walks the awaited faults (a handful), not the pages placed. Returns how
   * many.
   */
  sweep(map: PageMap, now: number, served: (fault: AwaitedFault, now: number) => void): number {
    let n = 0;
    for (const [offset, a] of this.awaited) {
      if (isSettled(map.state(a.r, a.page))) {
        this.awaited.delete(offset);
        served(a, now);
        n++;
      }
    }
    return n;
  }

  /** Forgets everything (the session ended); returns how many faults were still awaited. */
  clear(): number {
    const n = this.awaited.size;
    this.awaited.clear();
    this.pending = [];
    return n;
  }

  private queue(offset: number, length: number): void {
    const last = this.pending[this.pending.length - 1];
    if (last && last.offset + last.length === offset) last.length += length;
    else this.pending.push({ offset, length });
  }
}
