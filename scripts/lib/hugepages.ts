/**
 * Huge pages for the tests and the bench: a hugetlbfs guest needs pages reserved in the kernel's
 * pool (/proc/sys/vm/nr_hugepages, root only). Each reservation adds to the pool and takes the
 * same number back afterwards.
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
  // Gives back what it added, not the size it read: another reservation (a second test file
  // or suite at the same time) may have grown the pool since, and keeps its pages.
  const release = (): void => {
    const now = Number(readFileSync(POOL, 'utf8'));
    writeFileSync(POOL, String(Math.max(0, now - pages)));
  };
  const free = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1]);
  if (!(free >= needed)) {
    release();
    return { skip: `the kernel has only ${free} of ${needed} huge pages free` };
  }
  return { release };
}
