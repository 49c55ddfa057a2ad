/**
 * The background streamer of one migration: sends every page not sent yet, from a cursor that
 * follows the faults (after a demand request for [P, P + n) it continues at P + n, as QEMU does:
 * guests touch neighbours), wrapping around until every page went out. Non-zero pages go in DATA
 * frames of up to `frameBytes`; holes and zero pages in ZERO runs.
 *
 * Flow control: DATA payload only within the credit the dest granted (a ZERO frame costs 16), and
 * no new chunk while the socket holds more than `maxBufferedBytes`. One chunk per event loop turn
 * (setImmediate). It runs on the bulk thread (bulk-worker.ts); demand REQUESTs are answered on
 * the main thread meanwhile, and where they ended arrives through `cursorHint`.
 */
import { encodeProgress } from '../../protocol/page-codec.js';
import { HeaderSize, ProgressFlag } from '../../protocol/wire.js';
import type { SourceChannel } from '../transport/source-channel.js';
import { PageClass, type MemoryImage } from './image.js';
import { newPendingZero, newSpanStats, type PageWriter, type SpanStats } from './page-writer.js';
import type { SentMap } from './sent-map.js';

export interface BackgroundOptions {
  /** Largest DATA payload per frame (a whole page at least). */
  frameBytes: number;
  /** Pause while the socket holds more than this many unwritten bytes. */
  maxBufferedBytes: number;
  /** PROGRESS at most this often while streaming. */
  progressIntervalMs: number;
}

export interface BackgroundHooks {
  sent(stats: SpanStats): void;
  /** Where the demand answers ended since the last call (SourceBulkLane.continueFrom), or -1. */
  cursorHint?: () => number;
  /** Frame bytes that are not pages (PROGRESS). */
  overhead(bytes: number): void;
  failed(code: string): void;
}

const MAX_ZERO_RUN_BYTES = 0xffffffff;
/** Frames one event-loop turn may send (bounds the turn when runs are short). */
const MAX_FRAMES_PER_TURN = 64;

const isSkip = (cls: number): boolean => cls === PageClass.HOLE || cls === PageClass.ZERO;

export class BackgroundStreamer {
  private channel: SourceChannel | null = null;
  private creditBytes = 0;
  private cursor = 0;
  private running = false;
  private scheduled = false;
  private waitingDrain = false;
  private doneSent = false;
  private lastProgressMs = 0;
  private awaitingHave = false;
  /** A zero run carried across the spans of one turn (flushed before the turn ends). */
  private readonly zeroRun = newPendingZero();

  constructor(
    private readonly image: MemoryImage,
    private readonly sent: SentMap,
    private readonly writer: PageWriter,
    private readonly opts: BackgroundOptions,
    private readonly hooks: BackgroundHooks,
  ) {}

  /** A (new) background connection: credit starts at zero; nothing goes out before its HAVE sync. */
  attach(channel: SourceChannel): void {
    this.channel = channel;
    this.creditBytes = 0;
    this.waitingDrain = false;
    this.doneSent = false;
    this.awaitingHave = true;
  }

  /** The dest's HAVE sync is complete: stream what it does not hold. */
  synced(): void {
    this.awaitingHave = false;
    this.doneSent = false;
    this.kick();
  }

  detach(channel: SourceChannel): void {
    if (this.channel === channel) this.channel = null;
  }

  addCredit(bytes: number): void {
    this.creditBytes = Math.min(this.creditBytes + bytes, Number.MAX_SAFE_INTEGER);
    this.kick();
  }

  /** The image is frozen: stream. */
  start(): void {
    this.running = true;
    this.kick();
  }

  stop(): void {
    this.running = false;
  }

