/**
 * The demand server of one migration: answers each REQUEST at once with DATA/ZERO frames flagged
 * DEMAND (even for pages the background already sent: the dest asked because it does not have
 * them yet). Requests that arrive before the migration is frozen wait in arrival order: the
 * guest may still be writing those pages, so serving them early could install stale data.
 */
import { performance } from 'node:perf_hooks';
import { codeOf, PAGE_ERROR_CODES, ProtocolError } from '../../protocol/errors.js';
import { DataFlag, type PageRange } from '../../protocol/wire.js';
import type { SourceChannel } from '../transport/source-channel.js';
import type { MemoryImage, PagePiece } from './image.js';
import { newSpanStats, type PageWriter, type SpanStats } from './page-writer.js';
import type { SentMap } from './sent-map.js';

interface Pending {
  channel: SourceChannel;
  pieces: PagePiece[];
  /** performance.now() when the REQUEST arrived. */
  arrivedAt: number;
}

export interface DemandOptions {
  /** Largest DATA payload of a demand frame (at least one page is always sent whole). */
  readBytes: number;
  /** Largest total of one REQUEST frame; more is refused with OUT_OF_RANGE. */
  maxRequestBytes: number;
  /** Largest number of REQUEST frames held before the freeze. */
  maxPendingRequests: number;
}

export interface DemandHooks {
  /** A request was answered: its cost, the time since it arrived, the page after its last range. */
  served(stats: SpanStats, seconds: number, nextPage: number): void;
  /** Sending on `channel` failed with a coded error (the channel was failed with it). */
  failed(code: string): void;
}

export class DemandServer {
  private pending: Pending[] = [];

  constructor(
    private readonly image: MemoryImage,
    private readonly sent: SentMap,
    private readonly writer: PageWriter,
    private readonly opts: DemandOptions,
    private readonly hooks: DemandHooks,
  ) {}

  get pendingRequests(): number {
    return this.pending.length;
  }

  /** A REQUEST arrived; `frozen` says whether the image may be read yet. */
  request(channel: SourceChannel, ranges: readonly PageRange[], frozen: boolean): void {
    const arrivedAt = performance.now();
    let pieces: PagePiece[];
    try {
      pieces = this.resolve(ranges);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      const code = codeOf(err, PAGE_ERROR_CODES, 'OUT_OF_RANGE');
      this.hooks.failed(code);
      channel.fail(code, err.message);
      return;
    }
    if (frozen) {
      this.serve({ channel, pieces, arrivedAt });
      return;
    }
    if (this.pending.length >= this.opts.maxPendingRequests) {
      this.hooks.failed('BAD_STATE');
      channel.fail(
        'BAD_STATE',
        `more than ${this.opts.maxPendingRequests} requests before the freeze`,
      );
      return;
    }
    this.pending.push({ channel, pieces, arrivedAt });
  }

  /** The migration froze: serve what waited, in arrival order. */
  release(): void {
    const queue = this.pending;
    this.pending = [];
    for (const p of queue) if (p.channel.isOpen) this.serve(p);
  }

  /** Forgets requests of a closed channel (the dest re-requests on its new connection). */
  drop(channel: SourceChannel): void {
    this.pending = this.pending.filter((p) => p.channel !== channel);
  }

  clear(): void {
    this.pending = [];
  }

  /** The pages of a REQUEST (the image's one range rule), within maxRequestBytes. */
  private resolve(ranges: readonly PageRange[]): PagePiece[] {
    let total = 0;
    for (const range of ranges) total += range.length;
    if (total > this.opts.maxRequestBytes) {
      throw new ProtocolError('OUT_OF_RANGE', `request exceeds ${this.opts.maxRequestBytes} bytes`);
    }
    const pieces: PagePiece[] = [];
    this.image.resolve(ranges, (p) => pieces.push(p));
    return pieces;
  }

  private serve(p: Pending): void {
    const stats = newSpanStats();
    const sink = (frame: Uint8Array, onWritten?: () => void): void => {
      p.channel.send(frame, onWritten);
    };
    let next = 0;
    try {
      for (const piece of p.pieces) {
        const r = this.image.regions[piece.region]!;
        this.writer.write(
          r,
          piece.page,
          piece.count,
          DataFlag.DEMAND,
          this.opts.readBytes,
          sink,
          stats,
          undefined,
          p.arrivedAt,
        );
        this.sent.mark(piece.page, piece.count, r.pageSizeBytes);
        next = piece.page + piece.count;
      }
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      const coded = typeof code === 'string' ? code : 'IMAGE_IO';
      this.hooks.failed(coded);
      p.channel.fail('IMAGE_IO', (err as Error).message);
      return;
    }
    const seconds = (performance.now() - p.arrivedAt) / 1000;
    this.hooks.served(stats, seconds, next);
  }
}
