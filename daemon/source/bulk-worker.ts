/**
 * The source's bulk thread (see bulk.ts): serves every migration's background connection beside
 * the main thread, which answers demand requests. Per migration (a lane): the background
 * streamer, the HAVE sync of each connection, credit. It reads the image through the main
 * thread's fd and never closes it; after a release it does not read it again.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { codeOf, PAGE_ERROR_CODES, ProtocolError } from '../../protocol/errors.js';
import {
  channelName,
  Channel,
  FrameType,
  HaveFlag,
  HeaderSize,
  type Frame,
} from '../../protocol/wire.js';
import type { PageRange } from '../../protocol/wire.js';
import * as sys from '../linux/sys.js';
import { forwardingLogger, type Logger } from '../ops/log.js';
import {
  listenPageServer,
  PageConnections,
  type HelloAcceptance,
  type HelloFrame,
  type PageConnectionOptions,
} from '../transport/server.js';
import {
  endChannel,
  supersede,
  type EndCode,
  type SourceChannel,
} from '../transport/source-channel.js';
import { BackgroundStreamer } from './background.js';
import {
  LaneCount,
  LaneWord,
  laneCounts,
  laneWords,
  type BulkTls,
  type FromSourceBulk,
  type LaneInit,
  type ToSourceBulk,
} from './bulk.js';
import { MemoryImage } from './image.js';
import { authenticate } from './auth.js';
import { PageWriter } from './page-writer.js';
import { SentMap } from './sent-map.js';
import { SlabPool } from './slab-pool.js';

const port = parentPort!;
const data = workerData as {
  nice: number;
  heartbeatIntervalMs: number | undefined;
  helloTimeoutMs: number | undefined;
  authRequired: boolean;
  tls: BulkTls | undefined;
};
const post = (m: FromSourceBulk): void => port.postMessage(m);
// The main thread's logger writes these (its level, its output).
const log = forwardingLogger((level, msg, fields) => {
  try {
    post({ t: 'log', level, msg, fields });
  } catch {
    post({ t: 'log', level, msg, fields: { unserializable: Object.keys(fields) } });
  }
});
try {
  if (data.nice !== 0) sys.setThreadNice(data.nice);
} catch (err) {
  log.warn('cannot lower the bulk thread priority; it competes with demand for CPU', { err });
}
class Lane {
  readonly image: MemoryImage;
  private readonly sent: SentMap;
  private readonly streamer: BackgroundStreamer;
  private readonly words: Int32Array;
  private readonly counts: Float64Array;
  private channel: SourceChannel | null = null;
  /** A HAVE sync is under way (its first frame arrived, its LAST not yet). */
  private haveSyncOpen = false;
  /** Why it ended (complete, aborted, ...), once released. */
  ended: string | null = null;

  constructor(
    readonly init: LaneInit,
    private readonly log: Logger,
  ) {
    this.image = MemoryImage.fromShared(init.image);
    this.sent = new SentMap(this.image.totalPages, init.sent);
    this.words = laneWords(init.lane);
    this.counts = laneCounts(init.lane);
    // Slabs sized for a full frame; enough idle ones to refill the socket buffer.
    const writer = new PageWriter(
      this.image,
      new SlabPool(HeaderSize.DATA + init.options.frameBytes, 32),
    );
    this.streamer = new BackgroundStreamer(this.image, this.sent, writer, init.options, {
      sent: (stats) => {
        this.counts[LaneCount.DATA_PAGES]! += stats.dataPages;
        this.counts[LaneCount.ZERO_PAGES]! += stats.zeroPages;
        this.counts[LaneCount.FRAME_BYTES]! += stats.frameBytes;
      },
      overhead: (bytes) => {
        this.counts[LaneCount.FRAME_BYTES]! += bytes;
      },
      failed: (code) => post({ t: 'error', code }),
      cursorHint: () => Atomics.exchange(this.words, LaneWord.HINT, 0) - 1,
    });
    if (init.frozen) this.streamer.start();
  }

  freeze(): void {
    this.streamer.start();
  }

  hello(hello: HelloFrame, nonce: Uint8Array): HelloAcceptance {
    authenticate(hello, nonce, this.init.secret, data.authRequired);
    if (this.ended) {
      throw new ProtocolError('BAD_STATE', `migration ${this.init.id} is ${this.ended}`);
    }
    return { regions: this.image.regionTable(), attach: (ch) => this.attach(ch) };
  }

  /** A background connection passed its HELLO; a previous one is closed. */
  private attach(channel: SourceChannel): void {
    supersede(this.channel, channel, this.log);
    this.channel = channel;
    Atomics.store(this.words, LaneWord.CONNECTED, 1);
    post({ t: 'connected' });
    channel.onFrame = (frame) => this.onFrame(channel, frame);
    channel.onClose = (info) => {
      this.log.info('connection closed', {
        channel: channelName(channel.kind),
        conn: channel.serial,
        code: info.code,
        reason: info.message,
      });
      this.streamer.detach(channel);
      if (this.channel === channel) {
        this.channel = null;
        Atomics.store(this.words, LaneWord.CONNECTED, 0);
      }
    };
    // Pages in flight on the old connection may be lost: the dest's HAVE sync says what it
    // holds, and the stream waits for it before sending anything.
    this.haveSyncOpen = false;
    this.streamer.attach(channel);
  }

  private onFrame(channel: SourceChannel, frame: Frame): void {
    if (this.channel !== channel) return; // replaced
    switch (frame.type) {
      case FrameType.CREDIT:
        this.streamer.addCredit(frame.bytes);
        return;
      case FrameType.HAVE:
        this.onHave(channel, frame.flags, frame.ranges);
        return;
      default:
        // COMPLETE goes on the demand channel; nothing else is legal here.
        post({ t: 'error', code: 'BAD_STATE' });
        channel.fail(
          'BAD_STATE',
          `frame type ${frame.type} is not served on the background channel`,
        );
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
    try {
      this.image.resolve(ranges, (p) => {
        const r = this.image.regions[p.region]!;
        this.sent.mark(p.page, p.count, r.pageSizeBytes);
      });
    } catch (err) {
      const code = codeOf(err, PAGE_ERROR_CODES, 'OUT_OF_RANGE');
      post({ t: 'error', code });
      channel.fail(code, (err as Error).message);
      return;
    }
    if (flags & HaveFlag.LAST) {
      this.haveSyncOpen = false;
      this.streamer.synced();
    }
  }

  /** Stops streaming, closes the connection with `code`, and never reads the image again. */
  release(code: EndCode, message: string): void {
    this.ended = code === 'COMPLETE' ? 'complete' : code === 'SHUTDOWN' ? 'shut down' : 'aborted';
    this.streamer.stop();
    const ch = this.channel;
    this.channel = null;
    Atomics.store(this.words, LaneWord.CONNECTED, 0);
    endChannel(ch, code, message);
    this.image.release();
  }
}

