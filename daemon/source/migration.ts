/**
 * One migration on the source: a memory image, its state, its two connections, the demand
 * server and the background streamer.
 *
 *   registered ──freeze──► frozen ──COMPLETE from dest──► complete
 *        └──────abort──────┴──────abort──────► aborted
 *
 * Every transition is checked; an illegal one throws SourceError BAD_STATE. The image is
 * released (its fd closed) only on complete, or on an explicit abort.
 */
import { ProtocolError } from '../../protocol/errors.js';
import { encodeComplete } from '../../protocol/page-codec.js';
import {
  Channel,
  HaveFlag,
  HeaderSize,
  type PageRange,
  FrameType,
  type ChannelKind,
  type Frame,
  type RegionInfo,
} from '../../protocol/wire.js';
import type { Logger } from '../ops/log.js';
import type { SourceMetrics } from '../ops/metric-ports.js';
import {
  channelName,
  type ChannelCloseInfo,
  type SourceChannel,
} from '../transport/source-channel.js';
import { BackgroundStreamer } from './background.js';
import { DemandServer } from './demand.js';
import { SourceError } from './errors.js';
import type { MemoryImage } from './image.js';
import { PageWriter, type SpanStats } from './page-writer.js';
import { SentMap } from './sent-map.js';
import { SlabPool } from './slab-pool.js';

export type MigrationState = 'registered' | 'frozen' | 'complete' | 'aborted';

const NEXT: Record<MigrationState, readonly MigrationState[]> = {
  registered: ['frozen', 'aborted'],
  frozen: ['complete', 'aborted'],
  complete: [],
  aborted: [],
};

export interface MigrationOptions {
  /** Largest DATA payload of a background frame, bytes. Default 256 KiB. */
  backgroundFrameBytes?: number;
  /** Largest DATA payload of a demand frame, bytes. Default 1 MiB. */
  demandFrameBytes?: number;
  /** Background pauses while its socket holds more than this. Default 4 MiB. */
  maxBufferedBytes?: number;
  /** PROGRESS at most this often. Default 500 ms. */
  progressIntervalMs?: number;
  /** Largest REQUEST frame total. Default 64 MiB. */
  maxRequestBytes?: number;
  /** REQUEST frames held before the freeze. Default 4096. */
  maxPendingRequests?: number;
}

export interface MigrationStatus {
  id: string;
  state: MigrationState;
  image: string;
  regions: RegionInfo[];
  pages: {
    total: number;
    /** Pages sent at least once (since the last background reconnect). */
    sent: number;
    /** Pages sent by demand, counting repeats. */
    demand: number;
    /** Pages sent by the background stream, counting repeats. */
    background: number;
    /** Pages sent as ZERO runs (either path), counting repeats. */
    zero: number;
  };
  bytes: { total: number; sent: number };
  connections: { demand: boolean; background: boolean };
  /** REQUEST frames waiting for the freeze. */
  pendingRequests: number;
}

export type MigrationEvent = { type: MigrationState; id: string };

export const DEFAULT_BACKGROUND_FRAME_BYTES = 256 * 1024;

export class Migration {
  private stateValue: MigrationState = 'registered';
  private readonly sent: SentMap;
  private readonly demand: DemandServer;
  private readonly background: BackgroundStreamer;
  private readonly channels: Partial<Record<ChannelKind, SourceChannel>> = {};
  /** A HAVE sync is under way (its first frame arrived, its LAST not yet). */
  private haveSyncOpen = false;
  private readonly counts = { demand: 0, background: 0, zero: 0 };

