/**
 * Sessions parked in systemd's file descriptor store, so that a dest restarted by systemd (an
 * upgrade, a crash, the watchdog) picks its migrations up without the VMM doing anything.
 *
 * At its ack each session stores, under one name (`ybs.<token>`), three descriptors: the
 * userfaultfd, the VMM's handoff connection, and a memfd holding the handoff request (JSON:
 * regions, source, secret; never on disk). systemd keeps a duplicate of each. The VMM's
 * connection therefore stays open while no daemon runs: the VMM sees no hang-up and its vCPUs
 * simply wait. A session that ends (complete, failed, VMM gone) removes its name; a daemon that
 * stops leaves it, and the next one gets the descriptors back as LISTEN_FDS with
 * LISTEN_FDNAMES, tells them apart by what they are (a userfaultfd, a socket, a regular file),
 * and resumes each session as if its VMM had sent the handoff again with `resume`.
 *
 * Without a service manager ($NOTIFY_SOCKET unset) nothing is stored, and a VMM that sees the
 * daemon die hands its uffd over again itself (protocol/README.md, Resuming).
 */
import { fstatSync, readSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { decodeHandoff, type HandoffRequest } from '../../protocol/handoff.js';
import * as sys from '../linux/sys.js';
import { inspectUffd, type UffdInfo } from '../handoff/validate.js';
import { HandoffConnection } from '../handoff/listener.js';
import type { Logger } from '../ops/log.js';
import * as sd from '../ops/sdnotify.js';

/** The fd-store names of parked sessions. */
const PREFIX = 'ybs.';
/** Largest state a memfd may hold (a handoff line is at most 64 KiB). */
const MAX_STATE_BYTES = 256 * 1024;

/** Where a session parks its descriptors; `null` when there is no fd store to use. */
export interface SessionParking {
  /** Stores the session's descriptors under a fresh name; returns it, or null if not stored. */
  park(request: HandoffRequest, uffd: number, conn: number): string | null;
  /** Drops a parked session's descriptors (it ended). */
  unpark(name: string): void;
}

/** Parking in systemd's fd store (a no-op without $NOTIFY_SOCKET). */
export function fdStoreParking(log: Logger, env: NodeJS.ProcessEnv = process.env): SessionParking {
  return {
    park(request, uffd, conn) {
      if (!env['NOTIFY_SOCKET']) return null;
      const name = `${PREFIX}${randomBytes(8).toString('hex')}`;
      const state = sys.memfdCreate(name);
      try {
        writeSync(state, Buffer.from(JSON.stringify({ ...request, resume: true }), 'utf8'));
        sd.fdStore(name, [uffd, conn, state], env);
        return name;
      } catch (err) {
        log.warn('cannot park the session in the fd store; a restart will need the VMM', {
          migrationId: request.migrationId,
          error: (err as Error).message,
        });
        return null;
      } finally {
        sys.close(state);
      }
    },
    unpark(name) {
      try {
        sd.fdStoreRemove(name, env);
      } catch (err) {
        log.warn('cannot remove a session from the fd store', {
          name,
          error: (err as Error).message,
        });
      }
    },
  };
}

/** A parked session handed back at start, ready to be resumed like a handoff with `resume`. */
export interface ParkedSession {
  name: string;
  request: HandoffRequest;
  uffd: number;
  uffdInfo: UffdInfo;
  conn: HandoffConnection;
}

/**
 * The parked sessions among the descriptors this process was started with (sd.listenFds()).
 * Each is complete, or skipped with a warning and its descriptors closed and unparked: a
 * session whose VMM connection is gone (systemd drops a descriptor that hangs up) has no VMM.
 */
export function parkedSessions(
  fds: readonly sd.ListenFd[],
  log: Logger,
  parking: SessionParking,
): ParkedSession[] {
  const groups = new Map<string, number[]>();
  for (const { fd, name } of fds) {
    if (!name.startsWith(PREFIX)) continue;
    groups.set(name, [...(groups.get(name) ?? []), fd]);
  }
  const out: ParkedSession[] = [];
  for (const [name, group] of groups) {
    let uffd = -1;
    let conn = -1;
    let state = -1;
    for (const fd of group) {
      const st = fstatSync(fd);
      if (st.isSocket() && conn < 0) conn = fd;
      else if (st.isFile() && state < 0) state = fd;
      else if (uffd < 0 && isUffd(fd)) uffd = fd;
      else sys.close(fd);
    }
    const drop = (why: string): void => {
      log.warn('a parked session cannot be resumed', { name, reason: why });
      for (const fd of [uffd, conn, state]) if (fd >= 0) sys.close(fd);
      parking.unpark(name);
    };
    if (uffd < 0 || state < 0) {
      drop('its userfaultfd or its state is missing');
      continue;
    }
    if (conn < 0) {
      drop('the VMM connection is gone: the VMM left while no daemon ran');
      continue;
    }
    let request: HandoffRequest;
    try {
      request = decodeHandoff(readState(state));
    } catch (err) {
      drop(`its state does not decode: ${(err as Error).message}`);
      continue;
    }
    sys.close(state);
    sys.setNonBlocking(uffd, true);
    sys.setNonBlocking(conn, true);
    out.push({
      name,
      request,
      uffd,
      uffdInfo: inspectUffd(uffd),
      conn: new HandoffConnection(conn, sys.peerCred(conn)),
    });
  }
  return out;
}

function isUffd(fd: number): boolean {
  try {
    inspectUffd(fd);
    return true;
  } catch {
    return false;
  }
}

function readState(fd: number): Buffer {
  const size = fstatSync(fd).size;
  if (size > MAX_STATE_BYTES) throw new Error(`${size} bytes of state`);
  const buf = Buffer.alloc(size);
  let off = 0;
  while (off < size) {
    const n = readSync(fd, buf, off, size - off, off);
    if (n === 0) break;
    off += n;
  }
  return buf.subarray(0, off);
}
