/**
 * The bulk thread of the source: every migration's background connection is served on one worker
 * thread (bulk-worker.ts), so the main thread's event loop answers demand REQUESTs without waiting
 * behind a background turn (pread, classify, checksum and send of up to a frame) and without the
 * garbage collection the background's buffers cause.
 *
 * The dest asks for `/v1/pages?channel=background`; the page server hands such a socket over
 * before the ws handshake (a dup of its fd: the threads share the fd table). Both threads share
 * each migration's sent map and page classes (SharedArrayBuffers); a lane's words carry the
 * demand cursor hint and the background counts (one writer each). The image fd is closed only
 * after the bulk thread confirmed it let go of it: a reused fd number must never be read as
 * another migration's image.
 */
import { listenError } from '../ops/unix-socket.js';
import { closeSync, fstatSync } from 'node:fs';
import type https from 'node:https';
import { Worker } from 'node:worker_threads';
import type { HandedSocket } from '../transport/server.js';
import type { EndCode } from '../transport/source-channel.js';
import type { LogFields, Logger, LogLevel } from '../ops/log.js';
import type { SourceMetrics } from '../ops/metric-ports.js';
import type { BackgroundOptions } from './background.js';
import type { MemoryImage, SharedImage } from './image.js';
import type { SentMap, SharedSentMap } from './sent-map.js';

/** Int32 words of a lane (laneWords). */
export const LaneWord = {
  /** The page after the last demand answer, plus one (0: none since the bulk thread took it). */
  HINT: 0,
  /** 1 while a background connection is attached. */
  CONNECTED: 1,
} as const;
/** Float64 counts of a lane, written by the bulk thread only (laneCounts). */
export const LaneCount = { DATA_PAGES: 0, ZERO_PAGES: 1, FRAME_BYTES: 2 } as const;

const WORDS_BYTES = 16;
const COUNTS = 3;
export const laneWords = (b: SharedArrayBuffer): Int32Array => new Int32Array(b, 0, 2);
export const laneCounts = (b: SharedArrayBuffer): Float64Array =>
  new Float64Array(b, WORDS_BYTES, COUNTS);

export interface LaneInit {
  /** Unique per lane (an id may be registered again after an abort). */
  key: number;
  id: string;
  /** The migration's secret: background connections prove it too. */
  secret: Uint8Array | null;
  image: SharedImage;
  sent: SharedSentMap;
  lane: SharedArrayBuffer;
  frozen: boolean;
  options: BackgroundOptions;
}

export type ToSourceBulk =
  | { t: 'open'; init: LaneInit }
  | { t: 'freeze'; key: number }
  | { t: 'socket'; socket: HandedSocket }
  | { t: 'release'; key: number; code: EndCode; message: string };

export type FromSourceBulk =
  | { t: 'released'; key: number }
  /** TLS: the thread listens for background connections on `port`. */
  | { t: 'listening'; port: number }
  | { t: 'listenFailed'; code: string; message: string }
  | { t: 'error'; code: string }
  /** The thread took over a handed socket's fd (from now on it closes it). */
  | { t: 'adopted'; fd: number }
  /** A background connection passed its HELLO (metrics). */
  | { t: 'connected' }
  | { t: 'log'; level: LogLevel; msg: string; fields: LogFields };

/** With TLS, the bulk thread's own listener for background connections. */
export interface BulkTls {
  listen: { host: string; port: number };
  server: https.ServerOptions;
}

export interface SourceBulkOptions {
  /** Nice value of the bulk thread (0 = same as the main thread, 19 = lowest). */
  nice: number;
  /** Also writes the bulk thread's records (with thread: bulk). */
  log: Logger;
  metrics: SourceMetrics;
  /** ws ping interval and HELLO timeout of background connections, ms. */
  heartbeatIntervalMs?: number | undefined;
  /** Every background connection must prove its migration's secret. */
  authRequired: boolean;
  tls?: BulkTls | undefined;
  helloTimeoutMs?: number | undefined;
  /** The worker's entry (tests give a stand-in); default bulk-worker.js next to this file. */
  workerUrl?: URL;
}

