/**
 * The C reference: scripts/bench/c/uffd-fill.c, compiled at bench time (cc.ts). It fills 1 GiB
 * of uffd-registered anonymous memory with UFFDIO_COPY in 256 KiB chunks (then with
 * UFFDIO_ZEROPAGE): the machine's ceiling for placing pages.
 */
import { run, type BenchContext } from './harness.js';
import { compileC } from './cc.js';

export interface CFillResult {
  sizeBytes: number;
  chunkBytes: number;
  copySeconds: number;
  copyGBs: number;
  zeropageSeconds: number;
  zeropageGBs: number;
  /** UFFDIO_COPY from a source as large as the memory: every page new data. */
  copyDistinctGBs: number;
  verified: boolean;
}

export async function runReference(
  ctx: BenchContext,
  sizeBytes: number,
  chunkBytes = 256 * 1024,
): Promise<CFillResult> {
  const bin = await compileC(ctx, 'uffd-fill');
  const { stdout } = await run(ctx, bin, [String(sizeBytes), String(chunkBytes)]);
  return JSON.parse(stdout.trim()) as CFillResult;
}
