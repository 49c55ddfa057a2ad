/**
 * Configuration of both daemons. Every key has a JSON name (in the --config file), a flag and a
 * YABUSAME_* environment variable (KEYS below, which also write --help); a value is taken from
 * the flag, else the environment, else the file, else the default, and the result is validated
 * once (zod). Everything after this edge trusts the types.
 *
 * Errors carry a stable `code`: CONFIG_NOT_FOUND (the file cannot be read), CONFIG_BAD_JSON (not
 * JSON: the message gives line and column), CONFIG_INVALID (a value breaks the schema: the
 * message names the key and where it can be set).
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { dirname, resolve } from 'node:path';
import { z } from 'zod';
import { CodedError } from '../../protocol/errors.js';
import { Limits } from '../../protocol/wire.js';
import { validMigrationId } from '../../protocol/page-codec.js';
import { parseSourceUrl } from '../../protocol/source-url.js';
import { blankComments, jsonErrorAt } from './json-error.js';

export type ConfigErrorCode = 'CONFIG_NOT_FOUND' | 'CONFIG_BAD_JSON' | 'CONFIG_INVALID';

export class ConfigError extends CodedError<ConfigErrorCode> {
  constructor(
    code: ConfigErrorCode,
    message: string,
    /** The config file, when the error came from one. */
    readonly file?: string,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

export interface HostPort {
  host: string;
  port: number;
}

/**
 * `host:port` or `[v6addr]:port` → {host, port}; null when malformed. Port 0 means "any free
 * port" (tests); the host is not resolved here.
 */
export function parseHostPort(s: string): HostPort | null {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:[\]]+)):(\d{1,5})$/.exec(s);
  if (!m) return null;
  const port = Number(m[3]);
  if (port > 65535) return null;
  return { host: (m[1] ?? m[2])!, port };
}

