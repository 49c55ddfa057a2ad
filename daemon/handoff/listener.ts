/**
 * The handoff socket: a non-blocking AF_UNIX stream listener owned through koffi, because Node's
 * net module cannot receive file descriptors. Each connection sends one newline-terminated JSON
 * handoff whose first bytes carry the userfaultfd as SCM_RIGHTS (protocol/README.md). The
 * listener enforces size, time and fd-count limits, decodes the request, checks the fd, then
 * hands a HandoffConnection to `onHandoff`. Every refusal is a coded error reply, and the
 * listener serves on.
 */
import { unlinkSync } from 'node:fs';
import * as sys from '../linux/sys.js';
import { ERRNO } from '../linux/errors.js';
import { ProtocolError } from '../../protocol/errors.js';
import {
  decodeHandoff,
  encodeReply,
  MAX_HANDOFF_BYTES,
  type HandoffReply,
  type HandoffRequest,
} from '../../protocol/handoff.js';
import { inspectUffd, type UffdInfo } from './validate.js';
import type { Logger } from '../ops/log.js';

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
  /** Path of the socket to create, or... */
  path?: string;
  /** ...a listening socket inherited from systemd (socket activation). */
  listenFd?: number;
  timeoutMs: number;
  log: Logger;
  /** Takes ownership of a decoded handoff; throw a ProtocolError to refuse it. */
  onHandoff(h: ReceivedHandoff): void;
  /** Called for every handoff refused before reaching onHandoff, with its code. */
  onRefused?(code: string): void;
}

export interface HandoffListener {
  close(): void;
}

export function startHandoffListener(opts: HandoffListenerOptions): HandoffListener {
  let listenFd: number;
  if (opts.listenFd !== undefined) {
    listenFd = opts.listenFd;
    sys.setNonBlocking(listenFd, true);
  } else if (opts.path) {
    try {
      unlinkSync(opts.path); // a stale socket from a previous run
    } catch {
      /* not there */
    }
    listenFd = sys.listenUnix(opts.path);
  } else {
    throw new TypeError('startHandoffListener needs path or listenFd');
  }
  const pending = new Set<PendingHandoff>();
  const watch = sys.watchReadable(listenFd, () => {
    for (;;) {
      const fd = sys.tryAccept(listenFd);
      if (fd < 0) {
        if (-fd !== ERRNO.EAGAIN && -fd !== ERRNO.EINTR) {
          opts.log.warn('accept on the handoff socket failed', { errno: -fd });
        }
        return;
      }
      const p = new PendingHandoff(fd, opts, () => pending.delete(p));
      pending.add(p);
    }
  });
  opts.log.info('handoff socket listening', { path: opts.path, fd: listenFd });
  return {
    close() {
      watch.stop();
      for (const p of pending) p.abort();
      sys.close(listenFd);
      if (opts.path) {
        try {
          unlinkSync(opts.path);
        } catch {
          /* already gone */
        }
      }
    },
  };
}

/** One connection until its handoff line is complete, refused, or timed out. */
class PendingHandoff {
  private readonly buf = Buffer.alloc(MAX_HANDOFF_BYTES);
  private used = 0;
  private readonly fds: number[] = [];
  private tooManyFds = false;
  private readonly watch: sys.FdWatch;
  private readonly timer: NodeJS.Timeout;
  private done = false;
  private readonly conn: HandoffConnection;

  constructor(
    fd: number,
    private readonly opts: HandoffListenerOptions,
    private readonly finished: () => void,
  ) {
    let peer: sys.PeerCred = { pid: 0, uid: 0, gid: 0 };
    try {
      peer = sys.peerCred(fd);
    } catch {
      /* not fatal: logged as pid 0 */
    }
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
        this.refuse(
          new ProtocolError('HANDOFF_TOO_LARGE', `handoff exceeds ${MAX_HANDOFF_BYTES} bytes`),
        );
        return;
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
    const code = err instanceof ProtocolError ? err.code : 'HANDOFF_FAILED';
    const message = err instanceof Error ? err.message : String(err);
    this.opts.log.warn('handoff refused', { code, message, pid: this.conn.peer.pid });
    this.opts.onRefused?.(code);
    this.conn.reply({ type: 'error', code, message });
    this.conn.close();
  }
}
