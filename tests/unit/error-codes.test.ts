/**
 * Every code that may leave a daemon (protocol/errors.ts) is documented in protocol/README.md,
 * and every code the README's error tables name is one the code can send: the two lists cannot
 * drift apart.
 */
import t from 'tap';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { HANDOFF_ERROR_CODES, PAGE_ERROR_CODES } from '../../protocol/errors.js';

const readme = readFileSync(
  fileURLToPath(new URL('../../../protocol/README.md', import.meta.url)),
  'utf8',
);
/** The README from heading `from` to the next `to` (or its end). */
const section = (from: string, to?: string): string => {
  const start = readme.indexOf(from);
  if (start < 0) throw new Error(`README has no section ${from}`);
  const end = to === undefined ? -1 : readme.indexOf(to, start + from.length);
  return readme.slice(start, end < 0 ? undefined : end);
};
/** Backticked codes in the first column of a text's table rows (FRAME_* stands for them all). */
const codes = (text: string): Set<string> =>
  new Set(
    text
      .split('\n')
      .filter((line) => line.startsWith('|'))
      .flatMap((line) => [...line.split('|')[1]!.matchAll(/`([A-Z][A-Z0-9_]+\*?)`/g)])
      .map((m) => m[1]!),
  );

const pageTable = codes(section('### Error codes', '### Example'));
const handoffTables = codes(section('### Handoff error codes', '\n## '));

t.test('every page protocol code is in the Error codes table, and only those', async (t) => {
  const missing = PAGE_ERROR_CODES.filter((c) => !pageTable.has(c));
  t.same(missing, [], 'documented');
  const unknown = [...pageTable].filter(
    (c) => !(PAGE_ERROR_CODES as readonly string[]).includes(c),
  );
  t.same(unknown, [], 'the table names no code the daemons do not send');
});

t.test('every handoff code is in the Handoff error codes tables, and only those', async (t) => {
  const frameCodes = PAGE_ERROR_CODES.filter((c) => c.startsWith('FRAME_') && c !== 'FRAME_TEXT');
  const documented = (c: string): boolean =>
    handoffTables.has(c) ||
    (frameCodes.includes(c as (typeof frameCodes)[number]) && handoffTables.has('FRAME_*')) ||
    // The source's refusal or session-ending codes, documented with the page protocol.
    pageTable.has(c);
  t.same(
    HANDOFF_ERROR_CODES.filter((c) => !documented(c)),
    [],
    'documented',
  );
  const unknown = [...handoffTables].filter(
    (c) => c !== 'FRAME_*' && !(HANDOFF_ERROR_CODES as readonly string[]).includes(c),
  );
  t.same(unknown, [], 'the tables name no code the dest does not send');
});
