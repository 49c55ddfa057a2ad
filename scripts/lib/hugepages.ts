/**
 * Huge pages for the tests and the bench: a hugetlbfs guest needs pages reserved in the kernel's
 * pool (/proc/sys/vm/nr_hugepages, root only). The pool is put back as it was afterwards.
 */
import { readFileSync, writeFileSync } from 'node:fs';

const POOL = '/proc/sys/vm/nr_hugepages';

export type HugePageReservation = { release(): void } | { skip: string };

/**
 * Adds `pages` 2 MiB pages to the pool; `skip` says why not when the pool cannot be grown or the
 * kernel leaves fewer than `needed` free (memory too fragmented, no privilege).
 */
export function reserveHugePages(pages: number, needed: number): HugePageReservation {
  let before: number;
  try {
    before = Number(readFileSync(POOL, 'utf8'));
    writeFileSync(POOL, String(before + pages));
  } catch (err) {
    return { skip: `cannot reserve huge pages through ${POOL}: ${(err as Error).message}` };
  }
  const release = (): void => writeFileSync(POOL, String(before));
  const free = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1]);
  if (!(free >= needed)) {
    release();
    return { skip: `the kernel has only ${free} of ${needed} huge pages free` };
  }
  return { release };
}
