/**
 * What `yabusame status` shows, as pure functions: the daemons' JSON (a dest's /v1/sessions, a
 * source's /v1/migrations) → one row per migration (display state, progress, rate, ETA,
 * details) → text, either for a terminal (a progress bar per migration, colour, fitted to its
 * width) or a plain table for scripts and logs. No I/O here: status.ts fetches and redraws.
 */

/** How a row's state is coloured. */
export type Tone = 'good' | 'busy' | 'warn' | 'bad' | 'idle';

export interface StatusRow {
  id: string;
  /** What a person should read: the session state, or `reconnecting` while a link is down. */
  state: string;
  tone: Tone;
  /** Pages present (dest) or sent (source), of `total`. */
  done: number;
  total: number;
  /** Bytes per page on average (regions may differ): turns pages into bytes for rates. */
  pageBytes: number;
  /** Bytes per second, or null when not known yet. */
  rate: number | null;
  /** Seconds left at `rate`, or null. */
  etaSeconds: number | null;
  /** Short facts for the terminal's second line, e.g. `demand up`, `faults waiting 3`. */
  details: string[];
  /** Columns of the plain table beyond the common ones, by header. */
  extra: Record<string, string>;
  error?: { code: string; message: string } | undefined;
  /** Ended (done, failed, complete, aborted): no rate, no ETA. */
  ended: boolean;
}

export interface StatusModel {
  kind: 'dest' | 'source';
  /** Where it came from (a socket path), for the header. */
  target: string;
  rows: StatusRow[];
  /** Ended rows left out (only the most recent are shown unless asked). */
  hidden: number;
}

/** A previous reading of a migration, for rates between two polls (watch mode). */
export interface RateSample {
  atMs: number;
  doneBytes: number;
  /** The smoothed rate so far, bytes per second. */
  rate: number | null;
}

/** Rates between polls, smoothed: each new interval weighs this much. */
const RATE_WEIGHT = 0.3;

export interface ModelOptions {
  target: string;
  nowMs: number;
  /** Readings of the previous poll by migration id (updated in place); absent: one shot. */
  rates?: Map<string, RateSample>;
  /** Ended migrations to show, newest first (default 10; Infinity for all). */
  endedShown?: number;
}

type Json = Record<string, unknown>;
const num = (v: unknown): number => (typeof v === 'number' && Number.isFinite(v) ? v : 0);
const obj = (v: unknown): Json => (v && typeof v === 'object' ? (v as Json) : {});

/**
 * The rate of a migration: between this poll and the previous one when there is one (smoothed),
 * else the average since `sinceMs` (its start), else null.
 */
function rateOf(
  id: string,
  doneBytes: number,
  opts: ModelOptions,
  sinceMs: number | null,
): number | null {
  const prev = opts.rates?.get(id);
  let rate: number | null = null;
  if (prev && opts.nowMs > prev.atMs) {
    const now = ((doneBytes - prev.doneBytes) * 1000) / (opts.nowMs - prev.atMs);
    rate = prev.rate === null ? now : prev.rate + RATE_WEIGHT * (now - prev.rate);
    rate = Math.max(0, rate);
  } else if (sinceMs !== null && opts.nowMs > sinceMs) {
    rate = (doneBytes * 1000) / (opts.nowMs - sinceMs);
  }
  opts.rates?.set(id, { atMs: opts.nowMs, doneBytes, rate });
  return rate;
}

function eta(row: Pick<StatusRow, 'done' | 'total' | 'pageBytes' | 'rate'>): number | null {
  if (!row.rate || row.rate <= 0 || row.done >= row.total) return null;
  return ((row.total - row.done) * row.pageBytes) / row.rate;
}

/** Shows active rows, then the `endedShown` most recent ended ones; counts the rest. */
function pick(active: StatusRow[], endedOldestFirst: StatusRow[], opts: ModelOptions) {
  const shown = opts.endedShown ?? 10;
  const ended = [...endedOldestFirst].reverse();
  const kept = ended.slice(0, shown);
  return { rows: [...active, ...kept], hidden: ended.length - kept.length };
}

