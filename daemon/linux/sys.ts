/**
 * The only module that imports koffi: thin, typed bindings to libc. Each wrapper either returns a
 * result or throws SyscallError; callers that treat an errno as data (EEXIST, EAGAIN) use the
 * `try*` forms that return the negative errno instead.
 *
 * koffi pitfall: never keep koffi.address(buffer). Buffers are passed directly as pointer
 * arguments or as pointer fields of a struct, for the call's duration. The one exception,
 * uffdCopy, takes its source's address right before the ioctl that uses it, and drops it after.
 * Guest and mapping addresses are plain numbers (x86_64 user addresses are < 2^47, exact in a
 * double) passed as uintptr_t.
 */
import koffi from 'koffi';
import { ERRNO, SyscallError } from './errors.js';
import * as abi from './abi.js';

const libc = koffi.load('libc.so.6');

// Registered by name: the prototypes below refer to it as `uffdio_api`.
koffi.struct('uffdio_api', {
  api: 'uint64_t',
  features: 'uint64_t',
  ioctls: 'uint64_t',
});
const uffdio_range = koffi.struct('uffdio_range', { start: 'uintptr_t', len: 'uint64_t' });
// Registered by name: the prototypes below refer to it as `uffdio_register`.
koffi.struct('uffdio_register', {
  range: uffdio_range,
  mode: 'uint64_t',
  ioctls: 'uint64_t',
});
// Registered by name: the prototype below refers to it as `open_how`.
koffi.struct('open_how', { flags: 'uint64_t', mode: 'uint64_t', resolve: 'uint64_t' });
const iovec = koffi.struct('iovec', { iov_base: 'void *', iov_len: 'size_t' });
// Registered by name: the prototypes below refer to it as `msghdr`.
koffi.struct('msghdr', {
  msg_name: 'void *',
  msg_namelen: 'uint32_t',
  msg_iov: koffi.pointer(iovec),
  msg_iovlen: 'size_t',
  msg_control: 'void *',
  msg_controllen: 'size_t',
  msg_flags: 'int',
});
// Registered by name: the prototypes below refer to it as `ucred`.
koffi.struct('ucred', { pid: 'int32_t', uid: 'uint32_t', gid: 'uint32_t' });

const c = {
  syscall_uffd: libc.func('long syscall(long nr, int flags)'),
  syscall_openat2: libc.func(
    'long syscall(long nr, int dirfd, const char *path, const open_how *how, size_t size)',
  ),
  syscall_pidfd_open: libc.func('long syscall(long nr, int pid, unsigned int flags)'),
  syscall_pidfd_send_signal: libc.func(
    'long syscall(long nr, int pidfd, int sig, void *info, unsigned int flags)',
  ),
  open: libc.func('int open(const char *path, int flags, int mode)'),
  close: libc.func('int close(int fd)'),
  dup: libc.func('int dup(int fd)'),
  read: libc.func('long read(int fd, _Out_ void *buf, size_t count)'),
  write: libc.func('long write(int fd, const void *buf, size_t count)'),
  pread: libc.func('long pread(int fd, void *buf, size_t count, int64_t offset)'),
  lseek: libc.func('int64_t lseek(int fd, int64_t offset, int whence)'),
  fcntl: libc.func('int fcntl(int fd, int cmd, int arg)'),
  mmap: libc.func(
    'uintptr_t mmap(uintptr_t addr, size_t len, int prot, int flags, int fd, int64_t off)',
  ),
  munmap: libc.func('int munmap(uintptr_t addr, size_t len)'),
  madvise: libc.func('int madvise(uintptr_t addr, size_t len, int advice)'),
  memcpyFromAddr: libc.func('void *memcpy(_Out_ void *dst, uintptr_t src, size_t n)'),
  memcpyToAddr: libc.func('uintptr_t memcpy(uintptr_t dst, const void *src, size_t n)'),
  ioctlInt: libc.func('int ioctl(int fd, unsigned long req, int arg)'),
  ioctlApi: libc.func('int ioctl(int fd, unsigned long req, _Inout_ uffdio_api *arg)'),
  ioctlRegister: libc.func('int ioctl(int fd, unsigned long req, _Inout_ uffdio_register *arg)'),
  // The uffdio_* arguments of the ioctls a placement makes, written into `uffdArg` below.
  ioctlArg: libc.func('int ioctl(int fd, unsigned long req, void *arg)'),
  socket: libc.func('int socket(int domain, int type, int protocol)'),
  socketpair: libc.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)'),
  sendmsg: libc.func('long sendmsg(int fd, const msghdr *msg, int flags)'),
  recvmsg: libc.func('long recvmsg(int fd, _Inout_ msghdr *msg, int flags)'),
  getsockopt: libc.func(
    'int getsockopt(int fd, int level, int name, _Out_ ucred *val, _Inout_ uint32_t *len)',
  ),
  getpid: libc.func('int getpid()'),
  memfdCreate: libc.func('int memfd_create(const char *name, unsigned int flags)'),
  gettid: libc.func('int gettid()'),
  setpriority: libc.func('int setpriority(int which, unsigned int who, int prio)'),
  mallopt: libc.func('int mallopt(int param, int value)'),
  bind: libc.func('int bind(int fd, const void *addr, uint32_t len)'),
  sendto: libc.func(
    'long sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t addrlen)',
  ),
  recv: libc.func('long recv(int fd, _Out_ void *buf, size_t len, int flags)'),
  connect: libc.func('int connect(int fd, const void *addr, uint32_t len)'),
  listen: libc.func('int listen(int fd, int backlog)'),
  accept4: libc.func('int accept4(int fd, void *addr, void *len, int flags)'),
  send: libc.func('long send(int fd, const void *buf, size_t len, int flags)'),
  ioctlOutInt: libc.func('int ioctl(int fd, unsigned long req, _Out_ int *arg)'),
  setsockoptInt: libc.func(
    'int setsockopt(int fd, int level, int name, const int *val, uint32_t len)',
  ),
};

