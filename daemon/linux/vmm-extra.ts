/**
 * Syscalls only the reference VMM (scripts/vm-sim) needs, kept out of sys.ts so the daemon's
 * binding surface stays small. Same conventions as sys.ts: throws SyscallError on failure.
 */
import koffi from 'koffi';
import { SyscallError } from './errors.js';

const libc = koffi.load('libc.so.6');

const c = {
  mincore: libc.func('int mincore(uintptr_t addr, size_t len, _Out_ uint8_t *vec)'),
};

/**
 * mincore(2): fills `vec` with one byte per page of `[addr, addr+len)`, bit 0 set when the page
 * is resident. On anonymous memory registered with userfaultfd a page is resident once it was
 * placed (UFFDIO_COPY, or UFFDIO_ZEROPAGE, which maps the shared zero page); mincore never
 * faults, so it tells whether the next access to a page will block on the uffd.
 * https://man7.org/linux/man-pages/man2/mincore.2.html
 */
export function mincore(addr: number, len: number, vec: Uint8Array): void {
  const rc = c.mincore(addr, len, vec) as number;
  if (rc < 0) throw new SyscallError('mincore', koffi.errno());
}