/** A dest's /v1/sessions answer → rows. */
export function destModel(body: unknown, opts: ModelOptions): StatusModel {
  const b = obj(body);
  const list = (v: unknown): Json[] => (Array.isArray(v) ? v.map(obj) : []);
  const row = (s: Json, ended: boolean): StatusRow => {
    const id = String(s['migrationId']);
    const state = String(s['state']);
    const total = num(s['totalPages']);
    const done = num(s['presentPages']);
    const totalBytes = num(s['totalBytes']);
    const pageBytes = total > 0 && totalBytes > 0 ? totalBytes / total : 4096;
    const links = obj(s['links']);
    const linkState = (ch: string): string => String(obj(links[ch])['state'] ?? 'unknown');
    const down = ['demand', 'background'].filter((ch) => linkState(ch) === 'reconnecting');
    const live = state === 'running' || state === 'connecting' || state === 'completing';
    const shown = live && down.length > 0 ? 'reconnecting' : state;
    const error = s['error'] as StatusRow['error'];
    const details: string[] = [];
    if (live) {
      const link = (ch: string): string => {
        const st = linkState(ch);
        const since = num(obj(links[ch])['since']);
        const forHowLong =
          st === 'reconnecting' && since > 0 ? ` ${duration((opts.nowMs - since) / 1000)}` : '';
        return `${ch} ${st}${forHowLong}`;
      };
      details.push(`links: ${link('demand')}, ${link('background')}`);
      details.push(`faults waiting ${num(s['faultsWaiting'])}`);
    }
    details.push(`reconnects ${num(s['reconnects'])}`);
    details.push(
      `${live ? 'running for' : state === 'done' ? 'took' : 'ran for'} ${duration(num(s['elapsedMs']) / 1000)}`,
    );
    if (!live) {
      details.push(
        `pages by demand ${num(s['demandPages'])}, background ${num(s['backgroundPages'])}, zero ${num(s['zeroPages'])}`,
      );
    }
    const startedAt = num(s['startedAt']);
    const rate = live ? rateOf(id, done * pageBytes, opts, startedAt > 0 ? startedAt : null) : null;
    const r: StatusRow = {
      id,
      state: shown,
      tone: toneOf(shown),
      done,
      total,
      pageBytes,
      rate,
      etaSeconds: null,
      details,
      extra: {
        LINKS: live ? `demand=${linkState('demand')},background=${linkState('background')}` : '-',
        WAITING: String(num(s['faultsWaiting'])),
        RECONNECTS: String(num(s['reconnects'])),
      },
      error,
      ended,
    };
    r.etaSeconds = live ? eta(r) : null;
    return r;
  };
  const active = list(b['active']).map((s) => row(s, false));
  const ended = list(b['ended']).map((s) => row(s, true));
  const activeIds = new Set(active.map((r) => r.id));
  for (const id of opts.rates?.keys() ?? []) if (!activeIds.has(id)) opts.rates!.delete(id);
  return { kind: 'dest', target: opts.target, ...pick(active, ended, opts) };
}

/** A source's /v1/migrations answer → rows. */
export function sourceModel(body: unknown, opts: ModelOptions): StatusModel {
  const list = obj(body)['migrations'];
  const all = (Array.isArray(list) ? list : []).map(obj).map((m): StatusRow => {
    const id = String(m['id']);
    const state = String(m['state']);
    const pages = obj(m['pages']);
    const bytes = obj(m['bytes']);
    const conns = obj(m['connections']);
    const total = num(pages['total']);
    const done = state === 'complete' ? total : num(pages['sent']);
    const pageBytes = total > 0 && num(bytes['total']) > 0 ? num(bytes['total']) / total : 4096;
    const live = state === 'registered' || state === 'frozen';
    const frozenAt = typeof m['frozenAt'] === 'number' ? m['frozenAt'] : null;
    const rate = state === 'frozen' ? rateOf(id, done * pageBytes, opts, frozenAt) : null;
    const held = num(m['pendingRequests']);
    const yesNo = (ch: string): string => (conns[ch] === true ? 'connected' : 'not connected');
    const details = live
      ? [`dest: demand ${yesNo('demand')}, background ${yesNo('background')}`]
      : [];
    if (state === 'registered') details.push('waiting for the freeze');
    // A QEMU followed for the freeze (registered with qmp): a follow that failed is why a
    // migration never froze, so its error is the row's.
    const qmp = m['qmp'] === undefined ? null : obj(m['qmp']);
    if (qmp && live) details.push(`QEMU's QMP: ${String(qmp['state'])}`);
    const qmpError = qmp?.['error'] as StatusRow['error'];
    if (held > 0) details.push(`requests held ${held}`);
    details.push(
      `sent by demand ${num(pages['demand'])}, background ${num(pages['background'])} pages (zero runs ${num(pages['zero'])})`,
    );
    const r: StatusRow = {
      id,
      state,
      tone: toneOf(state),
      done,
      total,
      pageBytes,
      rate,
      etaSeconds: null,
      details,
      extra: {
        CONNECTIONS: `demand=${conns['demand'] === true ? 'up' : 'down'},background=${conns['background'] === true ? 'up' : 'down'}`,
        HELD: String(held),
      },
      ended: !live,
      error: qmpError,
    };
    r.etaSeconds = state === 'frozen' ? eta(r) : null;
    return r;
  });
  // The source lists migrations in registration order; finished ones stay until unregistered.
  const active = all.filter((r) => !r.ended);
  const ended = all.filter((r) => r.ended);
  return { kind: 'source', target: opts.target, ...pick(active, ended, opts) };
}

