/**
 * Where a session's pages come from when they come from a `yabusame source` on another host:
 * the demand channel (a Link on the main thread: REQUESTs out, their DATA/ZERO answers in, and
 * COMPLETE) and the background channel (a lane on the bulk thread, bulk.ts). Both are checked
 * against the session's regions on every connection: a restarted source that serves another
 * image fails the session with SOURCE_MISMATCH instead of placing wrong pages.
 *
 * Ordering written down here:
 *  - both channels are connected (HELLO answered) before the VMM is acked;
 *  - every new demand connection re-requests every awaited page (hooks.demandOpened);
 *  - every new background connection starts with a HAVE sync of what the session holds, and a
 *    PROGRESS DONE while pages are still missing (frames lost in a cut) triggers another;
 *  - COMPLETE goes on the demand channel, after the background channel was closed (so the
 *    source's close after its acknowledgement is never mistaken for a lost connection), and
 *    again on every restored demand connection until acknowledged.
 */
import { performance } from 'node:perf_hooks';
import { encodeComplete, encodeRequest } from '../../protocol/page-codec.js';
import { codeOf, HANDOFF_ERROR_CODES, ProtocolError } from '../../protocol/errors.js';
import { checkRun } from '../../protocol/ranges.js';
import {
  Channel,
  DataFlag,
  FrameType,
  ProgressFlag,
  type Frame,
  type PageRange,
  type RegionInfo,
} from '../../protocol/wire.js';
import type { ClientTls, ConnectOptions, PageChannel } from '../transport/client.js';
import { formatHostPort, parseSourceUrl, type SourceAddress } from '../../protocol/source-url.js';
import { checkSource, policyLookup, type SourcePolicy } from './source-policy.js';
import type { Logger } from '../ops/log.js';
import type { DestMetrics } from '../ops/metric-ports.js';
import { Link } from './link.js';
import type { BackgroundRun, BulkLane, BulkLaneFactory } from './bulk.js';
import { SessionError } from './session-error.js';
import type {
  LinkState,
  LinkStatus,
  DemandAnswer,
  PageSource,
  PageSourceFactory,
  SourceHooks,
} from './page-source.js';
import type { HandoffRequest } from '../../protocol/handoff.js';
import { parseSecret } from '../../protocol/auth.js';

export type { LinkState, LinkStatus, SourceHooks } from './page-source.js';

/**
 * Resyncs of one session go out at most this often. Each lists every settled page (work on the
 * main thread in proportion to the guest's size), and a source that alternates a run and a
 * PROGRESS DONE would otherwise get one for every such pair.
 */
const RESYNC_INTERVAL_MS = 1000;

export interface RemoteSourceOptions {
  /** Where the source is (its demand port; WELCOME names the background one). */
  source: SourceAddress;
  migrationId: string;
  /** The migration's secret, proven on every connection (null: the source asks for none). */
  secret: Uint8Array | null;
  tls: ClientTls | undefined;
  policy: SourcePolicy;
  connectTimeoutMs: number;
  heartbeatMs: number;
  reconnectTimeoutMs: number;
  /** Background bytes in flight (the credit window). */
  windowBytes: number;
  /** A resumed handoff: retry the first connections too (see LinkOptions.retryFirst). */
  retryFirst: boolean;
}

export interface RemoteSourceDeps {
  connect(opts: ConnectOptions): Promise<PageChannel>;
  bulk: BulkLaneFactory;
  log: Logger;
  metrics: DestMetrics;
}

export class RemoteSource implements PageSource {
  readonly answer: DemandAnswer = {
    offset: 0,
    end: -1,
    receivedAt: 0,
    verifiedAt: 0,
    message: null,
  };
  private readonly demand: Link;
  private readonly background: BulkLane;
  private backgroundSerial = 0;
  private backgroundReconnects = 0;
  private completeAck: (() => void) | null = null;
  private completing = false;
  /** The source sent PROGRESS DONE at least once. */
  sourceDone = false;
  readonly prefetches = true;
  /** Frame bytes received on both channels. */
  receivedBytes = 0;
  private readonly linkStatus: Record<'demand' | 'background', LinkStatus> = {
    demand: { state: 'connecting', since: Date.now() },
    background: { state: 'connecting', since: Date.now() },
  };
  readonly label: string;