  constructor(
    readonly id: string,
    readonly image: MemoryImage,
    private readonly metrics: SourceMetrics,
    private readonly log: Logger,
    private readonly onEvent: (event: MigrationEvent) => void,
    opts: MigrationOptions = {},
  ) {
    this.sent = new SentMap(image.totalPages);
    // Slabs sized for a full background frame; enough idle ones to refill the socket buffer.
    const frameBytes = opts.backgroundFrameBytes ?? DEFAULT_BACKGROUND_FRAME_BYTES;
    const writer = new PageWriter(image, new SlabPool(HeaderSize.DATA + frameBytes, 32));
    this.demand = new DemandServer(
      image,
      this.sent,
      writer,
      {
        readBytes: opts.demandFrameBytes ?? 1024 * 1024,
        maxRequestBytes: opts.maxRequestBytes ?? 64 * 1024 * 1024,
        maxPendingRequests: opts.maxPendingRequests ?? 4096,
      },
      {
        served: (stats, seconds, nextPage) => {
          this.account('demand', stats);
          metrics.demandServiceSeconds(seconds);
          // Demand answers go out first; the background continues after the faulted range.
          this.background.continueFrom(nextPage);
        },
        failed: (code) => this.failed(code),
      },
    );
    this.background = new BackgroundStreamer(
      image,
      this.sent,
      writer,
      {
        frameBytes: opts.backgroundFrameBytes ?? DEFAULT_BACKGROUND_FRAME_BYTES,
        maxBufferedBytes: opts.maxBufferedBytes ?? 4 * 1024 * 1024,
        progressIntervalMs: opts.progressIntervalMs ?? 500,
      },
      {
        sent: (stats) => this.account('background', stats),
        overhead: (bytes) => metrics.bytesSent('background', bytes),
        failed: (code) => this.failed(code),
      },
    );
    metrics.migrationEvent('registered');
  }

  get state(): MigrationState {
    return this.stateValue;
  }

  /** Checks `hello` may attach now; throws ProtocolError BAD_STATE otherwise. */
  checkHello(): void {
    if (this.stateValue === 'complete' || this.stateValue === 'aborted') {
      throw new ProtocolError('BAD_STATE', `migration ${this.id} is ${this.stateValue}`);
    }
  }

  /** A connection passed its HELLO; a previous one of the same kind is closed. */
  attach(channel: SourceChannel): void {
    const kind = channel.kind;
    const old = this.channels[kind];
    this.channels[kind] = channel;
    if (old) {
      this.log.info('connection replaced', {
        channel: channelName(kind),
        old: old.serial,
        new: channel.serial,
      });
      old.close('REPLACED', 'replaced by a newer connection');
    }
    this.metrics.connectionOpened(channelName(kind));
    channel.onFrame = (frame) => this.onFrame(channel, frame);
    channel.onClose = (info) => this.onClosed(channel, info);
    if (kind === Channel.BACKGROUND) {
      // Pages in flight on the old connection may be lost: the dest's HAVE sync says what it
      // holds, and the stream waits for it before sending anything.
      this.haveSyncOpen = false;
      this.background.attach(channel);
    }
  }

  freeze(): void {
    this.transition('frozen');
    this.demand.release();
    this.background.start();
  }

  abort(): void {
    this.transition('aborted');
    this.shutdown((ch) => ch.fail('MIGRATION_ABORTED', `migration ${this.id} was aborted`));
  }

  /** Releases the image without a state change (daemon shutdown). */
  dispose(): void {
    this.shutdown((ch) => ch.close('SHUTDOWN', 'the source is shutting down'));
  }

  status(): MigrationStatus {
    return {
      id: this.id,
      state: this.stateValue,
      image: this.image.path,
      regions: this.image.regionTable(),
      pages: {
        total: this.image.totalPages,
        sent: this.sent.sentPages,
        demand: this.counts.demand,
        background: this.counts.background,
        zero: this.counts.zero,
      },
      bytes: { total: this.image.totalBytes, sent: this.sent.sentBytes },
      connections: {
        demand: this.channels[Channel.DEMAND]?.isOpen ?? false,
        background: this.channels[Channel.BACKGROUND]?.isOpen ?? false,
      },
      pendingRequests: this.demand.pendingRequests,
    };
  }

  private transition(to: MigrationState): void {
    const from = this.stateValue;
    if (!NEXT[from].includes(to)) {
      throw new SourceError('BAD_STATE', `migration ${this.id}: ${from} cannot become ${to}`);
    }
    this.stateValue = to;
    this.log.info('migration state', { from, to });
    this.metrics.migrationEvent(to);
    this.onEvent({ type: to, id: this.id });
  }

