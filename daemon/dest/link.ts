/**
 * One logical channel to the source (demand or background) that survives its connections: when a
 * connection is lost (cut, stalled past the heartbeat, a frame that failed its checksum) the link
 * reconnects with exponential backoff and jitter, and hands each new connection to its owner,
 * which re-sends what the lost one may have swallowed. It gives up after `reconnectTimeoutMs`
 * without a working connection.
 */
import type { Frame, ChannelKind } from '../../protocol/wire.js';
import { channelName } from '../../protocol/wire.js';
import type { CloseInfo, ConnectOptions, PageChannel } from '../transport/client.js';
import type { Logger } from '../ops/log.js';

/** A connection up this long without a loss has proven itself. */
const STABLE_MS = 2000;

/** Where and as whom a link connects; read at every attempt (the port may change). */
export type LinkTarget = Pick<
  ConnectOptions,
  'source' | 'migrationId' | 'secret' | 'tls' | 'lookup' | 'receive' | 'payloads'
>;

export interface LinkOptions {
  connect(opts: ConnectOptions): Promise<PageChannel>;
  target(): LinkTarget;
  kind: ChannelKind;
  connectTimeoutMs: number;
  heartbeatMs: number;
  reconnectTimeoutMs: number;
  /**
   * Retry the first connection too (with backoff, for up to reconnectTimeoutMs), instead of
   * failing fast. For a resumed handoff: the guest already runs here, so a source that is down
   * for a moment must not end its migration.
   */
  retryFirst?: boolean;
  /** First retry delay; doubles up to maxBackoffMs. */
  minBackoffMs?: number;
  maxBackoffMs?: number;
  log: Logger;
}

export interface LinkHooks {
  /** A (new) connection is up: frames may be sent on it now. `reconnect` is false the first time. */
  opened(ch: PageChannel, reconnect: boolean): void;
  /** A frame of connection `ch`, with the ws message it came in (see PageChannel.attach). */
  frame(ch: PageChannel, frame: Frame, message: Buffer): void;
  /** The connection was lost; the link is reconnecting. */
  lost(info: CloseInfo): void;
  /** No connection for reconnectTimeoutMs: the link stopped trying. */
  gaveUp(info: CloseInfo): void;
}

export class Link {
  private channel: PageChannel | null = null;
  private closed = false;
  /** The source will close the connection, and that ends the link (see expectEnd). */
  private ending = false;
  private retryTimer: NodeJS.Timeout | null = null;
  private stableTimer: NodeJS.Timeout | null = null;
  private downSince = 0;
  private attempt = 0;
  private lastLoss: CloseInfo = { code: 'SOURCE_CLOSED', message: 'connection lost' };
  /** Connections lost and restored (metrics, tests). */
  reconnects = 0;

  constructor(
    private readonly opts: LinkOptions,
    private readonly hooks: LinkHooks,
  ) {}

  get name(): 'demand' | 'background' {
    return channelName(this.opts.kind);
  }

  get isOpen(): boolean {
    return this.channel?.isOpen ?? false;
  }

  /**
   * The first connection: rejects at once (no retry) so a handoff to an unreachable source fails
   * fast, unless `retryFirst`.
   */
  async open(): Promise<PageChannel> {
    const ch = this.opts.retryFirst ? await this.dialUntilTimeout() : await this.dial();
    if (this.closed) {
      // The session ended while we were connecting (the VMM left, the other link failed).
      ch.close();
      throw Object.assign(new Error('the session ended while connecting'), { code: 'CLOSED' });
    }
    this.channel = ch;
    return ch;
  }

  /** Starts delivering frames of the first connection (after the owner is ready for them). */
  start(): void {
    const ch = this.channel;
    if (ch) this.adopt(ch, false);
  }

  send(frame: Uint8Array): boolean {
    return this.channel?.send(frame) ?? false;
  }

  close(code?: string, message?: string): void {
    if (this.closed) return;
    this.closed = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (this.stableTimer) clearTimeout(this.stableTimer);
    this.channel?.close(code, message);
    this.channel = null;
  }

