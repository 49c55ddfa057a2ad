/**
 * Runs the test guest in QEMU under TCG, as a migration source or destination, for the QEMU
 * scripts (baseline.ts, try-yabusame.ts).
 *
 * Guest RAM is `memory-backend-file` on /dev/shm with share=on: QEMU maps the file MAP_SHARED, so
 * with the `x-ignore-shared` capability its own migration stream leaves RAM out, and a
 * destination can be filled through a userfaultfd registered on that mapping (MISSING_SHMEM).
 * (share=off maps the file privately and QEMU migrates all RAM; prealloc=on would touch every
 * page at start-up, which a destination waiting for its pages must not do.) The destination's RAM
 * file must be new and empty: a page already in the shmem file never faults.
 *
 * The serial console is QEMU's stdout (one guest line per line, stamped with the host's clock
 * on arrival); trace events go to a log file (`-D`) with `-msg timestamp=on`; QMP listens on a
 * UNIX socket.
 *
 * CLI: node dist/scripts/qemu/qemu.js boot [--runs N] [--mem 1G] [--workload-mib 512] [--json]
 *   measures how long the guest takes from QEMU's start to its first workload line.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { connectQmp, type QmpClient } from '../../daemon/qemu/qmp.js';
import { aptInstall, buildGuest, GUEST_CMDLINE } from './guest/build.js';

export const QEMU_BINARY = process.env['QEMU'] ?? 'qemu-system-x86_64';

/** Whether `cmd` is on the PATH. */
export function onPath(cmd: string): boolean {
  return (process.env['PATH'] ?? '')
    .split(':')
    .some((dir) => dir !== '' && fs.existsSync(join(dir, cmd)));
}

/** Installs Debian's QEMU (qemu-system-x86) with apt-get if QEMU_BINARY is missing. */
export function ensureQemu(): void {
  if (QEMU_BINARY.includes('/') ? fs.existsSync(QEMU_BINARY) : onPath(QEMU_BINARY)) return;
  aptInstall(['qemu-system-x86']);
}

/** Host wall clock, milliseconds with a sub-millisecond fraction (comparable with QMP stamps). */
export function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

export interface QemuOptions {
  /** Short name for logs and files: `src`, `dst`. */
  name: string;
  /** Folder for the QMP socket and logs (created). */
  workDir: string;
  /** The guest's RAM file, normally on /dev/shm. A destination's must not exist yet. */
  ramPath: string;
  /** Guest RAM, MiB. */
  memMiB: number;
  kernel: string;
  initramfs: string;
  /** The workload's size, MiB (kernel command line `yb.mib=`). */
  workloadMiB: number;
  /** Start with `-incoming defer` (a migration destination). */
  incoming?: boolean;
  /** Trace event names or patterns (`-trace enable=…`), written to `<workDir>/<name>.trace`. */
  traceEvents?: string[];
  /** `pc` (default) or `q35`. */
  machine?: 'pc' | 'q35';
  /** Limit for QMP's greeting, ms (a preload holding QEMU's start-up delays it). */
  qmpTimeoutMs?: number;
  /** Extra environment (LD_PRELOAD and its settings on a yabusame destination). */
  env?: Record<string, string>;
  /**
   * More QMP sockets (`-qmp unix:PATH`), for other clients: QMP serves one client per socket,
   * and this class keeps the first (`<workDir>/<name>.qmp`) for itself.
   */
  extraQmp?: string[];
}

export interface SerialLine {
  /** Host wall clock when the line arrived, ms. */
  atMs: number;
  text: string;
}

/** One line of the workload: `yb-workload batch=… pages=… errors=… batch_ms=… max_batch_ms=…`. */
export interface BatchLine {
  atMs: number;
  batch: number;
  pages: number;
  errors: number;
  batchMs: number;
  maxBatchMs: number;
}

const BATCH_RE =
  /yb-workload batch=(\d+) pages=(\d+) errors=(\d+) batch_ms=(\d+) max_batch_ms=(\d+)/;

export function parseBatch(line: SerialLine): BatchLine | null {
  const m = BATCH_RE.exec(line.text);
  if (!m) return null;
  return {
    atMs: line.atMs,
    batch: Number(m[1]),
    pages: Number(m[2]),
    errors: Number(m[3]),
    batchMs: Number(m[4]),
    maxBatchMs: Number(m[5]),
  };
}

