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
 * A Firecracker session (a configured Firecracker socket's VM) stores its userfaultfd, a pidfd
 * of the Firecracker process, Firecracker's socket while it is still open, and a memfd holding
 * what its handshake said (socket, format, regions, peer). Firecracker never hands its uffd
 * over again, so this is the only way such a VM outlives a dest restart. On start the session
 * goes back to the slot of its socket, if that socket is still configured, and resumes.
 *
 * Without a service manager ($NOTIFY_SOCKET unset) nothing is stored, and a VMM that sees the
 * daemon die hands its uffd over again itself (protocol/README.md, Resuming).
 */
import { fstatSync, readlinkSync, readSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { decodeHandoff, HandoffRegion, type HandoffRequest } from '../../protocol/handoff.js';
import * as sys from '../linux/sys.js';
import { inspectUffd, type UffdInfo } from '../handoff/validate.js';
import { HandoffConnection } from '../handoff/listener.js';
import type { Logger } from '../ops/log.js';
import * as sd from '../ops/sdnotify.js';

/** The fd-store names of parked sessions. */
const PREFIX = 'ybs.';
/** Largest state a memfd may hold (a handoff line is at most 64 KiB). */
const MAX_STATE_BYTES = 256 * 1024;

/** What a Firecracker session's handshake said, kept beside its descriptors. */
const FirecrackerState = z.strictObject({
  kind: z.literal('firecracker'),
  /** The configured Firecracker socket it came on (its slot, after a restart). */
  socket: z.string().min(1),
  migrationId: z.string().min(1),
  format: z.enum(['v1.1', 'v1.7', 'v1.12']),
  regions: z.array(HandoffRegion).min(1),
  peer: z.strictObject({ pid: z.number().int(), uid: z.number().int(), gid: z.number().int() }),
});
export type FirecrackerParkState = z.infer<typeof FirecrackerState>;

/** Where a session parks its descriptors; `null` when there is no fd store to use. */
export interface SessionParking {
  /** Stores the session's descriptors under a fresh name; returns it, or null if not stored. */
  park(request: HandoffRequest, uffd: number, conn: number): string | null;
  /**
   * Stores a Firecracker session: its uffd, the Firecracker pidfd, and its socket (-1 once
   * Firecracker closed it, as releases before v1.12 do after the handshake).
   */
  parkFirecracker(
    state: FirecrackerParkState,
    uffd: number,
    pidfd: number,
    conn: number,
  ): string | null;
  /** Drops a parked session's descriptors (it ended). */
  unpark(name: string): void;
}

/** Parking in systemd's fd store (a no-op without $NOTIFY_SOCKET). */
export function fdStoreParking(log: Logger, env: NodeJS.ProcessEnv = process.env): SessionParking {
  const store = (migrationId: string, state: object, fds: number[]): string | null => {
    if (!env['NOTIFY_SOCKET']) return null;
    const name = `${PREFIX}${randomBytes(8).toString('hex')}`;
    const memfd = sys.memfdCreate(name);
    try {
      writeSync(memfd, Buffer.from(JSON.stringify(state), 'utf8'));
      sd.fdStore(name, [...fds.filter((fd) => fd >= 0), memfd], env);
      return name;
    } catch (err) {
      log.warn('cannot park the session in the fd store; a restart will need the VMM', {
        migrationId,
        error: (err as Error).message,
      });
      return null;
    } finally {
      sys.close(memfd);
    }
  };
  return {
    park: (request, uffd, conn) =>
      store(request.migrationId, { ...request, resume: true }, [uffd, conn]),
    parkFirecracker: (state, uffd, pidfd, conn) =>
      store(state.migrationId, state, [uffd, pidfd, conn]),
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

/** A parked Firecracker session, handed back to the slot of its socket. */
export interface ParkedFirecracker {
  name: string;
  state: FirecrackerParkState;
  uffd: number;
  uffdInfo: UffdInfo;
  pidfd: number;
  /** Firecracker's socket, or -1 (closed before the daemon stopped). */
  conn: number;
}

export interface Parked {
  handoffs: ParkedSession[];
  firecracker: ParkedFirecracker[];
}

/**
 * The parked sessions among the descriptors this process was started with (sd.listenFds()).
 * Each is complete, or skipped with a warning and its descriptors closed and unparked: a
 * session whose VMM connection is gone (systemd drops a descriptor that hangs up) has no VMM,
 * nor has a Firecracker session whose process exited.
 */
export function parkedSessions(
  fds: readonly sd.ListenFd[],
  log: Logger,
  parking: SessionParking,
): Parked {
  const groups = new Map<string, number[]>();
  for (const { fd, name } of fds) {
    if (!name.startsWith(PREFIX)) continue;
    groups.set(name, [...(groups.get(name) ?? []), fd]);
  }
  const out: Parked = { handoffs: [], firecracker: [] };
  for (const [name, group] of groups) {
    let uffd = -1;
    let conn = -1;
    let state = -1;
    let pidfd = -1;
    for (const fd of group) {
      const st = fstatSync(fd);
      if (st.isSocket() && conn < 0) conn = fd;
      else if (st.isFile() && state < 0) state = fd;
      else if (pidfd < 0 && isPidfd(fd)) pidfd = fd;
      else if (uffd < 0 && isUffd(fd)) uffd = fd;
      else sys.close(fd);
    }
    const drop = (why: string): void => {
      log.warn('a parked session cannot be resumed', { name, reason: why });
      for (const fd of [uffd, conn, state, pidfd]) if (fd >= 0) sys.close(fd);
      parking.unpark(name);
    };
    if (uffd < 0 || state < 0) {
      drop('its userfaultfd or its state is missing');
      continue;
    }
    let json: unknown;
    const text = readState(state);
    try {
      json = JSON.parse(text.toString('utf8'));
    } catch (err) {
      drop(`its state does not decode: ${(err as Error).message}`);
      continue;
    }
    if ((json as { kind?: unknown } | null)?.kind === 'firecracker') {
      const parsed = FirecrackerState.safeParse(json);
      if (!parsed.success) {
        drop(`its state does not decode: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
        continue;
      }
      // A pidfd of an exited process signals ESRCH: Firecracker left while no daemon ran.
      if (pidfd < 0 || sys.tryPidfdSendSignal(pidfd, 0) < 0) {
        drop(`Firecracker (pid ${parsed.data.peer.pid}) is gone: it left while no daemon ran`);
        continue;
      }
      sys.close(state);
      sys.setNonBlocking(uffd, true);
      if (conn >= 0) sys.setNonBlocking(conn, true);
      out.firecracker.push({
        name,
        state: parsed.data,
        uffd,
        uffdInfo: inspectUffd(uffd),
        pidfd,
        conn,
      });
      continue;
    }
    if (conn < 0) {
      drop('the VMM connection is gone: the VMM left while no daemon ran');
      continue;
    }
    let request: HandoffRequest;
    try {
      request = decodeHandoff(text);
    } catch (err) {
      drop(`its state does not decode: ${(err as Error).message}`);
      continue;
    }
    sys.close(state);
    sys.setNonBlocking(uffd, true);
    sys.setNonBlocking(conn, true);
    out.handoffs.push({
      name,
      request,
      uffd,
      uffdInfo: inspectUffd(uffd),
      conn: new HandoffConnection(conn, sys.peerCred(conn)),
    });
  }
  return out;
}

function isPidfd(fd: number): boolean {
  try {
    // anon_inode:[pidfd] before Linux 6.9, pidfd:[inode] on pidfs since.
    return /^(anon_inode:\[pidfd\]|pidfd:)/.test(readlinkSync(`/proc/self/fd/${fd}`));
  } catch {
    return false;
  }
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
