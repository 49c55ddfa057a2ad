/**
 * A QMP client (QEMU Machine Protocol) over a UNIX or TCP socket, plain `node:net`.
 *
 * The wire (https://www.qemu.org/docs/master/interop/qmp-spec.html): QEMU sends one JSON object
 * per line (`\r\n`-terminated). First the greeting `{"QMP":{"version":…,"capabilities":[…]}}`;
 * the client leaves capabilities negotiation mode with `{"execute":"qmp_capabilities"}`. Each
 * command `{"execute":NAME,"arguments":{…},"id":N}` gets exactly one reply carrying the same `id`:
 * `{"return":…}` or `{"error":{"class":…,"desc":…}}`. Events arrive between replies at any time:
 * `{"event":NAME,"data":{…},"timestamp":{"seconds":S,"microseconds":US}}`, the timestamp taken by
 * QEMU on the host's wall clock when it raised the event.
 *
 * The source daemon follows QEMU's STOP event with it; the QEMU scripts drive migrations.
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';

/**
 * QMP_CONNECT: the socket could not be opened; QMP_GREETING: the peer's first line is not a QMP
 * greeting; QMP_PROTOCOL: a line that is not a JSON object, or a reply nobody waits for;
 * QMP_COMMAND: QEMU answered a command with an error (`qmpClass`, `desc`); QMP_CLOSED: the
 * connection closed (or was closed) before the reply; QMP_TIMEOUT: no greeting or event in time.
 */
export type QmpErrorCode =
  'QMP_CONNECT' | 'QMP_GREETING' | 'QMP_PROTOCOL' | 'QMP_COMMAND' | 'QMP_CLOSED' | 'QMP_TIMEOUT';

export class QmpError extends Error {
  readonly code: QmpErrorCode;
  /** The error class of a QMP_COMMAND reply, e.g. `GenericError`, `CommandNotFound`. */
  readonly qmpClass: string | undefined;
  constructor(
    code: QmpErrorCode,
    message: string,
    options?: { cause?: unknown; qmpClass?: string },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'QmpError';
    this.code = code;
    this.qmpClass = options?.qmpClass;
  }
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** When QEMU raised the event: Unix time, milliseconds (with microsecond fraction). */
  timestampMs: number;
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** Where QMP listens: a UNIX socket path, or a TCP host and port. */
export type QmpAddress = string | { host: string; port: number };

export interface QmpConnectOptions {
  /** Limit for connecting, the greeting and `qmp_capabilities`, milliseconds. */
  timeoutMs?: number;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: QmpError) => void;
}

/** A line longer than this is a protocol error (QEMU's own replies are far shorter). */
const MAX_LINE_BYTES = 16 * 1024 * 1024;

type JsonObject = Record<string, unknown>;

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * One QMP connection. Emits `event` (QmpEvent) for every event and `close` (QmpError | undefined)
 * once; `events()` is the same stream as an async iterator.
 */