/** The QEMU command line for these options (exported for the report and for tests). */
export function qemuArgs(o: QemuOptions, qmpPath: string, tracePath: string): string[] {
  const args = [
    '-nodefaults',
    '-no-user-config',
    '-name',
    `yabusame-${o.name},debug-threads=on`,
    '-machine',
    `${o.machine ?? 'pc'},accel=tcg,memory-backend=ram0`,
    '-object',
    `memory-backend-file,id=ram0,size=${o.memMiB}M,mem-path=${o.ramPath},share=on`,
    '-m',
    `${o.memMiB}M`,
    '-smp',
    '1',
    '-display',
    'none',
    '-kernel',
    o.kernel,
    '-initrd',
    o.initramfs,
    '-append',
    `${GUEST_CMDLINE} yb.mib=${o.workloadMiB}`,
    '-chardev',
    'stdio,id=ser0,signal=off',
    '-serial',
    'chardev:ser0',
    '-qmp',
    `unix:${qmpPath},server=on,wait=off`,
    '-msg',
    'timestamp=on',
    '-D',
    tracePath,
  ];
  for (const p of o.extraQmp ?? []) args.push('-qmp', `unix:${p},server=on,wait=off`);
  for (const ev of o.traceEvents ?? []) args.push('-trace', `enable=${ev}`);
  if (o.incoming) args.push('-incoming', 'defer');
  return args;
}

/** Every QEMU this process started and that still runs: killed if this process ends first. */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const p of live) p.kill('SIGKILL');
  });
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => process.exit(128 + (sig === 'SIGINT' ? 2 : 15)));
  }
}

