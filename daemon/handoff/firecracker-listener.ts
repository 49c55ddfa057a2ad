/**
 * A Firecracker socket: where one Firecracker process at a time hands over its guest memory
 * when it restores a snapshot with `"mem_backend": {"backend_type": "Uffd", "backend_path":
 * <this socket>}`. Firecracker's side of it is fixed (protocol/firecracker.ts): it connects
 * once, sends one message (a JSON array of regions, the uffd in SCM_RIGHTS, no newline) and
 * reads nothing, ever. So every refusal here is a log line and a closed socket, never a reply.
 *
 * Who is on the other end: SO_PEERCRED at accept, checked against the daemon's peers policy
 * (admit); then a pidfd of the peer's pid (pidfd_open), taken at once, so that whatever happens
 * to the socket the dest learns when that process exits, and can signal it (pidfd_send_signal)
 * without ever reaching a later process that reused its number.
 *
 * The socket's lifetime differs by release: up to v1.11 Firecracker closes its end right after
 * sending (EOF means nothing; the process goes on); from v1.12 it keeps it open until it exits
 * (EOF means it is gone). The pidfd says so for every release; a v1.12 EOF says so too.
 */
import { chmodSync, chownSync } from 'node:fs';
import * as sys from '../linux/sys.js';
import { ERRNO, errnoName } from '../linux/errors.js';
import { codeOf, HANDOFF_ERROR_CODES, ProtocolError } from '../../protocol/errors.js';
import {
  decodeFirecrackerHandshake,
  firecrackerMessageEnd,
  keepsSocketOpen,
  type FirecrackerFormat,
} from '../../protocol/firecracker.js';
import type { HandoffRegion, HandoffReply } from '../../protocol/handoff.js';
import { MAX_HANDOFF_BYTES } from '../../protocol/handoff.js';
import { inspectUffd, type UffdInfo } from './validate.js';
import type { Logger } from '../ops/log.js';
import { claimSocketPath, releaseSocketPath } from '../ops/unix-socket.js';

const SIGKILL = 9;

/** Firecracker's end of a session: nothing is ever written to it; `onClose` when it is gone. */
export class FirecrackerConnection {
  private closed = false;
  private gone = false;
  private closeHandlers: Array<(why?: string) => void> = [];
  private socketWatch: sys.FdWatch | null = null;
  private pidWatch: sys.FdWatch | null = null;
  private readonly scratch = Buffer.alloc(512);
  private fdOpen: boolean;

  constructor(
    /** Firecracker's socket, or -1 (a session resumed after Firecracker had closed it). */
    readonly fd: number,
    readonly peer: sys.PeerCred,
    /** A pidfd of the peer, or -1 (its pid is not visible here: liveness from EOF only). */
    private pidfd: number,
  ) {
    this.fdOpen = fd >= 0;
  }

  /** What a parked session keeps: the socket while open (else -1), and the pidfd. */
  descriptors(): { socket: number; pidfd: number } {
    return { socket: this.fdOpen ? this.fd : -1, pidfd: this.pidfd };
  }

  /**
   * Starts following Firecracker (after its handshake was read): its exit, by the pidfd; for a
   * v1.12+ format, the socket's EOF too. An older one's EOF only lets the socket go.
   */
  follow(format: FirecrackerFormat): void {
    if (this.closed) return;
    if (this.pidfd >= 0) {
      this.pidWatch = sys.watchReadable(this.pidfd, () =>
        this.vanished(`Firecracker (pid ${this.peer.pid}) exited`),
      );
    }
    const eofMeansGone = keepsSocketOpen(format) || this.pidfd < 0;
    if (!this.fdOpen) return;
    this.socketWatch = sys.watchReadable(this.fd, () => {
      // Firecracker sends nothing after its handshake: drain whatever comes, up to EOF.
      for (;;) {
        const r = sys.tryRecvWithFds(this.fd, this.scratch, 1, 0x40 /* MSG_DONTWAIT */);
        if (typeof r === 'number') {
          if (-r === ERRNO.EAGAIN || -r === ERRNO.EINTR) return;
          break;
        }
        for (const fd of r.fds) sys.close(fd);
        if (r.bytes === 0) break;
      }
      this.dropSocket();
      if (eofMeansGone) this.vanished(`Firecracker (pid ${this.peer.pid}) closed its socket`);
    });
  }

