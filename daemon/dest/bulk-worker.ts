/**
 * The bulk thread (see bulk.ts): every session's background connection lives here. Per session:
 * the background Link (reconnects like the demand one), frames decoded and checked (checksum,
 * inside one region of this connection's WELCOME, whole pages), the HAVE sync of each new
 * connection (the main thread, which owns the page map, says what to send), and credit: the
 * main thread reports each run it placed, and this thread grants it again on the connection the
 * run came from, within the session's share of the payload ring (credit-share.ts). A plain
 * connection's payloads are received straight into the ring (transport/raw-receive.ts), a TLS
 * one's copied in; verified runs go to the main thread, which does all placing; this thread
 * never touches a uffd.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { encodeCredit, encodeHave } from '../../protocol/page-codec.js';
import { ProtocolError, codeOf, HANDOFF_ERROR_CODES } from '../../protocol/errors.js';
import { checkRun } from '../../protocol/ranges.js';
import {
  Channel,
  FrameType,
  HaveFlag,
  HeaderSize,
  Limits,
  ProgressFlag,
  type Frame,
  type PageRange,
} from '../../protocol/wire.js';
import * as sys from '../linux/sys.js';
import { connectPageChannel, type PageChannel } from '../transport/client.js';
import { closeAllReceivers } from '../transport/raw-receive.js';
import { createLogger, type Logger, type LogLevel } from '../ops/log.js';
import { Link } from './link.js';
import { policyLookup } from './source-policy.js';
import type { SourceAddress } from '../../protocol/source-url.js';
import { PayloadRing, type SharedRing } from './payload-ring.js';
import type { BulkSessionInit, FromBulk, ToBulk } from './bulk.js';
import { FileLane } from './file-lane.js';
import { grantNow, leastShare, shareOf } from './credit-share.js';

/** Longest a background connection stops reading while faults await their pages, ms. */
const FAULT_PRIORITY_MS = 2;

const port = parentPort!;
const {
  nice,
  logLevel,
  faults,
  ring: sharedRing,
} = workerData as {
  nice: number;
  logLevel: LogLevel;
  /** [0]: faults awaited daemon-wide (bulk.ts). */
  faults: Int32Array;
  ring: SharedRing;
};
const ring = new PayloadRing(sharedRing);
/**
 * Background channels receive DATA payloads straight into the ring (transport/raw-receive.ts):
 * the room reserved last, and the position of the one committed last, which the frame delivered
 * right after the commit is at.
 */
const ringSink = {
  reserved: -1,
  reservedBytes: 0,
  committed: -1,
  reserve(n: number): Buffer | null {
    const p = ring.reserve(n);
    if (p < 0) return null;
    this.reserved = p;
    this.reservedBytes = n;
    return ring.view(p, n);
  },
  commit(): void {
    ring.commit(this.reserved + this.reservedBytes);
    this.committed = this.reserved;
  },
};
const log = createLogger(logLevel, { service: 'yabusame-dest', thread: 'bulk' });
try {
  if (nice !== 0) sys.setThreadNice(nice);
} catch (err) {
  log.warn('cannot lower the bulk thread priority; it competes with faults for CPU', { err });
}

/**
 * Messages to the main thread leave in batches: one postMessage per event-loop turn of this
 * thread (or per OUTBOX_MAX messages), in order. A run per message cost a structured clone,
 * a wakeup of the main thread and a MessageEvent there for every frame: measured with
 * `--cpu-prof` streaming 4 GiB, about 19,000 posts and 0.5 s of this thread's time.
 */
const OUTBOX_MAX = 64;
let outbox: FromBulk[] = [];
let outboxTransfer: ArrayBuffer[] = [];
let flushing: NodeJS.Immediate | null = null;
const flush = (): void => {
  if (flushing) clearImmediate(flushing);
  flushing = null;
  const messages = outbox;
  const transfer = outboxTransfer;
  if (messages.length === 0) return;
  outbox = [];
  outboxTransfer = [];
  port.postMessage(messages.length === 1 ? messages[0] : { t: 'batch', messages }, transfer);
};
const post = (m: FromBulk, transfer?: ArrayBuffer[]): void => {
  outbox.push(m);
  if (transfer) outboxTransfer.push(...transfer);
  if (outbox.length >= OUTBOX_MAX) flush();
  else flushing ??= setImmediate(flush);
};
post({ t: 'ready' });

/**
 * Faults go first: while any fault in the daemon awaits its page, a background connection stops
 * reading for up to FAULT_PRIORITY_MS after each frame (or until none is awaited). Bulk data
 * then waits in socket buffers, and the source, whose sends block, leaves the CPU and the link
 * to the fault's answer.
 */