function fail(name: string, detail?: string): never {
  throw new SyscallError(name, koffi.errno(), detail);
}

function check(name: string, rc: number, detail?: string): number {
  if (rc < 0) fail(name, detail);
  return rc;
}

/** Current errno as a negative number, for `try*` wrappers that return errors as data. */
const negErrno = (): number => -koffi.errno();

export function userfaultfd(flags: number): number {
  const rc = Number(c.syscall_uffd(abi.SYS_userfaultfd, flags));
  return check('userfaultfd', rc);
}

export function open(path: string, flags: number, mode = 0): number {
  return check('open', c.open(path, flags | abi.O_CLOEXEC, mode) as number, path);
}

/**
 * openat2(2) of `path` relative to the directory `dirfd` with `resolve` (RESOLVE_* flags, e.g.
 * RESOLVE_BENEATH: every step of the path, symlinks and ".." included, stays beneath dirfd).
 * Returns the fd or a negative errno (EXDEV when the path would leave; ENOSYS before 5.6).
 */
export function tryOpenat2(dirfd: number, path: string, flags: number, resolve: number): number {
  const how = { flags: flags | abi.O_CLOEXEC, mode: 0, resolve };
  const rc = Number(c.syscall_openat2(abi.SYS_openat2, dirfd, path, how, abi.SIZEOF_open_how));
  return rc < 0 ? negErrno() : rc;
}

/**
 * pidfd_open(2): a descriptor that refers to process `pid` itself, not to its number. It becomes
 * readable when the process exits (watchReadable), and signals sent through it never reach a
 * later process that reused the number. Returns the fd or a negative errno (ESRCH: no such
 * process).
 */
export function tryPidfdOpen(pid: number): number {
  const rc = Number(c.syscall_pidfd_open(abi.SYS_pidfd_open, pid, 0));
  return rc < 0 ? negErrno() : rc | 0;
}

/** pidfd_send_signal(2): `signal` to the process `pidfd` refers to; 0 or a negative errno. */
export function tryPidfdSendSignal(pidfd: number, signal: number): number {
  const rc = Number(c.syscall_pidfd_send_signal(abi.SYS_pidfd_send_signal, pidfd, signal, null, 0));
  return rc < 0 ? negErrno() : 0;
}

export function close(fd: number): void {
  check('close', c.close(fd) as number);
}

