/**
 * Paths of listening UNIX sockets (the dest's handoff socket, the control sockets): a path is
 * taken over only from a dead socket. A live daemon's socket is never unlinked, nor is anything
 * that is not a socket (a regular file at the path is an operator's mistake, not ours to delete).
 */
import { chmodSync, chownSync, lstatSync, unlinkSync } from 'node:fs';
import { connect } from 'node:net';
import { CodedError } from '../../protocol/errors.js';

export type SocketPathErrorCode = 'SOCKET_IN_USE' | 'SOCKET_PATH_NOT_SOCKET' | 'SOCKET_PATH';

export class SocketPathError extends CodedError<SocketPathErrorCode> {}

/** Whether something accepts connections on the UNIX socket at `path`. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = connect(path);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

/**
 * Makes `path` free for a new listening socket: absent is fine; a socket nobody answers on (a
 * daemon that died) is removed; a socket that answers, or anything else, is refused.
 */
export async function claimSocketPath(path: string): Promise<void> {
  let st;
  try {
    st = lstatSync(path);
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') return;
    throw new SocketPathError('SOCKET_PATH', `cannot inspect ${path}: ${(err as Error).message}`);
  }
  if (!st.isSocket()) {
    throw new SocketPathError(
      'SOCKET_PATH_NOT_SOCKET',
      `${path} exists and is not a socket; refusing to replace it`,
    );
  }
  if (await answers(path)) {
    throw new SocketPathError('SOCKET_IN_USE', `another process is listening on ${path}`);
  }
  unlinkSync(path);
}

/**
 * Gives the socket we just bound at `path` its permission bits and group; returns its inode,
 * which releaseSocketPath checks so that we never remove a socket another daemon made there.
 */
export function ownSocketPath(path: string, mode: number, gid?: number): number {
  chmodSync(path, mode);
  if (gid !== undefined) chownSync(path, -1, gid);
  return lstatSync(path).ino;
}

/** Removes our socket at `path` (after closing it): only a socket, and only ours (`ino`). */
export function releaseSocketPath(path: string, ino?: number): void {
  try {
    const st = lstatSync(path);
    if (st.isSocket() && (ino === undefined || st.ino === ino)) unlinkSync(path);
  } catch {
    // already gone
  }
}

/** Why binding failed, for an operator: which option, which address, what to do. */
export function listenError(what: string, where: string, err: unknown): Error {
  const code = (err as { code?: string }).code ?? 'LISTEN_FAILED';
  const hint =
    code === 'EADDRINUSE'
      ? 'another process listens there (another yabusame daemon?); choose another address'
      : code === 'EACCES' || code === 'EPERM'
        ? 'permission denied (ports below 1024 need privileges; check the folder of a socket)'
        : code === 'EADDRNOTAVAIL'
          ? 'no interface of this host has that address'
          : (err as Error).message;
  const out = new Error(`${what} ${where}: ${hint}`, { cause: err });
  return Object.assign(out, { code });
}
