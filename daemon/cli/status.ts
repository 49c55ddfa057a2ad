/**
 * `yabusame status`: a dest's sessions or a source's migrations, from their control sockets.
 * On a terminal a progress bar per migration (status-view.ts); a plain table otherwise; the raw
 * JSON with --json. --watch polls and redraws in place until Ctrl-C, which restores the cursor.
 */
import { call, parse, str, UsageError, type Target } from './common.js';
import {
  destModel,
  renderTable,
  renderTerminal,
  sourceModel,
  type RateSample,
  type StatusModel,
} from './status-view.js';

export const STATUS_USAGE = `Usage: yabusame status [--dest PATH | --source PATH] [--watch [--interval SECONDS]]
                       [--json] [--all]

Shows the migrations of a running dest (its sessions: state, pages present, rate, ETA, the
state of both links to the source, faults waiting, reconnects, and why a session failed) or of
a source (state, pages sent, its dest's connections).

  --dest PATH         a dest's control socket (default /run/yabusame/dest-control.sock)
  --source PATH       a source's control socket (e.g. /run/yabusame/source.sock)
  -w, --watch         poll and redraw until Ctrl-C
  -n, --interval S    seconds between polls with --watch (default 1, at least 0.1)
  --all               every ended migration the daemon remembers (default: the last 10)
  --json              the daemon's JSON (with --watch: one line per poll)

On a terminal each migration has a progress bar; when stdout is not a terminal the output is a
plain table (one line per migration). A dest session shows as "reconnecting" while a link to
its source is down (it fails after reconnectTimeoutMs). Rates are averages since the start for
a single reading and smoothed over the polls with --watch. NO_COLOR turns colours off.
Exit codes: 0, 1 when the daemon cannot be reached (--watch keeps trying), 2 usage.
`;

export interface StatusOptions {
  target: Target;
  kind: 'dest' | 'source';
  json: boolean;
  watch: boolean;
  intervalMs: number;
  endedShown: number;
}

export function statusOptions(args: string[]): StatusOptions {
  const v = parse(
    args,
    {
      dest: { type: 'string' },
      source: { type: 'string' },
      json: { type: 'boolean' },
      watch: { type: 'boolean', short: 'w' },
      interval: { type: 'string', short: 'n' },
      all: { type: 'boolean' },
    },
    STATUS_USAGE,
  );
  const source = str(v['source']);
  if (source && str(v['dest']))
    throw new UsageError(`--dest or --source, not both\n\n${STATUS_USAGE}`);
  const interval = str(v['interval']);
  const seconds = interval === undefined ? 1 : Number(interval);
  if (!Number.isFinite(seconds) || seconds < 0.1) {
    throw new UsageError(`--interval: a number of seconds, at least 0.1\n\n${STATUS_USAGE}`);
  }
  if (interval !== undefined && !v['watch']) {
    throw new UsageError(`--interval goes with --watch\n\n${STATUS_USAGE}`);
  }
  return {
    target: { socketPath: source ?? str(v['dest']) ?? '/run/yabusame/dest-control.sock' },
    kind: source ? 'source' : 'dest',
    json: v['json'] === true,
    watch: v['watch'] === true,
    intervalMs: Math.round(seconds * 1000),
    endedShown: v['all'] ? Infinity : 10,
  };
}

const targetName = (t: Target): string => ('socketPath' in t ? t.socketPath : t.url);

/** Reads the daemon once → its JSON. */
function fetchBody(o: StatusOptions): Promise<unknown> {
  return call(o.target, 'GET', o.kind === 'source' ? '/v1/migrations' : '/v1/sessions');
}

function model(o: StatusOptions, body: unknown, rates?: Map<string, RateSample>): StatusModel {
  const opts = {
    target: targetName(o.target),
    nowMs: Date.now(),
    endedShown: o.endedShown,
    ...(rates ? { rates } : {}),
  };
  return o.kind === 'source' ? sourceModel(body, opts) : destModel(body, opts);
}

/** Whether this terminal takes UTF-8 (the bar's block characters), from the locale. */
function utf8Locale(env: NodeJS.ProcessEnv): boolean {
  const locale = env['LC_ALL'] || env['LC_CTYPE'] || env['LANG'] || '';
  return /utf-?8/i.test(locale);
}