  private onFrame(channel: SourceChannel, frame: Frame): void {
    if (this.channels[channel.kind] !== channel) return; // replaced
    switch (frame.type) {
      case FrameType.REQUEST:
        this.demand.request(channel, frame.ranges, this.stateValue === 'frozen');
        return;
      case FrameType.CREDIT:
        this.background.addCredit(frame.bytes);
        return;
      case FrameType.HAVE:
        this.onHave(channel, frame.flags, frame.ranges);
        return;
      case FrameType.COMPLETE:
        this.complete(channel, frame.pages);
        return;
      default:
        // The transport delivers only frames legal for the channel; anything else is a bug here.
        channel.fail('BAD_STATE', `unexpected frame type ${frame.type}`);
    }
  }

  /**
   * A HAVE sync from the dest: the first frame of a sync forgets what was sent, every frame marks
   * the ranges the dest holds, and the LAST one lets the background stream the rest.
   */
  private onHave(channel: SourceChannel, flags: number, ranges: readonly PageRange[]): void {
    if (!this.haveSyncOpen) {
      this.sent.reset();
      this.haveSyncOpen = true;
    }
    for (const range of ranges) {
      let pos = range.offset;
      const end = range.offset + range.length;
      while (pos < end) {
        const idx = this.image.regionIndexAt(pos);
        const r = idx < 0 ? undefined : this.image.regions[idx];
        if (!r || (pos - r.offset) % r.pageSizeBytes !== 0) {
          channel.fail('OUT_OF_RANGE', `HAVE range at ${pos} is not page-aligned inside the image`);
          return;
        }
        const stop = Math.min(end, r.offset + r.sizeBytes);
        const first = r.firstPage + (pos - r.offset) / r.pageSizeBytes;
        this.sent.mark(first, Math.ceil((stop - pos) / r.pageSizeBytes), r.pageSizeBytes);
        pos = stop;
      }
    }
    if (flags & HaveFlag.LAST) {
      this.haveSyncOpen = false;
      this.background.synced();
    }
  }

  /** The dest has every page: acknowledge, then release the image. */
  private complete(channel: SourceChannel, pages: number): void {
    if (this.stateValue !== 'frozen') {
      this.failed('BAD_STATE');
      channel.fail('BAD_STATE', `COMPLETE while the migration is ${this.stateValue}`);
      return;
    }
    const expected = this.image.totalPages >>> 0;
    if (pages !== expected) {
      this.failed('BAD_STATE');
      channel.fail('BAD_STATE', `COMPLETE for ${pages} pages; the image has ${expected}`);
      return;
    }
    this.transition('complete');
    const ack = encodeComplete(this.image.totalPages);
    if (channel.send(ack)) this.metrics.bytesSent(channelName(channel.kind), ack.byteLength);
    this.shutdown((ch) => ch.close('COMPLETE', 'migration complete'));
  }

  private shutdown(closeChannel: (ch: SourceChannel) => void): void {
    this.background.stop();
    this.demand.clear();
    for (const kind of [Channel.DEMAND, Channel.BACKGROUND] as const) {
      const ch = this.channels[kind];
      if (ch?.isOpen) closeChannel(ch);
    }
    this.image.close();
  }

  private onClosed(channel: SourceChannel, info: ChannelCloseInfo): void {
    const destFailed = info.message.startsWith('peer: ') && this.stateValue !== 'complete';
    this.log[destFailed ? 'warn' : 'info'](
      destFailed
        ? 'the destination ended the migration; keeping the image (it may be the only full copy of the VM)'
        : 'connection closed',
      {
        channel: channelName(channel.kind),
        conn: channel.serial,
        code: info.code,
        reason: info.message,
      },
    );
    this.demand.drop(channel);
    this.background.detach(channel);
    if (this.channels[channel.kind] === channel) delete this.channels[channel.kind];
  }

  private account(path: 'demand' | 'background', stats: SpanStats): void {
    this.counts[path] += stats.dataPages + stats.zeroPages;
    this.counts.zero += stats.zeroPages;
    if (stats.dataPages > 0) this.metrics.pagesSent(path, 'data', stats.dataPages);
    if (stats.zeroPages > 0) this.metrics.pagesSent(path, 'zero', stats.zeroPages);
    this.metrics.bytesSent(path, stats.frameBytes);
  }

  private failed(code: string): void {
    this.metrics.error(code);
  }
}
