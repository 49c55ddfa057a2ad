/**
 * AF_UNIX datagram sockets through koffi: what sd_notify(3) needs (node's `dgram` module speaks
 * only UDP, and `net` only stream sockets). Path names and Linux abstract names (a leading `@`,
 * sent as a leading NUL byte, see unix(7)) are both accepted.
 *
 * Same conventions as sys.ts: C names, errors as SyscallError, Buffers passed straight through
 * as pointer arguments for the duration of one call (never a cached koffi.address).
 */
import koffi from 'koffi';
import { ERRNO, SyscallError } from './errors.js';

// <sys/socket.h>, <sys/un.h> (x86_64). Kept here so sys.ts/abi.ts stay untouched.
export const AF_UNIX = 1;
export const SOCK_DGRAM = 2;
export const SOCK_CLOEXEC = 0o2000000;
export const SOCK_NONBLOCK = 0o4000;
export const SOL_SOCKET = 1;
export const SCM_RIGHTS = 1;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
/** offsetof(struct sockaddr_un, sun_path): sa_family_t is a u16. */
export const SUN_PATH_OFFSET = 2;
/** sizeof(sun_path): the longest name, NUL included for path names. */
export const SUN_PATH_MAX = 108;
const SIZEOF_cmsghdr = 16;
const CMSG_ALIGN = (n: number): number => (n + 7) & ~7;

const libc = koffi.load('libc.so.6');

const iovec = koffi.struct('unix_dgram_iovec', { iov_base: 'void *', iov_len: 'size_t' });
// A private name: sys.ts already registers `msghdr` (with msg_name as void *, same layout).
koffi.struct('unix_dgram_msghdr', {
  msg_name: 'void *',
  msg_namelen: 'uint32_t',
  msg_iov: koffi.pointer(iovec),
  msg_iovlen: 'size_t',
  msg_control: 'void *',
  msg_controllen: 'size_t',
  msg_flags: 'int',
});

const c = {
  socket: libc.func('int socket(int domain, int type, int protocol)'),
  bind: libc.func('int bind(int fd, const void *addr, uint32_t addrlen)'),
  sendto: libc.func(
    'long sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t addrlen)',
  ),
  sendmsg: libc.func('long sendmsg(int fd, const unix_dgram_msghdr *msg, int flags)'),
  recv: libc.func('long recv(int fd, _Out_ void *buf, size_t len, int flags)'),
  close: libc.func('int close(int fd)'),
};

function check(name: string, rc: number, detail?: string): number {
  if (rc < 0) throw new SyscallError(name, koffi.errno(), detail);
  return rc;
}

/**
 * struct sockaddr_un for `name`, and the address length to pass with it. `@name` is abstract:
 * the length covers exactly the name bytes (no NUL terminator), as sd_notify does. A path name
 * gets its NUL counted in, like sockaddr_un_set_path() in systemd.
 */
export function sockaddrUn(name: string): { addr: Buffer; len: number } {
  const abstract = name.startsWith('@');
  const bytes = Buffer.from(abstract ? name.slice(1) : name, 'utf8');
  const nameLen = abstract ? 1 + bytes.length : bytes.length + 1;
  if (bytes.length === 0) throw new SyscallError('sockaddr_un', ERRNO.EINVAL, 'empty name');
  if (nameLen > SUN_PATH_MAX) {
    throw new SyscallError('sockaddr_un', ERRNO.ENAMETOOLONG, `name is ${nameLen} bytes`);
  }
  const addr = Buffer.alloc(SUN_PATH_OFFSET + SUN_PATH_MAX);
  addr.writeUInt16LE(AF_UNIX, 0);
  bytes.copy(addr, SUN_PATH_OFFSET + (abstract ? 1 : 0)); // abstract: sun_path[0] stays NUL
  return { addr, len: SUN_PATH_OFFSET + nameLen };
}

/** socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC [| SOCK_NONBLOCK], 0). */
export function socketUnixDgram(nonBlocking = false): number {
  const type = SOCK_DGRAM | SOCK_CLOEXEC | (nonBlocking ? SOCK_NONBLOCK : 0);
  return check('socket', c.socket(AF_UNIX, type, 0) as number);
}

export function bind(fd: number, name: string): void {
  const { addr, len } = sockaddrUn(name);
  check('bind', c.bind(fd, addr, len) as number, name);
}

/** sendto(2) one datagram to the socket named `name`; returns the bytes sent. */
export function sendto(fd: number, data: Buffer, name: string, flags = MSG_NOSIGNAL): number {
  const { addr, len } = sockaddrUn(name);
  return check('sendto', Number(c.sendto(fd, data, data.length, flags, addr, len)), name);
}

/**
 * sendmsg(2) one datagram to `name` with `fds` attached as one SCM_RIGHTS message (what
 * sd_pid_notify_with_fds does for FDSTORE=1). The receiver gets duplicates; ours stay open.
 */
export function sendtoWithFds(
  fd: number,
  data: Buffer,
  name: string,
  fds: readonly number[],
  flags = MSG_NOSIGNAL,
): number {
  const { addr, len } = sockaddrUn(name);
  let control: Buffer | null = null;
  if (fds.length > 0) {
    const dataLen = 4 * fds.length;
    control = Buffer.alloc(SIZEOF_cmsghdr + CMSG_ALIGN(dataLen));
    control.writeBigUInt64LE(BigInt(SIZEOF_cmsghdr + dataLen), 0); // cmsg_len = CMSG_LEN(n)
    control.writeInt32LE(SOL_SOCKET, 8);
    control.writeInt32LE(SCM_RIGHTS, 12);
    fds.forEach((f, i) => control!.writeInt32LE(f, SIZEOF_cmsghdr + 4 * i));
  }
  const msg = {
    msg_name: addr,
    msg_namelen: len,
    msg_iov: [{ iov_base: data, iov_len: data.length }],
    msg_iovlen: 1,
    msg_control: control,
    msg_controllen: control ? control.length : 0,
    msg_flags: 0,
  };
  return check('sendmsg', Number(c.sendmsg(fd, msg, flags)), name);
}

/** recv(2) one datagram into `buf`; returns its length, or a negative errno (EAGAIN). */
export function tryRecv(fd: number, buf: Buffer, flags = 0): number {
  const rc = Number(c.recv(fd, buf, buf.length, flags));
  return rc < 0 ? -koffi.errno() : rc;
}

export function close(fd: number): void {
  check('close', c.close(fd) as number);
}
