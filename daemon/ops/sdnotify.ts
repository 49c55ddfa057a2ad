/**
 * sd_notify(3) and sd_listen_fds(3) without libsystemd: the protocol is one datagram of
 * newline-separated `KEY=VALUE` fields to the AF_UNIX socket named by $NOTIFY_SOCKET
 * (https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html), and the listening
 * fds of socket activation start at fd 3, counted by $LISTEN_FDS for the pid in $LISTEN_PID.
 *
 * Everything is a no-op when $NOTIFY_SOCKET is unset (not run by systemd, or NotifyAccess=none),
 * so the daemons call these unconditionally. A send that fails throws: the caller decides
 * whether a lost READY=1 (systemd will time the start out) is worth a log line or an exit.
 */
import * as sys from '../linux/sys.js';
import { ERRNO, SyscallError } from '../linux/errors.js';

type Env = Readonly<Record<string, string | undefined>>;

/** The first fd passed by socket activation (SD_LISTEN_FDS_START in sd-daemon.h). */
export const SD_LISTEN_FDS_START = 3;

function notifySocket(env: Env): string | null {
  const name = env['NOTIFY_SOCKET'];
  if (!name) return null;
  // systemd >= 253 may also name an AF_VSOCK address (`vsock:CID:PORT`), only for VMs and
  // containers it starts; our units run on the host, so that form is refused, not guessed at.
  if (!name.startsWith('/') && !name.startsWith('@')) {
    throw new SyscallError('sd_notify', ERRNO.EAFNOSUPPORT, `NOTIFY_SOCKET=${name}`);
  }
  return name;
}

/**
 * Sends `fields` (e.g. "READY=1\nSTATUS=serving") to the service manager, with `fds` attached
 * when given (FDSTORE=1). Returns false when there is no manager to tell ($NOTIFY_SOCKET unset).
 */
export function notify(
  fields: string,
  fds: readonly number[] = [],
  env: Env = process.env,
): boolean {
  const name = notifySocket(env);
  if (name === null) return false;
  const fd = sys.socketUnixDgram();
  try {
    const data = Buffer.from(fields, 'utf8');
    if (fds.length > 0) sys.sendWithFds(fd, data, fds, name);
    else sys.sendto(fd, data, name);
  } finally {
    sys.close(fd);
  }
  return true;
}

/** One line per field: a newline inside a value would start a new (bogus) field. */
const oneLine = (s: string): string => s.replace(/[\r\n]+/g, ' ');

/** Startup finished: systemd moves a Type=notify unit to "active". */
export const ready = (env?: Env): boolean => notify('READY=1', [], env);

/** Free-form status shown by `systemctl status`. */
export const status = (text: string, env?: Env): boolean =>
  notify(`STATUS=${oneLine(text)}`, [], env);

/** Shutdown started (systemd shows "deactivating" instead of "failed" if it takes time). */
export const stopping = (env?: Env): boolean => notify('STOPPING=1', [], env);

/** Keep-alive for WatchdogSec=; send at half of watchdogIntervalMs(). */
export const watchdog = (env?: Env): boolean => notify('WATCHDOG=1', [], env);

/**
 * Parks `fds` in the service manager's fd store under `name` (FileDescriptorStoreMax= must be
 * large enough). After a restart they come back through socket activation (LISTEN_FDNAMES).
 */
export const fdStore = (name: string, fds: readonly number[], env?: Env): boolean =>
  notify(`FDSTORE=1\nFDNAME=${fdName(name)}`, fds, env);

/** Drops every fd stored under `name` (the manager closes them). */
export const fdStoreRemove = (name: string, env?: Env): boolean =>
  notify(`FDSTOREREMOVE=1\nFDNAME=${fdName(name)}`, [], env);

/** sd_notify's rule for FDNAME=: at most 255 printable ASCII bytes, no colon. */
function fdName(name: string): string {
  if (!/^[\x20-\x39\x3b-\x7e]{1,255}$/.test(name)) {
    throw new SyscallError('sd_notify', ERRNO.EINVAL, `bad FDNAME ${JSON.stringify(name)}`);
  }
  return name;
}

/**
 * The watchdog period systemd expects pings within (WatchdogSec=), in ms, or null when no
 * watchdog is enabled for this process (unset, or WATCHDOG_PID names another process).
 */
export function watchdogIntervalMs(env: Env = process.env, pid = process.pid): number | null {
  const usec = Number(env['WATCHDOG_USEC']);
  if (!Number.isSafeInteger(usec) || usec <= 0) return null;
  const forPid = env['WATCHDOG_PID'];
  if (forPid !== undefined && Number(forPid) !== pid) return null;
  return usec / 1000;
}

export interface ListenFd {
  fd: number;
  /** FileDescriptorName= of the socket unit, or the FDNAME= it was stored with; "unknown" if none. */
  name: string;
}

/**
 * The fds handed over by socket activation and the fd store (sd_listen_fds_with_names), or []
 * when none were passed to this process. Does not unset the variables; children are not spawned.
 */
export function listenFds(env: Env = process.env, pid = process.pid): ListenFd[] {
  if (Number(env['LISTEN_PID']) !== pid) return [];
  const n = Number(env['LISTEN_FDS']);
  if (!Number.isSafeInteger(n) || n <= 0) return [];
  const names = (env['LISTEN_FDNAMES'] ?? '').split(':');
  return Array.from({ length: n }, (_, i) => ({
    fd: SD_LISTEN_FDS_START + i,
    name: names[i] || 'unknown',
  }));
}