function toneOf(state: string): Tone {
  switch (state) {
    case 'done':
    case 'complete':
      return 'good';
    case 'running':
    case 'completing':
    case 'frozen':
      return 'busy';
    case 'reconnecting':
    case 'connecting':
      return 'warn';
    case 'failed':
    case 'aborted':
      return 'bad';
    default:
      return 'idle';
  }
}

// --- formatting -------------------------------------------------------------------------------

/** 1536 → "1.5 KiB". */
export function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${Math.round(n)} B` : `${n < 10 ? n.toFixed(1) : Math.round(n)} ${units[i]}`;
}

/** 75 → "1m15s"; 3725 → "1h02m"; 0.4 → "0.4s". */
export function duration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '-';
  if (seconds < 10) return `${seconds.toFixed(1)}s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

export function percent(done: number, total: number): string {
  if (total <= 0) return '-';
  // Never round up to 100% before the last page.
  const p = Math.floor((1000 * done) / total) / 10;
  return `${p.toFixed(1)}%`;
}

const rateText = (r: StatusRow): string =>
  r.ended ? '' : r.rate === null ? '-' : `${bytes(r.rate)}/s`;
const etaText = (r: StatusRow): string =>
  r.ended || r.done >= r.total ? '' : r.etaSeconds === null ? '-' : duration(r.etaSeconds);

/** The header line: what, where, and how many in which state. */
export function summary(model: StatusModel): string {
  const counts = new Map<string, number>();
  for (const r of model.rows) counts.set(r.state, (counts.get(r.state) ?? 0) + 1);
  const parts = [...counts].map(([state, n]) => `${n} ${state}`);
  if (model.hidden > 0) parts.push(`${model.hidden} older ended not shown (--all)`);
  return `yabusame ${model.kind} ${model.target}: ${parts.length ? parts.join(', ') : 'no migrations'}`;
}