  private kick(): void {
    if (
      this.scheduled ||
      this.waitingDrain ||
      this.awaitingHave ||
      !this.running ||
      !this.channel
    ) {
      return;
    }
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.step();
    });
  }

  /**
   * One event-loop turn of streaming: spans until about one frame's worth of page data was read
   * (zero runs and holes are nearly free, so a turn may cover many of them), all written with
   * the socket corked (one writev instead of one per frame: each loopback send costs a wakeup).
   */
  private step(): void {
    const ch = this.channel;
    if (!this.running || this.awaitingHave || !ch || !ch.isOpen) return;
    const hint = this.hooks.cursorHint?.() ?? -1;
    if (hint >= 0) this.cursor = hint >= this.image.totalPages ? 0 : hint;
    if (ch.bufferedBytes > this.opts.maxBufferedBytes) {
      this.waitingDrain = true;
      ch.whenBufferedBelow(this.opts.maxBufferedBytes, () => {
        this.waitingDrain = false;
        if (this.channel === ch) this.kick();
      });
      return;
    }
    let more = true;
    ch.batch(() => {
      const budget = { bytes: this.opts.frameBytes, frames: MAX_FRAMES_PER_TURN };
      while (more && budget.bytes > 0 && budget.frames > 0 && ch.isOpen) {
        more = this.span(ch, budget);
      }
      // The run carried to the end of the turn: its pages are marked sent, so send it now.
      this.flushCarried(ch);
    });
    if (more) this.kick();
  }

  /** Sends the zero run carried across spans, if any, and accounts for it. */
  private flushCarried(ch: SourceChannel): void {
    const stats = newSpanStats();
    this.writer.flushZero(this.zeroRun, (f) => ch.send(f), stats);
    this.settle(stats);
  }

  /** Accounts for what went out: credit (a ZERO frame costs its header) and the hook. */
  private settle(stats: SpanStats): void {
    if (stats.frameBytes === 0) return;
    this.creditBytes -= stats.payloadBytes + HeaderSize.ZERO * stats.zeroFrames;
    this.hooks.sent(stats);
  }

  /** Sends one span of pages; false when there is nothing to send now (done, or no credit). */
  private span(ch: SourceChannel, budget: { bytes: number; frames: number }): boolean {
    const page = this.sent.nextUnsent(this.cursor);
    if (page < 0) {
      this.flushCarried(ch); // before PROGRESS DONE
      if (!this.doneSent) {
        this.doneSent = true;
        this.progress(ch, ProgressFlag.DONE);
      }
      return false;
    }
    const image = this.image;
    const r = image.regions[image.regionIndexOfPage(page)]!;
    const size = r.pageSizeBytes;
    const regionEnd = r.firstPage + r.pageCount;
    const cls = image.pageClass;
    const skip = isSkip(cls[page]!);
    // A ZERO run costs 16 bytes of credit; a read chunk at most its size (zero pages found in it
    // cost 16 per run, which is less than the page they replace).
    const maxPages = skip
      ? this.creditBytes >= HeaderSize.ZERO
        ? Math.floor(MAX_ZERO_RUN_BYTES / size)
        : 0
      : Math.floor(Math.min(Math.max(this.opts.frameBytes, size), this.creditBytes) / size);
    if (maxPages <= 0) return false; // wait for CREDIT (a carried ZERO frame may overdraw it by 16)
    let end = page + 1;
    while (
      end < regionEnd &&
      end - page < maxPages &&
      !this.sent.isSent(end) &&
      isSkip(cls[end]!) === skip
    ) {
      end++;
    }
    const stats = newSpanStats();
    try {
      this.writer.write(
        r,
        page,
        end - page,
        0,
        this.opts.frameBytes,
        (f, onWritten) => ch.send(f, onWritten),
        stats,
        this.zeroRun,
      );
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      this.hooks.failed(typeof code === 'string' ? code : 'IMAGE_IO');
      ch.fail('IMAGE_IO', (err as Error).message);
      return false;
    }
    this.sent.mark(page, end - page, size);
    this.cursor = end >= image.totalPages ? 0 : end;
    this.settle(stats);
    const now = Date.now();
    if (now - this.lastProgressMs >= this.opts.progressIntervalMs) this.progress(ch, 0);
    // A turn is bounded by what it reads (data, and zero pages found by reading them) and by
    // its spans (holes and known zeros cost no read).
    budget.bytes -= stats.readBytes;
    budget.frames -= 1 + (stats.dataPages > 0 ? 1 : 0);
    return true;
  }

  private progress(ch: SourceChannel, flags: number): void {
    this.lastProgressMs = Date.now();
    const frame = encodeProgress(flags, this.sent.sentBytes, this.image.totalBytes);
    if (ch.send(frame)) this.hooks.overhead(frame.byteLength);
  }
}
