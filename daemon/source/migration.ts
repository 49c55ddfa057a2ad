/**
 * One migration on the source: a memory image, its state, its demand connection and demand
 * server, and its background lane (the streamer runs on the bulk thread, see bulk.ts).
 *
 *   registered ──freeze──► frozen ──COMPLETE from dest──► complete
 *        └──────abort──────┴──────abort──────► aborted
 *
 * Every transition is checked; an illegal one throws SourceError BAD_STATE. The image is
 * released (its fd closed) only on complete, or on an explicit abort, and only after the bulk
 * thread stopped reading it.
 */
import { ProtocolError } from '../../protocol/errors.js';
import { encodeComplete } from '../../protocol/page-codec.js';
import {
  channelName,
  Channel,
  HeaderSize,
  FrameType,
  type ChannelKind,
  type Frame,
  type RegionInfo,
} from '../../protocol/wire.js';
import type { Logger } from '../ops/log.js';
import type { SourceMetrics } from '../ops/metric-ports.js';
import {
  endChannel,
  supersede,
  type EndCode,
  type ChannelCloseInfo,
  type SourceChannel,
} from '../transport/source-channel.js';
import type { SourceBulkLane, SourceBulkThread } from './bulk.js';
import { DemandServer } from './demand.js';
import { SourceError } from './errors.js';
import type { MemoryImage } from './image.js';
import { PageWriter, type SpanStats } from './page-writer.js';
import type { QmpFollowStatus } from './qmp-follow.js';
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
  /** When it was registered, and frozen (null until then), ms since the epoch. */
  registeredAt: number;
  frozenAt: number | null;
  /** The source QEMU this migration follows for its freeze (registered with `qmp`). */
  qmp?: QmpFollowStatus;
}

/** What follows the VM for this migration (qmp-follow.ts): shown in status, closed at the end. */
export interface MigrationWatcher {
  status(): QmpFollowStatus;
  close(): void;
}

export type MigrationEvent = { type: MigrationState; id: string };

export const DEFAULT_BACKGROUND_FRAME_BYTES = 256 * 1024;

export class Migration {
  private stateValue: MigrationState = 'registered';
  private readonly sent: SentMap;
  private readonly demand: DemandServer;
  /** The background stream, on the bulk thread (bulk.ts). */
  private readonly background: SourceBulkLane;
  private readonly channels: Partial<Record<ChannelKind, SourceChannel>> = {};
  private readonly counts = { demand: 0, zero: 0 };
  /** Resolves once the image is closed (after the bulk thread let go of it). */
  private closedImage: Promise<void> | null = null;
  private readonly registeredAt = Date.now();
  private frozenAt: number | null = null;
  /** Ends the per-migration series (complete, aborted, disposed). */
  private readonly untrackMetrics: () => void;
  private watcher: MigrationWatcher | null = null;

