/**
 * What the bench runs and in which order, and the ratios it takes between rows: pure functions
 * over the scenarios' names, so they are tested without running anything.
 *
 * A scenario may name **partners**: rows that run interleaved with it, one run of each in turn
 * (A B C A B C …), so that a ratio between them is taken run by run, from runs that saw the same
 * machine at the same moment, and the median of those per-pair ratios is reported. On a shared,
 * noisy machine the rows' own medians move from one bench to the next; the per-pair ratio holds.
 * Partners are symmetric and transitive: the rows connected by partner links form one
 * interleaved set. A scenario may also **require** rows that a figure of its needs (a target
 * compares against them); those run too, in their own sets.
 */

export interface RowSpec {
  name: string;
  group: string;
  partners?: readonly string[];
  requires?: readonly string[];
}

/** True when `sel` (an --only word) picks `row`: its group, its name, or a prefix of its name up to a `/`. */
export function matches(row: RowSpec, sel: string): boolean {
  return row.group === sel || row.name === sel || row.name.startsWith(sel + '/');
}

/**
 * The rows to run, in the catalogue's order: those `only` picks (all when null), plus, unless
 * `solo`, their partners and required rows (and theirs). Throws RangeError for a word that
 * picks nothing.
 */
export function selectRows<T extends RowSpec>(
  all: readonly T[],
  only: string[] | null,
  solo = false,
): T[] {
  if (!only) return [...all];
  const unknown = only.filter((sel) => !all.some((r) => matches(r, sel)));
  if (unknown.length) throw new RangeError(`unknown scenario: ${unknown.join(', ')}`);
  const chosen = new Set(all.filter((r) => only.some((sel) => matches(r, sel))).map((r) => r.name));
  if (!solo) {
    const byName = new Map(all.map((r) => [r.name, r]));
    const queue = [...chosen];
    while (queue.length) {
      const r = byName.get(queue.pop()!);
      if (!r) continue;
      for (const n of [...(r.partners ?? []), ...(r.requires ?? []), ...partnersOf(all, r.name)]) {
        if (!chosen.has(n) && byName.has(n)) {
          chosen.add(n);
          queue.push(n);
        }
      }
    }
  }
  return all.filter((r) => chosen.has(r.name));
}

/** Rows that name `name` as a partner (partner links are symmetric). */
function partnersOf(all: readonly RowSpec[], name: string): string[] {
  return all.filter((r) => r.partners?.includes(name)).map((r) => r.name);
}

/**
 * The selected rows grouped into interleaved sets (connected by partner links, either way),
 * each set in catalogue order, the sets ordered by their first row. A row without partners
 * among the selected rows is a set of one.
 */
export function interleavedSets<T extends RowSpec>(rows: readonly T[]): T[][] {
  const index = new Map(rows.map((r, i) => [r.name, i]));
  const parent = rows.map((_, i) => i);
  const find = (i: number): number => (parent[i] === i ? i : (parent[i] = find(parent[i]!)));
  rows.forEach((r, i) => {
    for (const p of r.partners ?? []) {
      const j = index.get(p);
      if (j !== undefined) parent[find(i)] = find(j);
    }
  });
  const sets = new Map<number, T[]>();
  rows.forEach((r, i) => {
    const root = find(i);
    let set = sets.get(root);
    if (!set) sets.set(root, (set = []));
    set.push(r);
  });
  return [...sets.values()];
}

/**
 * The run order of one set for `runs` runs: run i of every row, then run i + 1 of every row
 * (A B A B …). Each entry is [row, run index].
 */
export function interleave<T>(set: readonly T[], runs: number): Array<[T, number]> {
  const out: Array<[T, number]> = [];
  for (let i = 0; i < runs; i++) for (const r of set) out.push([r, i]);
  return out;
}

/** How a ratio between two rows was taken. */
export type Pairing = 'per-run' | 'medians';

/**
 * The ratio of `mine` to `theirs` ('over': mine / theirs, 'under': theirs / mine). Rows that ran
 * interleaved pair their runs by index (run i with run i, as far as both got): one ratio per
 * pair. Otherwise every run of mine is compared with their median. Empty when either side has
 * no value (or a zero divisor).
 */
export function ratios(
  mine: ReadonlyArray<number | undefined>,
  theirs: ReadonlyArray<number | undefined>,
  dir: 'over' | 'under',
  pairing: Pairing,
): number[] {
  const div = (a: number, b: number): number | undefined =>
    dir === 'over' ? (b ? a / b : undefined) : a ? b / a : undefined;
  const out: number[] = [];
  if (pairing === 'per-run') {
    for (let i = 0; i < Math.min(mine.length, theirs.length); i++) {
      const a = mine[i];
      const b = theirs[i];
      if (a === undefined || b === undefined) continue;
      const r = div(a, b);
      if (r !== undefined && Number.isFinite(r)) out.push(r);
    }
    return out;
  }
  const t = medianOf(theirs.filter((x): x is number => x !== undefined));
  if (!Number.isFinite(t)) return out;
  for (const a of mine) {
    if (a === undefined) continue;
    const r = div(a, t);
    if (r !== undefined && Number.isFinite(r)) out.push(r);
  }
  return out;
}

function medianOf(values: number[]): number {
  if (!values.length) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
