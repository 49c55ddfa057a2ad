/**
 * Background payloads in flight from the bulk thread to the main thread, in shared memory: the
 * bulk thread receives each DATA payload in at the ring's tail (recv(2) straight into reserved
 * room, transport/raw-receive.ts; or a copy: a TLS connection's, or one that was not all queued
 * in the socket when its header came), the main thread places it
 * from there (UFFDIO_COPY reads the shared memory directly) and frees it from the head, in the
 * order the runs were queued (one FIFO for every session). No buffer changes threads and no
 * garbage is made per frame: measured with transferred ArrayBuffers instead, the main thread let
 * freed frames pile up (dest RSS 390 MiB streaming 4 GiB, against 140 MiB when the bulk thread
 * placed them itself), and its collections added to fault latency. A payload that does not fit
 * (the ring is full of unplaced runs, or the frame is larger than the ring) is transferred.
 *
 * Positions count bytes since the ring was made (a 64-bit counter each, one writer each): the
 * tail is the bulk thread's, the head the main thread's. A payload never wraps: one that would
 * cross the end starts again at offset 0.
 */
const HEAD = 0;
const TAIL = 1;

/** What the other thread needs to open the same ring (structured-cloneable). */
export interface SharedRing {
  data: SharedArrayBuffer;
  positions: SharedArrayBuffer;
}

export class PayloadRing {
  private readonly data: SharedArrayBuffer;
  private readonly pos: BigInt64Array;
  readonly capacity: number;

  constructor(capacityOrShared: number | SharedRing) {
    if (typeof capacityOrShared === 'number') {
      this.data = new SharedArrayBuffer(capacityOrShared);
      this.pos = new BigInt64Array(new SharedArrayBuffer(16));
    } else {
      this.data = capacityOrShared.data;
      this.pos = new BigInt64Array(capacityOrShared.positions);
    }
    this.capacity = this.data.byteLength;
  }

  share(): SharedRing {
    return { data: this.data, positions: this.pos.buffer as SharedArrayBuffer };
  }

  /**
   * Bulk thread: copies `payload` in; returns its position, or -1 when it does not fit now.
   * For payloads that were not received into the ring (a TLS connection's, or one that found no
   * room when it came).
   */
  put(payload: Uint8Array): number {
    const n = payload.byteLength;
    const p = this.reserve(n);
    if (p < 0) return -1;
    new Uint8Array(this.data, p % this.capacity, n).set(payload);
    this.commit(p + n);
    return p;
  }

  /**
   * Bulk thread: where `n` bytes would go now (fill them through view(), then commit()), or -1
   * when they do not fit. Nothing is taken until commit: a background connection receives a
   * payload straight into the ring this way, and a reader of a memory file reads pages, giving
   * back what turned out to be zeros.
   */
  reserve(n: number): number {
    const head = Number(Atomics.load(this.pos, HEAD));
    let p = Number(Atomics.load(this.pos, TAIL));
    const off = p % this.capacity;
    if (off + n > this.capacity) p += this.capacity - off;
    if (p + n - head > this.capacity) return -1;
    return p;
  }

  /** Bulk thread: the bytes before position `end` (from a reserve()) are taken. */
  commit(end: number): void {
    Atomics.store(this.pos, TAIL, BigInt(end));
  }

  /** The bytes at position `p` (a view on shared memory; the bulk thread fills reserved ones). */
  view(p: number, length: number): Buffer {
    return Buffer.from(this.data, p % this.capacity, length);
  }

  /** Main thread: everything before position `end` was placed (or dropped) and may be reused. */
  release(end: number): void {
    Atomics.store(this.pos, HEAD, BigInt(end));
  }

  /** Main thread, with no bulk thread running: forget everything (a new one starts empty). */
  reset(): void {
    Atomics.store(this.pos, HEAD, 0n);
    Atomics.store(this.pos, TAIL, 0n);
  }
}