/** memfd_create(2) with MFD_CLOEXEC: an anonymous file (the dest's parked session state). */
export function memfdCreate(name: string): number {
  return check('memfd_create', c.memfdCreate(name, abi.MFD_CLOEXEC) as number, name);
}

export function dup(fd: number): number {
  return check('dup', c.dup(fd) as number);
}

/** A second descriptor of the same open file, closed on exec. */
export function dupCloexec(fd: number): number {
  return check('fcntl', c.fcntl(fd, abi.F_DUPFD_CLOEXEC, 0) as number, 'F_DUPFD_CLOEXEC');
}

/** Bytes waiting in a socket's receive queue (FIONREAD). */
export function bytesReadable(fd: number): number {
  const out = [0];
  check('ioctl', c.ioctlOutInt(fd, abi.FIONREAD, out) as number, 'FIONREAD');
  return out[0]!;
}

/** SO_RCVLOWAT: poll reports the socket readable once `bytes` are queued (or at EOF, error). */
export function setRecvLowat(fd: number, bytes: number): void {
  check(
    'setsockopt',
    c.setsockoptInt(fd, abi.SOL_SOCKET, abi.SO_RCVLOWAT, [bytes], 4) as number,
    'SO_RCVLOWAT',
  );
}

/** read(2); returns bytes read, or a negative errno (EAGAIN on an empty non-blocking fd). */
export function tryRead(fd: number, buf: Buffer, len = buf.length): number {
  const rc = Number(c.read(fd, buf, len));
  return rc < 0 ? negErrno() : rc;
}

export function write(fd: number, buf: Buffer): number {
  return check('write', Number(c.write(fd, buf, buf.length)));
}

/** pread(2) into `buf` (or its first `len` bytes); returns bytes read. */
export function pread(fd: number, buf: Buffer, len: number, offset: number): number {
  return check('pread', Number(c.pread(fd, buf, len, offset)));
}

/** lseek(2) returning the offset, or a negative errno (ENXIO past the last data/hole). */
export function tryLseek(fd: number, offset: number, whence: number): number {
  const rc = Number(c.lseek(fd, offset, whence));
  return rc < 0 ? negErrno() : rc;
}

export function setNonBlocking(fd: number, on: boolean): void {
  const flags = check('fcntl', c.fcntl(fd, abi.F_GETFL, 0) as number);
  const next = on ? flags | abi.O_NONBLOCK : flags & ~abi.O_NONBLOCK;
  check('fcntl', c.fcntl(fd, abi.F_SETFL, next) as number);
}

export function mmap(len: number, prot: number, flags: number, fd = -1, offset = 0): number {
  const addr = c.mmap(0, len, prot, flags, fd, offset) as number;
  // MAP_FAILED is (void *)-1, which arrives as 2^64 in a double; no user address is >= 2^63.
  if (addr >= 2 ** 63) fail('mmap');
  return addr;
}

export function munmap(addr: number, len: number): void {
  check('munmap', c.munmap(addr, len) as number);
}

export function madvise(addr: number, len: number, advice: number): void {
  check('madvise', c.madvise(addr, len, advice) as number);
}

/** Copies `len` bytes at process address `addr` into `dst` (may fault: the caller blocks). */
export function readMemory(addr: number, dst: Buffer, len = dst.length): void {
  c.memcpyFromAddr(dst, addr, len);
}

/** Copies `src` to process address `addr` (may fault: the caller blocks). */
export function writeMemory(addr: number, src: Buffer): void {
  c.memcpyToAddr(addr, src, src.length);
}

export interface ApiResult {
  features: number;
  ioctls: number;
}

/** UFFDIO_API; returns the granted features, or a negative errno. */
export function tryUffdApi(fd: number, features: number): ApiResult | number {
  const arg = { api: abi.UFFD_API, features, ioctls: 0 };
  const rc = c.ioctlApi(fd, abi.UFFDIO_API, arg) as number;
  if (rc < 0) return negErrno();
  return { features: Number(arg.features), ioctls: Number(arg.ioctls) };
}

