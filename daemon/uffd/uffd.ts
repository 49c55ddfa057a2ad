/**
 * Typed userfaultfd: the operations yabusame needs, with kernel results as data
 * (https://docs.kernel.org/admin-guide/mm/userfaultfd.html).
 *
 * - placement (copy / copyZeros / zeropage) returns a PlaceResult: kernel answers are data, and
 *   a partial copy reports its byte count (the caller continues after it);
 * - probes answer questions about a received uffd's ranges without changing them;
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
  /** `bytes` were placed from the start of the range (a partial copy: continue after them). */
  | { kind: 'placed'; bytes: number }
  /** EEXIST: the first page is already present (another delivery, or placed before a resume). */
  | { kind: 'exists' }
  /** EAGAIN: a REMOVE/UNMAP event (or an mm change) is pending: read the events, then retry. */
  | { kind: 'retry' }
  /** ENOENT: the range is not inside one registered mapping (a VMA boundary, or unmapped). */
  | { kind: 'unmapped' }
  /** ESRCH: the address space is gone (the VMM exited). */
  | { kind: 'gone' }
  /** Anything else (EFAULT, EINVAL, ENOMEM...): `errno` names it. */
  | { kind: 'failed'; errno: string };

function classify(rc: number): PlaceResult {
  if (rc >= 0) return { kind: 'placed', bytes: rc };
  switch (-rc) {
    case ERRNO.EEXIST:
      return { kind: 'exists' };
    case ERRNO.EAGAIN:
      return { kind: 'retry' };
    case ERRNO.ENOENT:
      return { kind: 'unmapped' };
    case ERRNO.ESRCH:
      return { kind: 'gone' };
    default:
      return { kind: 'failed', errno: errnoName(-rc) };
  }
}

const copyMode = (wake: boolean): number => (wake ? 0 : abi.UFFDIO_COPY_MODE_DONTWAKE);

/** UFFDIO_COPY `len` bytes of `src` (a view, not copied) to `dst`. */
export function copy(fd: number, dst: number, src: Buffer, len: number, wake = true): PlaceResult {
  return classify(sys.uffdCopy(fd, dst, src, len, copyMode(wake)));
}

/**
 * Largest run copyZeros places in one ioctl, bytes: the size of the zero mapping it copies from
 * (at least one page of the largest page size the protocol allows).
 */
export const ZERO_SOURCE_BYTES = 16 * 1024 * 1024;

/**
 * Mappings of this process that UFFDIO_COPY reads from instead of a Buffer (made once, lazily):
 * - zeros: anonymous and read-only, never written, so every page of it is the kernel's shared
 *   zero page (no memory is used however much of it is read);
 * - inaccessible: PROT_NONE, so a copy from it fails with EFAULT after the kernel has checked
 *   the destination range and before it places anything (probeRange).
 */
let zeroSource = 0;
let probeSource = 0;
function sourceMapping(prot: number): number {
  return sys.mmap(ZERO_SOURCE_BYTES, prot, abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_NORESERVE);
}

/**
 * Places zeros on `[dst, dst+len)` by UFFDIO_COPY from the zero mapping: for ranges without
 * UFFDIO_ZEROPAGE (hugetlbfs, whose UFFDIO_REGISTER leaves it out of the ioctl mask). `len` is
 * at most ZERO_SOURCE_BYTES.
 */
export function copyZeros(fd: number, dst: number, len: number, wake = true): PlaceResult {
  if (len > ZERO_SOURCE_BYTES) throw new RangeError(`copyZeros of ${len} bytes`);
  zeroSource ||= sourceMapping(abi.PROT_READ);
  return classify(sys.uffdCopyFromAddress(fd, dst, zeroSource, len, copyMode(wake)));
}

/** UFFDIO_ZEROPAGE on `[start, start+len)` in one ioctl. */
export function zeropage(fd: number, start: number, len: number, wake = true): PlaceResult {
  return classify(sys.uffdZeropage(fd, start, len, wake ? 0 : abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE));
}

