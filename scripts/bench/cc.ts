/**
 * The bench's C programs (scripts/bench/c/*.c), compiled at bench time with `cc` (or $CC) into
 * the bench's working folder, once per folder: the C reference loop, the remote floor and the
 * delay proxy of the emulated link. Warnings are errors, as for scripts/c-vmm.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run, type BenchContext } from './harness.js';

export type CProgram = 'uffd-fill' | 'remote-floor' | 'delay-proxy';

const C_FLAGS = ['-O2', '-Wall', '-Wextra', '-Werror', '-std=gnu11'];

/** The C source of `name`, found from dist/scripts/bench/ or scripts/bench/ (tsx). */
export function cSourcePath(name: CProgram): string {
  const candidates = [
    new URL(`../../../scripts/bench/c/${name}.c`, import.meta.url),
    new URL(`./c/${name}.c`, import.meta.url),
  ].map((u) => fileURLToPath(u));
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`${name}.c not found (looked at ${candidates.join(', ')})`);
  return found;
}

const compiled = new Map<string, Promise<string>>();

/** Compiles `name` once per working folder; resolves with the binary's path. */
export function compileC(ctx: BenchContext, name: CProgram): Promise<string> {
  const bin = join(ctx.dir, name);
  let p = compiled.get(bin);
  if (!p) {
    p = run(ctx, process.env['CC'] ?? 'cc', [...C_FLAGS, '-o', bin, cSourcePath(name)]).then(
      () => bin,
    );
    compiled.set(bin, p);
  }
  return p;
}
