/**
 * daemon/linux/abi.ts against the installed kernel and libc headers: a C program compiled here
 * prints every value the file spells out by hand, and each must match (as userfaultfd-rs checks
 * its constants). An ioctl number off by one bit would otherwise fail only at run time.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as abi from '../../daemon/linux/abi.js';

/** Names whose C spelling is the same as in abi.ts. */
const NAMES = [
  'UFFDIO_API',
  'UFFDIO_REGISTER',
  'UFFDIO_UNREGISTER',
  'UFFDIO_WAKE',
  'UFFDIO_COPY',
  'UFFDIO_ZEROPAGE',
  'UFFDIO_WRITEPROTECT',
  'USERFAULTFD_IOC_NEW',
  'UFFD_API',
  'UFFD_EVENT_PAGEFAULT',
  'UFFD_EVENT_FORK',
  'UFFD_EVENT_REMAP',
  'UFFD_EVENT_REMOVE',
  'UFFD_EVENT_UNMAP',
  'UFFD_PAGEFAULT_FLAG_WRITE',
  'UFFD_PAGEFAULT_FLAG_WP',
  'UFFD_PAGEFAULT_FLAG_MINOR',
  'UFFD_FEATURE_PAGEFAULT_FLAG_WP',
  'UFFD_FEATURE_EVENT_FORK',
  'UFFD_FEATURE_EVENT_REMAP',
  'UFFD_FEATURE_EVENT_REMOVE',
  'UFFD_FEATURE_MISSING_HUGETLBFS',
  'UFFD_FEATURE_MISSING_SHMEM',
  'UFFD_FEATURE_EVENT_UNMAP',
  'UFFD_FEATURE_THREAD_ID',
  'UFFD_FEATURE_WP_HUGETLBFS_SHMEM',
  'UFFDIO_REGISTER_MODE_MISSING',
  'UFFDIO_REGISTER_MODE_WP',
  'UFFDIO_REGISTER_MODE_MINOR',
  'UFFDIO_COPY_MODE_DONTWAKE',
  'UFFDIO_ZEROPAGE_MODE_DONTWAKE',
  'UFFDIO_WRITEPROTECT_MODE_WP',
  'UFFDIO_WRITEPROTECT_MODE_DONTWAKE',
  'UFFD_USER_MODE_ONLY',
  'O_RDONLY',
  'O_RDWR',
  'O_NONBLOCK',
  'O_DIRECTORY',
  'O_NOFOLLOW',
  'O_CLOEXEC',
  'O_PATH',
  'MFD_CLOEXEC',
  'RESOLVE_NO_MAGICLINKS',
  'RESOLVE_BENEATH',
  'PROT_NONE',
  'PROT_READ',
  'PROT_WRITE',
  'MAP_SHARED',
  'MAP_PRIVATE',
  'MAP_ANONYMOUS',
  'MAP_NORESERVE',
  'MADV_DONTNEED',
  'MADV_REMOVE',
  'SEEK_SET',
  'SEEK_DATA',
  'SEEK_HOLE',
  'F_GETFL',
  'F_SETFL',
  'AF_UNIX',
  'SOCK_STREAM',
  'SOCK_DGRAM',
  'SOCK_CLOEXEC',
  'SOCK_NONBLOCK',
  'SOL_SOCKET',
  'SO_PEERCRED',
  'SCM_RIGHTS',
  'MSG_DONTWAIT',
  'MSG_NOSIGNAL',
  'MSG_CTRUNC',
  'MSG_CMSG_CLOEXEC',
  'POLLIN',
  'POLLERR',
  'POLLHUP',
  'POLLNVAL',
] as const;

