/**
 * Linux ABI vocabulary for x86_64, with the C names kept verbatim so each value can be checked
 * against its header (<linux/userfaultfd.h>, <sys/socket.h>, <sys/mman.h>, <poll.h>).
 * tests/unit/abi.test.ts compiles a C program against the installed headers and compares every
 * value below with what the compiler says.
 * Pure data: no FFI here.
 */

// --- ioctl number encoding (<asm-generic/ioctl.h>) ---
const IOC_NRSHIFT = 0;
const IOC_TYPESHIFT = 8;
const IOC_SIZESHIFT = 16;
const IOC_DIRSHIFT = 30;
export const IOC_NONE = 0;
export const IOC_WRITE = 1;
export const IOC_READ = 2;

/** _IOC(dir, type, nr, size) as an unsigned 32-bit number. */
export function IOC(dir: number, type: number, nr: number, size: number): number {
  return (
    ((dir << IOC_DIRSHIFT) |
      (type << IOC_TYPESHIFT) |
      (nr << IOC_NRSHIFT) |
      (size << IOC_SIZESHIFT)) >>>
    0
  );
}
export const IOR = (type: number, nr: number, size: number): number =>
  IOC(IOC_READ, type, nr, size);
export const IOWR = (type: number, nr: number, size: number): number =>
  IOC(IOC_READ | IOC_WRITE, type, nr, size);
export const IO = (type: number, nr: number): number => IOC(IOC_NONE, type, nr, 0);

// --- userfaultfd (<linux/userfaultfd.h>) ---
export const UFFDIO = 0xaa;
export const UFFD_API = 0xaa;
export const _UFFDIO_REGISTER = 0x00;
export const _UFFDIO_UNREGISTER = 0x01;
export const _UFFDIO_WAKE = 0x02;
export const _UFFDIO_COPY = 0x03;
export const _UFFDIO_ZEROPAGE = 0x04;
export const _UFFDIO_WRITEPROTECT = 0x06;
export const _UFFDIO_API = 0x3f;

/** Struct sizes in bytes, as the kernel lays them out on x86_64. */
export const SIZEOF_uffdio_api = 24; // api, features, ioctls: 3 x u64
export const SIZEOF_uffdio_range = 16; // start, len
export const SIZEOF_uffdio_register = 32; // range, mode, ioctls
export const SIZEOF_uffdio_copy = 40; // dst, src, len, mode, s64 copy
export const SIZEOF_uffdio_zeropage = 32; // range, mode, s64 zeropage
export const SIZEOF_uffdio_writeprotect = 24; // range, mode
export const SIZEOF_uffd_msg = 32;
/** Field offsets of the arguments sys.ts writes into memory itself (every field a u64 or s64). */
export const OFFSETOF_uffdio_copy_src = 8;
export const OFFSETOF_uffdio_copy_len = 16;
export const OFFSETOF_uffdio_copy_mode = 24;
export const OFFSETOF_uffdio_copy_copy = 32;
export const OFFSETOF_uffdio_zeropage_mode = 16;
export const OFFSETOF_uffdio_zeropage_zeropage = 24;
export const OFFSETOF_uffdio_writeprotect_mode = 16;

export const UFFDIO_API = IOWR(UFFDIO, _UFFDIO_API, SIZEOF_uffdio_api);
export const UFFDIO_REGISTER = IOWR(UFFDIO, _UFFDIO_REGISTER, SIZEOF_uffdio_register);
export const UFFDIO_UNREGISTER = IOR(UFFDIO, _UFFDIO_UNREGISTER, SIZEOF_uffdio_range);
export const UFFDIO_WAKE = IOR(UFFDIO, _UFFDIO_WAKE, SIZEOF_uffdio_range);
export const UFFDIO_COPY = IOWR(UFFDIO, _UFFDIO_COPY, SIZEOF_uffdio_copy);
export const UFFDIO_ZEROPAGE = IOWR(UFFDIO, _UFFDIO_ZEROPAGE, SIZEOF_uffdio_zeropage);
export const UFFDIO_WRITEPROTECT = IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, SIZEOF_uffdio_writeprotect);
export const USERFAULTFD_IOC = 0xaa;
export const USERFAULTFD_IOC_NEW = IO(USERFAULTFD_IOC, 0x00);

