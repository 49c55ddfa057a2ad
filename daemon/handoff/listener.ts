/**
 * The handoff socket: a non-blocking AF_UNIX stream listener owned through koffi, because Node's
 * net module cannot receive file descriptors. Each connection sends one newline-terminated JSON
 * handoff whose first bytes carry the userfaultfd as SCM_RIGHTS (protocol/README.md). The
 * listener admits the peer (its SO_PEERCRED against the daemon's policy; pending connections
 * capped overall and per uid), enforces size, time and fd-count limits, decodes the request,
 * checks the fd, then hands a HandoffConnection to `onHandoff`. Every refusal is a coded error
 * reply (logged at a bounded rate: a peer can provoke them at will), and the listener serves on,
 * even out of file descriptors (a reserve fd lets it drop the connection it cannot take).
 */
import * as sys from '../linux/sys.js';
import { O_RDONLY } from '../linux/abi.js';
import { ERRNO, errnoName } from '../linux/errors.js';
import { codeOf, HANDOFF_ERROR_CODES, ProtocolError } from '../../protocol/errors.js';
import {
  decodeHandoff,
  encodeReply,
  MAX_HANDOFF_BYTES,
  type HandoffReply,
  type HandoffRequest,
} from '../../protocol/handoff.js';
import { inspectUffd, type UffdInfo } from './validate.js';
import type { Logger } from '../ops/log.js';
import { rateLimitedLog, type RateLimitedLog } from '../ops/rate-limit.js';
import {
  claimSocketPath,
  listenError,
  ownSocketPath,
  releaseSocketPath,
} from '../ops/unix-socket.js';

/** The VMM's side of one migration: reply lines go out here; `onClose` fires when the VMM hangs up. */
export class HandoffConnection {
  private closed = false;
  private closeHandlers: Array<() => void> = [];
  private watch: sys.FdWatch | null = null;
  private readonly scratch = Buffer.alloc(4096);

  constructor(
    readonly fd: number,
    readonly peer: sys.PeerCred,
  ) {}

  /** Starts watching for the VMM hanging up (after the handoff was read). */
  watchHangup(): void {
    if (this.closed || this.watch) return;
    this.watch = sys.watchReadable(this.fd, () => {
      // Anything the VMM sends after its handoff is ignored in version 1; EOF means it is gone.
      for (;;) {
        const r = sys.tryRecvWithFds(this.fd, this.scratch, 1, 0x40 /* MSG_DONTWAIT */);
        if (typeof r === 'number') {
          if (-r === ERRNO.EAGAIN) return;
          this.close();
          return;
        }
        for (const fd of r.fds) sys.close(fd);
        if (r.bytes === 0) {
          this.close();
          return;
        }
      }
    });
  }

  /** Sends one reply line. Returns false if the VMM is gone or not reading (the line is dropped). */
  reply(msg: HandoffReply): boolean {
    if (this.closed) return false;
    const line = encodeReply(msg);
    const n = sys.trySend(this.fd, line);
    return n === line.length;
  }

  onClose(handler: () => void): void {
    if (this.closed) handler();
    else this.closeHandlers.push(handler);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watch?.stop();
    sys.close(this.fd);
    for (const h of this.closeHandlers.splice(0)) h();
  }
}

export interface ReceivedHandoff {
  request: HandoffRequest;
  /** The userfaultfd, owned by the receiver from now on (non-blocking). */
  uffd: number;
  uffdInfo: UffdInfo;
  conn: HandoffConnection;
}

export interface HandoffListenerOptions {
  /** Path of the socket to create (with `mode` and `gid`), or... */
  path?: string;
  mode?: number;
  gid?: number | undefined;
  /** ...a listening socket inherited from systemd (socket activation). */
  listenFd?: number;
  timeoutMs: number;
  log: Logger;
  /** Connections waiting for their handoff line, at most: overall, and per uid. */
  maxPending?: number;
  maxPendingPerUid?: number;
  /** Whether `peer` may hand over at all: null, or the refusal (HANDOFF_PEER_DENIED). */
  admit?(peer: sys.PeerCred): ProtocolError | null;
  /** Takes ownership of a decoded handoff; throw a ProtocolError to refuse it. */
  onHandoff(h: ReceivedHandoff): void;
  /** Called for every handoff refused before reaching onHandoff, with its code. */
  onRefused?(code: string): void;
}

export interface HandoffListener {
  close(): void;
}

/**
 * Listens on `path` (taken over only from a dead socket: see ops/unix-socket.ts) or on the
 * socket systemd passed (`listenFd`).
 */