interface Screen {
  columns: number;
  rows: number;
  color: boolean;
  unicode: boolean;
}

function screen(out: NodeJS.WriteStream): Screen {
  return {
    columns: out.columns || 80,
    rows: out.rows || 24,
    color: !process.env['NO_COLOR'] && process.env['TERM'] !== 'dumb',
    unicode: utf8Locale(process.env),
  };
}

export async function runStatus(args: string[]): Promise<void> {
  const o = statusOptions(args);
  const out = process.stdout;
  if (!o.watch) {
    const body = await fetchBody(o);
    if (o.json) out.write(JSON.stringify(body, null, 2) + '\n');
    else if (out.isTTY) out.write(renderTerminal(model(o, body), screen(out)).join('\n') + '\n');
    else out.write(renderTable(model(o, body)));
    return;
  }
  await watch(o, out);
}

const HIDE_CURSOR = '\x1b[?25l';
const SHOW_CURSOR = '\x1b[?25h';
const CLEAR_BELOW = '\x1b[J';
const CLEAR_SCREEN = '\x1b[H\x1b[2J';

/**
 * Polls every interval until a signal. On a terminal each frame replaces the previous one in
 * place (the cursor goes up by the lines written, and the rest of the screen is cleared), the
 * cursor is hidden meanwhile and shown again on the way out; elsewhere each poll appends a
 * table (or a JSON line) with a timestamp.
 */
async function watch(o: StatusOptions, out: NodeJS.WriteStream): Promise<never> {
  const tty = out.isTTY === true && !o.json;
  const rates = new Map<string, RateSample>();
  let written = 0;
  let clear = false;
  let timer: NodeJS.Timeout | null = null;
  let wake: (() => void) | null = null;

  let hidden = false;
  const restore = (): void => {
    if (hidden) out.write(SHOW_CURSOR);
    hidden = false;
  };
  const quit = (): void => {
    if (timer) clearTimeout(timer);
    restore();
    // The last frame stays on screen; the shell prompt goes below it.
    process.exit(0);
  };
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, quit);
  process.on('exit', restore);
  // A reader that went away (| head) ends the watch quietly.
  out.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
  if (tty) {
    out.write(HIDE_CURSOR);
    hidden = true;
    // Lines written before a resize may have wrapped: start again from a clear screen.
    out.on('resize', () => {
      clear = true;
      wake?.();
    });
  }

  const seconds = o.intervalMs / 1000;
  const footer = `every ${seconds}s · Ctrl-C to quit`;
  for (;;) {
    let frame: string[];
    try {
      const body = await fetchBody(o);
      if (o.json) frame = [JSON.stringify(body)];
      else if (tty) frame = renderTerminal(model(o, body, rates), { ...screen(out), footer });
      else {
        const table = renderTable(model(o, body, rates)).trimEnd();
        frame = [`# ${new Date().toISOString()}`, ...table.split('\n'), ''];
      }
    } catch (err) {
      const code = (err as { code?: string }).code;
      const why = `${code ? `${code}: ` : ''}${(err as Error).message}`;
      const cols = Math.max(20, (out.columns || 80) - 1);
      frame = tty
        ? [`yabusame ${o.kind} ${targetName(o.target)}: ${why}; retrying`, footer].map((l) =>
            l.slice(0, cols),
          )
        : [`# ${new Date().toISOString()} ${why}`];
      if (o.json) {
        const message = (err as Error).message;
        frame = [JSON.stringify({ error: { code: code ?? 'ERROR', message } })];
      }
    }
    if (tty) {
      // Every line fits the width (renderTerminal), so each took one row of the screen.
      const up = clear ? CLEAR_SCREEN : written > 0 ? `\x1b[${written}A\r` : '';
      clear = false;
      out.write(`${up}${CLEAR_BELOW}${frame.join('\n')}\n`);
      written = frame.length;
    } else {
      out.write(frame.join('\n') + '\n');
    }
    await new Promise<void>((resolve) => {
      wake = resolve;
      timer = setTimeout(resolve, o.intervalMs);
    });
    wake = null;
  }
}