/** How often the background counts reach the metrics, ms. */
const METRICS_SYNC_MS = 250;

/** One migration's background lane, seen from the main thread. */
export class SourceBulkLane {
  private readonly words: Int32Array;
  private readonly counts: Float64Array;
  /** Counts already given to the metrics. */
  private readonly reported = new Float64Array(COUNTS);
  private released: Promise<void> | null = null;
  frozen = false;
  resolveReleased: (() => void) | null = null;

  constructor(
    readonly init: LaneInit,
    private readonly thread: SourceBulkThread,
    private readonly metrics: SourceMetrics,
  ) {
    this.words = laneWords(init.lane);
    this.counts = laneCounts(init.lane);
  }

  get connected(): boolean {
    return Atomics.load(this.words, LaneWord.CONNECTED) === 1;
  }

  /** Background pages sent (DATA or ZERO runs), counting repeats. */
  get pages(): { data: number; zero: number } {
    return {
      data: this.counts[LaneCount.DATA_PAGES]!,
      zero: this.counts[LaneCount.ZERO_PAGES]!,
    };
  }

  /** The image is frozen: stream. */
  start(): void {
    this.frozen = true;
    this.thread.post({ t: 'freeze', key: this.init.key });
  }

  /** The background continues at global page `page` (after a demand answer). */
  continueFrom(page: number): void {
    Atomics.store(this.words, LaneWord.HINT, page + 1);
  }

  /** Adds what the bulk thread sent since the last call to the metrics. */
  syncMetrics(): void {
    const d = (i: number): number => {
      const delta = this.counts[i]! - this.reported[i]!;
      this.reported[i] = this.counts[i]!;
      return delta;
    };
    const data = d(LaneCount.DATA_PAGES);
    const zero = d(LaneCount.ZERO_PAGES);
    const bytes = d(LaneCount.FRAME_BYTES);
    if (data > 0) this.metrics.pagesSent('background', 'data', data);
    if (zero > 0) this.metrics.pagesSent('background', 'zero', zero);
    if (bytes > 0) this.metrics.bytesSent('background', bytes);
  }

  /**
   * Closes the background connection with `code` and forgets the lane; resolves once the bulk
   * thread no longer reads the image (then its fd may be closed).
   */
  release(code: EndCode, message: string): Promise<void> {
    this.released ??= new Promise<void>((resolve) => {
      this.resolveReleased = () => {
        this.syncMetrics();
        resolve();
      };
      this.thread.post({ t: 'release', key: this.init.key, code, message });
    });
    return this.released;
  }
}

/**
 * The worker thread and its lanes. Started at once (a thread that cannot start fails the daemon
 * at startup); a thread that dies is replaced and given every live lane again (a background
 * connection it carried is lost, and the dest reconnects).
 */
export class SourceBulkThread {
  private worker: Worker | null = null;
  private readonly lanes = new Map<number, SourceBulkLane>();
  private nextKey = 1;
  /** Handed sockets the thread has not taken over yet: fd → its inode (see closeHanded). */
  private readonly handed = new Map<number, number>();
  private stopped = false;
  private readonly timer: NodeJS.Timeout;
  /** TLS: the port the thread listens on for background connections (0 until known). */
  backgroundPort = 0;
  private readyWaiters: Array<{ resolve(): void; reject(err: Error): void }> = [];

  constructor(private readonly opts: SourceBulkOptions) {
    this.spawn();
    this.timer = setInterval(() => {
      for (const lane of this.lanes.values()) lane.syncMetrics();
    }, METRICS_SYNC_MS);
    this.timer.unref();
  }