export async function startHandoffListener(opts: HandoffListenerOptions): Promise<HandoffListener> {
  let listenFd: number;
  let ino: number | undefined;
  if (opts.listenFd !== undefined) {
    listenFd = opts.listenFd;
    sys.setNonBlocking(listenFd, true);
  } else if (opts.path) {
    await claimSocketPath(opts.path);
    try {
      listenFd = sys.listenUnix(opts.path);
    } catch (err) {
      throw listenError('socket', opts.path, err);
    }
    try {
      ino = ownSocketPath(opts.path, opts.mode ?? 0o660, opts.gid);
    } catch (err) {
      sys.close(listenFd);
      releaseSocketPath(opts.path);
      throw err;
    }
  } else {
    throw new TypeError('startHandoffListener needs path or listenFd');
  }
  const limitedLog = rateLimitedLog(opts.log);
  const maxPending = opts.maxPending ?? 64;
  const maxPendingPerUid = opts.maxPendingPerUid ?? 8;
  const pending = new Set<PendingHandoff>();
  const perUid = new Map<number, number>();
  // A descriptor kept in reserve: out of fds (EMFILE), it is given up to accept and drop the
  // connection at the head of the queue, which would otherwise stay there and wake the loop
  // again and again (a busy loop at 100% CPU).
  let reserve = sys.open('/dev/null', O_RDONLY);
  /** The reserve again, or -1 if another thread took the descriptor meanwhile (retried later). */
  const reopenReserve = (): number => {
    try {
      return sys.open('/dev/null', O_RDONLY);
    } catch {
      return -1;
    }
  };
  const refuseNow = (fd: number, peer: sys.PeerCred, err: ProtocolError): void => {
    limitedLog('warn', err.code, 'handoff refused', {
      code: err.code,
      message: err.message,
      pid: peer.pid,
      uid: peer.uid,
    });
    opts.onRefused?.(err.code);
    sys.trySend(fd, encodeReply({ type: 'error', code: err.code, message: err.message }));
    sys.close(fd);
  };
  const watch = sys.watchReadable(listenFd, () => {
    if (reserve < 0) reserve = reopenReserve();
    for (;;) {
      const fd = sys.tryAccept(listenFd);
      if (fd < 0) {
        const errno = -fd;
        if (errno === ERRNO.EAGAIN || errno === ERRNO.EINTR) return;
        if ((errno === ERRNO.EMFILE || errno === ERRNO.ENFILE) && reserve >= 0) {
          sys.close(reserve);
          const dropped = sys.tryAccept(listenFd);
          if (dropped >= 0) sys.close(dropped);
          reserve = reopenReserve();
          // accept(2) takes a descriptor before it looks at the queue: out of fds it fails
          // with EMFILE even when nothing is queued. Nothing was: wait for the next one
          // (continuing would loop here for ever, the event loop blocked).
          if (dropped < 0) return;
          limitedLog('error', 'EMFILE', 'out of file descriptors: dropped a handoff connection', {
            errno: errnoName(errno),
          });
          opts.onRefused?.('HANDOFF_BUSY');
          continue;
        }
        limitedLog('warn', 'accept', 'accept on the handoff socket failed', {
          errno: errnoName(errno),
        });
        return;
      }
      let peer: sys.PeerCred = { pid: 0, uid: -1, gid: -1 };
      try {
        peer = sys.peerCred(fd);
      } catch {
        // Without credentials nobody is admitted (uid -1 matches no allowlist).
      }
      const denied = opts.admit?.(peer) ?? null;
      if (denied) {
        refuseNow(fd, peer, denied);
        continue;
      }
      const mine = perUid.get(peer.uid) ?? 0;
      if (pending.size >= maxPending || mine >= maxPendingPerUid) {
        refuseNow(
          fd,
          peer,
          new ProtocolError(
            'HANDOFF_BUSY',
            pending.size >= maxPending
              ? `${maxPending} handoffs are already being read`
              : `uid ${peer.uid} already has ${maxPendingPerUid} handoffs being read`,
          ),
        );
        continue;
      }
      perUid.set(peer.uid, mine + 1);
      const p = new PendingHandoff(fd, peer, opts, limitedLog, () => {
        pending.delete(p);
        const n = (perUid.get(peer.uid) ?? 1) - 1;
        if (n > 0) perUid.set(peer.uid, n);
        else perUid.delete(peer.uid);
      });
      pending.add(p);
    }
  });
  opts.log.info('handoff socket listening', { path: opts.path, fd: listenFd });
  return {
    close() {
      watch.stop();
      for (const p of pending) p.abort();
      sys.close(listenFd);
      if (reserve >= 0) sys.close(reserve);
      reserve = -1;
      if (opts.path) releaseSocketPath(opts.path, ino);
    },
  };
}

