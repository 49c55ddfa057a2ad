/**
 * The C reference: scripts/bench/c/uffd-fill.c, compiled at bench time with `cc -O2` into the
 * bench's working folder. It fills 1 GiB of uffd-registered anonymous memory with UFFDIO_COPY in
 * 256 KiB chunks (then with UFFDIO_ZEROPAGE): the machine's ceiling for placing pages.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run, type BenchContext } from './harness.js';

/** The C source, found from dist/scripts/bench/ or scripts/bench/ (tsx). */
export function cSourcePath(): string {
  const candidates = [
    new URL('../../../scripts/bench/c/uffd-fill.c', import.meta.url),
    new URL('./c/uffd-fill.c', import.meta.url),
  ].map((u) => fileURLToPath(u));
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`uffd-fill.c not found (looked at ${candidates.join(', ')})`);
  return found;
}

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

const compiled = new Map<string, Promise<string>>();

/** Compiles the reference once per working folder; resolves with the binary's path. */
export function compileReference(ctx: BenchContext): Promise<string> {
  let p = compiled.get(ctx.dir);
  if (!p) {
    const bin = join(ctx.dir, 'uffd-fill');
    p = run(ctx, process.env['CC'] ?? 'cc', ['-O2', '-o', bin, cSourcePath()]).then(() => bin);
    compiled.set(ctx.dir, p);
  }
  return p;
}

export async function runReference(
  ctx: BenchContext,
  sizeBytes: number,
  chunkBytes = 256 * 1024,
): Promise<CFillResult> {
  const bin = await compileReference(ctx);
  const { stdout } = await run(ctx, bin, [String(sizeBytes), String(chunkBytes)]);
  return JSON.parse(stdout.trim()) as CFillResult;
}