/** A running QEMU: its process, QMP connection and serial console. */
export class Qemu extends EventEmitter<{
  line: [SerialLine];
  stderr: [SerialLine];
  exit: [number | null];
}> {
  readonly lines: SerialLine[] = [];
  exitCode: number | null | undefined = undefined;
  private constructor(
    readonly options: QemuOptions,
    readonly proc: ChildProcess,
    readonly qmp: QmpClient,
    readonly startedAtMs: number,
    readonly tracePath: string,
    /** QEMU's stderr (the preload library's messages among them), the last 2000 lines. */
    readonly stderr: SerialLine[],
  ) {
    super();
  }

  static async start(o: QemuOptions): Promise<Qemu> {
    fs.mkdirSync(o.workDir, { recursive: true });
    const qmpPath = join(o.workDir, `${o.name}.qmp`);
    const tracePath = join(o.workDir, `${o.name}.trace`);
    fs.rmSync(qmpPath, { force: true });
    if (o.incoming && fs.existsSync(o.ramPath)) {
      throw new Error(`${o.ramPath} exists: a destination's RAM file must be new and empty`);
    }
    const startedAtMs = nowMs();
    const proc = spawn(QEMU_BINARY, qemuArgs(o, qmpPath, tracePath), {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, ...o.env },
    });
    installExitHook();
    live.add(proc);
    const early: SerialLine[] = [];
    const stderr: SerialLine[] = [];
    let vm: Qemu | null = null;
    createInterface({ input: proc.stdout! }).on('line', (text) => {
      const line = { atMs: nowMs(), text };
      if (vm) vm.push(line);
      else early.push(line);
    });
    createInterface({ input: proc.stderr! }).on('line', (text) => {
      const line = { atMs: nowMs(), text };
      stderr.push(line);
      if (stderr.length > 2000) stderr.shift();
      vm?.emit('stderr', line);
    });
    let exited: number | null | undefined = undefined;
    proc.on('exit', (code) => {
      live.delete(proc);
      exited = code;
      if (vm) {
        vm.exitCode = code;
        vm.emit('exit', code);
      }
    });
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (exited !== undefined) {
        throw new Error(
          `${o.name}: QEMU exited (${exited}) at start-up: ${stderr.map((l) => l.text).join(' | ')}`,
        );
      }
      if (fs.existsSync(qmpPath)) break;
      if (Date.now() > deadline) {
        proc.kill('SIGKILL');
        throw new Error(`${o.name}: no QMP socket after 30 s`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    let qmp: QmpClient;
    const qmpTimeoutMs = o.qmpTimeoutMs ?? 10_000;
    const connectBy = Date.now() + qmpTimeoutMs;
    for (;;) {
      try {
        qmp = await connectQmp(qmpPath, { timeoutMs: qmpTimeoutMs });
        break;
      } catch (err) {
        // The socket's file exists from QEMU's bind(2); until its listen(2) (a busy machine can
        // hold QEMU between the two) a connection is refused: try again while QEMU lives.
        const refused = (err as { code?: string }).code === 'QMP_CONNECT';
        if (refused && exited === undefined && Date.now() < connectBy) {
          await new Promise((r) => setTimeout(r, 50));
          continue;
        }
        proc.kill('SIGKILL');
        const said = stderr.map((l) => l.text).join(' | ');
        throw new Error(`${o.name}: QMP: ${(err as Error).message}; QEMU's stderr: ${said}`, {
          cause: err,
        });
      }
    }
    vm = new Qemu(o, proc, qmp, startedAtMs, tracePath, stderr);
    for (const l of early) vm.push(l);
    if (exited !== undefined) vm.exitCode = exited;
    return vm;
  }

  private push(line: SerialLine): void {
    this.lines.push(line);
    this.emit('line', line);
  }

  /** The workload lines seen so far. */
  batches(): BatchLine[] {
    return this.lines.map(parseBatch).filter((b): b is BatchLine => b !== null);
  }

  /** The first serial line (from now, or already seen if `past`) that `match` accepts. */
  waitLine(
    match: (l: SerialLine) => boolean,
    timeoutMs: number,
    past = false,
  ): Promise<SerialLine> {
    return waitForLine(this, this.lines, this.options.name, match, timeoutMs, past);
  }

  /** Waits for the workload's first batch line; resolves with it. */
  waitWorkload(timeoutMs = 120_000): Promise<SerialLine> {
    return this.waitLine((l) => BATCH_RE.test(l.text), timeoutMs, true);
  }

  /** `quit` over QMP, then SIGKILL if QEMU is still there after `graceMs`. */
  async stop(graceMs = 5000): Promise<void> {
    if (this.exitCode === undefined) {
      const exited = new Promise<void>((r) => this.proc.once('exit', () => r()));
      await this.qmp.execute('quit').catch(() => {});
      const timer = setTimeout(() => this.proc.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    }
    await this.qmp.close();
  }
}

/**
 * The first line of `source` (from now, or already in `seen` if `past`) that `match` accepts;
 * rejects after `timeoutMs`, or when the source emits `exit`.
 */
export function waitForLine(
  source: {
    on(ev: 'line', l: (line: SerialLine) => void): unknown;
    on(ev: 'exit', l: (code: number | null) => void): unknown;
    off(ev: 'line', l: (line: SerialLine) => void): unknown;
    off(ev: 'exit', l: (code: number | null) => void): unknown;
  },
  seen: readonly SerialLine[],
  name: string,
  match: (l: SerialLine) => boolean,
  timeoutMs: number,
  past = false,
): Promise<SerialLine> {
  if (past) {
    const found = seen.find(match);
    if (found) return Promise.resolve(found);
  }
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      done();
      reject(new Error(`${name}: no matching line within ${timeoutMs} ms`));
    }, timeoutMs);
    const onLine = (l: SerialLine): void => {
      if (!match(l)) return;
      done();
      resolve(l);
    };
    const onExit = (code: number | null): void => {
      done();
      reject(new Error(`${name}: QEMU exited (${code}) while waiting for a line`));
    };
    const done = (): void => {
      clearTimeout(timer);
      source.off('line', onLine);
      source.off('exit', onExit);
    };
    source.on('line', onLine);
    source.on('exit', onExit);
  });
}

/**
 * The lines of a log file another process writes (a QEMU that `yabusame migrate` started, whose
 * stdout and stderr go to `--dest-log`), read as they come: the guest's serial console and
 * QEMU's (and the preload's) messages together, each stamped when this process read it.
 */
export class LogTail extends EventEmitter<{ line: [SerialLine]; exit: [number | null] }> {
  readonly lines: SerialLine[] = [];
  private offset = 0;
  private partial = '';
  private readonly timer: NodeJS.Timeout;

  constructor(
    readonly path: string,
    readonly name: string,
    pollMs = 50,
  ) {
    super();
    this.timer = setInterval(() => this.poll(), pollMs);
  }

  /** The workload's lines seen so far. */
  batches(): BatchLine[] {
    return this.lines.map(parseBatch).filter((b): b is BatchLine => b !== null);
  }