  /** Whether the process is still there (as far as this connection knows). */
  get alive(): boolean {
    return !this.gone;
  }

  private vanished(why: string): void {
    if (this.gone) return;
    this.gone = true;
    this.pidWatch?.stop();
    this.pidWatch = null;
    for (const h of this.closeHandlers.splice(0)) h(why);
  }

  private dropSocket(): void {
    this.socketWatch?.stop();
    this.socketWatch = null;
    if (this.fdOpen) {
      this.fdOpen = false;
      sys.close(this.fd);
    }
  }

  /** Firecracker reads nothing: replies are dropped. */
  reply(_msg: HandoffReply): boolean {
    return false;
  }

  onClose(handler: (why?: string) => void): void {
    if (this.gone || this.closed) handler();
    else this.closeHandlers.push(handler);
  }

  /** The session is over: stops following and lets the socket go (the pidfd stays: kill()). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.pidWatch?.stop();
    this.pidWatch = null;
    this.closeHandlers = [];
    this.dropSocket();
  }

  /** SIGKILL to the Firecracker process, through its pidfd; false if that is not possible. */
  kill(): boolean {
    if (this.pidfd < 0) return false;
    return sys.tryPidfdSendSignal(this.pidfd, SIGKILL) === 0;
  }

  /** Closes the pidfd (after any kill). */
  release(): void {
    this.close();
    if (this.pidfd >= 0) sys.close(this.pidfd);
    this.pidfd = -1;
  }
}

export interface FirecrackerHandoff {
  format: FirecrackerFormat;
  regions: HandoffRegion[];
  /** The userfaultfd, owned by the receiver from now on (non-blocking). */
  uffd: number;
  uffdInfo: UffdInfo;
  conn: FirecrackerConnection;
}

/** A refused connection: who it was, and (an admitted peer) a way to kill it. */
export interface FirecrackerRefusal {
  code: string;
  message: string;
  peer: sys.PeerCred;
  /** The peer passed the peers policy (only such a peer may be killed). */
  admitted: boolean;
  /** SIGKILL through the peer's pidfd (false if there is none). */
  kill(): boolean;
}

export interface FirecrackerListenerOptions {
  path: string;
  /** Permission bits of the socket (e.g. 0o660) and its group. */
  mode: number;
  gid?: number | undefined;
  timeoutMs: number;
  log: Logger;
  /** Whether `peer` may hand over at all: null, or the refusal (HANDOFF_PEER_DENIED). */
  admit(peer: sys.PeerCred): ProtocolError | null;
  /** Null, or why a new connection is refused now (a VM is being served: HANDOFF_SOCKET_BUSY). */
  busy(): ProtocolError | null;
  /** Takes ownership of a handshake; throw a ProtocolError to refuse it. */
  onHandshake(h: FirecrackerHandoff): void;
  /** Every refused connection (the socket is closed right after). */
  onRefused(r: FirecrackerRefusal): void;
}

export interface FirecrackerListener {
  close(): void;
}

/**
 * Creates the socket at `path` (taken over only from a dead socket: ops/unix-socket.ts) with
 * `mode`: bound under a umask that leaves no other bits, so it is never more open than that.
 */
