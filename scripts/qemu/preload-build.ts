/**
 * Compiles scripts/qemu/preload.c into a shared library, cached under
 * /var/tmp/yabusame-qemu-guest/preload-<hash of the source and compiler>.so.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DEFAULT_CACHE_DIR } from './guest/build.js';

/** The flags the library must build with (warnings are errors). */
export const PRELOAD_CFLAGS = ['-shared', '-fPIC', '-O2', '-Wall', '-Wextra', '-Werror'];

export function preloadSourcePath(): string {
  const candidates = [
    new URL('../../../scripts/qemu/preload.c', import.meta.url),
    new URL('./preload.c', import.meta.url),
  ].map((u) => fileURLToPath(u));
  const found = candidates.find((p) => fs.existsSync(p));
  if (!found) throw new Error(`preload.c not found (looked at ${candidates.join(', ')})`);
  return found;
}

export function buildPreload(cacheDir = DEFAULT_CACHE_DIR): string {
  const src = preloadSourcePath();
  const cc = process.env['CC'] ?? 'cc';
  const h = createHash('sha256')
    .update(fs.readFileSync(src))
    .update(execFileSync(cc, ['--version']))
    .update(PRELOAD_CFLAGS.join(' '))
    .digest('hex')
    .slice(0, 16);
  const out = join(cacheDir, `preload-${h}.so`);
  if (fs.existsSync(out)) return out;
  fs.mkdirSync(cacheDir, { recursive: true });
  const tmp = `${out}.${process.pid}.tmp`;
  execFileSync(cc, [...PRELOAD_CFLAGS, '-o', tmp, src, '-ldl', '-pthread'], {
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  fs.renameSync(tmp, out);
  return out;
}