/** Lanes by key, and the newest lane of each migration id (what a HELLO names). */
const lanes = new Map<number, Lane>();
const byId = new Map<string, Lane>();

const connectionOptions: PageConnectionOptions = {
  onHello: (hello: HelloFrame, nonce: Uint8Array): HelloAcceptance => {
    if (hello.channel !== Channel.BACKGROUND) {
      throw new ProtocolError(
        'BAD_STATE',
        'this connection asked for the background channel (?channel=background)',
      );
    }
    const lane = byId.get(hello.migrationId);
    if (!lane) {
      throw new ProtocolError('UNKNOWN_MIGRATION', `no migration ${hello.migrationId} here`);
    }
    return lane.hello(hello, nonce);
  },
  heartbeatIntervalMs: data.heartbeatIntervalMs,
  helloTimeoutMs: data.helloTimeoutMs,
  log,
  onError: (code) => post({ t: 'error', code }),
};

/**
 * Plaintext: background sockets are handed over by the main thread (conns.adopt). TLS: this
 * thread listens on a port of its own (a TLS session cannot change threads).
 */
const conns = new PageConnections(connectionOptions, 'bg');
if (data.tls) {
  listenPageServer({ ...connectionOptions, ...data.tls.listen, tls: data.tls.server }).then(
    (server) => post({ t: 'listening', port: server.port }),
    (err: Error & { code?: string }) => {
      log.error('the bulk thread cannot listen for background connections', { err });
      post({ t: 'listenFailed', code: err.code ?? 'LISTEN', message: err.message });
    },
  );
}

port.on('message', (m: ToSourceBulk) => {
  switch (m.t) {
    case 'open': {
      const lane = new Lane(m.init, log.child({ migrationId: m.init.id }));
      lanes.set(m.init.key, lane);
      byId.set(m.init.id, lane);
      break;
    }
    case 'freeze':
      lanes.get(m.key)?.freeze();
      break;
    case 'socket':
      conns.adopt(m.socket);
      post({ t: 'adopted', fd: m.socket.fd });
      break;
    case 'release':
      lanes.get(m.key)?.release(m.code, m.message);
      lanes.delete(m.key);
      // From here on this thread never reads that image's fd.
      post({ t: 'released', key: m.key });
      break;
  }
});
