/**
 * `yabusame migrate`: the whole post-copy live migration of a running QEMU through yabusame, in
 * one command.
 *
 *   source     QMP to the source QEMU: it runs, no migration is under way, its RAM is a
 *              memory-backend-file with share=on (that file is the image), x-ignore-shared exists
 *   register   the migration with `yabusame source` (its control API): the image, the secret
 *              (generated, or --secret-file), and the QMP socket the source follows for the
 *              freeze (--follow-qmp; without it this command freezes the migration on STOP)
 *   destination  start the destination QEMU here (`-- COMMAND…`, with the preload library and
 *              its environment) or use one already started (--dest-qmp); it must be `inmigrate`
 *   capabilities `events` and `x-ignore-shared` on both QEMUs (QEMU's own stream then carries
 *              device state only), the source's max-bandwidth raised
 *   incoming   migrate-incoming on the destination
 *   migrate    `migrate` on the source; the switch-over is the source's STOP
 *   switch-over  device state moves; the destination resumes (RESUME)
 *   memory     progress until every page is present at the destination and the source has the
 *              destination's confirmation (the migration `complete` on the source)
 *   release    the migration forgotten on the source, once its image is closed
 *
 * Every error names its step. Before the switch-over a failure leaves the source VM running:
 * migrate_cancel, the source's capabilities and max-bandwidth put back, the migration
 * unregistered, a destination QEMU this command started stopped. After it, QEMU and the
 * daemons own the migration: the destination runs, its faults are served whether or not this
 * command still watches.
 *
 * Progress: a live bar on a terminal, JSON lines otherwise (or with --json). Exit codes: 0 the
 * migration completed, 1 it failed (the message names the step), 2 usage.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import { connectQmp, QmpError, type QmpAddress, type QmpClient } from '../qemu/qmp.js';
import {
  call,
  parse,
  readConfigFile,
  requestJson,
  str,
  UsageError,
  type Target,
} from './common.js';

export const MIGRATE_USAGE = `Usage: yabusame migrate --source-qmp ADDR --page-url URL [options] -- QEMU-COMMAND...
       yabusame migrate --source-qmp ADDR --page-url URL --dest-qmp ADDR --secret-file FILE [options]

Live-migrates a running QEMU post-copy through yabusame: device state by QEMU's own migration
(x-ignore-shared), guest RAM afterwards by \`yabusame source\` and \`yabusame dest\`.

Both QEMUs keep guest RAM in a file: -object memory-backend-file,id=ram0,size=SIZE,
mem-path=/dev/shm/FILE,share=on -machine memory-backend=ram0 (no prealloc); the destination's
file must not exist yet, and the destination starts with -incoming defer.

Source:
  --source-qmp ADDR     the source QEMU's QMP socket (a path, or tcp:HOST:PORT)
  --follow-qmp PATH     a second QMP socket of the source QEMU (QMP serves one client per
                        socket) that \`yabusame source\` follows to freeze the migration when
                        QEMU stops the VM; without it this command freezes it on the STOP
  --image PATH          the source's RAM file as the source daemon names it (default: the
                        mem-path of the source QEMU's memory-backend-file)
  --control PATH        the source daemon's control socket (default /run/yabusame/source.sock)
  --control-url URL     or its TCP control listener ...
  --token-file FILE     ... with its bearer token
  --page-url URL        the page server as the destination reaches it: ws:// or wss://HOST:PORT
  --secret-file FILE    the migration's secret (hex, mode 0600); default: the source generates one
  --id ID               the migration id (default qemu-TIME)

Destination, either started here:
  -- QEMU-COMMAND...    the destination QEMU's command line; it runs detached (it outlives this
                        command) with LD_PRELOAD and the YABUSAME_* settings of the preload
  --preload PATH        the preload library (default $YABUSAME_PRELOAD, else built with cc)
  --dest-log FILE       the started QEMU's stdout and stderr (default: this command's)
or already running (started with the preload, YABUSAME_SECRET from --secret-file, and its
YABUSAME_MIGRATION_ID the --id given here; it waits for the registration):
  --dest-qmp ADDR       the destination QEMU's QMP socket (with a command: default its
                        -qmp unix:PATH)
  --dest-ram PATH       its RAM file (default: the command's memory-backend-file mem-path)
  --dest-socket PATH    the dest daemon's handoff socket (default /run/yabusame/dest.sock)
  --dest-control PATH   the dest daemon's control socket, for progress
                        (default /run/yabusame/dest-control.sock)
  --incoming HOST:PORT  where the destination QEMU listens for device state
                        (default 127.0.0.1:0: a free loopback port)

Options:
  --max-bandwidth B     the source's max-bandwidth for the device state, bytes/s (default 8 GiB)
  --timeout S           give up waiting for all RAM after S seconds (default 600)
  --interval MS         progress every MS (default 250)
  --json                JSON lines, even on a terminal
  -h, --help            this help

Before the switch-over (the source's STOP) any failure leaves the source VM running and as it
was. Exit codes: 0 all RAM present at the destination and the source released the image,
1 failed (the message names the step), 2 usage.
`;

export type MigrateStep =
  | 'source'
  | 'register'
  | 'destination'
  | 'capabilities'
  | 'incoming'
  | 'migrate'
  | 'switch-over'
  | 'memory'
  | 'release';

/** A failure at one step; `code` is the underlying coded error's (QMP_*, the source's, …). */
export class MigrateError extends Error {
  constructor(
    readonly step: MigrateStep,
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`step ${step}: ${message}`, options);
  }
}

