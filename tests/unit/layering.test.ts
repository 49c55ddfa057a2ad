/**
 * The direction of dependencies, checked by a plain scan of import specifiers (STYLE.md):
 * only daemon/linux/ talks to the kernel through koffi, only daemon/transport/ speaks ws, only
 * daemon/ops/metrics.ts knows prom-client, and protocol/ stays pure (no I/O, no daemon/).
 */
import t from 'tap';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

// dist/tests/unit/layering.test.js → the repository root, where the .ts sources are.
const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const SCANNED = ['daemon', 'protocol', 'scripts'];

/** Import specifiers in TypeScript source: static, side-effect, re-export, dynamic, require. */
export function importsOf(source: string): string[] {
  // Drop comments first so prose such as "only this file may import koffi" is not an import.
  // A `//` right after `:` (a URL in a string) is kept.
  const code = source.replace(/\/\*[\s\S]*?\*\//g, '').replace(/(^|[^:\\])\/\/.*$/gm, '$1');
  const out: string[] = [];
  const patterns = [
    /\b(?:import|export)\s+(?:type\s+)?[^'"`;]*?\bfrom\s*['"]([^'"]+)['"]/g,
    /\bimport\s*['"]([^'"]+)['"]/g,
    /\bimport\s*\(\s*['"]([^'"]+)['"]\s*\)/g,
    /\brequire\s*\(\s*['"]([^'"]+)['"]\s*\)/g,
  ];
  for (const re of patterns) for (const m of code.matchAll(re)) out.push(m[1]!);
  return out;
}

function tsFiles(dir: string): string[] {
  let entries: string[];
  try {
    entries = readdirSync(dir);
  } catch {
    return [];
  }
  return entries.flatMap((name) => {
    const path = join(dir, name);
    if (name === 'node_modules') return [];
    if (statSync(path).isDirectory()) return tsFiles(path);
    return name.endsWith('.ts') && !name.endsWith('.d.ts') ? [path] : [];
  });
}

interface Source {
  /** Repository-relative, with `/` separators. */
  file: string;
  imports: string[];
  /** Relative imports resolved to repository-relative paths. */
  resolved: string[];
}

const sources: Source[] = SCANNED.flatMap((d) => tsFiles(join(ROOT, d))).map((abs) => {
  const imports = importsOf(readFileSync(abs, 'utf8'));
  const rel = (p: string): string => relative(ROOT, p).split(sep).join('/');
  return {
    file: rel(abs),
    imports,
    resolved: imports.filter((s) => s.startsWith('.')).map((s) => rel(resolve(dirname(abs), s))),
  };
});

/** Files importing `pkg` (or a subpath of it). */
const importers = (pkg: string): string[] =>
  sources
    .filter((s) => s.imports.some((i) => i === pkg || i.startsWith(`${pkg}/`)))
    .map((s) => s.file);

t.test('the scanner reads the forms of import it must', async (t) => {
  const src = [
    "import koffi from 'koffi';",
    "import type { A } from './a.js';",
    "import {\n  b,\n  c,\n} from '../b.js';",
    "export * from 'ws';",
    "import 'node:fs';",
    "const m = await import('prom-client');",
    "// import x from 'commented-out';",
    "/* import y from 'block-comment'; */",
    "const url = 'ws://host:1'; // import z from 'trailing';",
  ].join('\n');
  t.same(importsOf(src).sort(), ['../b.js', './a.js', 'koffi', 'node:fs', 'prom-client', 'ws']);
  t.ok(sources.length > 10, `scanned ${sources.length} files`);
  t.ok(
    importers('koffi').includes('daemon/linux/sys.ts'),
    'finds the known importer (the scan is not vacuous)',
  );
});

t.test('only daemon/linux/ imports koffi', async (t) => {
  t.same(
    importers('koffi').filter((f) => !f.startsWith('daemon/linux/')),
    [],
  );
});

t.test('only daemon/transport/ imports ws', async (t) => {
  t.same(
    importers('ws').filter((f) => !f.startsWith('daemon/transport/')),
    [],
  );
});

t.test('only daemon/ops/metrics.ts imports prom-client', async (t) => {
  t.same(
    importers('prom-client').filter((f) => f !== 'daemon/ops/metrics.ts'),
    [],
  );
});

t.test('protocol/ is pure', async (t) => {
  const protocol = sources.filter((s) => s.file.startsWith('protocol/'));
  t.ok(protocol.length > 0, 'protocol/ has sources');
  const forbidden =
    /^(?:node:)?(?:fs|fs\/promises|net|http|https|http2|dgram|worker_threads|child_process)$|^(?:ws|koffi|prom-client)(?:\/|$)/;
  const io = protocol.flatMap((s) =>
    s.imports.filter((i) => forbidden.test(i)).map((i) => `${s.file} imports ${i}`),
  );
  t.same(io, [], 'no sockets, files, threads or FFI');
  const up = protocol.flatMap((s) =>
    s.resolved.filter((p) => !p.startsWith('protocol/')).map((p) => `${s.file} imports ${p}`),
  );
  t.same(up, [], 'nothing outside protocol/ (in particular nothing from daemon/)');
});

t.test(
  'private internals of node and ws are read in daemon/transport/internals.ts only',
  async (t) => {
    const reads = SCANNED.flatMap((d) => tsFiles(join(ROOT, d)))
      .filter((abs) => /\._handle\b|\._socket\b/.test(readFileSync(abs, 'utf8')))
      .map((abs) => relative(ROOT, abs).split(sep).join('/'));
    t.same(reads, ['daemon/transport/internals.ts']);
  },
);
