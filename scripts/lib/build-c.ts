/**
 * Builds the C programs the tests and the bench drive (`scripts/<name>/<name>.c`: the VMMs c-vmm
 * and fc-vmm, and uffd-race) with `cc` (or $CC) into `dist/<name>/<name>`, when that is missing or
 * older than the source. Warnings are errors.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, rename, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

export type CProgramName = 'c-vmm' | 'fc-vmm' | 'uffd-race';

const C_FLAGS = ['-O2', '-g', '-pthread', '-Wall', '-Wextra', '-Werror', '-std=gnu11'];

/** The repository root: found from dist/scripts/lib/ (compiled) or scripts/lib/ (tsx). */
function repoRoot(name: CProgramName): string {
  const rel = `scripts/${name}/${name}.c`;
  const candidates = [new URL('../../../', import.meta.url), new URL('../../', import.meta.url)];
  const root = candidates.map((u) => fileURLToPath(u)).find((dir) => existsSync(join(dir, rel)));
  if (!root) throw new Error(`${rel} not found above ${import.meta.url}`);
  return root;
}

const building = new Map<CProgramName, Promise<string>>();

/** Compiles `name` when needed (once per process); resolves with the binary's path. */
export function buildCProgram(name: CProgramName): Promise<string> {
  let p = building.get(name);
  if (!p) {
    p = (async () => {
      const root = repoRoot(name);
      const source = join(root, `scripts/${name}/${name}.c`);
      const binary = join(root, `dist/${name}/${name}`);
      const [src, bin] = await Promise.all([stat(source), stat(binary).catch(() => undefined)]);
      if (bin && bin.mtimeMs >= src.mtimeMs) return binary;
      await mkdir(dirname(binary), { recursive: true });
      // Compile beside the binary, then rename: a concurrent test process never runs half a file.
      const tmp = `${binary}.${process.pid}.tmp`;
      await promisify(execFile)(process.env['CC'] ?? 'cc', [...C_FLAGS, '-o', tmp, source]);
      await rename(tmp, binary);
      return binary;
    })();
    building.set(name, p);
  }
  return p;
}
