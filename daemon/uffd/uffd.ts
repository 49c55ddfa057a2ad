/**
 * Typed userfaultfd: the operations yabusame needs, with kernel results as data
 * (https://docs.kernel.org/admin-guide/mm/userfaultfd.html).
 *
 * - placement (copy / zeropage) returns `placed`, `exists` (EEXIST: another delivery won the
 *   race), `retry` (EAGAIN: a REMOVE/UNMAP event is pending, drain events and try again) or
 *   `gone` (ESRCH/ENOENT/EBADF...: the address space or range is gone, the VMM died);
 *   a partial copy reports its byte count and the caller continues after it.
 * - anything else throws UffdError with a stable code.
 */
import * as sys from '../linux/sys.js';
import * as abi from '../linux/abi.js';
import { ERRNO, errnoName } from '../linux/errors.js';

export class UffdError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'UffdError';
    this.code = code;
  }
}

export type PlaceResult =
  | { kind: 'placed'; bytes: number }
  | { kind: 'exists'; bytes: number }
  | { kind: 'retry' }
  | { kind: 'gone'; errno: string };

const GONE = new Set([
  ERRNO.ESRCH,
  ERRNO.ENOENT,
  ERRNO.EBADF,
  ERRNO.EFAULT,
  ERRNO.ENOMEM,
  ERRNO.EINVAL,
]);

function classify(rc: number): PlaceResult {
  if (rc >= 0) return { kind: 'placed', bytes: rc };
  const errno = -rc;
  if (errno === ERRNO.EEXIST) return { kind: 'exists', bytes: 0 };
  if (errno === ERRNO.EAGAIN) return { kind: 'retry' };
  if (GONE.has(errno)) return { kind: 'gone', errno: errnoName(errno) };
  throw new UffdError(
    `UFFD_${errnoName(errno)}`,
    `userfaultfd placement failed: ${errnoName(errno)}`,
  );
}

/** UFFDIO_COPY `len` bytes of `src` (a view, not copied) to `dst`. */
export function copy(fd: number, dst: number, src: Buffer, len: number, wake = true): PlaceResult {
  return classify(sys.uffdCopy(fd, dst, src, len, wake ? 0 : abi.UFFDIO_COPY_MODE_DONTWAKE));
}

/** UFFDIO_ZEROPAGE on `[start, start+len)` in one ioctl. */
export function zeropage(fd: number, start: number, len: number, wake = true): PlaceResult {
  return classify(sys.uffdZeropage(fd, start, len, wake ? 0 : abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE));
}

/** Wakes threads blocked on `[start, start+len)`: they retry the access and fault again if still missing. */
export function wake(fd: number, start: number, len: number): void {
  const rc = sys.tryUffdRange(fd, abi.UFFDIO_WAKE, start, len);
  if (rc < 0)
    throw new UffdError(`UFFD_WAKE_${errnoName(-rc)}`, `UFFDIO_WAKE failed: ${errnoName(-rc)}`);
}

/** UFFDIO_UNREGISTER; returns false when the range or address space is already gone. */
export function unregister(fd: number, start: number, len: number): boolean {
  return sys.tryUffdRange(fd, abi.UFFDIO_UNREGISTER, start, len) === 0;
}

/**
 * Registers `[start, start+len)` in MISSING mode (idempotent for the same uffd) and returns the
 * ioctls available on it. Works on a uffd received from another process: it acts on that mm.
 */
export function registerMissing(fd: number, start: number, len: number): number {
  const rc = sys.tryUffdRegister(fd, start, len, abi.UFFDIO_REGISTER_MODE_MISSING);
  if (rc < 0) {
    throw new UffdError(
      `UFFD_REGISTER_${errnoName(-rc)}`,
      `UFFDIO_REGISTER of ${len} bytes at 0x${start.toString(16)} failed: ${errnoName(-rc)}`,
    );
  }
  return rc;
}

/** Creates a userfaultfd (syscall, falling back to /dev/userfaultfd) and performs UFFDIO_API. */
export function create(features: number, nonBlocking = true): { fd: number; features: number } {
  const flags = abi.O_CLOEXEC | (nonBlocking ? abi.O_NONBLOCK : 0);
  let fd: number;
  try {
    fd = sys.userfaultfd(flags);
  } catch {
    const dev = sys.open('/dev/userfaultfd', abi.O_RDWR);
    try {
      fd = sys.ioctlInt(dev, abi.USERFAULTFD_IOC_NEW, flags, 'USERFAULTFD_IOC_NEW');
    } finally {
      sys.close(dev);
    }
  }
  const api = sys.tryUffdApi(fd, features);
  if (typeof api === 'number') {
    sys.close(fd);
    throw new UffdError(`UFFD_API_${errnoName(-api)}`, `UFFDIO_API failed: ${errnoName(-api)}`);
  }
  return { fd, features: api.features };
}

// --- events (struct uffd_msg, 32 bytes) ---
export type UffdEvent =
  | { kind: 'pagefault'; address: number; write: boolean; tid: number }
  | { kind: 'remove'; start: number; end: number }
  | { kind: 'unmap'; start: number; end: number }
  | { kind: 'remap'; from: number; to: number; len: number }
  | { kind: 'fork'; ufd: number }
  | { kind: 'unknown'; event: number };

const u64 = (b: Buffer, off: number): number =>
  b.readUInt32LE(off) + b.readUInt32LE(off + 4) * 2 ** 32;

/** Decodes one uffd_msg at `off`. Layout: u8 event, 7 reserved, then the 24-byte union `arg`. */
export function decodeEvent(b: Buffer, off: number): UffdEvent {
  const event = b[off]!;
  switch (event) {
    case abi.UFFD_EVENT_PAGEFAULT:
      return {
        kind: 'pagefault',
        write: (b.readUInt32LE(off + 8) & abi.UFFD_PAGEFAULT_FLAG_WRITE) !== 0,
        address: u64(b, off + 16),
        tid: b.readUInt32LE(off + 24),
      };
    case abi.UFFD_EVENT_REMOVE:
      return { kind: 'remove', start: u64(b, off + 8), end: u64(b, off + 16) };
    case abi.UFFD_EVENT_UNMAP:
      return { kind: 'unmap', start: u64(b, off + 8), end: u64(b, off + 16) };
    case abi.UFFD_EVENT_REMAP:
      return { kind: 'remap', from: u64(b, off + 8), to: u64(b, off + 16), len: u64(b, off + 24) };
    case abi.UFFD_EVENT_FORK:
      return { kind: 'fork', ufd: b.readUInt32LE(off + 8) };
    default:
      return { kind: 'unknown', event };
  }
}

/**
 * Reads every queued event from a non-blocking uffd without blocking. Returns the events, or
 * `gone` when the fd reports the address space is gone (read returns 0 or ESRCH/EBADF).
 */
export function drainEvents(fd: number, buf: Buffer, into: UffdEvent[]): 'ok' | 'gone' {
  for (;;) {
    const n = sys.tryRead(fd, buf);
    if (n < 0) {
      if (-n === ERRNO.EAGAIN || -n === ERRNO.EINTR) return 'ok';
      return 'gone';
    }
    if (n === 0) return 'gone';
    for (let off = 0; off + abi.SIZEOF_uffd_msg <= n; off += abi.SIZEOF_uffd_msg) {
      into.push(decodeEvent(buf, off));
    }
    if (n < buf.length) return 'ok';
  }
}
