/**
 * Structured logs: one JSON object per line on stderr (journald keeps them; `jq` reads them).
 * Levels: debug < info < warn < error. Fields never carry page contents.
 */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every line (e.g. the migration id). */
  child(fields: LogFields): Logger;
  /** Changes the level of this logger and of every child of its root (SIGHUP). */
  setLevel(level: LogLevel): void;
}

function serialize(value: unknown): unknown {
  if (value instanceof Error) {
    const code = (value as { code?: unknown }).code;
    return {
      message: value.message,
      ...(code !== undefined ? { code } : {}),
      ...(value.cause !== undefined ? { cause: serialize(value.cause) } : {}),
    };
  }
  return value;
}

export function createLogger(
  level: LogLevel = 'info',
  base: LogFields = {},
  write: (line: string) => void = (line) => process.stderr.write(line),
): Logger {
  return makeLogger({ min: RANK[level] }, base, write);
}

function makeLogger(
  state: { min: number },
  base: LogFields,
  write: (line: string) => void,
): Logger {
  const emit = (lvl: LogLevel, msg: string, fields?: LogFields): void => {
    if (RANK[lvl] < state.min) return;
    const out: LogFields = { time: new Date().toISOString(), level: lvl, msg, ...base };
    if (fields) for (const [k, v] of Object.entries(fields)) out[k] = serialize(v);
    write(JSON.stringify(out) + '\n');
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (fields) => makeLogger(state, { ...base, ...fields }, write),
    setLevel: (level) => {
      state.min = RANK[level];
    },
  };
}

/**
 * A logger whose records go to `send` as they are (another thread's logger writes them, so
 * levels and the output are that logger's). Fields must survive structured cloning.
 */
export function forwardingLogger(
  send: (level: LogLevel, msg: string, fields: LogFields) => void,
  base: LogFields = {},
): Logger {
  const emit =
    (level: LogLevel) =>
    (msg: string, fields?: LogFields): void =>
      send(level, msg, { ...base, ...fields });
  return {
    debug: emit('debug'),
    info: emit('info'),
    warn: emit('warn'),
    error: emit('error'),
    child: (fields) => forwardingLogger(send, { ...base, ...fields }),
    // The receiving logger decides what is written.
    setLevel: () => {},
  };
}

/** A logger that drops everything (tests of pure logic). */
export const silentLogger: Logger = createLogger('error', {}, () => {});