/** UFFDIO_REGISTER; returns the ioctls mask supported on the range, or a negative errno. */
export function tryUffdRegister(fd: number, start: number, len: number, mode: number): number {
  const arg = { range: { start, len }, mode, ioctls: 0 };
  const rc = c.ioctlRegister(fd, abi.UFFDIO_REGISTER, arg) as number;
  return rc < 0 ? negErrno() : Number(arg.ioctls);
}

/**
 * The argument of every UFFDIO_COPY, ZEROPAGE, WAKE, UNREGISTER and WRITEPROTECT made on this
 * thread, written in place. koffi passes a struct argument by reading the object's fields by
 * name, and an _Inout_ one is written back the same way: about 1.8 µs a call measured here,
 * against 0.2 µs for the ioctl itself with a plain pointer, and a placement makes one or two per
 * fault. An ArrayBuffer's memory is off the JS heap and never moves; module state is per thread;
 * each use is one synchronous call.
 */
const uffdArgMemory = new ArrayBuffer(abi.SIZEOF_uffdio_copy);
const uffdArg = new Uint8Array(uffdArgMemory);
const uffdArgU32 = new Uint32Array(uffdArgMemory);
const uffdArgI32 = new Int32Array(uffdArgMemory);

/** The u64 at byte `offset` of the argument := `value` (an integer, 0 ≤ value < 2^53). */
function putU64(offset: number, value: number): void {
  uffdArgU32[offset >> 2] = value >>> 0;
  uffdArgU32[(offset >> 2) + 1] = (value / 0x1_0000_0000) >>> 0;
}

/** The s64 at byte `offset` of the argument (the kernel's results are far below 2^53). */
function getI64(offset: number): number {
  return uffdArgI32[(offset >> 2) + 1]! * 0x1_0000_0000 + uffdArgU32[offset >> 2]!;
}

/** The argument's uffdio_range at offset 0 := start, len. */
function putRange(start: number, len: number): void {
  putU64(0, start);
  putU64(8, len);
}

/** UFFDIO_UNREGISTER or UFFDIO_WAKE on a range; 0 or a negative errno. */
export function tryUffdRange(fd: number, req: number, start: number, len: number): number {
  putRange(start, len);
  const rc = c.ioctlArg(fd, req, uffdArg) as number;
  return rc < 0 ? negErrno() : 0;
}

/**
 * UFFDIO_COPY `len` bytes of `src` to `dst`. Returns the kernel's signed `copy` field: bytes copied
 * (possibly fewer than asked), or a negative errno when nothing was copied (EEXIST, EAGAIN, ...).
 */
export function uffdCopy(fd: number, dst: number, src: Buffer, len: number, mode: number): number {
  if (len > src.length) throw new RangeError(`UFFDIO_COPY of ${len} bytes from ${src.length}`);
  // The address of src's memory, used by this one ioctl while `src` keeps that memory alive.
  return uffdCopyFromAddress(fd, dst, Number(koffi.address(src)), len, mode);
}

/** UFFDIO_COPY from `srcAddr`, an address in this process: same result as uffdCopy. */
export function uffdCopyFromAddress(
  fd: number,
  dst: number,
  srcAddr: number,
  len: number,
  mode: number,
): number {
  putU64(0, dst);
  putU64(abi.OFFSETOF_uffdio_copy_src, srcAddr);
  putU64(abi.OFFSETOF_uffdio_copy_len, len);
  putU64(abi.OFFSETOF_uffdio_copy_mode, mode);
  putU64(abi.OFFSETOF_uffdio_copy_copy, 0);
  const rc = c.ioctlArg(fd, abi.UFFDIO_COPY, uffdArg) as number;
  const copied = getI64(abi.OFFSETOF_uffdio_copy_copy);
  if (rc < 0 && copied > 0) return copied; // partial copy: the caller continues after it
  if (rc < 0) return copied < 0 ? copied : negErrno();
  return copied;
}

/** UFFDIO_WRITEPROTECT on a range with `mode`; 0 or a negative errno. */
export function tryUffdWriteProtect(fd: number, start: number, len: number, mode: number): number {
  putRange(start, len);
  putU64(abi.OFFSETOF_uffdio_writeprotect_mode, mode);
  const rc = c.ioctlArg(fd, abi.UFFDIO_WRITEPROTECT, uffdArg) as number;
  return rc < 0 ? negErrno() : 0;
}