/** A plain table (no escape codes, columns aligned with spaces): for pipes, logs and scripts. */
export function renderTable(model: StatusModel): string {
  if (model.rows.length === 0) return 'no migrations\n';
  const common = ['MIGRATION', 'STATE', model.kind === 'dest' ? 'PRESENT' : 'SENT', 'TOTAL'];
  const extraKeys = Object.keys(model.rows[0]!.extra);
  const withError = model.kind === 'dest';
  const header = [...common, 'PCT', 'RATE', 'ETA', ...extraKeys, ...(withError ? ['ERROR'] : [])];
  const lines = model.rows.map((r) => [
    r.id,
    r.state,
    String(r.done),
    String(r.total),
    percent(r.done, r.total),
    rateText(r) || '-',
    etaText(r) || '-',
    ...extraKeys.map((k) => r.extra[k] ?? '-'),
    ...(withError ? [r.error ? `${r.error.code}: ${r.error.message}` : '-'] : []),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  const fmt = (cells: string[]): string =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  const out = [fmt(header), ...lines.map(fmt)];
  if (model.hidden > 0) out.push(`(${model.hidden} older ended migrations not shown: --all)`);
  return out.join('\n') + '\n';
}

export interface TerminalOptions {
  columns: number;
  /** Lines available; the frame is cut to fit (with a note of how many rows were left out). */
  rows: number;
  color: boolean;
  /** Block characters for the bar (a UTF-8 terminal), else ASCII. */
  unicode: boolean;
  /** A last line, e.g. the watch mode's "every 1s, Ctrl-C to quit". */
  footer?: string;
}

const SGR: Record<Tone, string> = {
  good: '\x1b[32m',
  busy: '\x1b[36m',
  warn: '\x1b[33m',
  bad: '\x1b[31m',
  idle: '\x1b[2m',
};
const RESET = '\x1b[0m';

/** Cuts `s` to `width` visible characters (they are all single-width here), with an ellipsis. */
function fit(s: string, width: number): string {
  if (width <= 0) return '';
  return s.length <= width ? s : `${s.slice(0, Math.max(0, width - 1))}…`;
}

/**
 * The frame for a terminal: a header, then per migration a line with its state, a progress bar,
 * the percentage, pages, rate and ETA, and an indented line of details (links, faults waiting,
 * reconnects; the error of a failed one). Every line fits in `columns - 1` (no wrapping: the
 * watch mode moves the cursor up by the number of lines it wrote).
 */
export function renderTerminal(model: StatusModel, o: TerminalOptions): string[] {
  const width = Math.max(20, o.columns - 1);
  const paint = (s: string, tone: Tone): string =>
    o.color && s !== '' ? `${SGR[tone]}${s}${RESET}` : s;
  const out: string[] = [fit(summary(model), width)];
  // Columns shared by every row, so the bars line up.
  const cells = model.rows.map((r) => ({
    pct: percent(r.done, r.total),
    pages: `${r.done}/${r.total}`,
    rate: rateText(r),
    eta: etaText(r) && `ETA ${etaText(r)}`,
  }));
  const widest = (f: (c: (typeof cells)[number]) => string): number =>
    Math.max(0, ...cells.map((c) => f(c).length));
  const idWidth = Math.min(24, Math.max(9, ...model.rows.map((r) => r.id.length)));
  const stateWidth = 12;
  const pagesWidth = widest((c) => c.pages);
  const rateWidth = widest((c) => c.rate);
  const etaWidth = widest((c) => c.eta);
  const tailWidth = rateWidth + (etaWidth ? 2 + etaWidth : 0);
  const fixed = idWidth + 1 + stateWidth + 1 + 2 + 1 + 6 + 1 + pagesWidth;
  const withTail = fixed + (tailWidth ? 2 + tailWidth : 0);
  const barWidth = Math.max(10, Math.min(40, width - withTail));
  const showTail = tailWidth > 0 && withTail + barWidth <= width;
  const [full, empty] = o.unicode ? ['█', '░'] : ['#', '-'];
  const indent = ' '.repeat(Math.min(idWidth + 1, 8));

  const blocks: string[][] = model.rows.map((r, i) => {
    const c = cells[i]!;
    const filled = r.total > 0 ? Math.floor((barWidth * r.done) / r.total) : 0;
    const line = (color: boolean): string => {
      const p = (s: string): string => (color ? paint(s, r.tone) : s);
      const bar = `[${p(full.repeat(filled))}${empty.repeat(barWidth - filled)}]`;
      const id = fit(r.id, idWidth).padEnd(idWidth);
      const state = p(fit(r.state, stateWidth).padEnd(stateWidth));
      const head = `${id} ${state} ${bar} ${c.pct.padStart(6)} ${c.pages.padStart(pagesWidth)}`;
      return showTail ? `${head}  ${c.rate.padStart(rateWidth)}  ${c.eta}`.trimEnd() : head;
    };
    // A terminal too narrow for the whole line gets it cut, uncoloured (a cut never splits an
    // escape sequence then).
    const plain = line(false);
    const lines = [
      plain.length <= width ? line(true) : fit(plain, width),
      ...wrap(r.details, indent, width),
    ];
    if (r.error) {
      lines.push(paint(fit(`${indent}${r.error.code}: ${r.error.message}`, width), 'bad'));
    }
    return lines;
  });
  const footer = o.footer ? [fit(o.footer, width)] : [];
  let room = Math.max(1, o.rows - 1) - out.length - footer.length;
  let left = 0;
  for (const block of blocks) {
    if (left === 0 && block.length <= room - (block === blocks.at(-1) ? 0 : 1)) {
      out.push(...block);
      room -= block.length;
    } else {
      left++;
    }
  }
  if (left > 0) out.push(fit(`… ${left} more (a taller terminal, or --json)`, width));
  if (model.rows.length === 0) out.push('no migrations');
  out.push(...footer);
  return out;
}

/** `items` joined with " · " into lines of at most `width`, each starting with `indent`. */
function wrap(items: string[], indent: string, width: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const item of items) {
    const next = line ? `${line} · ${item}` : `${indent}${item}`;
    if (line && next.length > width) {
      lines.push(line);
      line = fit(`${indent}${item}`, width);
    } else {
      line = fit(next, width);
    }
  }
  if (line) lines.push(line);
  return lines;
}