const yielding = new WeakSet<PageChannel>();
function yieldToFaults(ch: PageChannel): void {
  const awaited = Atomics.load(faults, 0);
  // Frames ws had already read still arrive while paused: they are delivered, not held again.
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

/**
 * The ArrayBuffer to hand to the main thread with a payload that did not fit in the ring, and
 * where the payload starts in it. A ws message that is a whole ArrayBuffer of its own (every
 * frame larger than a socket read) moves without a copy; one that shares its buffer with other
 * messages is copied.
 */
function transferable(payload: Uint8Array, message: Buffer): { buf: ArrayBuffer; at: number } {
  const ab = message.buffer;
  if (
    ab instanceof ArrayBuffer &&
    message.byteOffset === 0 &&
    message.byteLength === ab.byteLength
  ) {
    return { buf: ab, at: payload.byteOffset };
  }
  const copy = new Uint8Array(payload); // deliberate: the message shares its memory
  return { buf: copy.buffer, at: 0 };
}

/**
 * Sessions whose window is open: they share the ring (credit-share.ts). Credit of a lost
 * connection is void, and a closed session's is freed, at once.
 */
const windows = new Set<BulkSession>();
/** Credit granted by every session and not placed yet (what the ring must hold). */
let granted = 0;
const refillAll = (): void => {
  for (const s of windows) s.refill();
};

class BulkSession {
  private readonly link: Link;
  /** Connection numbers: runs and credit belong to the connection they came on. */
  private readonly serials = new WeakMap<PageChannel, number>();
  private lastSerial = 0;
  /** The current connection (after opened()). */
  private channel: PageChannel | null = null;
  /** The first CREDIT may go out (after backgroundDelayMs). */
  private windowOpen = false;
  /** The current connection's HAVE sync went out (credit may follow). */
  private synced = false;
  /** Credit granted on the current connection for runs not placed yet. */
  private outstanding = 0;
  /** The largest page of the current connection's regions (from its WELCOME). */
  private maxPageBytes = 0;
  /**
   * Credit granted on each connection and not spent yet by its DATA and ZERO frames: a frame
   * beyond it is BAD_STATE (protocol/README.md), so a source that ignores credit cannot keep
   * the daemon-wide placement queue full.
   */
  private readonly balance = new WeakMap<PageChannel, number>();
  /**
   * A PROGRESS DONE went to the main thread and no run since. Another one would change nothing
   * there (it resyncs once until a run comes): it is not queued, so a source repeating DONE
   * cannot grow the daemon-wide queue that every session's runs wait in.
   */
  private doneQueued = false;
  private closed = false;

  constructor(
    private readonly key: number,
    private readonly init: BulkSessionInit,
    private source: SourceAddress,
    sessionLog: Logger,
  ) {
    const lookup = policyLookup(init.policy);
    this.link = new Link(
      {
        connect: connectPageChannel,
        target: () => ({
          source: this.source,
          migrationId: init.migrationId,
          secret: init.secret,
          tls: init.tls,
          lookup,
          payloads: ringSink,
        }),
        kind: Channel.BACKGROUND,
        connectTimeoutMs: init.connectTimeoutMs,
        heartbeatMs: init.heartbeatMs,
        reconnectTimeoutMs: init.reconnectTimeoutMs,
        retryFirst: init.retryFirst,
        log: sessionLog,
      },
      {
        opened: (ch, reconnect) => this.onOpened(ch, reconnect),
        frame: (ch, frame, message) => this.onFrame(ch, frame, message),
        lost: (info) => {
          this.channel = null;
          this.setOutstanding(0);
          refillAll();
          post({ t: 'lost', key, code: info.code });
        },
        gaveUp: (info) =>
          this.fail(
            codeOf(info.code, HANDOFF_ERROR_CODES, 'SOURCE_UNREACHABLE'),
            `no working background connection to the source for ${init.reconnectTimeoutMs} ms; last: ${info.message}`,
          ),
      },
    );
  }

  open(): void {
    this.link.open().then(
      (ch) => post({ t: 'opened', key: this.key, regions: ch.welcome.regions }),
      (err: { code?: string; message?: string }) =>
        post({
          t: 'openFailed',
          key: this.key,
          code: codeOf(err, HANDOFF_ERROR_CODES, 'SOURCE_UNREACHABLE'),
          message: err.message ?? String(err),
        }),
    );
  }

  start(): void {
    if (!this.closed) this.link.start();
  }

  retarget(source: SourceAddress): void {
    this.source = source;
  }

  /** The window opens now (if the current connection is synced), or with its HAVE sync. */
  openWindow(): void {
    if (this.closed) return;
    this.windowOpen = true;
    windows.add(this);
    refillAll(); // this one first asks; the others' shares shrink as their runs are placed
  }

  private setOutstanding(bytes: number): void {
    granted += bytes - this.outstanding;
    this.outstanding = bytes;
  }

  /** Grants what this session's share of the ring allows now (credit-share.ts). */
  refill(): void {
    if (!this.windowOpen || !this.synced || !this.channel || this.closed) return;
    const { windowBytes } = this.init;
    const want = grantNow({
      share: shareOf(ring.capacity, windows.size, windowBytes, this.maxPageBytes),
      least: leastShare(windowBytes, this.maxPageBytes),
      outstanding: this.outstanding,
      ringBytes: ring.capacity,
      granted,
    });
    if (want <= 0) return;
    this.grant(want);
    this.setOutstanding(this.outstanding + want);
  }

  /** Sends CREDIT on the current connection, and counts it in that connection's balance. */
  private grant(bytes: number): void {
    const ch = this.channel;
    if (ch && this.link.send(encodeCredit(bytes))) {
      this.balance.set(ch, (this.balance.get(ch) ?? 0) + bytes);
    }
  }

  private serialOf(ch: PageChannel): number {
    let n = this.serials.get(ch);
    if (n === undefined) this.serials.set(ch, (n = ++this.lastSerial));
    return n;
  }

  private get serial(): number {
    return this.channel ? this.serialOf(this.channel) : -1;
  }

  /** The main thread's HAVE sync for connection `serial` (it owns the page map). */
  have(serial: number, ranges: readonly PageRange[]): void {
    if (this.closed || serial !== this.serial || !this.channel) return;
    const max = Limits.MAX_HAVE_ENTRIES;
    for (let i = 0; i < ranges.length || i === 0; i += max) {
      const last = i + max >= ranges.length;
      this.link.send(encodeHave(last ? HaveFlag.LAST : 0, ranges.slice(i, i + max)));
    }
    if (!this.synced) {
      this.synced = true;
      this.setOutstanding(0);
      this.refill();
    }
  }

  /**
   * The main thread placed `bytes` of connection `serial`'s runs: they may be granted again
   * (by the refillAll() that follows a batch of credits: this one, or one that waited for room).
   */
  credit(serial: number, bytes: number): void {
    // Credit belongs to the connection that used it: a run left from a lost one grants nothing.
    if (this.closed || serial !== this.serial || !this.synced) return;
    this.setOutstanding(Math.max(0, this.outstanding - bytes));
  }

  close(code?: string, message?: string): void {
    this.closed = true;
    this.link.close(code, message);
    this.setOutstanding(0);
    if (windows.delete(this)) refillAll(); // the others' shares grow
  }

  private fail(code: (typeof HANDOFF_ERROR_CODES)[number], message: string): void {
    if (!this.closed) post({ t: 'fail', key: this.key, code, message });
  }

  /** A (new) connection: the main thread checks its regions and answers with the HAVE sync. */
  private onOpened(ch: PageChannel, reconnect: boolean): void {
    if (this.closed) return;
    this.channel = ch;
    this.synced = false;
    this.maxPageBytes = Math.max(0, ...ch.welcome.regions.map((r) => r.pageSizeBytes));
    this.doneQueued = false;
    post({
      t: 'connected',
      key: this.key,
      serial: this.serialOf(ch),
      regions: ch.welcome.regions,
      reconnect,
    });
  }

  private onFrame(ch: PageChannel, frame: Frame, message: Buffer): void {
    if (this.closed) return;
    try {
      switch (frame.type) {
        case FrameType.DATA:
        case FrameType.ZERO: {
          const length = frame.type === FrameType.DATA ? frame.payload.byteLength : frame.length;
          // Frames that came right behind WELCOME arrive before opened(): check and count them
          // by their own connection.
          const region = ch.welcome.regions[checkRun(ch.welcome.regions, frame.offset, length)]!;
          // What the source's balance paid for it: the payload, or a ZERO frame's header.
          const cost = frame.type === FrameType.DATA ? length : HeaderSize.ZERO;
          const balance = this.balance.get(ch) ?? 0;
          if (cost > balance) {
            throw new ProtocolError(
              'BAD_STATE',
              `a background frame costing ${cost} bytes of credit, with ${balance} left`,
            );
          }
          this.balance.set(ch, balance - cost);
          this.doneQueued = false;
          const base = {
            t: 'run' as const,
            key: this.key,
            serial: this.serialOf(ch),
            offset: frame.offset,
            length,
            // A frame read apart from its payload comes with the payload as its message.
            bytes: frame.type === FrameType.DATA ? HeaderSize.DATA + length : message.byteLength,
            pageSizeBytes: region.pageSizeBytes,
          };
          if (frame.type === FrameType.ZERO) {
            // A ZERO frame costs its header in credit (the source's accounting).
            post({ ...base, credit: HeaderSize.ZERO, ring: -1, buf: null, at: 0 });
          } else if (frame.payload.buffer === sharedRing.data) {
            // Received into the ring, committed right before this delivery.
            post({ ...base, credit: length, ring: ringSink.committed, buf: null, at: 0 });
          } else {
            const at = ring.put(frame.payload);
            if (at >= 0) post({ ...base, credit: length, ring: at, buf: null, at: 0 });
            else {
              const t = transferable(frame.payload, message);
              post({ ...base, credit: length, ring: -1, buf: t.buf, at: t.at }, [t.buf]);
            }
          }
          this.link.healthy(ch);
          yieldToFaults(ch);
          break;
        }
        case FrameType.PROGRESS:
          if (frame.flags & ProgressFlag.DONE && !this.doneQueued) {
            this.doneQueued = true;
            post({ t: 'sourceDone', key: this.key });
          }
          break;
        default:
          throw new ProtocolError(
            'BAD_STATE',
            `frame type ${frame.type} is not legal on the background channel`,
          );
      }
    } catch (err) {
      // Well-formed but wrong (outside the image, misaligned, illegal here): drop this
      // connection and reconnect; a source that keeps doing it fails the session when the
      // link gives up, with this code.
      const code = codeOf(err, HANDOFF_ERROR_CODES, 'INTERNAL_ERROR');
      post({ t: 'error', key: this.key, code });
      this.link.reset({ code, message: (err as Error).message });
    }
  }
}

const sessions = new Map<number, BulkSession>();
/** Sessions whose pages come from a memory file on this host (file-lane.ts). */
const files = new Map<number, FileLane>();

/**
 * Runs the main thread placed, as (key, serial, bytes) triples, one per run: each lane takes its
 * credit, then placed runs freed ring space for every lane (file lanes that found the ring full
 * try again, sessions are granted what their shares allow).
 */
function placed(credits: readonly number[]): void {
  for (let i = 0; i + 2 < credits.length; i += 3) {
    const key = credits[i]!;
    const file = files.get(key);
    if (file) file.credit(credits[i + 2]!);
    else sessions.get(key)?.credit(credits[i + 1]!, credits[i + 2]!);
  }
  for (const f of files.values()) f.retry();
  refillAll();
}

port.on('message', (m: ToBulk) => {
  if (m.t === 'shutdown') {
    closeAllReceivers();
    port.postMessage({ t: 'down' } satisfies FromBulk);
    return;
  }
  if (m.t === 'placed') {
    try {
      placed(m.credits);
    } catch (err) {
      // A lane left without its credit would wait forever: fail the lanes of this batch.
      const keys = new Set(m.credits.filter((_, i) => i % 3 === 0));
      const message = `bulk thread: ${(err as Error).message}`;
      for (const key of keys) post({ t: 'fail', key, code: 'INTERNAL_ERROR', message });
    }
    return;
  }
  try {
    const file = files.get(m.key);
    if (file) {
      switch (m.t) {
        case 'start':
          file.start();
          break;
        case 'window':
          file.openWindow();
          break;
        case 'demanded':
          file.demanded(m.ranges);
          break;
        case 'have':
          file.have(m.ranges);
          break;
        case 'close':
          file.close();
          files.delete(m.key);
          post({ t: 'closed', key: m.key });
          break;
      }
      return;
    }
    switch (m.t) {
      case 'openFile':
        files.set(m.key, new FileLane(m.key, m.init, { ring, post, faults }));
        break;
      case 'open': {
        const s = new BulkSession(
          m.key,
          m.init,
          m.source,
          log.child({ migrationId: m.init.migrationId }),
        );
        sessions.set(m.key, s);
        s.open();
        break;
      }
      case 'start':
        sessions.get(m.key)?.start();
        break;
      case 'retarget':
        sessions.get(m.key)?.retarget(m.source);
        break;
      case 'window':
        sessions.get(m.key)?.openWindow();
        break;
      case 'have':
        sessions.get(m.key)?.have(m.serial, m.ranges);
        break;
      case 'close':
        sessions.get(m.key)?.close(m.code, m.message);
        sessions.delete(m.key);
        post({ t: 'closed', key: m.key });
        break;
    }
  } catch (err) {
    post({
      t: 'fail',
      key: m.key,
      code: 'INTERNAL_ERROR',
      message: `bulk thread: ${(err as Error).message}`,
    });
  }
});
