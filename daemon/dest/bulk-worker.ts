/**
 * The bulk thread (see bulk.ts): runs every session's background channel beside the main
 * thread, which serves faults. Per session: the background Link (reconnects like the demand one), the
 * HAVE sync on every (re)connect and after a PROGRESS DONE with pages still missing, the credit
 * window, checksum-verified frames placed straight from the ws message into the VMM's memory.
 * It never reads the uffd (the main thread does): a placement that meets EAGAIN (a REMOVE or
 * UNMAP event the main thread has not read yet) waits a moment and retries, by then skipping the
 * pages the main thread marked discarded.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { encodeCredit, encodeHave } from '../../protocol/page-codec.js';
import { ProtocolError } from '../../protocol/errors.js';
import {
  Channel,
  FrameType,
  HaveFlag,
  HeaderSize,
  Limits,
  ProgressFlag,
  type Frame,
} from '../../protocol/wire.js';
import * as sys from '../linux/sys.js';
import { connectPageChannel, type PageChannel } from '../transport/client.js';
import { createLogger, type Logger, type LogLevel } from '../ops/log.js';
import { Link } from './link.js';
import { Gate, PageMap, frameRun, settledRanges, sourceMismatch } from './page-map.js';
import { placeRun, type PlaceOutcome } from './placer.js';
import type { BulkCounts, BulkSessionInit, FromBulk, ToBulk } from './bulk.js';

/** How long a placement that met EAGAIN waits before it tries again, ms. */
const RETRY_DELAY_MS = 1;
/** Longest a background channel stops reading while faults await their pages, ms. */
const FAULT_PRIORITY_MS = 2;

const port = parentPort!;
const { nice, logLevel, faults } = workerData as {
  nice: number;
  logLevel: LogLevel;
  /** [0]: faults awaited daemon-wide (bulk.ts). */
  faults: Int32Array;
};
const log = createLogger(logLevel, { service: 'yabusame-dest', thread: 'bulk' });
try {
  if (nice !== 0) sys.setThreadNice(nice);
} catch (err) {
  log.warn('cannot lower the bulk thread priority; it competes with faults for CPU', { err });
}

const post = (m: FromBulk): void => port.postMessage(m);

/**
 * Faults go first: after placing a frame while any fault in the daemon awaits its page, the
 * channel stops reading for up to FAULT_PRIORITY_MS (or until no fault is awaited). Bulk data
 * then waits in socket buffers, and the source, whose sends block, leaves the CPU to the fault's
 * answer too. Returns at once when no fault is awaited.
 */
const yielding = new WeakSet<PageChannel>();

function yieldToFaults(ch: PageChannel): void {
  const awaited = Atomics.load(faults, 0);
  // Frames ws had already read still arrive while paused: they are placed, not held again.
  if (awaited === 0 || !ch.isOpen || yielding.has(ch)) return;
  yielding.add(ch);
  ch.pause();
  const until = performance.now() + FAULT_PRIORITY_MS;
  const check = (): void => {
    const now = performance.now();
    const v = Atomics.load(faults, 0);
    if (v === 0 || now >= until || !ch.isOpen) {
      yielding.delete(ch);
      ch.resume();
      return;
    }
    const w = Atomics.waitAsync(faults, 0, v, until - now);
    if (w.async) void w.value.then(check);
    else setImmediate(check);
  };
  check();
}

class BulkSession {
  private readonly map: PageMap;
  private readonly link: Link;
  private windowOpen = false;
  /** Frames flow (start()): the first connection's HAVE sync went out. */
  private started = false;
  private creditOwed = 0;
  private closed = false;
  private counts: BulkCounts = zeroCounts();
  private flushScheduled = false;
  private readonly retryTimers = new Set<NodeJS.Timeout>();

  constructor(
    private readonly key: number,
    private readonly init: BulkSessionInit,
    sessionLog: Logger,
  ) {
    this.map = new PageMap(init.map.regions, init.map);
    this.link = new Link(
      {
        connect: connectPageChannel,
        url: init.source,
        migrationId: init.migrationId,
        kind: Channel.BACKGROUND,
        connectTimeoutMs: init.connectTimeoutMs,
        heartbeatMs: init.heartbeatMs,
        reconnectTimeoutMs: init.reconnectTimeoutMs,
        retryFirst: init.retryFirst,
        log: sessionLog,
      },
      {
        opened: (ch, reconnect) => this.onOpened(ch, reconnect),
        frame: (ch, frame, bytes) => this.onFrame(ch, frame, bytes),
        lost: (info) => post({ t: 'lost', key, code: info.code }),
        gaveUp: (info) =>
          this.fail(
            info.code,
            `no working background connection to the source for ${init.reconnectTimeoutMs} ms; last: ${info.message}`,
          ),
      },
    );
  }

  open(): void {
    this.link.open().then(
      () => post({ t: 'opened', key: this.key }),
      (err: { code?: string; message?: string }) =>
        post({
          t: 'openFailed',
          key: this.key,
          code: err.code ?? 'SOURCE_UNREACHABLE',
          message: err.message ?? String(err),
        }),
    );
  }

  start(): void {
    if (this.closed) return;
    this.started = true;
    this.link.start();
  }

  /** The window opens now, or with the HAVE sync if the channel has not started yet. */
  openWindow(): void {
    this.windowOpen = true;
    if (this.started && this.link.isOpen) this.link.send(encodeCredit(this.init.windowBytes));
  }

  close(code?: string, message?: string): void {
    this.closed = true;
    for (const t of this.retryTimers) clearTimeout(t);
    this.retryTimers.clear();
    this.link.close(code, message);
    this.flush();
  }