/** `tcp:HOST:PORT` → TCP; anything else is a UNIX socket path. */
export function parseQmpAddress(s: string): QmpAddress {
  const m = /^tcp:(.+):(\d{1,5})$/.exec(s);
  if (m) return { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
  return resolve(s);
}

/** What a destination command line says about itself (QEMU's option syntax). */
export interface DestCommandInfo {
  qmpPath?: string;
  ramPath?: string;
  shared: boolean;
  incomingDefer: boolean;
}

/** Reads the QMP socket, RAM file and -incoming of a QEMU command line. */
export function inspectDestCommand(argv: readonly string[]): DestCommandInfo {
  const info: DestCommandInfo = { shared: false, incomingDefer: false };
  const props = (v: string): Map<string, string> =>
    new Map(
      v.split(',').map((kv) => {
        const eq = kv.indexOf('=');
        return eq < 0 ? [kv, ''] : [kv.slice(0, eq), kv.slice(eq + 1)];
      }),
    );
  for (let i = 0; i < argv.length - 1; i++) {
    const opt = argv[i]!.replace(/^--/, '-');
    const v = argv[i + 1]!;
    if (opt === '-qmp' && v.startsWith('unix:')) {
      info.qmpPath = v.slice('unix:'.length).split(',')[0];
    } else if (opt === '-object' && v.startsWith('memory-backend-file')) {
      const p = props(v);
      if (p.has('mem-path')) info.ramPath = p.get('mem-path');
      info.shared = p.get('share') === 'on' || p.get('share') === 'true';
    } else if (opt === '-incoming' && v === 'defer') {
      info.incomingDefer = true;
    }
  }
  return info;
}

interface Progress {
  presentPages: number;
  totalPages: number;
  /** Where the figure comes from: the dest's session, or pages the source sent. */
  from: 'dest' | 'source';
}

/** What this command prints: JSON lines, or human lines and a live bar on a terminal. */
class Reporter {
  private barShown = false;
  constructor(private readonly json: boolean) {}

  step(step: MigrateStep | 'done', msg: string, fields: Record<string, unknown> = {}): void {
    if (this.json) {
      this.line({ event: 'step', step, msg, ...fields });
      return;
    }
    this.clearBar();
    process.stdout.write(`${step === 'done' ? '✓' : '·'} ${msg}\n`);
  }

  warn(msg: string, fields: Record<string, unknown> = {}): void {
    if (this.json) this.line({ event: 'warning', msg, ...fields });
    else {
      this.clearBar();
      process.stdout.write(`! ${msg}\n`);
    }
  }

  progress(p: Progress, sinceStopMs: number): void {
    if (this.json) {
      this.line({ event: 'progress', ...p, sinceStopMs: Math.round(sinceStopMs) });
      return;
    }
    const frac = p.totalPages ? p.presentPages / p.totalPages : 0;
    const width = 30;
    const full = Math.round(frac * width);
    const mib = (pages: number): string => ((pages * 4096) / 2 ** 20).toFixed(0);
    const what = p.from === 'dest' ? 'present at the destination' : 'sent by the source';
    process.stdout.write(
      `\r\x1b[K[${'#'.repeat(full)}${'.'.repeat(width - full)}] ${(frac * 100).toFixed(1)}% ` +
        `${mib(p.presentPages)}/${mib(p.totalPages)} MiB ${what}, ` +
        `${(sinceStopMs / 1000).toFixed(1)} s since STOP`,
    );
    this.barShown = true;
  }

  done(fields: Record<string, unknown>): void {
    if (this.json) this.line({ event: 'done', ...fields });
  }

  error(err: MigrateError, sourceRunning: boolean | null): void {
    if (this.json) {
      this.line({
        event: 'error',
        step: err.step,
        code: err.code,
        message: err.message,
        sourceRunning,
      });
    } else this.clearBar();
  }

  line(obj: Record<string, unknown>): void {
    process.stdout.write(`${JSON.stringify({ time: new Date().toISOString(), ...obj })}\n`);
  }

  private clearBar(): void {
    if (!this.barShown) return;
    process.stdout.write('\n');
    this.barShown = false;
  }
}

interface MigrateOptions {
  id: string;
  sourceQmp: QmpAddress;
  followQmp: string | undefined;
  image: string | undefined;
  control: Target;
  pageUrl: string;
  secret: string | undefined;
  destCommand: string[];
  destQmp: QmpAddress | undefined;
  destRam: string | undefined;
  destSocket: string;
  destControl: string;
  preload: string | undefined;
  destLog: string | undefined;
  incoming: { host: string; port: number };
  maxBandwidth: number;
  timeoutMs: number;
  intervalMs: number;
  json: boolean;
}

const GiB = 1024 ** 3;

function options(args: string[]): MigrateOptions {
  const dash = args.indexOf('--');
  const destCommand = dash < 0 ? [] : args.slice(dash + 1);
  const v = parse(
    dash < 0 ? args : args.slice(0, dash),
    {
      id: { type: 'string' },
      'source-qmp': { type: 'string' },
      'follow-qmp': { type: 'string' },
      image: { type: 'string' },
      control: { type: 'string' },
      'control-url': { type: 'string' },
      'token-file': { type: 'string' },
      'page-url': { type: 'string' },
      'secret-file': { type: 'string' },
      'dest-qmp': { type: 'string' },
      'dest-ram': { type: 'string' },
      'dest-socket': { type: 'string' },
      'dest-control': { type: 'string' },
      preload: { type: 'string' },
      'dest-log': { type: 'string' },
      incoming: { type: 'string' },
      'max-bandwidth': { type: 'string' },
      timeout: { type: 'string' },
      interval: { type: 'string' },
      json: { type: 'boolean' },
    },
    MIGRATE_USAGE,
  );
  const need = (name: string): string => {
    const s = str(v[name]);
    if (!s) throw new UsageError(`--${name} is required\n\n${MIGRATE_USAGE}`);
    return s;
  };
  const num = (name: string, dflt: number, min: number): number => {
    const s = str(v[name]);
    if (s === undefined) return dflt;
    const n = Number(s);
    if (!Number.isFinite(n) || n < min) {
      throw new UsageError(`--${name}: expected a number ≥ ${min}, got "${s}"`);
    }
    return n;
  };
  const pageUrl = need('page-url');
  if (!/^wss?:\/\/[^/]+\/?$/.test(pageUrl)) {
    throw new UsageError(
      `--page-url: expected ws://HOST:PORT or wss://HOST:PORT, got "${pageUrl}"`,
    );
  }
  const info = inspectDestCommand(destCommand);
  const destQmpText = str(v['dest-qmp']) ?? info.qmpPath;
  if (!destQmpText) {
    throw new UsageError(
      destCommand.length
        ? '--dest-qmp is required: the command has no -qmp unix:PATH'
        : `a destination is required: -- QEMU-COMMAND..., or --dest-qmp\n\n${MIGRATE_USAGE}`,
    );
  }
  const secretFile = str(v['secret-file']);
  if (destCommand.length === 0 && !secretFile) {
    throw new UsageError(
      '--dest-qmp without a command needs --secret-file: the destination QEMU, started before ' +
        'this command, proves the secret it was given',
    );
  }
  const incoming = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(str(v['incoming']) ?? '127.0.0.1:0');
  if (!incoming) throw new UsageError('--incoming: expected HOST:PORT');
  const controlUrl = str(v['control-url']);
  const tokenFile = str(v['token-file']);
  return {
    id: str(v['id']) ?? `qemu-${Date.now()}`,
    sourceQmp: parseQmpAddress(need('source-qmp')),
    followQmp: str(v['follow-qmp']) === undefined ? undefined : resolve(str(v['follow-qmp'])!),
    image: str(v['image']),
    control: controlUrl
      ? {
          url: controlUrl,
          token: tokenFile
            ? readConfigFile(tokenFile, '--token-file', true).toString().trim()
            : undefined,
        }
      : { socketPath: str(v['control']) ?? '/run/yabusame/source.sock' },
    pageUrl: pageUrl.replace(/\/$/, ''),
    secret: secretFile
      ? readConfigFile(secretFile, '--secret-file', true).toString('utf8').trim()
      : undefined,
    destCommand,
    destQmp: parseQmpAddress(destQmpText),
    destRam: str(v['dest-ram']) ?? info.ramPath,
    destSocket: resolve(str(v['dest-socket']) ?? '/run/yabusame/dest.sock'),
    destControl: str(v['dest-control']) ?? '/run/yabusame/dest-control.sock',
    preload: str(v['preload']) ?? process.env['YABUSAME_PRELOAD'],
    destLog: str(v['dest-log']),
    incoming: { host: incoming[1] ?? incoming[2]!, port: Number(incoming[3]) },
    maxBandwidth: num('max-bandwidth', 8 * GiB, 1),
    timeoutMs: num('timeout', 600, 1) * 1000,
    intervalMs: num('interval', 250, 10),
    json: v['json'] === true || !process.stdout.isTTY,
  };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** An error's code, if it carries one (QmpError, the control API's, a system call's). */
function codeOf(err: unknown, fallback: string): string {
  const c = (err as { code?: unknown } | null)?.code;
  return typeof c === 'string' ? c : fallback;
}

/** One migration, step by step; `cleanup` undoes what it did if it fails before the switch-over. */
class Migration {
  private src: QmpClient | null = null;
  private dst: QmpClient | null = null;
  private destChild: ChildProcess | null = null;
  private destExited: string | null = null;
  private registered = false;
  private migrating = false;
  /** The source's migration settings before this command changed them, to put back. */
  private savedCaps: { capability: string; state: boolean }[] | null = null;
  private savedBandwidth: number | null = null;
  /** This command changed the source's capabilities (cleanup puts them back). */
  private capsChanged = false;
  /** Host time of the source's STOP (QMP timestamp): the switch-over began. */
  stopAtMs: number | null = null;
  resumeAtMs: number | null = null;
  private imagePath = '';
  private totalPages = 0;

  constructor(
    private readonly o: MigrateOptions,
    private readonly report: Reporter,
  ) {}

  get switchedOver(): boolean {
    return this.stopAtMs !== null;
  }

  async run(): Promise<void> {
    const t0 = Date.now();
    await this.source();
    await this.register();
    await this.destination();
    await this.capabilities();
    const uri = await this.incoming();
    await this.migrate(uri);
    await this.memory();
    await this.release();
    const ms = (a: number | null, b: number | null): number | null =>
      a === null || b === null ? null : Math.round((b - a) * 10) / 10;
    this.report.done({
      id: this.o.id,
      totalPages: this.totalPages,
      stopToResumeMs: ms(this.stopAtMs, this.resumeAtMs),
      stopToCompleteMs: ms(this.stopAtMs, this.completeAtMs),
      elapsedMs: Date.now() - t0,
    });
    if (!this.o.json) {
      process.stdout.write(
        `migrated ${this.o.id}: the VM resumed ${ms(this.stopAtMs, this.resumeAtMs)} ms after ` +
          `the source stopped; all RAM present after ${ms(this.stopAtMs, this.completeAtMs)} ms\n`,
      );
    }
  }

  private completeAtMs: number | null = null;

  /** Connects to the source QEMU and checks it can be migrated this way. */
  private async source(): Promise<void> {
    const step = 'source';
    this.src = await connectQmp(this.o.sourceQmp, { timeoutMs: 10_000 }).catch((err: unknown) => {
      throw new MigrateError(step, codeOf(err, 'QMP_CONNECT'), (err as Error).message, {
        cause: err,
      });
    });
    const q = this.qmpStep(step);
    const status = await q(this.src, 'query-status');
    const run = status as { status: string; running: boolean };
    if (!run.running) {
      // A paused VM has no STOP to switch over on; `cont` it first.
      throw new MigrateError(step, 'VM_STATE', `the source VM is ${run.status}, not running`);
    }
    const mig = (await q(this.src, 'query-migrate')) as { status?: string };
    if (mig.status && !['completed', 'failed', 'cancelled', 'none'].includes(mig.status)) {
      throw new MigrateError(step, 'MIGRATION_ACTIVE', `a migration is ${mig.status} already`);
    }
    const caps = (await q(this.src, 'query-migrate-capabilities')) as {
      capability: string;
      state: boolean;
    }[];
    if (!caps.some((c) => c.capability === 'x-ignore-shared')) {
      throw new MigrateError(step, 'QEMU_TOO_OLD', 'this QEMU has no x-ignore-shared capability');
    }
    this.savedCaps = caps.filter((c) => ['events', 'x-ignore-shared'].includes(c.capability));
    const params = (await q(this.src, 'query-migrate-parameters')) as { 'max-bandwidth'?: number };
    this.savedBandwidth = params['max-bandwidth'] ?? null;
    const ram = await this.ramBackend(this.src, step);
    this.imagePath = this.o.image ?? ram.memPath;
    this.totalPages = Math.floor(ram.size / 4096);
    this.report.step(
      step,
      `source QEMU ${run.status}; guest RAM ${ram.memPath} (${ram.size >> 20} MiB, share=on)`,
      {
        runState: run.status,
        ramPath: ram.memPath,
        ramBytes: ram.size,
      },
    );
  }

  /** The one shared memory-backend-file of a QEMU (qom-list /objects). */
  private async ramBackend(
    qmp: QmpClient,
    step: MigrateStep,
  ): Promise<{ memPath: string; size: number }> {
    const q = this.qmpStep(step);
    const objects = (await q(qmp, 'qom-list', { path: '/objects' })) as {
      name: string;
      type: string;
    }[];
    const files = objects.filter((o) => o.type === 'child<memory-backend-file>');
    const found: { name: string; memPath: string; size: number; share: boolean }[] = [];
    for (const f of files) {
      const path = `/objects/${f.name}`;
      found.push({
        name: f.name,
        memPath: (await q(qmp, 'qom-get', { path, property: 'mem-path' })) as string,
        size: (await q(qmp, 'qom-get', { path, property: 'size' })) as number,
        share: (await q(qmp, 'qom-get', { path, property: 'share' })) as boolean,
      });
    }
    const shared = found.filter((f) => f.share);
    if (found.length === 0) {
      throw new MigrateError(
        step,
        'NO_RAM_FILE',
        'the QEMU keeps guest RAM in no memory-backend-file: give it -object ' +
          'memory-backend-file,id=ram0,size=SIZE,mem-path=/dev/shm/FILE,share=on ' +
          '-machine memory-backend=ram0',
      );
    }
    if (shared.length === 0) {
      throw new MigrateError(
        step,
        'RAM_NOT_SHARED',
        `memory-backend-file ${found[0]!.name} has share=off: QEMU maps it privately and would ` +
          'migrate all RAM itself; use share=on',
      );
    }
    if (shared.length > 1) {
      throw new MigrateError(
        step,
        'RAM_SEVERAL_FILES',
        `several shared memory-backend-files (${shared.map((f) => f.name).join(', ')}); one is supported`,
      );
    }
    return shared[0]!;
  }

  private async register(): Promise<void> {
    const step = 'register';
    const body = (await call(this.o.control, 'POST', '/v1/migrations', {
      id: this.o.id,
      image: this.imagePath,
      ...(this.o.secret ? { secret: this.o.secret } : {}),
      ...(this.o.followQmp ? { qmp: this.o.followQmp } : {}),
    }).catch((err: unknown) => {
      throw new MigrateError(step, codeOf(err, 'REGISTER_FAILED'), (err as Error).message, {
        cause: err,
      });
    })) as { secret?: string; pages: { total: number } };
    this.registered = true;
    this.secret = this.o.secret ?? body.secret;
    this.totalPages = body.pages.total;
    if (this.o.followQmp) {
      // The source must follow QEMU before the migration starts: its STOP is the freeze.
      const deadline = Date.now() + 10_000;
      for (;;) {
        const s = (await call(
          this.o.control,
          'GET',
          `/v1/migrations/${encodeURIComponent(this.o.id)}`,
        ).catch(() => null)) as {
          qmp?: { state: string; error?: { code: string; message: string } };
        } | null;
        if (s?.qmp?.state === 'following') break;
        if (s?.qmp?.state === 'failed') {
          throw new MigrateError(
            step,
            s.qmp.error?.code ?? 'QMP_FAILED',
            `the source cannot follow ${this.o.followQmp}: ${s.qmp.error?.message ?? 'failed'}`,
          );
        }
        if (Date.now() > deadline) {
          throw new MigrateError(
            step,
            'QMP_TIMEOUT',
            `the source did not follow ${this.o.followQmp} within 10 s`,
          );
        }
        await sleep(20);
      }
    }
    this.report.step(
      step,
      `registered ${this.o.id} with the source (${this.o.secret ? 'secret from --secret-file' : 'secret generated'}` +
        `${this.o.followQmp ? `; it follows ${this.o.followQmp}` : '; this command freezes it on STOP'})`,
      { id: this.o.id, totalPages: this.totalPages, follow: this.o.followQmp ?? null },
    );
  }

  private secret: string | undefined;

  private async destination(): Promise<void> {
    const step = 'destination';
    if (this.o.destCommand.length > 0) await this.startDestination();
    const deadline = Date.now() + 60_000;
    for (;;) {
      try {
        this.dst = await connectQmp(this.o.destQmp!, { timeoutMs: 10_000 });
        break;
      } catch (err) {
        if (this.destExited) {
          throw new MigrateError(step, 'DEST_EXITED', `the destination QEMU ${this.destExited}`);
        }
        const code = codeOf(err, '');
        if (code !== 'QMP_CONNECT' || Date.now() > deadline) {
          throw new MigrateError(step, code || 'QMP_CONNECT', (err as Error).message, {
            cause: err,
          });
        }
        // The preload holds QEMU's start-up until the dest daemon's ack: its QMP comes after.
        await sleep(100);
      }
    }
    const q = this.qmpStep(step);
    const st = (await q(this.dst, 'query-status')) as { status: string };
    if (st.status !== 'inmigrate') {
      throw new MigrateError(
        step,
        'VM_STATE',
        `the destination QEMU is ${st.status}, not inmigrate: start it with -incoming defer`,
      );
    }
    const ram = await this.ramBackend(this.dst, step);
    this.report.step(step, `destination QEMU waiting for the migration; guest RAM ${ram.memPath}`, {
      ramPath: ram.memPath,
      started: this.destChild !== null,
    });
  }

  private async startDestination(): Promise<void> {
    const step = 'destination';
    const info = inspectDestCommand(this.o.destCommand);
    const ram = this.o.destRam;
    if (!ram) {
      throw new MigrateError(
        step,
        'NO_RAM_FILE',
        'the command has no memory-backend-file mem-path (or give --dest-ram)',
      );
    }
    if (!info.shared) {
      throw new MigrateError(
        step,
        'RAM_NOT_SHARED',
        "the command's memory-backend-file needs share=on",
      );
    }
    if (!info.incomingDefer) {
      throw new MigrateError(step, 'NOT_INCOMING', 'the command needs -incoming defer');
    }
    if (existsSync(ram)) {
      throw new MigrateError(
        step,
        'RAM_FILE_EXISTS',
        `${ram} exists: a destination's RAM file must be new (a page already in it never faults)`,
      );
    }
    let preload = this.o.preload;
    if (!preload) {
      // The library is C (scripts/qemu/preload.c), built with cc and cached.
      const { buildPreload } = await import('../../scripts/qemu/preload-build.js');
      this.report.warn('building the preload library with cc (give --preload to skip this)');
      preload = buildPreload();
    }
    preload = realpathSync(preload);
    const env: Record<string, string> = {
      ...(process.env as Record<string, string>),
      LD_PRELOAD: [preload, process.env['LD_PRELOAD']].filter(Boolean).join(':'),
      YABUSAME_RAM_PATH: ram,
      YABUSAME_SOCKET: this.o.destSocket,
      YABUSAME_MIGRATION_ID: this.o.id,
      YABUSAME_SOURCE: this.o.pageUrl,
    };
    if (this.secret) env['YABUSAME_SECRET'] = this.secret;
    else delete env['YABUSAME_SECRET'];
    const log = this.o.destLog ? openSync(this.o.destLog, 'a') : null;
    const child = spawn(this.o.destCommand[0]!, this.o.destCommand.slice(1), {
      env,
      // Its own session: the destination VM outlives this command (and its terminal's ^C).
      detached: true,
      stdio: ['ignore', log ?? 'inherit', log ?? 'inherit'],
    });
    if (log !== null) closeSync(log);
    this.destChild = child;
    child.on('error', (err) => (this.destExited = `could not start: ${err.message}`));
    child.on('exit', (code, signal) => {
      this.destExited = `exited (${signal ?? code})${this.o.destLog ? `; see ${this.o.destLog}` : ''}`;
    });
    child.unref();
    this.report.step(step, `started the destination QEMU (pid ${child.pid}) with the preload`, {
      pid: child.pid,
      preload,
    });
  }

  private async capabilities(): Promise<void> {
    const step = 'capabilities';
    const q = this.qmpStep(step);
    const caps = {
      capabilities: ['events', 'x-ignore-shared'].map((capability) => ({
        capability,
        state: true,
      })),
    };
    await q(this.dst!, 'migrate-set-capabilities', caps);
    this.capsChanged = true;
    await q(this.src!, 'migrate-set-capabilities', caps);
    // QEMU 7.2's default (32 MiB/s) would pace even the device state.
    await q(this.src!, 'migrate-set-parameters', { 'max-bandwidth': this.o.maxBandwidth });
    this.report.step(step, 'x-ignore-shared and events on both QEMUs; source max-bandwidth raised');
  }

  private async incoming(): Promise<string> {
    const step = 'incoming';
    const q = this.qmpStep(step);
    const { host, port } = this.o.incoming;
    const h = host.includes(':') ? `[${host}]` : host;
    await q(this.dst!, 'migrate-incoming', { uri: `tcp:${h}:${port}` });
    let real = port;
    if (port === 0) {
      const info = (await q(this.dst!, 'query-migrate')) as {
        'socket-address'?: { type: string; port?: string | number }[];
      };
      real = Number(info['socket-address']?.find((a) => a.type === 'inet')?.port ?? 0);
      if (!real)
        throw new MigrateError(
          step,
          'NO_PORT',
          'the destination QEMU did not say which port it listens on',
        );
    }
    const uri = `tcp:${h}:${real}`;
    this.report.step(step, `destination QEMU listening on ${uri}`, { uri });
    return uri;
  }

  private async migrate(uri: string): Promise<void> {
    const src = this.src!;
    const dst = this.dst!;
    const stopped = src.waitEvent('STOP');
    const srcEnd = src.waitEvent('MIGRATION', {
      match: (e) => ['completed', 'failed', 'cancelled'].includes(String(e.data['status'])),
    });
    const resumed = dst.waitEvent('RESUME');
    const dstFailed = dst.waitEvent('MIGRATION', {
      match: (e) => e.data['status'] === 'failed',
    });
    for (const p of [stopped, srcEnd, resumed, dstFailed]) p.catch(() => {});
    this.migrating = true;
    await this.qmpStep('migrate')(src, 'migrate', { uri });
    this.report.step(
      'migrate',
      "migration started; waiting for the switch-over (the source's STOP)",
    );

    // Before the STOP any failure is undone by cleanup(); the source keeps running.
    const first = await Promise.race([
      stopped.then((ev) => ({ kind: 'stop' as const, ev })),
      srcEnd.then((ev) => ({ kind: 'end' as const, ev })),
      this.deadline(60_000, 'migrate', 'no switch-over within 60 s'),
    ]);
    if (first.kind === 'end') {
      throw new MigrateError(
        'migrate',
        'QEMU_MIGRATION_FAILED',
        `QEMU's migration ${String(first.ev.data['status'])} before the switch-over${await this.qemuError(src)}`,
      );
    }
    this.stopAtMs = first.ev.timestampMs;
    if (!this.o.followQmp) {
      // Nobody else tells the source: the VM has stopped for its migration, so freeze.
      await call(
        this.o.control,
        'POST',
        `/v1/migrations/${encodeURIComponent(this.o.id)}/freeze`,
      ).catch((err: unknown) => {
        throw new MigrateError('switch-over', codeOf(err, 'FREEZE_FAILED'), (err as Error).message);
      });
    }
    this.report.step('switch-over', 'the source VM stopped; device state moving', {
      stopAtMs: this.stopAtMs,
    });
    const end = await Promise.race([
      srcEnd,
      this.deadline(120_000, 'switch-over', 'the device state did not move within 120 s'),
    ]);
    if (end.data['status'] !== 'completed') {
      throw new MigrateError(
        'switch-over',
        'QEMU_MIGRATION_FAILED',
        `QEMU's migration ${String(end.data['status'])} after the source stopped (QEMU restarts ` +
          `the source VM; the source aborts the page migration if it runs again)${await this.qemuError(src)}`,
      );
    }
    const res = await Promise.race([
      resumed.then((ev) => ({ ok: true as const, ev })),
      dstFailed.then((ev) => ({ ok: false as const, ev })),
      this.deadline(60_000, 'switch-over', 'the destination did not resume within 60 s'),
    ]);
    if (!res.ok) {
      throw new MigrateError(
        'switch-over',
        'QEMU_MIGRATION_FAILED',
        `the destination QEMU failed to load the device state${await this.qemuError(dst)}`,
      );
    }
    this.resumeAtMs = res.ev.timestampMs;
    this.report.step(
      'switch-over',
      `the destination VM runs, ${(this.resumeAtMs - this.stopAtMs).toFixed(1)} ms after the source stopped`,
      { resumeAtMs: this.resumeAtMs, stopToResumeMs: this.resumeAtMs - this.stopAtMs },
    );
  }

  /** QEMU's own words on a failed migration (query-migrate's error-desc), if any. */
  private async qemuError(qmp: QmpClient): Promise<string> {
    const info = (await qmp
      .execute<{ 'error-desc'?: string }>('query-migrate')
      .catch(() => ({}))) as {
      'error-desc'?: string;
    };
    return info['error-desc'] ? `: ${info['error-desc']}` : '';
  }

  private deadline(ms: number, step: MigrateStep, message: string): Promise<never> {
    return new Promise((_, reject) => {
      const t = setTimeout(() => reject(new MigrateError(step, 'TIMEOUT', message)), ms);
      t.unref();
    });
  }

  private async memory(): Promise<void> {
    const step = 'memory';
    const deadline = Date.now() + this.o.timeoutMs;
    const path = `/v1/migrations/${encodeURIComponent(this.o.id)}`;
    let lastDestError = '';
    for (;;) {
      const res = await requestJson(this.o.control, 'GET', path).catch((err: unknown) => {
        throw new MigrateError(step, codeOf(err, 'UNREACHABLE'), (err as Error).message);
      });
      const m = res.body as {
        state?: string;
        pages?: { total: number; sent: number };
        qmp?: { error?: { code: string; message: string } };
      };
      if (res.status !== 200 || !m.state) {
        throw new MigrateError(
          step,
          'UNKNOWN_MIGRATION',
          `the source no longer knows ${this.o.id}`,
        );
      }
      if (m.state === 'complete') {
        this.completeAtMs = Date.now();
        break;
      }
      if (m.state === 'aborted') {
        const why = m.qmp?.error;
        throw new MigrateError(
          step,
          why?.code ?? 'MIGRATION_ABORTED',
          `the source aborted the migration${why ? `: ${why.message}` : ''}`,
        );
      }
      const dest = await this.destProgress();
      if (dest.error && dest.error !== lastDestError) {
        // A failed dest session is not the end: the preload hands the uffd to the next one.
        this.report.warn(`destination session: ${dest.error}`);
      }
      lastDestError = dest.error ?? '';
      const p: Progress = dest.progress ?? {
        presentPages: m.pages?.sent ?? 0,
        totalPages: m.pages?.total ?? this.totalPages,
        from: 'source',
      };
      this.report.progress(p, Date.now() - this.stopAtMs!);
      if (Date.now() > deadline) {
        throw new MigrateError(
          step,
          'TIMEOUT',
          `not all RAM present after ${this.o.timeoutMs / 1000} s`,
        );
      }
      await sleep(this.o.intervalMs);
    }
    this.report.progress(
      { presentPages: this.totalPages, totalPages: this.totalPages, from: 'dest' },
      this.completeAtMs - this.stopAtMs!,
    );
    this.report.step(step, 'all RAM present at the destination, confirmed to the source', {
      stopToCompleteMs: this.completeAtMs - this.stopAtMs!,
    });
  }

  /** The dest daemon's session of this migration, if its control socket answers. */
  private async destProgress(): Promise<{ progress?: Progress; error?: string }> {
    const res = await requestJson({ socketPath: this.o.destControl }, 'GET', '/v1/sessions').catch(
      () => null,
    );
    if (!res || res.status !== 200) return {};
    const b = res.body as {
      active: { migrationId: string; presentPages: number; totalPages: number }[];
      ended: { migrationId: string; state: string; error?: { code: string; message: string } }[];
    };
    const s = b.active.find((x) => x.migrationId === this.o.id);
    const failed = b.ended.filter((x) => x.migrationId === this.o.id && x.error).at(-1);
    return {
      ...(s
        ? { progress: { presentPages: s.presentPages, totalPages: s.totalPages, from: 'dest' } }
        : {}),
      ...(failed?.error ? { error: `${failed.error.code}: ${failed.error.message}` } : {}),
    };
  }

  private async release(): Promise<void> {
    const step = 'release';
    // Answered once the source closed the image file.
    await call(this.o.control, 'DELETE', `/v1/migrations/${encodeURIComponent(this.o.id)}`).catch(
      (err: unknown) => {
        throw new MigrateError(step, codeOf(err, 'RELEASE_FAILED'), (err as Error).message);
      },
    );
    this.registered = false;
    this.report.step(
      step,
      'the source released the image; the source QEMU stays stopped (quit it when done)',
    );
  }

  /** A QMP call whose failure becomes a MigrateError of `step`. */
  private qmpStep(step: MigrateStep) {
    return async (
      qmp: QmpClient,
      cmd: string,
      args?: Record<string, unknown>,
    ): Promise<unknown> => {
      try {
        return await qmp.execute(cmd, args);
      } catch (err) {
        const who = qmp === this.src ? 'source' : 'destination';
        throw new MigrateError(
          step,
          codeOf(err, 'QMP_COMMAND'),
          `${who} QEMU: ${(err as Error).message}`,
          {
            cause: err,
          },
        );
      }
    };
  }

  /**
   * Undoes what this command did, after a failure. Before the switch-over: the source VM keeps
   * running, as it was. After it: the source's own migration is QEMU's; only a destination this
   * command started and that never resumed is stopped.
   */
  async cleanup(): Promise<void> {
    const notes: string[] = [];
    const src = this.src;
    if (!this.switchedOver) {
      if (src && !src.closed) {
        if (this.migrating) await src.execute('migrate_cancel').catch(() => {});
        // Put back what we changed: x-ignore-shared left on would make a later ordinary
        // migration of this VM leave its RAM behind.
        if (this.capsChanged && this.savedCaps) {
          await this.waitMigrationEnded(src);
          await src
            .execute('migrate-set-capabilities', { capabilities: this.savedCaps })
            .catch((err: unknown) =>
              notes.push(`capabilities not restored: ${(err as Error).message}`),
            );
        }
        if (this.capsChanged && this.savedBandwidth !== null) {
          await src
            .execute('migrate-set-parameters', { 'max-bandwidth': this.savedBandwidth })
            .catch(() => {});
        }
      }
    }
    if (this.registered && (!this.switchedOver || this.resumeAtMs === null)) {
      await call(this.o.control, 'DELETE', `/v1/migrations/${encodeURIComponent(this.o.id)}`).catch(
        (err: unknown) => notes.push(`not unregistered: ${(err as Error).message}`),
      );
    }
    if (this.destChild && !this.destExited && this.resumeAtMs === null) {
      if (this.dst && !this.dst.closed) await this.dst.execute('quit').catch(() => {});
      else this.destChild.kill('SIGKILL');
    }
    for (const n of notes) this.report.warn(n);
  }

  /** After migrate_cancel QEMU accepts new capabilities only once the migration ended. */
  private async waitMigrationEnded(qmp: QmpClient): Promise<void> {
    for (let i = 0; i < 50; i++) {
      const m = (await qmp.execute<{ status?: string }>('query-migrate').catch(() => ({}))) as {
        status?: string;
      };
      if (!m.status || ['completed', 'failed', 'cancelled', 'none'].includes(m.status)) return;
      await sleep(100);
    }
  }

  async close(): Promise<void> {
    await Promise.all([this.src?.close(), this.dst?.close()]);
  }

  /** Whether the source VM runs now (for the error report), or null if unknown. */
  async sourceRunning(): Promise<boolean | null> {
    if (!this.src || this.src.closed) return null;
    const s = (await this.src.execute<{ running: boolean }>('query-status').catch(() => null)) as {
      running: boolean;
    } | null;
    return s?.running ?? null;
  }
}

export async function runMigrate(args: string[]): Promise<void> {
  const o = options(args);
  const report = new Reporter(o.json);
  const m = new Migration(o, report);
  const onSignal = (signal: NodeJS.Signals): void => {
    const interrupted = new MigrateError(
      m.switchedOver ? 'memory' : 'migrate',
      'INTERRUPTED',
      m.switchedOver
        ? `${signal}: stopped watching; the migration goes on (yabusame status)`
        : `${signal}: cancelled before the switch-over`,
    );
    rejectRun(interrupted);
  };
  let rejectRun!: (err: MigrateError) => void;
  const interruptedP = new Promise<never>((_, reject) => (rejectRun = reject));
  interruptedP.catch(() => {});
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    await Promise.race([m.run(), interruptedP]);
    await m.close();
  } catch (err) {
    const e =
      err instanceof MigrateError
        ? err
        : err instanceof QmpError
          ? new MigrateError(m.switchedOver ? 'memory' : 'migrate', err.code, err.message, {
              cause: err,
            })
          : new MigrateError(
              m.switchedOver ? 'memory' : 'migrate',
              codeOf(err, 'FAILED'),
              (err as Error).message,
              {
                cause: err,
              },
            );
    await m.cleanup();
    report.error(e, await m.sourceRunning().catch(() => null));
    await m.close();
    throw Object.assign(new Error(e.message), { code: e.code });
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}
