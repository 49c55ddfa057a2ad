/**
 * A VMM's side of the handoff, for tests: connects with node's net, sends raw bytes with any
 * fds as SCM_RIGHTS on the socket's own fd (before node writes anything on it), and collects
 * the daemon's reply lines.
 */
import { connect, type Socket } from 'node:net';
import { once } from 'node:events';
import * as sys from '../../daemon/linux/sys.js';
import { decodeReply, type HandoffReply } from '../../protocol/handoff.js';

export interface HandoffClient {
  socket: Socket;
  /** Resolves with the next reply line. */
  next(): Promise<HandoffReply>;
  /** Resolves when the daemon closes the connection. */
  closed: Promise<void>;
  close(): void;
}

export async function connectHandoff(path: string): Promise<HandoffClient> {
  const socket = connect(path);
  await once(socket, 'connect');
  const queue: HandoffReply[] = [];
  const waiters: Array<(r: HandoffReply) => void> = [];
  let buf = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    buf += chunk;
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const reply = decodeReply(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
      const w = waiters.shift();
      if (w) w(reply);
      else queue.push(reply);
    }
  });
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  socket.on('error', () => {});
  return {
    socket,
    next: () => {
      const r = queue.shift();
      if (r) return Promise.resolve(r);
      return new Promise((resolve, reject) => {
        waiters.push(resolve);
        void closed.then(() => reject(new Error('handoff connection closed')));
      });
    },
    closed,
    close: () => socket.destroy(),
  };
}

/** The fd under a connected net.Socket (node keeps it in its pipe handle). */
export function socketFd(socket: Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('socket has no fd');
  return fd;
}

/** Sends `data` with `fds` attached, in one sendmsg. */
export function sendRaw(client: HandoffClient, data: Buffer, fds: number[] = []): void {
  sys.sendWithFds(socketFd(client.socket), data, fds);
}