  private fail(code: string, message: string): void {
    if (this.closed) return;
    post({ t: 'fail', key: this.key, code, message });
  }

  /** A (new) connection: check its regions, tell the source what we hold, open the window. */
  private onOpened(ch: PageChannel, reconnect: boolean): void {
    if (this.closed) return;
    if (reconnect) {
      const why = sourceMismatch(this.map, ch.welcome.regions);
      if (why) {
        this.fail('SOURCE_MISMATCH', why);
        return;
      }
    }
    this.sendHave();
    this.creditOwed = 0;
    if (this.windowOpen) this.link.send(encodeCredit(this.init.windowBytes));
  }

  /** A HAVE sync: every settled range, LAST on the final frame (one empty frame if none). */
  private sendHave(): void {
    const ranges = settledRanges(this.map);
    const max = Limits.MAX_HAVE_ENTRIES;
    for (let i = 0; i < ranges.length || i === 0; i += max) {
      const last = i + max >= ranges.length;
      this.link.send(encodeHave(last ? HaveFlag.LAST : 0, ranges.slice(i, i + max)));
    }
  }

  private onFrame(ch: PageChannel, frame: Frame, bytes: number): void {
    if (this.closed) return;
    this.counts.bytes += bytes;
    try {
      switch (frame.type) {
        case FrameType.DATA:
        case FrameType.ZERO: {
          const { r, first, count, data, length } = frameRun(this.map, frame);
          this.place(r.index, first, count, data);
          this.link.healthy(ch);
          // Credit belongs to the connection that used it: a frame left from a lost one is
          // placed (its checksum held) but grants nothing to the new connection.
          if (ch.isOpen) this.grantCredit(data ? length : HeaderSize.ZERO);
          yieldToFaults(ch);
          break;
        }
        case FrameType.PROGRESS:
          if (frame.flags & ProgressFlag.DONE) {
            post({ t: 'sourceDone', key: this.key });
            // The source sent everything, yet pages are missing: frames were lost in a cut.
            if (!this.map.complete) this.sendHave();
          }
          break;
        default:
          throw new ProtocolError(
            'BAD_STATE',
            `frame type ${frame.type} is not legal from the source`,
          );
      }
    } catch (err) {
      // Well-formed but wrong (outside the image, misaligned, illegal here): drop this
      // connection and reconnect; a source that keeps doing it fails the session when the
      // link gives up, with this code.
      const code = (err as { code?: string }).code ?? 'SESSION_FAILED';
      post({ t: 'error', key: this.key, code });
      this.link.reset({ code, message: (err as Error).message });
    }
  }

  private grantCredit(bytes: number): void {
    this.creditOwed += bytes;
    // Batch grants: a CREDIT frame per quarter window keeps the stream full without chatter.
    if (this.creditOwed >= this.init.windowBytes / 4) {
      this.link.send(encodeCredit(this.creditOwed));
      this.creditOwed = 0;
    }
  }

  /** Places a run; on EAGAIN retries shortly (the main thread reads the pending event). */
  private place(region: number, first: number, count: number, data: Buffer | null): void {
    if (this.closed) return;
    const r = this.map.regions[region]!;
    // Under the gate: never between the main thread's read of a REMOVE event and its marks.
    this.map.enterGate(Gate.BULK);
    let out: PlaceOutcome;
    try {
      out = placeRun(this.init.uffd, this.map, r, first, count, data);
    } finally {
      this.map.leaveGate();
    }
    if (out.kind === 'gone') {
      this.fail(
        'VMM_GONE',
        `placement failed with ${out.errno} (${out.what}): the VMM's memory is gone`,
      );
      return;
    }
    if (data) this.counts.dataPages += out.placed;
    else this.counts.zeroPages += out.placed;
    this.counts.existed += out.existed;
    if (out.kind === 'retry') {
      this.counts.retries++;
      const at = out.resumeAt;
      // The frame's buffer stays referenced by this closure until the retry: bounded by the
      // credit window like every frame in flight.
      const timer = setTimeout(() => {
        this.retryTimers.delete(timer);
        this.place(
          region,
          at,
          first + count - at,
          data ? data.subarray((at - first) * r.pageSizeBytes) : null,
        );
      }, RETRY_DELAY_MS);
      this.retryTimers.add(timer);
    }
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  /** One report per turn: the main thread accounts for the pages and settles faults. */
  private flush(): void {
    const c = this.counts;
    if (c.dataPages + c.zeroPages + c.existed + c.retries + c.bytes === 0) return;
    this.counts = zeroCounts();
    post({ t: 'placed', key: this.key, counts: c });
  }
}

function zeroCounts(): BulkCounts {
  return { dataPages: 0, zeroPages: 0, existed: 0, retries: 0, bytes: 0 };
}

const sessions = new Map<number, BulkSession>();

port.on('message', (m: ToBulk) => {
  try {
    switch (m.t) {
      case 'open': {
        const s = new BulkSession(m.key, m.init, log.child({ migration: m.init.migrationId }));
        sessions.set(m.key, s);
        s.open();
        break;
      }
      case 'start':
        sessions.get(m.key)?.start();
        break;
      case 'window':
        sessions.get(m.key)?.openWindow();
        break;
      case 'close':
        sessions.get(m.key)?.close(m.code, m.message);
        sessions.delete(m.key);
        // From here on this thread never touches that session's uffd.
        post({ t: 'closed', key: m.key });
        break;
    }
  } catch (err) {
    const key = m.key;
    post({
      t: 'fail',
      key,
      code: 'INTERNAL_ERROR',
      message: `bulk thread: ${(err as Error).message}`,
    });
  }
});
