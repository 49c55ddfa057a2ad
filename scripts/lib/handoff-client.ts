/**
 * A VMM's side of the handoff (protocol/README.md, "Handoff protocol"), for vm-sim and the
 * tests: connects to `yabusame dest`'s UNIX socket through the Linux layer (node cannot send
 * file descriptors), sends bytes with any fds as SCM_RIGHTS, and reads the daemon's reply lines
 * through a node Socket opened on the same fd (node only reads it; every write is a sendmsg).
 */
import { Socket } from 'node:net';
import * as sys from '../../daemon/linux/sys.js';
import { decodeReply, MAX_HANDOFF_BYTES, type HandoffReply } from '../../protocol/handoff.js';

export interface HandoffClient {
  /** The connected socket's fd (owned by `socket`: closed with it). */
  readonly fd: number;
  /** Sends `data` with `fds` attached to its first byte, in one sendmsg; returns bytes sent. */
  send(data: Buffer, fds?: readonly number[]): number;
  /** Resolves with the next reply line; rejects once the daemon closed the connection. */
  next(): Promise<HandoffReply>;
  /** Every reply line as it arrives (instead of next()), and the close with its reason. */
  onReply(fn: (reply: HandoffReply) => void, closed: (err?: Error) => void): void;
  /** Resolves when the daemon closes the connection. */
  readonly closed: Promise<void>;
  close(): void;
}

/**
 * Connects to the daemon at `path`. Throws SyscallError (ENOENT, ECONNREFUSED...) when nobody
 * listens there.
 */
export function connectHandoff(path: string): HandoffClient {
  const fd = sys.connectUnix(path);
  const socket = new Socket({ fd, readable: true, writable: false });
  const queue: HandoffReply[] = [];
  const waiters: Array<{ resolve(r: HandoffReply): void; reject(e: Error): void }> = [];
  let listener: ((r: HandoffReply) => void) | null = null;
  let onClosed: ((err?: Error) => void) | null = null;
  let failure: Error | undefined;
  let buf = '';
  let isClosed = false;
  const deliver = (r: HandoffReply): void => {
    if (listener) listener(r);
    else if (waiters.length > 0) waiters.shift()!.resolve(r);
    else queue.push(r);
  };
  const end = (err?: Error): void => {
    if (isClosed) return;
    isClosed = true;
    failure ??= err;
    const e = failure ?? new Error('the daemon closed the handoff connection');
    for (const w of waiters.splice(0)) w.reject(e);
    onClosed?.(failure);
  };
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    buf += chunk;
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const text = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!text.trim()) continue;
      try {
        deliver(decodeReply(text));
      } catch (err) {
        failure = err as Error;
        socket.destroy();
        return;
      }
    }
    if (buf.length > MAX_HANDOFF_BYTES) {
      failure = new Error('reply line too long');
      socket.destroy();
    }
  });
  const closed = new Promise<void>((resolve) =>
    socket.once('close', () => {
      end();
      resolve();
    }),
  );
  socket.on('error', (err) => (failure ??= err));
  return {
    fd,
    send: (data, fds = []) => sys.sendWithFds(fd, data, fds),
    next: () => {
      const r = queue.shift();
      if (r) return Promise.resolve(r);
      if (isClosed) return Promise.reject(failure ?? new Error('handoff connection closed'));
      return new Promise((resolve, reject) => waiters.push({ resolve, reject }));
    },
    onReply: (fn, closedFn) => {
      listener = fn;
      onClosed = closedFn;
      for (const r of queue.splice(0)) fn(r);
      if (isClosed) closedFn(failure);
    },
    closed,
    close: () => socket.destroy(),
  };
}
