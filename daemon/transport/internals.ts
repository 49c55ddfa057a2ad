/**
 * The two private internals of node and ws that yabusame relies on, each in one function so an
 * upgrade that changes them breaks here, loudly (tests/unit/transport-internals.test.ts), and
 * nowhere else:
 *  - the fd of an accepted net.Socket (node keeps it in `socket._handle.fd`): the source hands a
 *    background connection to its bulk thread by fd, before the ws handshake;
 *  - the net.Socket under a ws WebSocket (ws keeps it in `ws._socket`): the source corks it
 *    around a burst of frames, so they leave in one write (ws has no public cork);
 *  - the bytes ws has read and not parsed yet (`ws._receiver._bufferedBytes`), and the
 *    socket handle's readStop(): the dest takes over reading a plain channel right after
 *    WELCOME, and the source a plain demand connection right after HELLO, when ws holds nothing
 *    more (raw-receive.ts).
 */
import type { Duplex } from 'node:stream';
import type { Socket } from 'node:net';
import type WebSocket from 'ws';

/** The file descriptor under a connected socket; throws if node no longer exposes it. */
export function socketFd(socket: Duplex): number {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) {
    throw new Error('node no longer exposes a socket fd as socket._handle.fd');
  }
  return fd;
}

/** The socket under a ws WebSocket; throws if ws no longer keeps it as ws._socket. */
export function wsSocket(ws: WebSocket): Socket {
  const socket = (ws as unknown as { _socket?: Socket })._socket;
  if (!socket || typeof socket.cork !== 'function' || typeof socket.uncork !== 'function') {
    throw new Error('ws no longer exposes its socket as ws._socket');
  }
  return socket;
}

/**
 * Stops node from reading a plain ws connection and returns the socket's fd, for a reader of
 * its own; null when ws or the socket already holds bytes after the message being delivered
 * (they would be lost), or when the socket is TLS. Sending through ws still works. Call it from
 * ws's 'message' handler, before the event loop reads again.
 */
export function takeOverReading(ws: WebSocket): number | null {
  const socket = wsSocket(ws);
  if ((socket as Socket & { encrypted?: boolean }).encrypted) return null;
  const buffered = (ws as unknown as { _receiver?: { _bufferedBytes?: unknown } })._receiver
    ?._bufferedBytes;
  if (typeof buffered !== 'number') {
    throw new Error('ws no longer counts unparsed bytes as ws._receiver._bufferedBytes');
  }
  if (buffered !== 0 || socket.readableLength !== 0) return null;
  const handle = (socket as unknown as { _handle?: { readStop?: () => number } })._handle;
  if (typeof handle?.readStop !== 'function') {
    throw new Error('node no longer exposes readStop() on socket._handle');
  }
  const fd = socketFd(socket);
  // `_handle.reading` stays true: node then never starts reading again on its own.
  handle.readStop();
  return fd;
}
