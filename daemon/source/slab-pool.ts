/**
 * Reusable read buffers for DATA frames. A buffer goes back to the pool only when every frame cut
 * from it has been written to the socket (ws send callback). Fresh 256 KiB buffers cost a page
 * fault per 4 KiB on first touch and push V8 into major GCs; reusing them removes both.
 */
export class SlabPool {
  private readonly free: Buffer[] = [];

  /**
   * @param slabBytes size of each pooled buffer (one DATA frame's header and payload)
   * @param maxFree buffers kept when idle; the rest are left to the GC
   */
  constructor(
    readonly slabBytes: number,
    private readonly maxFree: number,
  ) {}

  /** A slab of at least `bytes`, holding one reference for the caller. */
  acquire(bytes: number): Slab {
    if (bytes > this.slabBytes) return new Slab(Buffer.allocUnsafeSlow(bytes), null);
    return new Slab(this.free.pop() ?? Buffer.allocUnsafeSlow(this.slabBytes), this);
  }

  /** Buffers waiting for reuse (tests, metrics). */
  get idle(): number {
    return this.free.length;
  }

  put(buf: Buffer): void {
    if (this.free.length < this.maxFree) this.free.push(buf);
  }
}

export class Slab {
  private refs = 1;

  constructor(
    readonly buf: Buffer,
    private readonly pool: SlabPool | null,
  ) {}

  retain(): this {
    this.refs++;
    return this;
  }

  /** Drops one reference; the last one returns the buffer to its pool. */
  release = (): void => {
    if (--this.refs === 0) this.pool?.put(this.buf);
  };
}