/**
 * Whether `[start, start+len)` lies inside one mapping registered with this uffd, without placing
 * anything: a UFFDIO_COPY from an inaccessible source. The kernel checks the destination range
 * first (ENOENT: a hole or a VMA boundary inside it, or not registered), then pending events
 * (EAGAIN), and only then reads the source, which fails (EFAULT) before any page is installed
 * (mm/userfaultfd.c: uffd_mfill_lock/validate_dst_vma, then the copy_from_user fallback).
 * Measured on kernel 6.18 for anonymous, shmem and hugetlbfs mappings, present pages included.
 */
export function probeRange(
  fd: number,
  start: number,
  len: number,
): 'inside' | 'outside' | 'retry' | 'gone' | { errno: string } {
  probeSource ||= sourceMapping(abi.PROT_NONE);
  const rc = sys.uffdCopyFromAddress(fd, start, probeSource, len, abi.UFFDIO_COPY_MODE_DONTWAKE);
  if (rc === -ERRNO.EFAULT) return 'inside';
  if (rc === -ERRNO.ENOENT) return 'outside';
  if (rc === -ERRNO.EAGAIN) return 'retry';
  if (rc === -ERRNO.ESRCH) return 'gone';
  // A copy that succeeded would mean the source mapping is readable: never for PROT_NONE.
  return { errno: rc >= 0 ? `copied ${rc}` : errnoName(-rc) };
}

/**
 * Whether the mapping at `start` is registered in write-protect mode: UFFDIO_WRITEPROTECT
 * (clearing, DONTWAKE) on its first page answers ENOENT unless it is (mm/userfaultfd.c:
 * mwriteprotect_range). On a WP range this clears the protection of that one page; callers
 * probe only to refuse such a range.
 */
export function isWriteProtectRegistered(
  fd: number,
  start: number,
  pageSizeBytes: number,
): boolean | 'retry' | 'gone' {
  const rc = sys.tryUffdWriteProtect(
    fd,
    start,
    pageSizeBytes,
    abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
  );
  if (rc === 0) return true;
  if (rc === -ERRNO.EAGAIN) return 'retry';
  if (rc === -ERRNO.ESRCH) return 'gone';
  // ENOENT: not WP-registered; EINVAL: a kernel without WP support.
  return false;
}

/** Wakes threads blocked on `[start, start+len)`: they retry the access and fault again if still missing. */
export function wake(fd: number, start: number, len: number): void {
  const rc = sys.tryUffdRange(fd, abi.UFFDIO_WAKE, start, len);
  if (rc < 0)
    throw new UffdError(`UFFD_WAKE_${errnoName(-rc)}`, `UFFDIO_WAKE failed: ${errnoName(-rc)}`);
}

/**
 * UFFDIO_UNREGISTER, then UFFDIO_WAKE on the same range; returns false when the range or address
 * space is already gone. The wake is needed: the kernel wakes the range's waiters before it clears
 * the registration, and a fault taken under the per-VMA lock can queue in between. Nothing would
 * ever wake that thread (no message for it is answered once the range is unregistered): for a
 * VMM, a vCPU stuck for good. On this kernel (6.18) about 1 unregister in 100 left a thread so,
 * with four threads faulting at the time (tests/integration/uffd-unregister.test.ts). Once the
 * unregister has returned no fault can queue on the range any more, so one wake after it frees
 * every such thread.
 */
export function unregister(fd: number, start: number, len: number): boolean {
  const ok = sys.tryUffdRange(fd, abi.UFFDIO_UNREGISTER, start, len) === 0;
  // Also when the unregister failed: a range unregistered before (by the VMM itself, say) can
  // still hold a thread that queued during that unregister.
  sys.tryUffdRange(fd, abi.UFFDIO_WAKE, start, len);
  return ok;
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
  /** `wp`: a write-protect fault; `minor`: a minor fault (page cache hit, not mapped). */
  | { kind: 'pagefault'; address: number; write: boolean; wp: boolean; minor: boolean; tid: number }
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
    case abi.UFFD_EVENT_PAGEFAULT: {
      const flags = b.readUInt32LE(off + 8);
      return {
        kind: 'pagefault',
        write: (flags & abi.UFFD_PAGEFAULT_FLAG_WRITE) !== 0,
        wp: (flags & abi.UFFD_PAGEFAULT_FLAG_WP) !== 0,
        minor: (flags & abi.UFFD_PAGEFAULT_FLAG_MINOR) !== 0,
        address: u64(b, off + 16),
        tid: b.readUInt32LE(off + 24),
      };
    }
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