/** Values abi.ts names differently from C: [abi.ts value, C expression]. */
const EXPRESSIONS: Array<[string, number, string]> = [
  ['SYS_userfaultfd', abi.SYS_userfaultfd, 'SYS_userfaultfd'],
  ['SYS_openat2', abi.SYS_openat2, 'SYS_openat2'],
  ['SYS_pidfd_open', abi.SYS_pidfd_open, 'SYS_pidfd_open'],
  ['SYS_pidfd_send_signal', abi.SYS_pidfd_send_signal, 'SYS_pidfd_send_signal'],
  ['SIZEOF_open_how', abi.SIZEOF_open_how, 'sizeof(struct open_how)'],
  ['SIZEOF_uffdio_api', abi.SIZEOF_uffdio_api, 'sizeof(struct uffdio_api)'],
  ['SIZEOF_uffdio_range', abi.SIZEOF_uffdio_range, 'sizeof(struct uffdio_range)'],
  ['SIZEOF_uffdio_register', abi.SIZEOF_uffdio_register, 'sizeof(struct uffdio_register)'],
  ['SIZEOF_uffdio_copy', abi.SIZEOF_uffdio_copy, 'sizeof(struct uffdio_copy)'],
  ['SIZEOF_uffdio_zeropage', abi.SIZEOF_uffdio_zeropage, 'sizeof(struct uffdio_zeropage)'],
  [
    'SIZEOF_uffdio_writeprotect',
    abi.SIZEOF_uffdio_writeprotect,
    'sizeof(struct uffdio_writeprotect)',
  ],
  ['SIZEOF_uffd_msg', abi.SIZEOF_uffd_msg, 'sizeof(struct uffd_msg)'],
  ['OFFSETOF_uffdio_copy_src', abi.OFFSETOF_uffdio_copy_src, 'offsetof(struct uffdio_copy, src)'],
  ['OFFSETOF_uffdio_copy_len', abi.OFFSETOF_uffdio_copy_len, 'offsetof(struct uffdio_copy, len)'],
  [
    'OFFSETOF_uffdio_copy_mode',
    abi.OFFSETOF_uffdio_copy_mode,
    'offsetof(struct uffdio_copy, mode)',
  ],
  [
    'OFFSETOF_uffdio_copy_copy',
    abi.OFFSETOF_uffdio_copy_copy,
    'offsetof(struct uffdio_copy, copy)',
  ],
  [
    'OFFSETOF_uffdio_zeropage_mode',
    abi.OFFSETOF_uffdio_zeropage_mode,
    'offsetof(struct uffdio_zeropage, mode)',
  ],
  [
    'OFFSETOF_uffdio_zeropage_zeropage',
    abi.OFFSETOF_uffdio_zeropage_zeropage,
    'offsetof(struct uffdio_zeropage, zeropage)',
  ],
  [
    'OFFSETOF_uffdio_writeprotect_mode',
    abi.OFFSETOF_uffdio_writeprotect_mode,
    'offsetof(struct uffdio_writeprotect, mode)',
  ],
  ['SIZEOF_cmsghdr', abi.SIZEOF_cmsghdr, 'sizeof(struct cmsghdr)'],
  ['SUN_PATH_OFFSET', abi.SUN_PATH_OFFSET, 'offsetof(struct sockaddr_un, sun_path)'],
  ['SUN_PATH_MAX', abi.SUN_PATH_MAX, 'sizeof(((struct sockaddr_un *)0)->sun_path)'],
  ['UFFD_IOCTL_BIT_WAKE', abi.UFFD_IOCTL_BIT_WAKE, '(1ULL << _UFFDIO_WAKE)'],
  ['UFFD_IOCTL_BIT_COPY', abi.UFFD_IOCTL_BIT_COPY, '(1ULL << _UFFDIO_COPY)'],
  ['UFFD_IOCTL_BIT_ZEROPAGE', abi.UFFD_IOCTL_BIT_ZEROPAGE, '(1ULL << _UFFDIO_ZEROPAGE)'],
];

t.test('every hand-written ABI value matches the installed headers', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'yabusame-abi-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const exprs: Array<[string, string]> = [
    ...NAMES.map((n): [string, string] => [n, n]),
    ...EXPRESSIONS.map(([n, , c]): [string, string] => [n, c]),
  ];
  const src = `#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/openat2.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>
int main(void) {
${exprs.map(([n, c]) => `  printf("%s %llu\\n", "${n}", (unsigned long long)(${c}));`).join('\n')}
  return 0;
}
`;
  writeFileSync(join(dir, 'abi.c'), src);
  execFileSync('cc', ['-o', join(dir, 'abi'), join(dir, 'abi.c')]);
  const c = new Map(
    execFileSync(join(dir, 'abi'), { encoding: 'utf8' })
      .trim()
      .split('\n')
      .map((line) => {
        const [name, value] = line.split(' ');
        return [name!, Number(value)];
      }),
  );
  const ours = new Map<string, number>([
    ...NAMES.map((n): [string, number] => [n, (abi as unknown as Record<string, number>)[n]!]),
    ...EXPRESSIONS.map(([n, v]): [string, number] => [n, v]),
  ]);
  const wrong = [...ours]
    .filter(([n, v]) => c.get(n) !== v)
    .map(([n, v]) => `${n}: ours ${v}, C ${c.get(n)}`);
  t.same(wrong, [], `${ours.size} values checked`);
});