export async function startFirecrackerListener(
  opts: FirecrackerListenerOptions,
): Promise<FirecrackerListener> {
  await claimSocketPath(opts.path);
  const old = process.umask(0o777 & ~opts.mode);
  let listenFd: number;
  try {
    listenFd = sys.listenUnix(opts.path, 8);
  } finally {
    process.umask(old);
  }
  try {
    chmodSync(opts.path, opts.mode);
    if (opts.gid !== undefined) chownSync(opts.path, -1, opts.gid);
  } catch (err) {
    sys.close(listenFd);
    releaseSocketPath(opts.path);
    throw err;
  }
  let pending: PendingHandshake | null = null;
  const watch = sys.watchReadable(listenFd, () => {
    for (;;) {
      const fd = sys.tryAccept(listenFd);
      if (fd < 0) {
        const errno = -fd;
        if (errno !== ERRNO.EAGAIN && errno !== ERRNO.EINTR) {
          opts.log.warn('accept on a Firecracker socket failed', {
            socket: opts.path,
            errno: errnoName(errno),
          });
        }
        return;
      }
      let peer: sys.PeerCred = { pid: 0, uid: -1, gid: -1 };
      try {
        peer = sys.peerCred(fd);
      } catch {
        // Without credentials nobody is admitted (uid -1 matches no allowlist).
      }
      const refuse = (err: ProtocolError, admitted: boolean, pidfd = -1): void => {
        opts.onRefused({
          code: err.code,
          message: err.message,
          peer,
          admitted,
          kill: () => pidfd >= 0 && sys.tryPidfdSendSignal(pidfd, SIGKILL) === 0,
        });
        if (pidfd >= 0) sys.close(pidfd);
        sys.close(fd);
      };
      const denied = opts.admit(peer);
      if (denied) {
        refuse(denied, false);
        continue;
      }
      // The peer's pidfd first, before anything else can happen to it.
      let pidfd = -1;
      if (peer.pid > 0) {
        pidfd = sys.tryPidfdOpen(peer.pid);
        if (pidfd < 0) {
          refuse(
            new ProtocolError(
              'VMM_GONE',
              `pid ${peer.pid} cannot be followed (pidfd_open: ${errnoName(-pidfd)})`,
            ),
            true,
          );
          continue;
        }
      }
      const busy =
        opts.busy() ??
        (pending
          ? new ProtocolError('HANDOFF_SOCKET_BUSY', 'a handshake is being read on this socket')
          : null);
      if (busy) {
        refuse(busy, true, pidfd);
        continue;
      }
      if (pidfd < 0) {
        opts.log.warn('Firecracker pid not visible here: its exit is noticed only from v1.12 on', {
          socket: opts.path,
          uid: peer.uid,
        });
      }
      pending = new PendingHandshake(fd, peer, pidfd, opts, refuse, () => (pending = null));
    }
  });
  opts.log.info('Firecracker socket listening', { socket: opts.path });
  return {
    close() {
      watch.stop();
      pending?.abort();
      sys.close(listenFd);
      releaseSocketPath(opts.path);
    },
  };
}

/** One connection until its handshake is complete, refused, or timed out. */
class PendingHandshake {
  private buf = Buffer.alloc(1024);
  private used = 0;
  private readonly fds: number[] = [];
  private tooManyFds = false;
  private readonly watch: sys.FdWatch;
  private readonly timer: NodeJS.Timeout;
  private done = false;

  constructor(
    private readonly fd: number,
    private readonly peer: sys.PeerCred,
    private readonly pidfd: number,
    private readonly opts: FirecrackerListenerOptions,
    private readonly refuse: (err: ProtocolError, admitted: boolean, pidfd?: number) => void,
    private readonly finished: () => void,
  ) {
    this.timer = setTimeout(
      () =>
        this.fail(
          new ProtocolError('HANDOFF_TIMEOUT', `no complete handshake within ${opts.timeoutMs} ms`),
        ),
      opts.timeoutMs,
    );
    this.watch = sys.watchReadable(fd, () => this.onReadable());
  }

  abort(): void {
    if (!this.finish()) return;
    for (const fd of this.fds.splice(0)) sys.close(fd);
    if (this.pidfd >= 0) sys.close(this.pidfd);
    sys.close(this.fd);
  }