/** One connection until its handoff line is complete, refused, or timed out. */
class PendingHandoff {
  /** Grows as the line does, up to MAX_HANDOFF_BYTES (idle connections hold little). */
  private buf = Buffer.alloc(4096);
  private used = 0;
  private readonly fds: number[] = [];
  private tooManyFds = false;
  private readonly watch: sys.FdWatch;
  private readonly timer: NodeJS.Timeout;
  private done = false;
  private readonly conn: HandoffConnection;

  constructor(
    fd: number,
    peer: sys.PeerCred,
    private readonly opts: HandoffListenerOptions,
    private readonly limitedLog: RateLimitedLog,
    private readonly finished: () => void,
  ) {
    this.conn = new HandoffConnection(fd, peer);
    this.timer = setTimeout(
      () =>
        this.refuse(
          new ProtocolError('HANDOFF_TIMEOUT', `no complete handoff within ${opts.timeoutMs} ms`),
        ),
      opts.timeoutMs,
    );
    this.watch = sys.watchReadable(fd, () => this.onReadable());
  }

  abort(): void {
    this.finish();
    for (const fd of this.fds.splice(0)) sys.close(fd);
    this.conn.close();
  }

  private finish(): void {
    if (this.done) return;
    this.done = true;
    clearTimeout(this.timer);
    this.watch.stop();
    this.finished();
  }

  private onReadable(): void {
    if (this.done) return;
    for (;;) {
      // Room for 2 fds: the second proves the VMM sent too many (the kernel would close extras).
      const r = sys.tryRecvWithFds(this.conn.fd, this.buf.subarray(this.used), 2, 0x40);
      if (typeof r === 'number') {
        if (-r === ERRNO.EAGAIN || -r === ERRNO.EINTR) return;
        this.abort();
        return;
      }
      this.fds.push(...r.fds);
      if (r.truncated || this.fds.length > 1) this.tooManyFds = true;
      if (r.bytes === 0) {
        // The VMM hung up before finishing its handoff: nobody to reply to.
        this.opts.onRefused?.('HANDOFF_EOF');
        this.abort();
        return;
      }
      const start = this.used;
      this.used += r.bytes;
      const nl = this.buf.subarray(start, this.used).indexOf(0x0a);
      if (nl >= 0) {
        this.complete(this.buf.subarray(0, start + nl));
        return;
      }
      if (this.used >= this.buf.length) {
        if (this.buf.length >= MAX_HANDOFF_BYTES) {
          this.refuse(
            new ProtocolError('HANDOFF_TOO_LARGE', `handoff exceeds ${MAX_HANDOFF_BYTES} bytes`),
          );
          return;
        }
        const bigger = Buffer.alloc(Math.min(MAX_HANDOFF_BYTES, this.buf.length * 4));
        this.buf.copy(bigger, 0, 0, this.used);
        this.buf = bigger;
      }
    }
  }

  private complete(line: Buffer): void {
    this.finish();
    let uffdFd = -1;
    try {
      const request = decodeHandoff(line);
      if (this.tooManyFds) {
        throw new ProtocolError('HANDOFF_TOO_MANY_FDS', 'the handoff must carry exactly one fd');
      }
      if (this.fds.length === 0) {
        throw new ProtocolError('HANDOFF_NO_FD', 'the handoff carried no file descriptor');
      }
      uffdFd = this.fds.pop()!;
      const uffdInfo = inspectUffd(uffdFd);
      sys.setNonBlocking(uffdFd, true);
      this.conn.watchHangup();
      this.opts.onHandoff({ request, uffd: uffdFd, uffdInfo, conn: this.conn });
    } catch (err) {
      if (uffdFd >= 0) sys.close(uffdFd);
      this.refuse(err);
    }
  }

  private refuse(err: unknown): void {
    this.finish();
    for (const fd of this.fds.splice(0)) sys.close(fd);
    const code = codeOf(err, HANDOFF_ERROR_CODES, 'INTERNAL_ERROR');
    const message = err instanceof Error ? err.message : String(err);
    this.limitedLog('warn', code, 'handoff refused', {
      code,
      message,
      pid: this.conn.peer.pid,
      uid: this.conn.peer.uid,
    });
    this.opts.onRefused?.(code);
    this.conn.reply({ type: 'error', code, message });
    this.conn.close();
  }
}
