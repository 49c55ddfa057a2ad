/**
 * The faults a session is waiting on: each missing page a vCPU touched is requested once per
 * demand connection (adjacent pages coalesce into one REQUEST entry) and timed from the moment
 * its fault was read until its page is settled, by whichever channel. A new demand connection
 * asks again for every page still awaited (the lost one may have swallowed the request or its
 * answer).
 *
 * Prefetch: a fault in a sweep may also ask for the missing pages after it (prefetch.ts).
 * Those go in entries of their own, after every fault's own entry of the same REQUEST, so the
 * source answers (and the dest places, waking the vCPU) the faulting pages first. A fault on a
 * prefetched page waits for it without asking again; a prefetched page nobody waits for when
 * its demand connection is lost goes back to MISSING (the background brings it, or its fault
 * asks again).
 */
import { Limits, type PageRange } from '../../protocol/wire.js';
import type { PageMap } from './page-map.js';
import { isSettled, PageState } from './page-map.js';
import type { GuestRegion } from './regions.js';

/** Prefetched runs remembered (to undo on a lost connection) before settled ones are dropped. */
const PREFETCH_PRUNE_AT = 1024;

/** A fault awaiting its page. */
export interface AwaitedFault {
  r: GuestRegion;
  page: number;
  /** Image offset of the page. */
  offset: number;
  /** performance.now() when the fault was read. */
  at: number;
  /**
   * performance.now() when its page was first requested (0: not yet; -1: it was in flight
   * already, asked by another fault or a prefetch: no stage of its own to time).
   */
  sentAt: number;
}

export class FaultTracker {
  /** By image offset of the page. */
  private readonly awaited = new Map<number, AwaitedFault>();
  private pending: PageRange[] = [];
  /** Prefetch entries for the next REQUEST, after `pending`. */
  private pendingPrefetch: PageRange[] = [];
  /** Runs prefetched on the current demand connection (REQUESTED unless settled since). */
  private prefetched: Array<{ r: GuestRegion; first: number; count: number }> = [];

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

  /**
   * A fault on a page already in flight (REQUESTED): waits for it. Only a prefetched page is
   * not awaited yet; its wait is timed from this fault, its stages are not (see sentAt).
   */
  addInFlight(r: GuestRegion, page: number, at: number): boolean {
    const offset = r.imageOffset(page);
    if (this.awaited.has(offset)) return false;
    this.awaited.set(offset, { r, page, offset, at, sentAt: -1 });
    return true;
  }

  /** Pages [first, first + count) of `r` (now REQUESTED in the map) go in the next REQUEST. */
  prefetch(map: PageMap, r: GuestRegion, first: number, count: number): void {
    append(this.pendingPrefetch, r.imageOffset(first), count * r.pageSizeBytes);
    if (this.prefetched.length >= PREFETCH_PRUNE_AT) this.prunePrefetched(map);
    this.prefetched.push({ r, first, count });
  }

  /** The requests taken were handed to the demand connection at `now`. */
  requested(now: number): void {
    for (const a of this.awaited.values()) if (a.sentAt === 0) a.sentAt = now;
  }

  /**
   * Queues every awaited page again (a new demand connection); prefetched pages nobody awaits
   * go back to MISSING in `map`.
   */
  requeueAll(map: PageMap): void {
    this.pending = [];
    this.pendingPrefetch = [];
    for (const { r, first, count } of this.prefetched) {
      for (let p = first; p < first + count; p++) {
        if (!this.awaited.has(r.imageOffset(p))) map.unrequest(r, p);
      }
    }
    this.prefetched = [];
    for (const [offset, a] of [...this.awaited].sort((x, y) => x[0] - y[0])) {
      this.queue(offset, a.r.pageSizeBytes);
    }
  }

  /** The queued requests, at most Limits.MAX_REQUEST_ENTRIES per REQUEST frame. */
  takeRequests(): PageRange[][] {
    if (this.pending.length === 0 && this.pendingPrefetch.length === 0) return [];
    const all =
      this.pendingPrefetch.length === 0 ? this.pending : this.pending.concat(this.pendingPrefetch);
    const out: PageRange[][] = [];
    for (let i = 0; i < all.length; i += Limits.MAX_REQUEST_ENTRIES) {
      out.push(all.slice(i, i + Limits.MAX_REQUEST_ENTRIES));
    }
    this.pending = [];
    this.pendingPrefetch = [];
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
    this.pendingPrefetch = [];
    this.prefetched = [];
    return n;
  }

  /** Forgets prefetched runs whose pages are all settled or discarded (no longer REQUESTED). */
  private prunePrefetched(map: PageMap): void {
    this.prefetched = this.prefetched.filter(({ r, first, count }) => {
      for (let p = first; p < first + count; p++) {
        if (map.state(r, p) === PageState.REQUESTED) return true;
      }
      return false;
    });
  }

  private queue(offset: number, length: number): void {
    append(this.pending, offset, length);
  }
}

/** Appends a range to a REQUEST's entries, merged into the last one where it continues it. */
function append(entries: PageRange[], offset: number, length: number): void {
  const last = entries[entries.length - 1];
  if (last && last.offset + last.length === offset) last.length += length;
  else entries.push({ offset, length });
}