  /** Stops reading; false if it had already stopped. */
  private finish(): boolean {
    if (this.done) return false;
    this.done = true;
    clearTimeout(this.timer);
    this.watch.stop();
    this.finished();
    return true;
  }

  private onReadable(): void {
    if (this.done) return;
    try {
      for (;;) {
        // Room for 2 fds: the second proves Firecracker sent too many (the kernel closes extras).
        const r = sys.tryRecvWithFds(this.fd, this.buf.subarray(this.used), 2, 0x40);
        if (typeof r === 'number') {
          if (-r === ERRNO.EAGAIN || -r === ERRNO.EINTR) return;
          throw new ProtocolError('HANDOFF_BAD_JSON', `recvmsg failed: ${errnoName(-r)}`);
        }
        this.fds.push(...r.fds);
        if (r.truncated || this.fds.length > 1) this.tooManyFds = true;
        if (r.bytes === 0) {
          throw new ProtocolError(
            'HANDOFF_BAD_JSON',
            `the connection closed after ${this.used} bytes, before the JSON array was complete`,
          );
        }
        this.used += r.bytes;
        const end = firecrackerMessageEnd(this.buf, this.used);
        if (end >= 0) {
          this.complete(this.buf.subarray(0, end));
          return;
        }
        if (this.used >= this.buf.length) {
          if (this.buf.length >= MAX_HANDOFF_BYTES) {
            throw new ProtocolError(
              'HANDOFF_TOO_LARGE',
              `no complete handshake in ${MAX_HANDOFF_BYTES} bytes`,
            );
          }
          const bigger = Buffer.alloc(Math.min(MAX_HANDOFF_BYTES, this.buf.length * 4));
          this.buf.copy(bigger, 0, 0, this.used);
          this.buf = bigger;
        }
      }
    } catch (err) {
      this.fail(err);
    }
  }

  private complete(message: Buffer): void {
    this.finish();
    let uffdFd = -1;
    let conn: FirecrackerConnection | null = null;
    try {
      const h = decodeFirecrackerHandshake(message);
      if (this.tooManyFds) {
        throw new ProtocolError('HANDOFF_TOO_MANY_FDS', 'the handshake must carry exactly one fd');
      }
      if (this.fds.length === 0) {
        throw new ProtocolError('HANDOFF_NO_FD', 'the handshake carried no file descriptor');
      }
      uffdFd = this.fds.pop()!;
      const uffdInfo = inspectUffd(uffdFd);
      sys.setNonBlocking(uffdFd, true);
      conn = new FirecrackerConnection(this.fd, this.peer, this.pidfd);
      conn.follow(h.format);
      this.opts.onHandshake({ format: h.format, regions: h.regions, uffd: uffdFd, uffdInfo, conn });
    } catch (err) {
      if (uffdFd >= 0) sys.close(uffdFd);
      // Refused before a session took it: the connection (if made) lets the socket go.
      conn?.close();
      this.fail(err, conn === null);
    }
  }

  /** Reports a refusal, closes the pidfd and (unless a connection already did) the socket. */
  private fail(err: unknown, closeSocket = true): void {
    this.finish();
    for (const fd of this.fds.splice(0)) sys.close(fd);
    const code = codeOf(err, HANDOFF_ERROR_CODES, 'INTERNAL_ERROR');
    const message = err instanceof Error ? err.message : String(err);
    if (closeSocket) {
      this.refuse(new ProtocolError(code, message), true, this.pidfd);
      return;
    }
    this.opts.onRefused({
      code,
      message,
      peer: this.peer,
      admitted: true,
      kill: () => this.pidfd >= 0 && sys.tryPidfdSendSignal(this.pidfd, SIGKILL) === 0,
    });
    if (this.pidfd >= 0) sys.close(this.pidfd);
  }
}