  constructor(
    private readonly opts: RemoteSourceOptions,
    private readonly hooks: SourceHooks,
    private readonly deps: RemoteSourceDeps,
  ) {
    const { log } = deps;
    this.label = `${opts.source.scheme}://${formatHostPort(opts.source)}`;
    const lookup = policyLookup(opts.policy);
    this.demand = new Link(
      {
        connect: deps.connect,
        target: () => ({
          source: opts.source,
          migrationId: opts.migrationId,
          secret: opts.secret,
          tls: opts.tls,
          lookup,
          // One small frame per fault, placed while it is delivered (raw-receive.ts).
          receive: 'raw',
        }),
        kind: Channel.DEMAND,
        connectTimeoutMs: opts.connectTimeoutMs,
        heartbeatMs: opts.heartbeatMs,
        reconnectTimeoutMs: opts.reconnectTimeoutMs,
        retryFirst: opts.retryFirst,
        log,
      },
      {
        opened: (ch, reconnect) => this.onDemandOpened(ch, reconnect),
        frame: (ch, frame, message) => this.onDemandFrame(ch, frame, message),
        lost: (info) => {
          this.setLink('demand', 'reconnecting');
          deps.metrics.reconnect('demand');
          deps.metrics.error(info.code);
        },
        gaveUp: (info) => {
          this.setLink('demand', 'closed');
          hooks.fail(
            codeOf(info.code, HANDOFF_ERROR_CODES, 'SOURCE_UNREACHABLE'),
            `no working demand connection to the source for ${opts.reconnectTimeoutMs} ms; last: ${info.message}`,
          );
        },
      },
    );
    this.background = deps.bulk.lane(
      {
        migrationId: opts.migrationId,
        secret: opts.secret,
        tls: opts.tls,
        policy: opts.policy,
        windowBytes: opts.windowBytes,
        connectTimeoutMs: opts.connectTimeoutMs,
        heartbeatMs: opts.heartbeatMs,
        reconnectTimeoutMs: opts.reconnectTimeoutMs,
        retryFirst: opts.retryFirst,
      },
      {
        connected: (serial, regions, reconnect) =>
          this.onBackgroundConnected(serial, regions, reconnect),
        run: (r) => this.onBackgroundRun(r),
        lost: (code) => {
          this.setLink('background', 'reconnecting');
          this.backgroundReconnects++;
          deps.metrics.reconnect('background');
          deps.metrics.error(code);
        },
        error: (code) => deps.metrics.error(code),
        sourceDone: () => this.onSourceDone(),
        fail: (code, message) => hooks.fail(code, message),
      },
    );
  }

  /** Connections lost and restored, both channels. */
  get reconnects(): number {
    return this.demand.reconnects + this.backgroundReconnects;
  }

  /** Each channel's state (status, per-migration metrics). */
  get links(): Readonly<Record<'demand' | 'background', LinkStatus>> {
    return this.linkStatus;
  }

  private setLink(channel: 'demand' | 'background', state: LinkState): void {
    if (this.linkStatus[channel].state === state) return;
    this.linkStatus[channel] = { state, since: Date.now() };
  }

  /**
   * Opens the demand channel, then the background channel where its WELCOME says, and checks
   * the source's regions. Rejects with a SessionError (SOURCE_UNREACHABLE, SOURCE_MISMATCH,
   * AUTH_FAILED, the source's refusal...).
   */
  async open(): Promise<void> {
    const coded = (err: unknown): never => {
      throw new SessionError(
        codeOf(err, HANDOFF_ERROR_CODES, 'SOURCE_UNREACHABLE'),
        (err as Error).message,
        { cause: err },
      );
    };
    const demand = await this.demand.open().catch(coded);
    this.setLink('demand', 'up');
    const regions = await this.background
      .open(this.backgroundAddress(demand.welcome.backgroundPort))
      .catch(coded);
    this.setLink('background', 'up');
    for (const r of [demand.welcome.regions, regions]) {
      const why = this.hooks.mismatch(r);
      if (why) throw new SessionError('SOURCE_MISMATCH', why);
    }
  }

  /** The port of the last WELCOME's backgroundPort (0: the demand port). */
  private backgroundPort = 0;
  /** Where background connections go, by a WELCOME's backgroundPort. */
  private backgroundAddress(port: number): SourceAddress {
    this.backgroundPort = port;
    return port === 0 ? this.opts.source : { ...this.opts.source, port };
  }

  /** The session runs: frames flow. */
  start(): void {
    this.demand.start();
    this.background.start();
  }

  /** Grants the first background CREDIT. */
  openWindow(): void {
    this.background.openWindow();
  }