  waitLine(
    match: (l: SerialLine) => boolean,
    timeoutMs: number,
    past = false,
  ): Promise<SerialLine> {
    return waitForLine(this, this.lines, this.name, match, timeoutMs, past);
  }

  /** Reads what is left and stops. */
  close(): void {
    clearInterval(this.timer);
    this.poll();
  }

  private poll(): void {
    let fd: number;
    try {
      fd = fs.openSync(this.path, 'r');
    } catch {
      return; // not created yet
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (size <= this.offset) return;
      const buf = Buffer.alloc(size - this.offset);
      fs.readSync(fd, buf, 0, buf.length, this.offset);
      this.offset = size;
      const parts = (this.partial + buf.toString('utf8')).split('\n');
      this.partial = parts.pop()!;
      const atMs = nowMs();
      for (const text of parts) {
        const line = { atMs, text: text.replace(/\r$/, '') };
        this.lines.push(line);
        this.emit('line', line);
      }
    } finally {
      fs.closeSync(fd);
    }
  }
}

/** A free TCP port on 127.0.0.1 (closed again: a small race with other processes). */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((r) => server.close(r));
  return port;
}

/** Names of the migration capabilities this QEMU offers (`query-migrate-capabilities`). */
export async function migrationCapabilities(vm: Qemu): Promise<string[]> {
  const caps = await vm.qmp.execute<{ capability: string; state: boolean }[]>(
    'query-migrate-capabilities',
  );
  return caps.map((c) => c.capability);
}

export async function setCapabilities(vm: Qemu, names: string[]): Promise<void> {
  await vm.qmp.execute('migrate-set-capabilities', {
    capabilities: names.map((capability) => ({ capability, state: true })),
  });
}

/** The RAM file for one run, on /dev/shm; removed first so it is new and empty. */
export function shmRamPath(tag: string): string {
  const p = `/dev/shm/yabusame-qemu-${tag}-${process.pid}.ram`;
  fs.rmSync(p, { force: true });
  return p;
}

async function bootMain(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: 'string', default: '3' },
      mem: { type: 'string', default: '1024' },
      'workload-mib': { type: 'string', default: '512' },
      machine: { type: 'string', default: 'pc' },
      json: { type: 'boolean', default: false },
    },
  });
  const guest = buildGuest();
  const results: { firstLineMs: number; workloadStartMs: number; initUptimeS: number }[] = [];
  for (let i = 0; i < Number(values.runs); i++) {
    const ramPath = shmRamPath(`boot${i}`);
    const vm = await Qemu.start({
      name: `boot${i}`,
      workDir: fs.mkdtempSync('/tmp/yabusame-qemu-boot-'),
      ramPath,
      memMiB: Number(values.mem),
      kernel: guest.kernel,
      initramfs: guest.initramfs,
      workloadMiB: Number(values['workload-mib']),
      machine: values.machine as 'pc' | 'q35',
    });
    try {
      const first = await vm.waitWorkload();
      const init = vm.lines.find((l) => l.text.startsWith('yb-init up'));
      const start = vm.lines.find((l) => l.text.startsWith('yb-workload start'));
      const r = {
        firstLineMs: Math.round(first.atMs - vm.startedAtMs),
        workloadStartMs: Math.round((start?.atMs ?? first.atMs) - vm.startedAtMs),
        initUptimeS: Number(/up ([\d.]+)s/.exec(init?.text ?? '')?.[1] ?? NaN),
      };
      results.push(r);
      if (!values.json) {
        process.stdout.write(
          `run ${i + 1}: first workload line ${r.firstLineMs} ms after QEMU started ` +
            `(fill done at ${r.workloadStartMs} ms; /init ran at guest uptime ${r.initUptimeS} s)\n`,
        );
      }
    } finally {
      await vm.stop();
      fs.rmSync(ramPath, { force: true });
    }
  }
  if (values.json) process.stdout.write(`${JSON.stringify({ boot: results })}\n`);
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  const [cmd, ...rest] = process.argv.slice(2);
  if (cmd !== 'boot') {
    process.stderr.write(
      'usage: qemu.js boot [--runs N] [--mem MiB] [--workload-mib N] [--json]\n',
    );
    process.exitCode = 2;
  } else {
    bootMain(rest).then(
      (code) => (process.exitCode = code),
      (err: unknown) => {
        process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
        process.exitCode = 1;
      },
    );
  }
}
