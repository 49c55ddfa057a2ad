import { closeSync, ftruncateSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { generateImage } from '../../scripts/image/gen-image.js';

const HUGE_PAGE = 2 * 1024 * 1024;

/**
 * Writes a memory file of 2 MiB pages at `path`, one letter of `pages` per page: D a huge page of
 * generated guest memory (data, text and 4 KiB zero runs mixed; `seed`), Z a huge page of written
 * zeros, H a huge page left as a hole.
 */
export async function writeHugePageFile(path: string, pages: string, seed: number): Promise<void> {
  const donor = `${path}.donor`;
  await generateImage({ path: donor, sizeBytes: pages.length * HUGE_PAGE, seed });
  const from = openSync(donor, 'r');
  const to = openSync(path, 'w');
  const buf = Buffer.alloc(HUGE_PAGE);
  for (let i = 0; i < pages.length; i++) {
    if (pages[i] === 'H') continue;
    if (pages[i] === 'D') readSync(from, buf, 0, HUGE_PAGE, i * HUGE_PAGE);
    else buf.fill(0);
    writeSync(to, buf, 0, HUGE_PAGE, i * HUGE_PAGE);
  }
  ftruncateSync(to, pages.length * HUGE_PAGE);
  closeSync(from);
  closeSync(to);
  rmSync(donor);
}