/** Loopback hosts: where the unauthenticated and plaintext modes may listen. */
export function isLoopbackHost(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

const hostPort = z.string().transform((s, ctx): HostPort => {
  const hp = parseHostPort(s);
  if (hp) return hp;
  ctx.addIssue({ code: 'custom', message: `expected host:port or [ipv6]:port, got "${s}"` });
  return z.NEVER;
});
/** `host:port`, or `off` (→ null). One transform rather than a union, for a precise message. */
const hostPortOrOff = z.string().transform((s, ctx): HostPort | null => {
  if (s === 'off') return null;
  const hp = parseHostPort(s);
  if (hp) return hp;
  ctx.addIssue({ code: 'custom', message: `expected host:port, [ipv6]:port or off, got "${s}"` });
  return z.NEVER;
});
/** A path, or `off` (→ null). */
const pathOrOff = z
  .string()
  .min(1)
  .max(107)
  .transform((s) => (s === 'off' ? null : s));
/** Permission bits written in octal, e.g. "0660". */
const octalMode = z
  .string()
  .regex(/^0?[0-7]{3}$/, 'expected permission bits in octal, e.g. 0660')
  .transform((s) => parseInt(s, 8));

const int = (min: number, max: number): z.ZodNumber => z.number().int().min(min).max(max);
const safeUint = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const logLevel = z.enum(['debug', 'info', 'warn', 'error']);
/** Whole pages of 4 KiB, so a frame or window never splits the smallest page. */
const pageMultiple = (min: number, max: number): z.ZodNumber =>
  int(min, max).multipleOf(4096, 'must be a multiple of 4096 bytes');
const timeoutMs = int(1, 3_600_000);
const uidList = z.array(int(0, 2 ** 32 - 2)).max(256);

/** An allowedSources entry: an address, a CIDR, or a host name. */
function validAllowEntry(entry: string): boolean {
  const [ip, bits, more] = entry.split('/');
  if (ip && isIP(ip)) {
    if (bits === undefined) return true;
    const n = Number(bits);
    const max = isIP(ip) === 6 ? 128 : 32;
    return more === undefined && /^\d{1,3}$/.test(bits) && n >= 0 && n <= max;
  }
  return bits === undefined && /^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$/.test(entry);
}
const allowEntry = z
  .string()
  .refine(validAllowEntry, 'expected an address, a CIDR (10.0.0.0/8) or a host name');

/**
 * One Firecracker socket of the dest: Firecracker restores a snapshot with
 * `"mem_backend": {"backend_type": "Uffd", "backend_path": <socket>}`, and the dest serves its
 * memory from a local memory file (`memFile`) or from a `yabusame source` (`source`,
 * `migrationId`, `secretFile`).
 */
export const FirecrackerSocketSchema = z
  .strictObject({
    socket: z.string().min(1).max(107),
    /** The snapshot's memory file on this host. */
    memFile: z.string().min(1).optional(),
    /** Or the `yabusame source` serving it (ws:// or wss://, host and port)... */
    source: z.string().min(1).max(2048).optional(),
    /** ...its migration id there... */
    migrationId: z
      .string()
      .refine(validMigrationId, 'migration id: 1-128 of [A-Za-z0-9._:-]')
      .optional(),
    /** ...and a file holding the migration's secret (hex, mode 0600). */
    secretFile: z.string().min(1).optional(),
    /** The sessions' id in logs and status (memFile; default derived from the socket path). */
    id: z.string().refine(validMigrationId, 'id: 1-128 of [A-Za-z0-9._:-]').optional(),
    /** SIGKILL a Firecracker whose handshake is refused or whose session fails. */
    killOnFailure: z.boolean().default(false),
    /** Record the demand faults of a restore, and stream them first on the next (memFile). */
    prefetch: z.boolean().default(false),
    /** Where the working set is kept (default: the memory file's path + `.working-set.json`). */
    workingSetFile: z.string().min(1).optional(),
    socketMode: octalMode.default(0o660),
    /** Group of the socket (a name or a gid); default the daemon's. */
    socketGroup: z.string().min(1).max(64).optional(),
  })
  .superRefine((f, ctx) => {
    const issue = (path: string, message: string): void =>
      ctx.addIssue({ code: 'custom', path: [path], message });
    if ((f.memFile === undefined) === (f.source === undefined)) {
      issue('memFile', 'give either memFile (a local file) or source (a yabusame source)');
    }
    if (f.source !== undefined) {
      try {
        parseSourceUrl(f.source);
      } catch (err) {
        issue('source', (err as Error).message);
      }
      if (f.migrationId === undefined) issue('migrationId', 'source needs migrationId');
      for (const k of ['prefetch', 'workingSetFile', 'id'] as const) {
        if (f[k] !== undefined && f[k] !== false) issue(k, `${k} goes with memFile`);
      }
    } else {
      for (const k of ['migrationId', 'secretFile'] as const) {
        if (f[k] !== undefined) issue(k, `${k} goes with source`);
      }
    }
  });
export type FirecrackerSocketEntry = z.output<typeof FirecrackerSocketSchema>;

export const DestConfigSchema = z.strictObject({
  /** The handoff socket (ignored when systemd passes it by socket activation). */
  socket: z.string().min(1).max(107).default('/run/yabusame/dest.sock'),
  socketMode: octalMode.default(0o660),
  /** Group of the handoff socket (a name or a gid): the VMMs' group. Default the daemon's. */
  socketGroup: z.string().min(1).max(64).optional(),
  /** Where /metrics and /healthz are served, or "off". */
  metricsListen: hostPortOrOff.default({ host: '127.0.0.1', port: 9464 }),
  /** Where /v1/sessions (migration details) is served, or "off". */
  controlSocket: pathOrOff.default('/run/yabusame/dest-control.sock'),
  controlSocketMode: octalMode.default(0o660),
  /** Group of the control socket (a name or a gid); default the daemon's. */
  controlSocketGroup: z.string().min(1).max(64).optional(),
  /** Concurrent sessions. */
  maxSessions: int(1, 1024).default(64),
  /** Peers whose uid or gid (SO_PEERCRED) is listed may hand over; default root and ourselves. */
  allowedUids: uidList.optional(),
  allowedGids: uidList.optional(),
  maxSessionsPerUid: int(1, 1024).default(16),
  maxPendingHandoffs: int(1, 4096).default(64),
  maxPendingHandoffsPerUid: int(1, 4096).default(8),
  /** From accepting a VMM connection to a complete, valid handoff message. */
  handoffTimeoutMs: timeoutMs.default(5000),
  /** Connecting both channels to the source (ws open + HELLO answered). */
  connectTimeoutMs: timeoutMs.default(5000),
  /** From the last page placed to the source acknowledging completion. */
  completeTimeoutMs: timeoutMs.default(10_000),
  /** Background bytes in flight (requested but not yet placed): the flow-control window. */
  backgroundWindowBytes: pageMultiple(64 * KiB, 1 * GiB).default(16 * MiB),
  /**
   * Nice value of the bulk thread that receives background pages (0-19; faults, demand pages
   * and every placement stay on the main thread). Raise it to favour the guest's own CPU time
   * over finishing the migration.
   */
  bulkThreadNice: int(0, 19).default(0),
  /** Hold the background stream back this long after a session starts (benchmarks). */
  backgroundDelayMs: int(0, 3_600_000).default(0),
  /**
   * A fault that continues a sweep (it lies where an earlier fault's request ended) asks a remote
   * source also for the missing pages right after it, up to this many bytes, answered after the
   * faulting page; the window doubles with each further fault of the same sweep, up to 16 times
   * this and at most 1 MiB (prefetch.ts has the measurements behind the default). 0 turns it off.
   */
  demandPrefetchBytes: int(0, 1 * MiB).default(64 * KiB),
  /** How long a lost connection to the source may stay down before the session fails. */
  reconnectTimeoutMs: timeoutMs.default(120_000),
  /** ws ping interval on both channels; a missed pong closes the channel. 0 disables. */
  heartbeatMs: int(0, 3_600_000).default(5000),
  /** Interval of `progress` replies to the VMM; progress logs: every 10 s, or this if longer. */
  progressIntervalMs: int(10, 3_600_000).default(1000),
  /** CAs to verify wss sources with (PEM); default the system's. */
  sourceCaFile: z.string().min(1).optional(),
  /** A client certificate for sources that require one (PEM), with its key. */
  clientCertFile: z.string().min(1).optional(),
  clientKeyFile: z.string().min(1).optional(),
  /** Sources the dest may connect to: CIDRs, addresses and host names; empty: any. */
  allowedSources: z.array(allowEntry).max(256).default([]),
  /** Allow plaintext ws:// to sources that are not on this host. */
  allowPlaintextSources: z.boolean().default(false),
  /** No migration secrets: handoffs need none, sources must be on loopback. */
  insecureNoAuth: z.boolean().default(false),
  logLevel: logLevel.default('info'),
  /** Firecracker sockets, one Firecracker process at a time each (also: --firecracker-socket). */
  firecracker: z.array(FirecrackerSocketSchema).max(256).default([]),
});

const regionName = z.string().min(1).max(Limits.MAX_REGION_NAME_BYTES);

export const SourceRegionSchema = z.strictObject({
  name: regionName,
  /** Where the region starts in the migration's image address space (the handoff's `offset`). */
  offset: safeUint,
  sizeBytes: safeUint.min(1),
  /** Where the region's bytes start in the image file. */
  fileOffset: safeUint,
  /** 4096, or a huge page size (a power of two). */
  pageSizeBytes: safeUint
    .min(4096)
    .max(GiB)
    .refine((n) => (n & (n - 1)) === 0, 'must be a power of two'),
});
export type SourceRegion = z.infer<typeof SourceRegionSchema>;

const MigrationSchema = z
  .strictObject({
    id: z.string().refine(validMigrationId, 'migration id: 1-128 of [A-Za-z0-9._:-]'),
    /** The memory image: a file beneath imageRoot (absolute, or relative to the root). */
    image: z.string().min(1),
    /** Default: one region `ram0` covering the whole file with 4 KiB pages. */
    regions: z.array(SourceRegionSchema).min(1).max(Limits.MAX_REGIONS).optional(),
    /**
     * The VM is already stopped: the image may be served at once. When false, requests wait
     * until the migration is marked frozen (never serve stale pages).
     */
    frozen: z.boolean().default(false),
    /** A file holding the migration's secret (hex); absent: one is generated and printed. */
    secretFile: z.string().min(1).optional(),
    /**
     * The source QEMU's QMP socket (a UNIX socket path): the source follows it and marks the
     * migration frozen when QEMU stops the VM for its migration.
     */
    qmp: z.string().min(1).max(107).optional(),
  })
  .superRefine((m, ctx) => {
    const regions = m.regions ?? [];
    regions.forEach((r, i) => {
      for (const key of ['offset', 'sizeBytes', 'fileOffset'] as const) {
        if (r[key] % r.pageSizeBytes !== 0) {
          ctx.addIssue({
            code: 'custom',
            path: ['regions', i, key],
            message: `must be a multiple of pageSizeBytes (${r.pageSizeBytes})`,
          });
        }
      }
    });
    const names = new Set<string>();
    regions.forEach((r, i) => {
      if (names.has(r.name)) {
        ctx.addIssue({ code: 'custom', path: ['regions', i, 'name'], message: 'duplicate name' });
      }
      names.add(r.name);
    });
    const sorted = regions.map((r, i) => ({ r, i })).sort((a, b) => a.r.offset - b.r.offset);
    for (let k = 1; k < sorted.length; k++) {
      const prev = sorted[k - 1]!.r;
      const cur = sorted[k]!;
      if (prev.offset + prev.sizeBytes > cur.r.offset) {
        ctx.addIssue({
          code: 'custom',
          path: ['regions', cur.i, 'offset'],
          message: `overlaps region ${prev.name} in the image address space`,
        });
      }
    }
  });

export const SourceConfigSchema = z
  .strictObject({
    /** The page server. */
    listen: hostPort.default({ host: '127.0.0.1', port: 7070 }),
    /** Serve wss with this certificate chain and key (PEM). */
    tlsCertFile: z.string().min(1).optional(),
    tlsKeyFile: z.string().min(1).optional(),
    /** Require a client certificate signed by these CAs (PEM). */
    tlsClientCaFile: z.string().min(1).optional(),
    /** With TLS, where background connections are served (default: listen's port + 1). */
    backgroundListen: hostPort.optional(),
    /** Serve plaintext ws off loopback (secrets are still required). */
    allowPlaintext: z.boolean().default(false),
    /** No migration secrets; the page server must listen on loopback. */
    insecureNoAuth: z.boolean().default(false),
    /** The one directory images are read from. */
    imageRoot: z.string().min(1).default('/var/lib/yabusame/images'),
    /** Migrations registered at once. */
    maxMigrations: int(1, 4096).default(64),
    /** The control API's UNIX socket, or "off". */
    controlSocket: pathOrOff.default('/run/yabusame/source.sock'),
    controlSocketMode: octalMode.default(0o660),
    controlSocketGroup: z.string().min(1).max(64).optional(),
    /** The control API on TCP too (every request with the bearer token), or "off". */
    controlListen: hostPortOrOff.default(null),
    /** The bearer token for controlListen: a file only its owner can read. */
    controlTokenFile: z.string().min(1).optional(),
    /** Where /metrics and /healthz are served, or "off". */
    metricsListen: hostPortOrOff.default({ host: '127.0.0.1', port: 9465 }),
    /** Largest background DATA frame, bytes (contiguous runs go out in one frame up to this). */
    backgroundFrameBytes: pageMultiple(4096, 16 * MiB).default(256 * KiB),
    /**
     * Nice value of the bulk thread that streams background pages (0-19; demand answers stay on
     * the main thread).
     */
    bulkThreadNice: int(0, 19).default(0),
    /** Exit once every configured migration has completed (one-shot use, demos). */
    exitWhenDone: z.boolean().default(false),
    logLevel: logLevel.default('info'),
    migrations: z.array(MigrationSchema).max(1024).default([]),
  })
  .superRefine((c, ctx) => {
    const ids = new Set<string>();
    c.migrations.forEach((m, i) => {
      if (ids.has(m.id)) {
        ctx.addIssue({ code: 'custom', path: ['migrations', i, 'id'], message: 'duplicate id' });
      }
      ids.add(m.id);
    });
    if ((c.tlsCertFile === undefined) !== (c.tlsKeyFile === undefined)) {
      ctx.addIssue({
        code: 'custom',
        path: ['tlsKeyFile'],
        message: 'tlsCertFile and tlsKeyFile go together',
      });
    }
    if (c.controlListen && !c.controlTokenFile) {
      ctx.addIssue({
        code: 'custom',
        path: ['controlTokenFile'],
        message: 'controlListen needs controlTokenFile (the bearer token)',
      });
    }
  });

export type DestConfig = z.output<typeof DestConfigSchema>;
export type SourceConfig = z.output<typeof SourceConfigSchema>;
export type SourceMigration = SourceConfig['migrations'][number];

// --- keys: flags, environment variables, help ---

/** How a key's text (a flag's or an environment variable's) becomes its value. */
type Kind = 'string' | 'int' | 'bool' | 'strings' | 'ints';

export interface KeySpec {
  /** The JSON name. */
  key: string;
  kind: Kind;
  /** What the value looks like in --help. */
  arg?: string;
  help: string;
}

/** `maxSessions` → `--max-sessions`. */
export const flagOf = (key: string): string =>
  `--${key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
/** `maxSessions` → `YABUSAME_MAX_SESSIONS`. */
export const envOf = (key: string): string =>
  `YABUSAME_${key.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`;

export const DEST_KEYS: readonly KeySpec[] = [
  {
    key: 'socket',
    kind: 'string',
    arg: 'PATH',
    help: 'handoff socket (default /run/yabusame/dest.sock); systemd socket activation overrides it',
  },
  { key: 'socketMode', kind: 'string', arg: 'OCTAL', help: 'its permission bits (default 0660)' },
  { key: 'socketGroup', kind: 'string', arg: 'GROUP', help: 'its group: the VMMs (default ours)' },
  {
    key: 'metricsListen',
    kind: 'string',
    arg: 'H:P|off',
    help: '/metrics and /healthz (default 127.0.0.1:9464)',
  },
  {
    key: 'controlSocket',
    kind: 'string',
    arg: 'PATH|off',
    help: '/v1/sessions and /healthz (default /run/yabusame/dest-control.sock)',
  },
  {
    key: 'controlSocketMode',
    kind: 'string',
    arg: 'OCTAL',
    help: 'its permission bits (default 0660)',
  },
  { key: 'controlSocketGroup', kind: 'string', arg: 'GROUP', help: 'its group (a name or a gid)' },
  { key: 'maxSessions', kind: 'int', arg: 'N', help: 'concurrent migrations (default 64)' },
  {
    key: 'allowedUids',
    kind: 'ints',
    arg: 'UID,..',
    help: 'peers that may hand over, by uid (default 0 and our own)',
  },
  {
    key: 'allowedGids',
    kind: 'ints',
    arg: 'GID,..',
    help: '... or by primary gid (default our own)',
  },
  {
    key: 'maxSessionsPerUid',
    kind: 'int',
    arg: 'N',
    help: 'migrations one uid may run at once (default 16)',
  },
  {
    key: 'maxPendingHandoffs',
    kind: 'int',
    arg: 'N',
    help: 'handoffs being read at once (default 64)',
  },
  { key: 'maxPendingHandoffsPerUid', kind: 'int', arg: 'N', help: '... per uid (default 8)' },
  {
    key: 'handoffTimeoutMs',
    kind: 'int',
    arg: 'MS',
    help: 'a handoff line must arrive within (default 5000)',
  },
  {
    key: 'connectTimeoutMs',
    kind: 'int',
    arg: 'MS',
    help: 'connecting to a source (default 5000)',
  },
  {
    key: 'completeTimeoutMs',
    kind: 'int',
    arg: 'MS',
    help: "waiting for the source's COMPLETE (default 10000)",
  },
  {
    key: 'backgroundWindowBytes',
    kind: 'int',
    arg: 'BYTES',
    help: 'background bytes in flight per VM, at most (default 16 MiB; VMs share 16 MiB)',
  },
  {
    key: 'bulkThreadNice',
    kind: 'int',
    arg: '0-19',
    help: 'nice value of the background thread (default 0)',
  },
  {
    key: 'backgroundDelayMs',
    kind: 'int',
    arg: 'MS',
    help: 'hold the background stream back (default 0; not a recorded working set)',
  },
  {
    key: 'demandPrefetchBytes',
    kind: 'int',
    arg: 'BYTES',
    help: 'a fault in a sweep also asks for the next BYTES, doubling as it goes on, to 16x and 1 MiB at most (default 65536; 0 off)',
  },
  {
    key: 'reconnectTimeoutMs',
    kind: 'int',
    arg: 'MS',
    help: 'a lost source may stay down (default 120000)',
  },
  { key: 'heartbeatMs', kind: 'int', arg: 'MS', help: 'ws ping interval, 0 off (default 5000)' },
  {
    key: 'progressIntervalMs',
    kind: 'int',
    arg: 'MS',
    help: 'progress replies to the VMM (default 1000; logs every 10 s)',
  },
  {
    key: 'sourceCaFile',
    kind: 'string',
    arg: 'PEM',
    help: "CAs that sign sources' certificates (default the system's)",
  },
  {
    key: 'clientCertFile',
    kind: 'string',
    arg: 'PEM',
    help: 'our client certificate, for sources that require one',
  },
  { key: 'clientKeyFile', kind: 'string', arg: 'PEM', help: 'its key' },
  {
    key: 'allowedSources',
    kind: 'strings',
    arg: 'CIDR|HOST,..',
    help: 'sources we may connect to (default any)',
  },
  { key: 'allowPlaintextSources', kind: 'bool', help: 'allow ws:// to sources off this host' },
  {
    key: 'insecureNoAuth',
    kind: 'bool',
    help: 'INSECURE: no migration secrets; loopback sources only',
  },
  {
    key: 'logLevel',
    kind: 'string',
    arg: 'LEVEL',
    help: 'debug | info | warn | error (default info)',
  },
];

export const SOURCE_KEYS: readonly KeySpec[] = [
  { key: 'listen', kind: 'string', arg: 'H:P', help: 'the page server (default 127.0.0.1:7070)' },
  { key: 'tlsCertFile', kind: 'string', arg: 'PEM', help: 'serve wss with this certificate chain' },
  { key: 'tlsKeyFile', kind: 'string', arg: 'PEM', help: 'its key' },
  {
    key: 'tlsClientCaFile',
    kind: 'string',
    arg: 'PEM',
    help: 'require client certificates signed by these CAs',
  },
  {
    key: 'backgroundListen',
    kind: 'string',
    arg: 'H:P',
    help: "with TLS, background connections (default listen's port + 1)",
  },
  {
    key: 'allowPlaintext',
    kind: 'bool',
    help: 'serve plaintext ws off loopback (secrets still required)',
  },
  { key: 'insecureNoAuth', kind: 'bool', help: 'INSECURE: no migration secrets; loopback only' },
  {
    key: 'imageRoot',
    kind: 'string',
    arg: 'DIR',
    help: 'images are read beneath it only (default /var/lib/yabusame/images)',
  },
  {
    key: 'maxMigrations',
    kind: 'int',
    arg: 'N',
    help: 'migrations registered at once (default 64)',
  },
  {
    key: 'controlSocket',
    kind: 'string',
    arg: 'PATH|off',
    help: 'the control API (default /run/yabusame/source.sock)',
  },
  {
    key: 'controlSocketMode',
    kind: 'string',
    arg: 'OCTAL',
    help: 'its permission bits (default 0660)',
  },
  { key: 'controlSocketGroup', kind: 'string', arg: 'GROUP', help: 'its group (a name or a gid)' },
  {
    key: 'controlListen',
    kind: 'string',
    arg: 'H:P|off',
    help: 'the control API on TCP too (default off)',
  },
  {
    key: 'controlTokenFile',
    kind: 'string',
    arg: 'FILE',
    help: 'its bearer token (a file of mode 0600)',
  },
  {
    key: 'metricsListen',
    kind: 'string',
    arg: 'H:P|off',
    help: '/metrics and /healthz (default 127.0.0.1:9465)',
  },
  {
    key: 'backgroundFrameBytes',
    kind: 'int',
    arg: 'BYTES',
    help: 'largest background frame (default 256 KiB)',
  },
  {
    key: 'bulkThreadNice',
    kind: 'int',
    arg: '0-19',
    help: 'nice value of the background thread (default 0)',
  },
  { key: 'exitWhenDone', kind: 'bool', help: 'exit 0 once every configured migration completed' },
  {
    key: 'logLevel',
    kind: 'string',
    arg: 'LEVEL',
    help: 'debug | info | warn | error (default info)',
  },
];

/** parseArgs options for `keys` (every value as text; converted by loadConfig). */
export function keyOptions(
  keys: readonly KeySpec[],
): Record<string, { type: 'string' | 'boolean' }> {
  return Object.fromEntries(
    keys.map((k) => [flagOf(k.key).slice(2), { type: k.kind === 'bool' ? 'boolean' : 'string' }]),
  );
}

/** The --help lines of `keys`, after `lead` rows of other options ([flag, help]), aligned. */
export function keysHelp(
  keys: readonly KeySpec[],
  lead: ReadonlyArray<readonly [string, string]> = [],
): string {
  const rows = [
    ...lead,
    ...keys.map((k) => [`${flagOf(k.key)}${k.arg ? ` ${k.arg}` : ''}`, k.help] as const),
  ];
  const width = Math.max(...rows.map(([f]) => f.length)) + 2;
  return rows.map(([f, h]) => `  ${f.padEnd(width)}${h}`).join('\n');
}

function convert(spec: KeySpec, text: string | boolean, where: string): unknown {
  if (typeof text === 'boolean') return text;
  switch (spec.kind) {
    case 'string':
      return text;
    case 'bool':
      if (/^(1|true|yes|on)$/i.test(text)) return true;
      if (/^(0|false|no|off)$/i.test(text)) return false;
      throw new ConfigError('CONFIG_INVALID', `${where}: expected true or false, got "${text}"`);
    case 'int': {
      const n = Number(text);
      if (text.trim() === '' || !Number.isInteger(n)) {
        throw new ConfigError('CONFIG_INVALID', `${where}: expected an integer, got "${text}"`);
      }
      return n;
    }
    case 'strings':
      return text === '' ? [] : text.split(',').map((s) => s.trim());
    case 'ints':
      return (text === '' ? [] : text.split(',')).map((s) => {
        const n = Number(s);
        if (!Number.isInteger(n)) {
          throw new ConfigError('CONFIG_INVALID', `${where}: expected integers, got "${text}"`);
        }
        return n;
      });
  }
}

/** Where a key comes from, for messages: the flag, the variable and the file key. */
const sources = (spec: KeySpec): string => `${spec.key} (${flagOf(spec.key)}, ${envOf(spec.key)})`;

function readJson(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError('CONFIG_NOT_FOUND', `config ${file}: cannot read`, file, { cause: err });
  }
  // Comments are allowed (the example configs are commented); positions stay those of the file.
  text = blankComments(text);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    const at = jsonErrorAt(text);
    const where = at ? `line ${at.line}, column ${at.column}: ${at.message}` : 'not valid JSON';
    throw new ConfigError('CONFIG_BAD_JSON', `config ${file}: ${where}`, file, { cause: err });
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new ConfigError('CONFIG_INVALID', `config ${file}: (root): expected an object`, file);
  }
  return json as Record<string, unknown>;
}

function validate<S extends z.ZodType>(
  schema: S,
  input: unknown,
  keys: readonly KeySpec[],
  file?: string,
): z.output<S> {
  const parsed = schema.safeParse(input);
  if (parsed.success) return parsed.data;
  const where = file ? `config ${file}` : 'config';
  const detail = parsed.error.issues
    .map((issue) => {
      const path = issue.path.join('.') || '(root)';
      const spec = keys.find((k) => k.key === issue.path[0]);
      const named = spec && issue.path.length === 1 ? sources(spec) : path;
      return `${named}: ${issue.message}`;
    })
    .join('; ');
  throw new ConfigError('CONFIG_INVALID', `${where}: ${detail}`, file, { cause: parsed.error });
}

/** Where a daemon's settings come from (flags as parseArgs gave them). */
export interface ConfigInput {
  file?: string | undefined;
  flags?: Record<string, string | boolean | undefined>;
  env?: Readonly<Record<string, string | undefined>>;
  /** Values the CLI computed itself (e.g. --migration specs), laid over the rest. */
  extra?: Record<string, unknown>;
  /** List entries the CLI built from flags, appended to the file's list of that key. */
  append?: Record<string, unknown[]>;
}

/** Defaults < file < environment < flags < extra, then the schema. */
function load<S extends z.ZodType>(
  schema: S,
  keys: readonly KeySpec[],
  input: ConfigInput,
  adjustFile?: (json: Record<string, unknown>, file: string) => void,
): z.output<S> {
  const merged: Record<string, unknown> = input.file ? readJson(input.file) : {};
  if (input.file) adjustFile?.(merged, input.file);
  const env = input.env ?? {};
  for (const spec of keys) {
    const text = env[envOf(spec.key)];
    if (text !== undefined) merged[spec.key] = convert(spec, text, envOf(spec.key));
  }
  for (const spec of keys) {
    const value = input.flags?.[flagOf(spec.key).slice(2)];
    if (value !== undefined) merged[spec.key] = convert(spec, value, flagOf(spec.key));
  }
  Object.assign(merged, input.extra ?? {});
  for (const [key, items] of Object.entries(input.append ?? {})) {
    const before = merged[key];
    merged[key] = [...(Array.isArray(before) ? before : []), ...items];
  }
  return validate(schema, merged, keys, input.file);
}

/** The paths of Firecracker entries in a config file are relative to its folder. */
export function loadDestConfig(input: ConfigInput = {}): DestConfig {
  return load(DestConfigSchema, DEST_KEYS, input, (json, file) => {
    if (!Array.isArray(json['firecracker'])) return;
    const dir = dirname(resolve(file));
    json['firecracker'] = json['firecracker'].map((f: unknown) => {
      if (!f || typeof f !== 'object') return f;
      const out: Record<string, unknown> = { ...f };
      for (const k of ['socket', 'memFile', 'secretFile', 'workingSetFile']) {
        if (typeof out[k] === 'string') out[k] = resolve(dir, out[k]);
      }
      return out;
    });
  });
}

/**
 * Secret files and QMP sockets named in a config file are relative to its folder (images, to
 * imageRoot).
 */
export function loadSourceConfig(input: ConfigInput = {}): SourceConfig {
  return load(SourceConfigSchema, SOURCE_KEYS, input, (json, file) => {
    if (!Array.isArray(json['migrations'])) return;
    const dir = dirname(resolve(file));
    json['migrations'] = json['migrations'].map((m: unknown) => {
      if (!m || typeof m !== 'object') return m;
      const out: Record<string, unknown> = { ...m };
      if (typeof out['secretFile'] === 'string')
        out['secretFile'] = resolve(dir, out['secretFile']);
      if (typeof out['qmp'] === 'string') out['qmp'] = resolve(dir, out['qmp']);
      return out;
    });
  });
}

/** The keys `--migration` accepts: id=ID,image=PATH[,frozen][,secret-file=FILE][,qmp=PATH]. */
const MIGRATION_SPEC_KEYS = new Set(['id', 'image', 'frozen', 'secret-file', 'qmp']);

/** Parses one `--migration` value; unknown keys are errors (a typo must not pass silently). */
export function parseMigrationSpec(spec: string): z.input<typeof MigrationSchema> {
  const out: Record<string, string | true> = {};
  for (const part of spec.split(',')) {
    const eq = part.indexOf('=');
    const k = eq < 0 ? part : part.slice(0, eq);
    if (!MIGRATION_SPEC_KEYS.has(k)) {
      throw new ConfigError(
        'CONFIG_INVALID',
        `--migration: unknown key "${k}" in "${spec}" (id=ID,image=PATH[,frozen][,secret-file=FILE][,qmp=PATH])`,
      );
    }
    out[k] = eq < 0 ? true : part.slice(eq + 1);
  }
  if (typeof out['id'] !== 'string' || typeof out['image'] !== 'string') {
    throw new ConfigError('CONFIG_INVALID', `--migration needs id=ID,image=PATH, got "${spec}"`);
  }
  if (out['frozen'] !== undefined && out['frozen'] !== true) {
    throw new ConfigError('CONFIG_INVALID', `--migration: "frozen" takes no value, in "${spec}"`);
  }
  for (const k of ['secret-file', 'qmp']) {
    if (out[k] === true || out[k] === '') {
      throw new ConfigError('CONFIG_INVALID', `--migration: "${k}" needs a path, in "${spec}"`);
    }
  }
  return {
    id: out['id'],
    image: out['image'],
    frozen: out['frozen'] === true,
    ...(typeof out['secret-file'] === 'string' ? { secretFile: resolve(out['secret-file']) } : {}),
    ...(typeof out['qmp'] === 'string' ? { qmp: resolve(out['qmp']) } : {}),
  };
}

/**
 * A loaded config as a config file would say it (host:port strings, octal modes), for
 * --check-config and the start-up log line: what an operator can paste back.
 */
export function configText(config: DestConfig | SourceConfig): string {
  return JSON.stringify(
    config,
    (key, value: unknown) => {
      if (value && typeof value === 'object' && 'host' in value && 'port' in value) {
        return formatHostPort(value as HostPort);
      }
      if (value === null && /(Listen|Socket)$/.test(key)) return 'off';
      if (key.endsWith('Mode') && typeof value === 'number') {
        return `0${value.toString(8)}`;
      }
      return value;
    },
    2,
  );
}

/** `host:port`, IPv6 in brackets. */
export function formatHostPort(hp: HostPort): string {
  return hp.host.includes(':') ? `[${hp.host}]:${hp.port}` : `${hp.host}:${hp.port}`;
}