  /** Resolves once the thread serves background connections (with TLS: once it listens). */
  ready(): Promise<void> {
    if (!this.opts.tls || this.backgroundPort > 0) return Promise.resolve();
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  private listening(port: number, err: Error | null): void {
    this.backgroundPort = port;
    for (const w of this.readyWaiters.splice(0)) {
      if (err) w.reject(err);
      else w.resolve();
    }
  }

  /** Opens the background lane of migration `id`. */
  lane(
    id: string,
    image: MemoryImage,
    sent: SentMap,
    secret: Uint8Array | null,
    options: BackgroundOptions,
  ): SourceBulkLane {
    const lane = new SourceBulkLane(
      {
        key: this.nextKey++,
        id,
        secret,
        image: image.share(),
        sent: sent.share(),
        lane: new SharedArrayBuffer(WORDS_BYTES + COUNTS * 8),
        frozen: false,
        options,
      },
      this,
      this.opts.metrics,
    );
    this.lanes.set(lane.init.key, lane);
    this.post({ t: 'open', init: lane.init });
    return lane;
  }

  /** Serves a background connection the page server handed over. */
  adopt(socket: HandedSocket): void {
    if (this.stopped) {
      closeSync(socket.fd);
      return;
    }
    this.handed.set(socket.fd, fstatSync(socket.fd).ino);
    this.post({ t: 'socket', socket });
  }

  post(m: ToSourceBulk): void {
    if (this.stopped) return;
    (this.worker ?? this.spawn()).postMessage(m);
  }

  private spawn(): Worker {
    const { opts } = this;
    const worker = new Worker(opts.workerUrl ?? new URL('./bulk-worker.js', import.meta.url), {
      workerData: {
        nice: opts.nice,
        heartbeatIntervalMs: opts.heartbeatIntervalMs,
        helloTimeoutMs: opts.helloTimeoutMs,
        authRequired: opts.authRequired,
        tls: opts.tls,
      },
      stdout: false,
      stderr: false,
    });
    worker.unref();
    const bulkLog = opts.log.child({ thread: 'bulk' });
    worker.on('message', (m: FromSourceBulk) => {
      if (m.t === 'log') bulkLog[m.level](m.msg, m.fields);
      else if (m.t === 'listening') this.listening(m.port, null);
      else if (m.t === 'listenFailed') {
        const where = `${opts.tls?.listen.host ?? ''}:${opts.tls?.listen.port ?? 0}`;
        const err = Object.assign(new Error(m.message), { code: m.code });
        this.listening(0, listenError('backgroundListen', where, err));
      } else if (m.t === 'adopted') this.handed.delete(m.fd);
      else if (m.t === 'error') opts.metrics.error(m.code);
      else if (m.t === 'connected') opts.metrics.connectionOpened('background');
      else this.onReleased(m.key);
    });
    worker.on('error', (err) => opts.log.error('the bulk thread failed', { err }));
    worker.on('exit', (code) => {
      if (this.worker === worker) this.worker = null;
      if (this.stopped) return;
      opts.log.error('the bulk thread exited; starting another', { exitCode: code });
      this.closeHanded();
      // A dead thread reads no image: releases it owed are done; live lanes move to a new one.
      for (const [key, lane] of this.lanes) {
        if (lane.resolveReleased) this.onReleased(key);
        else {
          this.post({ t: 'open', init: { ...lane.init, frozen: lane.frozen } });
        }
      }
    });
    this.worker = worker;
    return worker;
  }

  /**
   * Closes the sockets a dead thread never took over (their peers see the connection end and
   * reconnect). One it did take over was closed with the thread, and its fd number may belong
   * to something else by now: only an fd that is still the same socket (same inode) is closed.
   */
  private closeHanded(): void {
    for (const [fd, ino] of this.handed) {
      try {
        if (fstatSync(fd).ino === ino) closeSync(fd);
      } catch {
        // already closed
      }
    }
    this.handed.clear();
  }

  private onReleased(key: number): void {
    const lane = this.lanes.get(key);
    if (!lane?.resolveReleased) return;
    this.lanes.delete(key);
    lane.resolveReleased();
  }

  /** Stops the thread (daemon shutdown, after every lane was released). */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    for (const key of [...this.lanes.keys()]) this.onReleased(key);
    const w = this.worker;
    this.worker = null;
    if (w) await w.terminate();
    this.closeHanded();
  }
}