/** UFFDIO_ZEROPAGE: same result convention as uffdCopy. */
export function uffdZeropage(fd: number, start: number, len: number, mode: number): number {
  putRange(start, len);
  putU64(abi.OFFSETOF_uffdio_zeropage_mode, mode);
  putU64(abi.OFFSETOF_uffdio_zeropage_zeropage, 0);
  const rc = c.ioctlArg(fd, abi.UFFDIO_ZEROPAGE, uffdArg) as number;
  const done = getI64(abi.OFFSETOF_uffdio_zeropage_zeropage);
  if (rc < 0 && done > 0) return done;
  if (rc < 0) return done < 0 ? done : negErrno();
  return done;
}

/** ioctl with an integer argument (USERFAULTFD_IOC_NEW); returns rc or throws. */
export function ioctlInt(fd: number, req: number, arg: number, name: string): number {
  return check(name, c.ioctlInt(fd, req, arg) as number);
}

export function socket(domain: number, type: number): number {
  return check('socket', c.socket(domain, type | abi.SOCK_CLOEXEC, 0) as number);
}

export function socketpair(): [number, number] {
  const sv = [0, 0];
  check(
    'socketpair',
    c.socketpair(abi.AF_UNIX, abi.SOCK_STREAM | abi.SOCK_CLOEXEC, 0, sv) as number,
  );
  return [sv[0]!, sv[1]!];
}

/** A control buffer carrying `fds` as one SCM_RIGHTS message, or null for none. */
function rightsControl(fds: readonly number[]): Buffer | null {
  if (fds.length === 0) return null;
  const control = Buffer.alloc(abi.CMSG_SPACE(4 * fds.length));
  control.writeBigUInt64LE(BigInt(abi.CMSG_LEN(4 * fds.length)), 0);
  control.writeInt32LE(abi.SOL_SOCKET, 8);
  control.writeInt32LE(abi.SCM_RIGHTS, 12);
  fds.forEach((f, i) => control.writeInt32LE(f, abi.SIZEOF_cmsghdr + 4 * i));
  return control;
}

/**
 * sendmsg with `data` and, when given, file descriptors as one SCM_RIGHTS message; `to` names
 * the destination of a datagram socket (sd_notify's FDSTORE=1), absent on a connected socket.
 * The receiver gets duplicates; ours stay open.
 */
export function sendWithFds(fd: number, data: Buffer, fds: readonly number[], to?: string): number {
  const control = rightsControl(fds);
  const name = to === undefined ? null : sockaddrUn(to);
  const msg = {
    msg_name: name?.addr ?? null,
    msg_namelen: name?.len ?? 0,
    msg_iov: [{ iov_base: data, iov_len: data.length }],
    msg_iovlen: 1,
    msg_control: control,
    msg_controllen: control ? control.length : 0,
    msg_flags: 0,
  };
  return check('sendmsg', Number(c.sendmsg(fd, msg, abi.MSG_NOSIGNAL)), to);
}

export interface Received {
  /** Bytes read into the buffer; 0 means the peer closed. */
  bytes: number;
  /** File descriptors that came with the data (already owned by this process, CLOEXEC). */
  fds: number[];
  /** The control data was truncated: more fds were sent than we accept (they were closed). */
  truncated: boolean;
}

/**
 * recvmsg into `buf`, collecting SCM_RIGHTS descriptors. Room for `maxFds`; the kernel closes
 * any beyond that and sets MSG_CTRUNC, which we report. Returns a negative errno on failure
 * (EAGAIN on a non-blocking socket with nothing queued).
 */