  /** Sends REQUEST frames; false when the demand channel is down (the caller keeps them). */
  request(batches: readonly PageRange[][]): boolean {
    if (!this.demand.isOpen) return false;
    for (const ranges of batches) this.demand.send(encodeRequest(ranges));
    return true;
  }

  /**
   * Every page is settled: closes the background channel, sends COMPLETE on the demand channel
   * (again on every restored connection) and resolves true on the source's acknowledgement, or
   * false after `timeoutMs` (the source then keeps its image until told).
   */
  async complete(totalPages: number, timeoutMs: number): Promise<boolean> {
    this.completing = true;
    this.setLink('background', 'closed');
    await this.background.close();
    return new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.completeAck = () => {
        clearTimeout(timer);
        resolve(true);
      };
      this.sendComplete(totalPages);
    });
  }

  /**
   * Closes both channels; a `code` goes to the source as an ERROR frame (VMM_GONE,
   * DAEMON_STOPPING...). Resolves once no background run can reach the session any more.
   */
  close(code?: string, message?: string): Promise<void> {
    this.cancelResync();
    this.setLink('demand', 'closed');
    this.setLink('background', 'closed');
    this.demand.close(code, message);
    return this.background.close(code, message);
  }

  private totalPages = 0;
  private sendComplete(totalPages: number): void {
    this.totalPages = totalPages;
    this.demand.send(encodeComplete(totalPages));
  }

  private onDemandOpened(ch: PageChannel, reconnect: boolean): void {
    this.setLink('demand', 'up');
    if (reconnect) {
      const why = this.hooks.mismatch(ch.welcome.regions);
      if (why) {
        this.hooks.fail('SOURCE_MISMATCH', why);
        return;
      }
      // A restarted source may serve background connections on another port now.
      if (ch.welcome.backgroundPort !== this.backgroundPort) {
        this.background.retarget(this.backgroundAddress(ch.welcome.backgroundPort));
      }
    }
    this.hooks.demandOpened(reconnect);
    if (this.completing && this.completeAck) this.sendComplete(this.totalPages);
  }

  /** A frame on the demand channel (the background channel's come through the bulk thread). */
  private onDemandFrame(ch: PageChannel, frame: Frame, message: Buffer): void {
    this.deps.metrics.bytesReceived('demand', message.byteLength);
    this.receivedBytes += message.byteLength;
    try {
      switch (frame.type) {
        case FrameType.DATA:
        case FrameType.ZERO: {
          const data =
            frame.type === FrameType.DATA
              ? Buffer.from(
                  frame.payload.buffer,
                  frame.payload.byteOffset,
                  frame.payload.byteLength,
                )
              : null;
          const length = data ? data.byteLength : (frame as { length: number }).length;
          checkRun(ch.welcome.regions, frame.offset, length);
          const demand = (frame.flags & DataFlag.DEMAND) !== 0;
          if (demand) {
            const a = this.answer;
            a.offset = frame.offset;
            a.end = frame.offset + length;
            a.verifiedAt = performance.now();
            a.receivedAt = ch.receivedAt ?? a.verifiedAt;
            a.message = message;
          }
          try {
            this.hooks.run({
              offset: frame.offset,
              length,
              data,
              path: demand ? 'demand' : 'background',
            });
          } finally {
            this.answer.end = -1;
            this.answer.message = null;
          }
          this.demand.healthy(ch);
          break;
        }
        case FrameType.PROGRESS:
          if (frame.flags & ProgressFlag.DONE) this.sourceDone = true;
          break;
        case FrameType.COMPLETE:
          if (!this.completing) throw new ProtocolError('BAD_STATE', 'COMPLETE before ours');
          this.demand.expectEnd();
          this.completeAck?.();
          this.completeAck = null;
          break;
        default:
          throw new ProtocolError(
            'BAD_STATE',
            `frame type ${frame.type} is not legal on the demand channel`,
          );
      }
    } catch (err) {
      // Well-formed but wrong (outside the image, misaligned, illegal here): drop this
      // connection and reconnect; a source that keeps doing it fails the session when the
      // link gives up, with this code.
      const code = codeOf(err, HANDOFF_ERROR_CODES, 'INTERNAL_ERROR');
      this.deps.metrics.error(code);
      this.demand.reset({ code, message: (err as Error).message });
    }
  }

  private onBackgroundConnected(
    serial: number,
    regions: readonly RegionInfo[],
    reconnect: boolean,
  ): void {
    this.backgroundSerial = serial;
    this.resyncSent = false;
    // The sync below lists everything: a resync waiting for its turn has nothing to add.
    this.cancelResync();
    this.setLink('background', 'up');
    if (reconnect) {
      const why = this.hooks.mismatch(regions);
      if (why) {
        this.hooks.fail('SOURCE_MISMATCH', why);
        return;
      }
    }
    this.background.have(serial, this.hooks.settledRanges());
  }

  private onBackgroundRun(r: BackgroundRun): void {
    this.resyncSent = false;
    this.deps.metrics.bytesReceived('background', r.bytes);
    this.receivedBytes += r.bytes;
    this.hooks.run({ offset: r.offset, length: r.length, data: r.data, path: 'background' });
  }

  /** A resync went out and no run came since: another PROGRESS DONE changes nothing. */
  private resyncSent = false;
  /** When the last resync went out (performance.now()). */
  private lastResyncAt = -Infinity;
  /** A resync deferred to the end of RESYNC_INTERVAL_MS. */
  private resyncTimer: NodeJS.Timeout | null = null;

  private onSourceDone(): void {
    this.sourceDone = true;
    this.resync();
  }

  /**
   * The source sent everything, yet pages are missing: frames were lost in a cut. Resync, once:
   * a source repeating DONE with nothing in between gets no second sync to send back. And at
   * most once per RESYNC_INTERVAL_MS: a DONE sooner is answered by one deferred resync.
   */
  private resync(): void {
    if (this.hooks.complete() || this.resyncSent || this.resyncTimer) return;
    const waitMs = this.lastResyncAt + RESYNC_INTERVAL_MS - performance.now();
    if (waitMs > 0) {
      this.resyncTimer = setTimeout(() => {
        this.resyncTimer = null;
        this.resync();
      }, waitMs);
      return;
    }
    this.resyncSent = true;
    this.lastResyncAt = performance.now();
    this.background.have(this.backgroundSerial, this.hooks.settledRanges());
  }

  private cancelResync(): void {
    if (this.resyncTimer) clearTimeout(this.resyncTimer);
    this.resyncTimer = null;
  }
}

