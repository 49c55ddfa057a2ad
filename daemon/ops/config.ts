/**
 * Configuration of both daemons: zod schemas, defaults, and loaders that read an optional JSON
 * file, lay CLI overrides over it, and validate once. Everything after this edge trusts the types.
 *
 * Errors carry a stable `code`: CONFIG_NOT_FOUND (the file cannot be read), CONFIG_BAD_JSON (not
 * JSON), CONFIG_INVALID (a value breaks the schema; the message names its path, e.g.
 * `migrations.0.regions.1.sizeBytes`).
 */
import { readFileSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { z } from 'zod';
import { Limits } from '../../protocol/wire.js';
import { validMigrationId } from '../../protocol/page-codec.js';

export type ConfigErrorCode = 'CONFIG_NOT_FOUND' | 'CONFIG_BAD_JSON' | 'CONFIG_INVALID';

export class ConfigError extends Error {
  readonly code: ConfigErrorCode;
  /** The config file, when the error came from one. */
  readonly file: string | undefined;
  constructor(code: ConfigErrorCode, message: string, file?: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'ConfigError';
    this.code = code;
    this.file = file;
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

const int = (min: number, max: number): z.ZodNumber => z.number().int().min(min).max(max);
const safeUint = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const logLevel = z.enum(['debug', 'info', 'warn', 'error']);
/** Whole pages of 4 KiB, so a frame or window never splits the smallest page. */
const pageMultiple = (min: number, max: number): z.ZodNumber =>
  int(min, max).multipleOf(4096, 'must be a multiple of 4096 bytes');
const timeoutMs = int(1, 3_600_000);

export const DestConfigSchema = z.strictObject({
  /** The handoff socket (ignored when systemd passes it by socket activation). */
  socketPath: z.string().min(1).max(107).default('/run/yabusame/dest.sock'),
  /** Where /metrics is served, or "off". Parsed to {host, port}; null = off. */
  metricsListen: hostPortOrOff.default({ host: '127.0.0.1', port: 9464 }),
  /**
   * Concurrent sessions. Each session's uffd is parked in systemd's fd store
   * (FileDescriptorStoreMax=1024 in yabusame-dest.service), hence the ceiling.
   */
  maxSessions: int(1, 1024).default(64),
  /** From accepting a VMM connection to a complete, valid handoff message. */
  handoffTimeoutMs: timeoutMs.default(5000),
  /** Connecting both channels to the source (ws open + HELLO answered). */
  connectTimeoutMs: timeoutMs.default(5000),
  /** From the last page placed to the source acknowledging completion. */
  completeTimeoutMs: timeoutMs.default(10_000),
  /** Background bytes in flight (requested but not yet placed): the flow-control window. */
  backgroundWindowBytes: pageMultiple(64 * KiB, 1 * GiB).default(8 * MiB),
  /**
   * Nice value of the bulk thread that receives and places background pages (0-19; faults and
   * demand pages stay on the main thread). 0, the default, competes fairly with busy vCPU
   * threads: measured with `npm run demo` (4 busy vCPUs, 1 GiB), nice 10 starved the stream and
   * made the migration take 12.3 s instead of 6.0 s. Raise it to favour the guest's own CPU
   * time over finishing the migration.
   */
  bulkThreadNice: int(0, 19).default(0),
  /**
   * Hold the background stream back for this long after a session starts: only faulting pages
   * move meanwhile. 0 (the default) streams at once; benchmarks use it to measure demand alone.
   */
  backgroundDelayMs: int(0, 3_600_000).default(0),
  /**
   * How long a lost connection to the source may stay down (reconnecting with backoff) before
   * the session fails. The guest's faulting threads wait meanwhile; they never get zero pages.
   */
  reconnectTimeoutMs: timeoutMs.default(120_000),
  /** ws ping interval on both channels; a missed pong closes the channel. 0 disables. */
  heartbeatMs: int(0, 3_600_000).default(5000),
  /** Interval of `progress` replies to the VMM and of progress logs. */
  progressIntervalMs: int(10, 3_600_000).default(1000),
  logLevel: logLevel.default('info'),
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
    /** The memory image: a file (e.g. QEMU's memory-backend-file on /dev/shm). */
    image: z.string().min(1),
    /** Default: one region `ram0` covering the whole file with 4 KiB pages (filled in by the loader). */
    regions: z.array(SourceRegionSchema).min(1).max(Limits.MAX_REGIONS).optional(),
    /**
     * The VM is already stopped: the image may be served at once. When false, requests wait
     * until the migration is marked frozen (never serve stale pages).
     */
    frozen: z.boolean().default(false),
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
    /** The ws page server. */
    listen: hostPort.default({ host: '127.0.0.1', port: 7070 }),
    /** Largest background DATA frame, bytes (contiguous runs go out in one frame up to this). */
    backgroundFrameBytes: pageMultiple(4096, 16 * MiB).default(256 * KiB),
    /**
     * Nice value of the bulk thread that streams background pages (0-19; demand answers stay on
     * the main thread). Raising it lets demand answers win the CPU from the stream, at the cost
     * of a slower stream when the host is busy.
     */
    bulkThreadNice: int(0, 19).default(0),
    /** Exit once every configured migration has completed (one-shot use, demos). */
    exitWhenDone: z.boolean().default(false),
    logLevel: logLevel.default('info'),
    /** Where /metrics is served, or "off" (the default: the source is often a one-shot). */
    metricsListen: hostPortOrOff.default(null),
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
  });

export type DestConfig = z.output<typeof DestConfigSchema>;
/** Source config after loading: every migration has its regions. */
export type SourceConfig = Omit<z.output<typeof SourceConfigSchema>, 'migrations'> & {
  migrations: SourceMigration[];
};
export type SourceMigration = Omit<z.output<typeof MigrationSchema>, 'regions'> & {
  regions: SourceRegion[];
};
/** What a config file or the CLI may say: every field optional, values as written (strings). */
export type DestConfigInput = z.input<typeof DestConfigSchema>;
export type SourceConfigInput = z.input<typeof SourceConfigSchema>;

/** Page size of the default region. */
export const DEFAULT_PAGE_SIZE_BYTES = 4096;

function readJson(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError('CONFIG_NOT_FOUND', `config ${file}: cannot read`, file, { cause: err });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError('CONFIG_BAD_JSON', `config ${file}: not valid JSON`, file, {
      cause: err,
    });
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    throw new ConfigError('CONFIG_INVALID', `config ${file}: (root): expected an object`, file);
  }
  return json as Record<string, unknown>;
}

/** Overrides win over the file; `undefined` means "not given" (an unset CLI flag). */
function merge(
  base: Record<string, unknown>,
  overrides: Record<string, unknown>,
): Record<string, unknown> {
  const out = { ...base };
  for (const [k, v] of Object.entries(overrides)) if (v !== undefined) out[k] = v;
  return out;
}

function validate<S extends z.ZodType>(schema: S, input: unknown, file?: string): z.output<S> {
  const parsed = schema.safeParse(input);
  if (parsed.success) return parsed.data;
  const where = file ? `config ${file}` : 'config';
  const detail = parsed.error.issues
    .map((issue) => `${issue.path.join('.') || '(root)'}: ${issue.message}`)
    .join('; ');
  throw new ConfigError('CONFIG_INVALID', `${where}: ${detail}`, file, { cause: parsed.error });
}

/** Reads `file` (if given), applies `overrides`, validates. Throws ConfigError. */
export function loadDestConfig(
  file?: string,
  overrides: Partial<DestConfigInput> = {},
): DestConfig {
  const base = file ? readJson(file) : {};
  return validate(DestConfigSchema, merge(base, overrides), file);
}

/**
 * Reads `file` (if given), applies `overrides`, validates, and fills in default regions.
 * Relative image paths in the file are relative to the file's folder; in overrides, to the
 * working directory. A migration without `regions` gets one region `ram0` covering the whole
 * image with 4 KiB pages, so its image must exist now and be a whole number of pages.
 */
export function loadSourceConfig(
  file?: string,
  overrides: Partial<SourceConfigInput> = {},
): SourceConfig {
  const base = file ? readJson(file) : {};
  if (file && Array.isArray(base['migrations'])) {
    const dir = dirname(resolve(file));
    base['migrations'] = base['migrations'].map((m: unknown) =>
      m && typeof m === 'object' && typeof (m as { image?: unknown }).image === 'string'
        ? { ...m, image: resolve(dir, (m as { image: string }).image) }
        : m,
    );
  }
  const parsed = validate(SourceConfigSchema, merge(base, overrides), file);
  const where = file ? `config ${file}` : 'config';
  const migrations = parsed.migrations.map((m, i): SourceMigration => {
    const image = resolve(m.image);
    if (m.regions) return { ...m, image, regions: m.regions };
    let sizeBytes: number;
    try {
      sizeBytes = statSync(image).size;
    } catch (err) {
      throw new ConfigError(
        'CONFIG_INVALID',
        `${where}: migrations.${i}.image: cannot stat ${image} to size its default region`,
        file,
        { cause: err },
      );
    }
    if (sizeBytes === 0 || sizeBytes % DEFAULT_PAGE_SIZE_BYTES !== 0) {
      throw new ConfigError(
        'CONFIG_INVALID',
        `${where}: migrations.${i}.image: ${sizeBytes} bytes is not a whole, non-zero number of ${DEFAULT_PAGE_SIZE_BYTES}-byte pages`,
        file,
      );
    }
    const ram0: SourceRegion = {
      name: 'ram0',
      offset: 0,
      sizeBytes,
      fileOffset: 0,
      pageSizeBytes: DEFAULT_PAGE_SIZE_BYTES,
    };
    return { ...m, image, regions: [ram0] };
  });
  return { ...parsed, migrations };
}