export function tryRecvWithFds(
  fd: number,
  buf: Buffer,
  maxFds: number,
  flags = 0,
): Received | number {
  const control = Buffer.alloc(abi.CMSG_SPACE(4 * maxFds));
  const msg = {
    msg_name: null,
    msg_namelen: 0,
    msg_iov: [{ iov_base: buf, iov_len: buf.length }],
    msg_iovlen: 1,
    msg_control: control,
    msg_controllen: control.length,
    msg_flags: 0,
  };
  const rc = Number(c.recvmsg(fd, msg, flags | abi.MSG_CMSG_CLOEXEC));
  if (rc < 0) return negErrno();
  const fds: number[] = [];
  const controlLen = Number(msg.msg_controllen);
  let off = 0;
  while (off + abi.SIZEOF_cmsghdr <= controlLen) {
    const len = Number(control.readBigUInt64LE(off));
    if (len < abi.SIZEOF_cmsghdr) break;
    const level = control.readInt32LE(off + 8);
    const type = control.readInt32LE(off + 12);
    if (level === abi.SOL_SOCKET && type === abi.SCM_RIGHTS) {
      const n = Math.floor((len - abi.SIZEOF_cmsghdr) / 4);
      for (let i = 0; i < n; i++) fds.push(control.readInt32LE(off + abi.SIZEOF_cmsghdr + 4 * i));
    }
    off += abi.CMSG_ALIGN(len);
  }
  return { bytes: rc, fds, truncated: (msg.msg_flags & abi.MSG_CTRUNC) !== 0 };
}

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
}

export function peerCred(fd: number): PeerCred {
  const out = { pid: 0, uid: 0, gid: 0 };
  const len = [12];
  check('getsockopt', c.getsockopt(fd, abi.SOL_SOCKET, abi.SO_PEERCRED, out, len) as number);
  return out;
}

/**
 * struct sockaddr_un for `name`, and the address length to pass with it. `@name` is a Linux
 * abstract name (unix(7)): a leading NUL, and the length covers exactly the name bytes, as
 * sd_notify does. A path name gets its NUL counted in.
 */
export function sockaddrUn(name: string): { addr: Buffer; len: number } {
  const abstract = name.startsWith('@');
  const bytes = Buffer.from(abstract ? name.slice(1) : name, 'utf8');
  const nameLen = abstract ? 1 + bytes.length : bytes.length + 1;
  if (bytes.length === 0) throw new SyscallError('sockaddr_un', ERRNO.EINVAL, 'empty name');
  if (nameLen > abi.SUN_PATH_MAX) {
    throw new SyscallError('sockaddr_un', ERRNO.ENAMETOOLONG, `name is ${nameLen} bytes`);
  }
  const addr = Buffer.alloc(abi.SUN_PATH_OFFSET + abi.SUN_PATH_MAX);
  addr.writeUInt16LE(abi.AF_UNIX, 0);
  bytes.copy(addr, abi.SUN_PATH_OFFSET + (abstract ? 1 : 0)); // abstract: sun_path[0] stays NUL
  return { addr, len: abi.SUN_PATH_OFFSET + nameLen };
}

/** A non-blocking listening AF_UNIX stream socket bound to `path`. */
export function listenUnix(path: string, backlog = 64): number {
  const fd = socket(abi.AF_UNIX, abi.SOCK_STREAM | abi.SOCK_NONBLOCK);
  try {
    const { addr, len } = sockaddrUn(path);
    check('bind', c.bind(fd, addr, len) as number, path);
    check('listen', c.listen(fd, backlog) as number);
    return fd;
  } catch (err) {
    c.close(fd);
    throw err;
  }
}

/** A blocking AF_UNIX stream socket connected to `path`. */
export function connectUnix(path: string): number {
  const fd = socket(abi.AF_UNIX, abi.SOCK_STREAM);
  const { addr, len } = sockaddrUn(path);
  if ((c.connect(fd, addr, len) as number) < 0) {
    const err = new SyscallError('connect', koffi.errno(), path);
    c.close(fd);
    throw err;
  }
  return fd;
}

/** accept4 (non-blocking, CLOEXEC); returns the new fd or a negative errno (EAGAIN: none queued). */
export function tryAccept(fd: number): number {
  const rc = c.accept4(fd, null, null, abi.SOCK_NONBLOCK | abi.SOCK_CLOEXEC) as number;
  return rc < 0 ? negErrno() : rc;
}

/** send(2) without SIGPIPE; returns bytes sent or a negative errno. */
export function trySend(fd: number, buf: Buffer, flags = 0): number {
  const rc = Number(c.send(fd, buf, buf.length, flags | abi.MSG_NOSIGNAL));
  return rc < 0 ? negErrno() : rc;
}