export class QmpClient extends EventEmitter<{
  event: [QmpEvent];
  close: [QmpError | undefined];
}> {
  readonly greeting: QmpGreeting;
  private readonly socket: net.Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private closedWith: QmpError | null = null;

  /** Use `connectQmp`; this takes over a socket whose greeting was already read. */
  constructor(socket: net.Socket, greeting: QmpGreeting, rest: LineReader) {
    super();
    this.socket = socket;
    this.greeting = greeting;
    rest.onLine = (line) => this.onLine(line);
    rest.onError = (err) => this.fail(err);
    socket.on('close', () => this.fail(new QmpError('QMP_CLOSED', 'QMP connection closed')));
    socket.on('error', (err) =>
      this.fail(new QmpError('QMP_CLOSED', `QMP socket error: ${err.message}`, { cause: err })),
    );
    rest.drain();
  }

  /** True once the connection is closed (by either side). */
  get closed(): boolean {
    return this.closedWith !== null;
  }

  /**
   * Runs one command; resolves with its `return` value, rejects with QMP_COMMAND for an error
   * reply, QMP_CLOSED if the connection ends first.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const id = this.nextId++;
    const msg: JsonObject = { execute: command, id };
    if (args !== undefined) msg['arguments'] = args;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** Every event from now until the connection closes, in order. */
  events(): AsyncIterableIterator<QmpEvent> {
    const queue: QmpEvent[] = [];
    let wake: (() => void) | null = null;
    let done = this.closed;
    const onEvent = (ev: QmpEvent): void => {
      queue.push(ev);
      wake?.();
    };
    const onClose = (): void => {
      done = true;
      wake?.();
    };
    const stop = (): void => {
      done = true;
      this.off('event', onEvent);
      this.off('close', onClose);
      wake?.();
    };
    this.on('event', onEvent);
    this.on('close', onClose);
    const iterator: AsyncIterableIterator<QmpEvent> = {
      next: async () => {
        for (;;) {
          const ev = queue.shift();
          if (ev) return { value: ev, done: false };
          if (done) {
            stop();
            return { value: undefined, done: true };
          }
          await new Promise<void>((r) => (wake = r));
          wake = null;
        }
      },
      return: async () => {
        stop();
        queue.length = 0;
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /**
   * The first event named `name` (and matching `match`, if given) from now on. Rejects with
   * QMP_TIMEOUT after `timeoutMs`, QMP_CLOSED if the connection ends first.
   */
  waitEvent(
    name: string,
    opts: { match?: (ev: QmpEvent) => boolean; timeoutMs?: number } = {},
  ): Promise<QmpEvent> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    return new Promise((resolve, reject) => {
      const timer =
        opts.timeoutMs === undefined
          ? undefined
          : setTimeout(() => {
              done();
              reject(new QmpError('QMP_TIMEOUT', `no ${name} event within ${opts.timeoutMs} ms`));
            }, opts.timeoutMs);
      const onEvent = (ev: QmpEvent): void => {
        if (ev.event !== name || (opts.match && !opts.match(ev))) return;
        done();
        resolve(ev);
      };
      const onClose = (err: QmpError | undefined): void => {
        done();
        reject(err ?? new QmpError('QMP_CLOSED', `QMP closed before a ${name} event`));
      };
      const done = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  /** Closes the connection; pending commands reject with QMP_CLOSED. Resolves once closed. */
  close(): Promise<void> {
    this.fail(new QmpError('QMP_CLOSED', 'QMP connection closed by the client'), true);
    if (this.socket.closed) return Promise.resolve();
    return new Promise((resolve) => this.socket.once('close', () => resolve()));
  }

  private onLine(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch (err) {
      this.fail(
        new QmpError('QMP_PROTOCOL', `QMP sent a line that is not JSON: ${line.slice(0, 200)}`, {
          cause: err,
        }),
      );
      return;
    }
    if (!isObject(msg)) {
      this.fail(
        new QmpError('QMP_PROTOCOL', `QMP sent JSON that is not an object: ${line.slice(0, 200)}`),
      );
      return;
    }
    if (typeof msg['event'] === 'string') {
      this.emit('event', toEvent(msg));
      return;
    }
    if (!('return' in msg) && !('error' in msg)) {
      this.fail(
        new QmpError('QMP_PROTOCOL', `QMP sent neither reply nor event: ${line.slice(0, 200)}`),
      );
      return;
    }
    // Replies carry our id. QEMU answers a command it could not parse without one; commands on
    // one monitor run in order, so such a reply is the oldest pending command's.
    const id = typeof msg['id'] === 'number' ? msg['id'] : this.pending.keys().next().value;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) {
      this.fail(
        new QmpError('QMP_PROTOCOL', `QMP reply for no pending command: ${line.slice(0, 200)}`),
      );
      return;
    }
    this.pending.delete(id);
    if ('return' in msg) {
      p.resolve(msg['return']);
      return;
    }
    const e = isObject(msg['error']) ? msg['error'] : {};
    const qmpClass = typeof e['class'] === 'string' ? e['class'] : 'GenericError';
    const desc = typeof e['desc'] === 'string' ? e['desc'] : JSON.stringify(msg['error']);
    p.reject(new QmpError('QMP_COMMAND', `${p.command}: ${desc}`, { qmpClass }));
  }

  /** Ends the connection once; `byClient`: close() asked for it, so listeners see no error. */
  private fail(err: QmpError, byClient = false): void {
    if (this.closedWith) return;
    this.closedWith = err;
    for (const p of this.pending.values()) {
      p.reject(new QmpError('QMP_CLOSED', `${p.command}: ${err.message}`, { cause: err }));
    }
    this.pending.clear();
    this.socket.destroy();
    this.emit('close', byClient ? undefined : err);
  }
}

function toEvent(msg: JsonObject): QmpEvent {
  const ts = isObject(msg['timestamp']) ? msg['timestamp'] : {};
  const s = typeof ts['seconds'] === 'number' ? ts['seconds'] : 0;
  const us = typeof ts['microseconds'] === 'number' ? ts['microseconds'] : 0;
  return {
    event: msg['event'] as string,
    data: isObject(msg['data']) ? msg['data'] : {},
    timestampMs: s * 1000 + us / 1000,
  };
}

/** Splits a byte stream into lines (`\n`, an optional `\r` before it dropped). */
class LineReader {
  onLine: ((line: string) => void) | null = null;
  onError: ((err: QmpError) => void) | null = null;
  private readonly lines: string[] = [];
  private partial = '';

  constructor(socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.push(chunk));
  }

  /** Hands the lines already read to `onLine`, for the one who takes over after the greeting. */
  drain(): void {
    while (this.onLine && this.lines.length > 0) this.onLine(this.lines.shift()!);
  }

  private push(chunk: string): void {
    const parts = (this.partial + chunk).split('\n');
    this.partial = parts.pop()!;
    if (this.partial.length > MAX_LINE_BYTES) {
      this.onError?.(new QmpError('QMP_PROTOCOL', `QMP line longer than ${MAX_LINE_BYTES} bytes`));
      return;
    }
    for (const p of parts) {
      const line = p.endsWith('\r') ? p.slice(0, -1) : p;
      if (line.trim() === '') continue;
      this.lines.push(line);
    }
    this.drain();
  }
}

/**
 * Connects, reads the greeting and leaves capabilities negotiation (`qmp_capabilities`).
 * QMP accepts one client per socket at a time: a second connection waits for the first to end.
 */
export async function connectQmp(
  address: QmpAddress,
  opts: QmpConnectOptions = {},
): Promise<QmpClient> {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const where = typeof address === 'string' ? address : `${address.host}:${address.port}`;
  const socket =
    typeof address === 'string'
      ? net.createConnection({ path: address })
      : net.createConnection({ host: address.host, port: address.port });
  const reader = new LineReader(socket);
  try {
    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new QmpError('QMP_TIMEOUT', `no QMP greeting from ${where} within ${timeoutMs} ms`));
      }, timeoutMs);
      const settle = (fn: () => void): void => {
        clearTimeout(timer);
        reader.onLine = null;
        fn();
      };
      socket.once('error', (err) =>
        settle(() =>
          reject(
            new QmpError('QMP_CONNECT', `cannot reach QMP at ${where}: ${err.message}`, {
              cause: err,
            }),
          ),
        ),
      );
      socket.once('close', () =>
        settle(() =>
          reject(new QmpError('QMP_CLOSED', `QMP at ${where} closed before its greeting`)),
        ),
      );
      reader.onError = (err) => settle(() => reject(err));
      reader.onLine = (line) => {
        let msg: unknown;
        try {
          msg = JSON.parse(line);
        } catch {
          msg = undefined;
        }
        const qmp = isObject(msg) ? msg['QMP'] : undefined;
        if (!isObject(qmp) || !isObject(qmp['version'])) {
          settle(() =>
            reject(
              new QmpError(
                'QMP_GREETING',
                `not a QMP greeting from ${where}: ${line.slice(0, 200)}`,
              ),
            ),
          );
          return;
        }
        const capabilities = Array.isArray(qmp['capabilities']) ? qmp['capabilities'] : [];
        settle(() =>
          resolve({
            version: qmp['version'] as QmpGreeting['version'],
            capabilities: capabilities.filter((c): c is string => typeof c === 'string'),
          }),
        );
      };
      reader.drain();
    });
    socket.removeAllListeners('error');
    socket.removeAllListeners('close');
    const client = new QmpClient(socket, greeting, reader);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new QmpError(
              'QMP_TIMEOUT',
              `qmp_capabilities at ${where}: no reply within ${timeoutMs} ms`,
            ),
          ),
        timeoutMs,
      );
    });
    try {
      await Promise.race([client.execute('qmp_capabilities'), timeout]);
    } catch (err) {
      await client.close();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    return client;
  } catch (err) {
    socket.destroy();
    throw err;
  }
}