  /** Drops the current connection on purpose (a bad frame) and reconnects. */
  reset(info: CloseInfo): void {
    const ch = this.channel;
    if (!ch || this.closed) return;
    ch.close(info.code, info.message);
    this.onLost(ch, info);
  }

  private async dialUntilTimeout(): Promise<PageChannel> {
    const start = Date.now();
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.dial();
      } catch (err) {
        const left = this.opts.reconnectTimeoutMs - (Date.now() - start);
        if (this.closed || left <= 0) throw err;
        this.opts.log.warn('source not reachable yet; retrying', {
          channel: this.name,
          code: (err as { code?: string }).code,
          reason: (err as Error).message,
        });
        await new Promise((r) => setTimeout(r, Math.min(this.backoffMs(attempt), left)));
      }
    }
  }

  private backoffMs(attempt: number): number {
    const min = this.opts.minBackoffMs ?? 50;
    const max = this.opts.maxBackoffMs ?? 2000;
    const base = Math.min(max, min * 2 ** attempt);
    return base / 2 + Math.random() * (base / 2);
  }

  private dial(): Promise<PageChannel> {
    return this.opts.connect({
      ...this.opts.target(),
      channel: this.opts.kind,
      timeoutMs: this.opts.connectTimeoutMs,
      heartbeatMs: this.opts.heartbeatMs,
    });
  }

  /**
   * A connection counts as restored (backoff and the give-up clock reset) only once it proves
   * itself: the owner reports a frame handled well (healthy()), or STABLE_MS pass without a loss. A source that
   * accepts connections and then sends garbage must not keep the link trying forever.
   */
  private adopt(ch: PageChannel, reconnect: boolean): void {
    this.channel = ch;
    if (this.stableTimer) clearTimeout(this.stableTimer);
    this.stableTimer = setTimeout(() => this.healthy(ch), STABLE_MS);
    this.stableTimer.unref?.();
    ch.attach(
      (frame, message) => {
        if (this.channel === ch) this.hooks.frame(ch, frame, message);
      },
      (info) => this.onLost(ch, info),
    );
    // A frame delivered by attach may already have dropped this connection.
    if (this.channel === ch && ch.isOpen) this.hooks.opened(ch, reconnect);
  }

  /** The owner handled a frame of `ch` successfully: the connection is restored for real. */
  healthy(ch: PageChannel): void {
    if (this.channel !== ch || this.downSince === 0) return;
    this.attempt = 0;
    this.downSince = 0;
    if (this.stableTimer) clearTimeout(this.stableTimer);
    this.stableTimer = null;
  }

  /**
   * The source acknowledged COMPLETE and closes the connection next: that close is no loss, and
   * nothing reconnects. (A close right behind the last frame can arrive before the owner had a
   * turn to close the link itself.)
   */
  expectEnd(): void {
    this.ending = true;
  }

  private onLost(ch: PageChannel, info: CloseInfo): void {
    if (this.closed || this.channel !== ch) return;
    this.channel = null;
    if (this.ending) return;
    this.lastLoss = info;
    this.downSince ||= Date.now();
    this.opts.log.warn('source connection lost; reconnecting', {
      channel: this.name,
      code: info.code,
      reason: info.message,
    });
    this.hooks.lost(info);
    this.scheduleRetry();
  }

  private scheduleRetry(): void {
    if (this.closed) return;
    const downMs = Date.now() - this.downSince;
    if (downMs >= this.opts.reconnectTimeoutMs) {
      this.closed = true;
      this.hooks.gaveUp(this.lastLoss);
      return;
    }
    const delayMs = Math.min(this.backoffMs(this.attempt++), this.opts.reconnectTimeoutMs - downMs);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.dial().then(
        (ch) => {
          if (this.closed) {
            ch.close();
            return;
          }
          this.reconnects++;
          this.opts.log.info('source connection restored', {
            channel: this.name,
            downMs: Date.now() - this.downSince,
          });
          this.adopt(ch, true);
        },
        (err: { code?: string; message?: string }) => {
          this.lastLoss = {
            code: err.code ?? 'SOURCE_UNREACHABLE',
            message: err.message ?? String(err),
          };
          this.scheduleRetry();
        },
      );
    }, delayMs);
    this.retryTimer.unref?.();
  }
}