/** socket(AF_UNIX, SOCK_DGRAM): what sd_notify(3) needs (node's dgram speaks only UDP). */
export function socketUnixDgram(nonBlocking = false): number {
  return socket(abi.AF_UNIX, abi.SOCK_DGRAM | (nonBlocking ? abi.SOCK_NONBLOCK : 0));
}

export function bindUnix(fd: number, name: string): void {
  const { addr, len } = sockaddrUn(name);
  check('bind', c.bind(fd, addr, len) as number, name);
}

/** sendto(2) one datagram to the socket named `name`; returns the bytes sent. */
export function sendto(fd: number, data: Buffer, name: string): number {
  const { addr, len } = sockaddrUn(name);
  return check(
    'sendto',
    Number(c.sendto(fd, data, data.length, abi.MSG_NOSIGNAL, addr, len)),
    name,
  );
}

/**
 * recv(2) into `buf` (a datagram, or up to buf.length bytes of a stream); returns its length,
 * or a negative errno (EAGAIN).
 */
export function tryRecv(fd: number, buf: Buffer, flags = 0): number {
  const rc = Number(c.recv(fd, buf, buf.length, flags));
  return rc < 0 ? negErrno() : rc;
}

const M_TRIM_THRESHOLD = -1;
const M_MMAP_THRESHOLD = -3;

/**
 * Keeps large freed buffers in the malloc heap instead of returning them to the kernel.
 * Page frames arrive in 256 KiB buffers (pread targets, ws message reassembly); with glibc's
 * defaults each one is a fresh mmap whose first touch costs 64 page faults, and page faults are
 * expensive under virtualisation: measured here, they held the source's stream to 0.2 GB/s.
 * `keepBytes` bounds what stays mapped but unused.
 */
export function keepFreedBuffers(keepBytes: number): void {
  c.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
  c.mallopt(M_TRIM_THRESHOLD, keepBytes);
}

export function getpid(): number {
  return c.getpid() as number;
}

const PRIO_PROCESS = 0;

/**
 * Sets the nice value of the calling thread only (Linux schedules threads, and setpriority on a
 * thread id applies to that thread). Raising it needs no privilege.
 */
export function setThreadNice(nice: number): void {
  check('setpriority', c.setpriority(PRIO_PROCESS, c.gettid() as number, nice) as number);
}

let flushPending = false;
/** Makes node run queued nextTicks and microtasks soon: processImmediate drains both. */
function flushTicks(): void {
  if (flushPending) return;
  flushPending = true;
  setImmediate(() => {
    flushPending = false;
  });
}

export interface FdWatch {
  stop(): void;
  /** No callbacks until resume(); the fd stays open and watched. */
  pause(): void;
  resume(): void;
}

/**
 * Calls `onReadable` from the event loop whenever `fd` is readable (libuv uv_poll through
 * koffi.node.poll): no thread per fd, no blocking call on the main loop.
 *
 * koffi invokes the callback straight from libuv, outside node's MakeCallback: an exception left
 * pending there aborts the process later, and queued microtasks do not run until the next
 * callback that node itself makes. So the handler runs inside try/catch, errors are rethrown
 * from setImmediate (a normal uncaught exception), and after each call a microtask checkpoint
 * is forced with setImmediate.
 */
export function watchReadable(
  fd: number,
  onReadable: (hangup: boolean) => void,
  onError: (err: unknown) => void = (err) =>
    setImmediate(() => {
      throw err;
    }),
): FdWatch {
  let stopped = false;
  let paused = false;
  const events = { readable: true, disconnect: true };
  const callback = ((status: number, ev: { readable: boolean; disconnect: boolean }) => {
    if (stopped || paused) return;
    try {
      onReadable(status < 0 || ev.disconnect);
    } catch (err) {
      onError(err);
    }
    flushTicks();
  }) as never;
  const handle = koffi.node.poll(fd, events, callback);
  return {
    stop() {
      if (stopped) return;
      stopped = true;
      handle.stop();
      handle.close();
    },
    pause() {
      if (stopped || paused) return;
      paused = true;
      handle.stop();
    },
    resume() {
      if (stopped || !paused) return;
      paused = false;
      handle.start(events, callback);
    },
  };
}