export const UFFD_EVENT_PAGEFAULT = 0x12;
export const UFFD_EVENT_FORK = 0x13;
export const UFFD_EVENT_REMAP = 0x14;
export const UFFD_EVENT_REMOVE = 0x15;
export const UFFD_EVENT_UNMAP = 0x16;

export const UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0;
export const UFFD_PAGEFAULT_FLAG_WP = 1 << 1;
export const UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2;

export const UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0;
export const UFFD_FEATURE_EVENT_FORK = 1 << 1;
export const UFFD_FEATURE_EVENT_REMAP = 1 << 2;
export const UFFD_FEATURE_EVENT_REMOVE = 1 << 3;
export const UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4;
export const UFFD_FEATURE_MISSING_SHMEM = 1 << 5;
export const UFFD_FEATURE_EVENT_UNMAP = 1 << 6;
export const UFFD_FEATURE_THREAD_ID = 1 << 8;
export const UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12;

export const UFFDIO_REGISTER_MODE_MISSING = 1 << 0;
export const UFFDIO_REGISTER_MODE_WP = 1 << 1;
export const UFFDIO_REGISTER_MODE_MINOR = 1 << 2;
export const UFFDIO_COPY_MODE_DONTWAKE = 1 << 0;
export const UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0;
export const UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0;
export const UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1;

/** Bits of the `ioctls` mask that UFFDIO_REGISTER returns: 1 << _UFFDIO_x. */
export const UFFD_IOCTL_BIT_WAKE = 1 << _UFFDIO_WAKE;
export const UFFD_IOCTL_BIT_COPY = 1 << _UFFDIO_COPY;
export const UFFD_IOCTL_BIT_ZEROPAGE = 1 << _UFFDIO_ZEROPAGE;
export const UFFD_USER_MODE_ONLY = 1;

export const SYS_userfaultfd = 323; // x86_64 <asm/unistd_64.h>
export const SYS_openat2 = 437;
export const SYS_pidfd_open = 434;
export const SYS_pidfd_send_signal = 424;

// --- files, memory ---
export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_NONBLOCK = 0o4000;
export const O_DIRECTORY = 0o200000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
/** memfd_create(2) flag (linux/memfd.h). */
export const MFD_CLOEXEC = 0x0001;
export const O_PATH = 0o10000000;
/** struct open_how (<linux/openat2.h>): u64 flags, u64 mode, u64 resolve. */
export const SIZEOF_open_how = 24;
export const RESOLVE_NO_MAGICLINKS = 0x02;
export const RESOLVE_BENEATH = 0x08;
export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MADV_DONTNEED = 4;
export const MADV_REMOVE = 9;
export const SEEK_SET = 0;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_DUPFD_CLOEXEC = 1030;

// --- sockets ---
export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_CLOEXEC = 0o2000000;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_DGRAM = 2;
export const SOL_SOCKET = 1;
/** offsetof(struct sockaddr_un, sun_path): sa_family_t is a u16. */
export const SUN_PATH_OFFSET = 2;
/** sizeof(sun_path): the longest name, NUL included for path names. */
export const SUN_PATH_MAX = 108;
export const SO_PEERCRED = 17;
/** Bytes a socket's readers wait for (TCP: poll reports readable from this many on). */
export const SO_RCVLOWAT = 18;
/** Bytes in a TCP socket's receive queue (SIOCINQ). */
export const FIONREAD = 0x541b;
export const SCM_RIGHTS = 1;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CTRUNC = 0x08;
export const MSG_CMSG_CLOEXEC = 0x40000000;
/** struct cmsghdr: size_t cmsg_len; int cmsg_level; int cmsg_type; then data, 8-byte aligned. */
export const SIZEOF_cmsghdr = 16;
export const CMSG_ALIGN = (n: number): number => (n + 7) & ~7;
export const CMSG_SPACE = (n: number): number => SIZEOF_cmsghdr + CMSG_ALIGN(n);
export const CMSG_LEN = (n: number): number => SIZEOF_cmsghdr + n;

// --- poll ---
export const POLLIN = 0x001;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;
export const POLLNVAL = 0x020;