/** What remotePageSource needs beyond the request: the daemon's settings and its channels. */
export interface RemoteSourceSettings {
  connectTimeoutMs: number;
  heartbeatMs: number;
  reconnectTimeoutMs: number;
  backgroundWindowBytes: number;
  /** A handoff must carry the migration's secret. */
  requireSecret: boolean;
  policy: SourcePolicy;
  tls: ClientTls | undefined;
}

/**
 * The page source of a handoff that names a `yabusame source`: checks that this daemon may use
 * it (SOURCE_DENIED, HANDOFF_NO_SECRET), then builds its RemoteSource.
 */
export function remotePageSource(
  request: Pick<HandoffRequest, 'source' | 'secret' | 'migrationId' | 'resume'>,
  settings: RemoteSourceSettings,
  deps: Omit<RemoteSourceDeps, 'log'>,
): PageSourceFactory {
  return (hooks, { table, log }) => {
    // The codec checked both parse; policy decides whether this daemon may use them.
    const source = parseSourceUrl(request.source);
    const secret = request.secret === undefined ? null : parseSecret(request.secret);
    try {
      checkSource(source, settings.policy);
    } catch (err) {
      if (err instanceof SessionError) throw err;
      throw new SessionError('SOURCE_DENIED', (err as Error).message);
    }
    if (!secret && settings.requireSecret) {
      throw new SessionError(
        'HANDOFF_NO_SECRET',
        'the handoff carries no secret; this daemon proves one to every source',
      );
    }
    // The source sends a page only within credit, and the bulk thread grants in steps of a
    // quarter share, a share being at most the window: a quarter of the window holds the largest
    // page. (The share itself never drops below two such pages: credit-share.ts.)
    const largestPage = Math.max(...table.regions.map((r) => r.pageSizeBytes));
    return new RemoteSource(
      {
        source,
        migrationId: request.migrationId,
        secret,
        tls: settings.tls,
        policy: settings.policy,
        connectTimeoutMs: settings.connectTimeoutMs,
        heartbeatMs: settings.heartbeatMs,
        reconnectTimeoutMs: settings.reconnectTimeoutMs,
        windowBytes: Math.max(settings.backgroundWindowBytes, 4 * largestPage),
        retryFirst: request.resume === true,
      },
      hooks,
      { ...deps, log },
    );
  };
}