  constructor(
    readonly id: string,
    readonly image: MemoryImage,
    /** What each page connection must prove it knows (protocol/auth.ts), or null (no auth). */
    readonly secret: Uint8Array | null,
    private readonly metrics: SourceMetrics,
    private readonly log: Logger,
    private readonly onEvent: (event: MigrationEvent) => void,
    bulk: SourceBulkThread,
    opts: MigrationOptions = {},
  ) {
    this.sent = new SentMap(image.totalPages);
    // Demand answers are a page or a few: a handful of idle slabs (the bulk thread has its own).
    const frameBytes = opts.backgroundFrameBytes ?? DEFAULT_BACKGROUND_FRAME_BYTES;
    const writer = new PageWriter(image, new SlabPool(HeaderSize.DATA + frameBytes, 4));
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
          this.account(stats);
          metrics.demandServiceSeconds(seconds);
          // Demand answers go out first; the background continues after the faulted range.
          this.background.continueFrom(nextPage);
        },
        failed: (code) => this.failed(code),
      },
    );
    this.background = bulk.lane(id, image, this.sent, secret, {
      frameBytes,
      maxBufferedBytes: opts.maxBufferedBytes ?? 4 * 1024 * 1024,
      progressIntervalMs: opts.progressIntervalMs ?? 500,
    });
    metrics.migrationEvent('registered');
    this.untrackMetrics = metrics.trackMigration(id, () => {
      const st = this.status();
      return {
        state: this.stateValue === 'registered' ? 'registered' : 'frozen',
        totalPages: st.pages.total,
        sentPages: st.pages.sent,
        pagesSent: st.pages.demand + st.pages.background,
        connections: st.connections,
        heldRequests: st.pendingRequests,
      };
    });
  }

  get state(): MigrationState {
    return this.stateValue;
  }

  /** Checks `hello` may attach here now; throws ProtocolError BAD_STATE otherwise. */
  checkHello(channel: ChannelKind): void {
    if (this.stateValue === 'complete' || this.stateValue === 'aborted') {
      throw new ProtocolError('BAD_STATE', `migration ${this.id} is ${this.stateValue}`);
    }
    if (channel === Channel.BACKGROUND) {
      throw new ProtocolError(
        'BAD_STATE',
        'background connections are served at /v1/pages?channel=background (the bulk thread)',
      );
    }
  }

  /** A connection passed its HELLO; a previous one of the same kind is closed. */
  attach(channel: SourceChannel): void {
    const kind = channel.kind;
    supersede(this.channels[kind], channel, this.log);
    this.channels[kind] = channel;
    this.metrics.connectionOpened(channelName(kind));
    channel.onFrame = (frame) => this.onFrame(channel, frame);
    channel.onClose = (info) => this.onClosed(channel, info);
  }

  freeze(): void {
    this.transition('frozen');
    // The VM stopped: the image cannot change any more, so its holes are final now. Without
    // the scan every page is read (holes read as zeros): slower, never wrong.
    try {
      this.image.scanHoles();
    } catch (err) {
      this.log.warn('cannot scan the image for holes; every page will be read', { err });
    }
    this.demand.release();
    this.background.start();
  }

  abort(why?: string): void {
    this.transition('aborted');
    this.shutdown('MIGRATION_ABORTED', `migration ${this.id} was aborted${why ? `: ${why}` : ''}`);
  }

  /** Shows `watcher` in status() and closes it when the migration ends. */
  watch(watcher: MigrationWatcher): void {
    this.watcher = watcher;
    if (this.closedImage) watcher.close();
  }

  /** Resolves once the image is closed (never before complete, abort or dispose). */
  released(): Promise<void> {
    return this.closedImage ?? new Promise(() => {});
  }

  /** Releases the image without a state change (daemon shutdown); resolves once it is closed. */
  dispose(): Promise<void> {
    this.shutdown('SHUTDOWN', 'the source is shutting down');
    return this.closedImage!;
  }

  status(): MigrationStatus {
    const bg = this.background.pages;
    return {
      id: this.id,
      state: this.stateValue,
      image: this.image.path,
      regions: this.image.regionTable(),
      pages: {
        total: this.image.totalPages,
        sent: this.sent.sentPages,
        demand: this.counts.demand,
        background: bg.data + bg.zero,
        zero: this.counts.zero + bg.zero,
      },
      bytes: { total: this.image.totalBytes, sent: this.sent.sentBytes },
      connections: {
        demand: this.channels[Channel.DEMAND]?.isOpen ?? false,
        background: this.background.connected,
      },
      pendingRequests: this.demand.pendingRequests,
      registeredAt: this.registeredAt,
      frozenAt: this.frozenAt,
      ...(this.watcher ? { qmp: this.watcher.status() } : {}),
    };
  }

  private transition(to: MigrationState): void {
    const from = this.stateValue;
    if (!NEXT[from].includes(to)) {
      throw new SourceError('BAD_STATE', `migration ${this.id}: ${from} cannot become ${to}`);
    }
    this.stateValue = to;
    // Before the event, so its listeners see when.
    if (to === 'frozen') this.frozenAt = Date.now();
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
      case FrameType.COMPLETE:
        this.complete(channel, frame.pages);
        return;
      default:
        // The transport delivers only frames legal for the channel; anything else is a bug here.
        channel.fail('BAD_STATE', `unexpected frame type ${frame.type}`);
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
    // The image goes only when this source's own record says the dest can hold every page: each
    // was sent, or reported held in a HAVE sync, since the image was opened.
    const uncovered = this.sent.uncoveredPages();
    if (uncovered > 0) {
      this.failed('BAD_STATE');
      this.log.warn('COMPLETE refused: the image is kept', { uncoveredPages: uncovered });
      channel.fail(
        'BAD_STATE',
        `COMPLETE, but ${uncovered} pages were never sent nor reported held; keeping the image`,
      );
      return;
    }
    this.transition('complete');
    const ack = encodeComplete(this.image.totalPages);
    if (channel.send(ack)) this.metrics.bytesSent(channelName(channel.kind), ack.byteLength);
    this.shutdown('COMPLETE', 'migration complete');
  }

  /**
   * Ends both connections with `code` (COMPLETE and SHUTDOWN close normally, anything else is
   * sent as an ERROR) and closes the image once the bulk thread has let go of it.
   */
  private shutdown(code: EndCode, message: string): void {
    if (this.closedImage) return;
    this.untrackMetrics();
    this.watcher?.close();
    this.demand.clear();
    endChannel(this.channels[Channel.DEMAND], code, message);
    this.closedImage = this.background.release(code, message).then(() => this.image.close());
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
    if (this.channels[channel.kind] === channel) delete this.channels[channel.kind];
  }

  /** Demand pages (the bulk thread counts the background's in its lane). */
  private account(stats: SpanStats): void {
    this.counts.demand += stats.dataPages + stats.zeroPages;
    this.counts.zero += stats.zeroPages;
    if (stats.dataPages > 0) this.metrics.pagesSent('demand', 'data', stats.dataPages);
    if (stats.zeroPages > 0) this.metrics.pagesSent('demand', 'zero', stats.zeroPages);
    this.metrics.bytesSent('demand', stats.frameBytes);
  }

  private failed(code: string): void {
    this.metrics.error(code);
  }
}
