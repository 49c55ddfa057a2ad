/**
 * Handoff protocol (VMM <-> `yabusame dest`, over a UNIX stream socket): newline-delimited JSON.
 * The VMM's first message is a HandoffRequest; the bytes of its first sendmsg carry exactly one
 * file descriptor (the userfaultfd) as SCM_RIGHTS. The daemon answers with HandoffReply lines
 * on the same connection until the migration ends. See protocol/README.md.
 */
import { z } from 'zod';
import { ProtocolError } from './errors.js';
import { Limits } from './wire.js';
import { validMigrationId } from './page-codec.js';
import { parseSecret, SECRET_MAX_BYTES } from './auth.js';
import { parseSourceUrl } from './source-url.js';

export const HANDOFF_VERSION = 1;
/** Largest handoff line the daemon reads, in bytes (newline included). */
export const MAX_HANDOFF_BYTES = 64 * 1024;

const safeInt = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);

export const HandoffRegion = z.strictObject({
  /** Label for logs, e.g. "ram0" or "pc.ram". */
  name: z.string().min(1).max(Limits.MAX_REGION_NAME_BYTES).optional(),
  /** Host virtual address of the region in the VMM, bytes. */
  base: safeInt,
  /** Region length, bytes. */
  sizeBytes: safeInt.min(1),
  /** Where the region starts in the source's image address space, bytes. */
  offset: safeInt,
  /** Page size, bytes (4096, or a huge page size); checked by checkRegions. */
  pageSizeBytes: safeInt,
});
export type HandoffRegion = z.infer<typeof HandoffRegion>;

export const HandoffRequest = z.strictObject({
  type: z.literal('handoff'),
  version: z.literal(HANDOFF_VERSION),
  migrationId: z.string().refine(validMigrationId, 'migration id: 1-128 of [A-Za-z0-9._:-]'),
  /** ws:// or wss:// URL of `yabusame source`: host and port only (source-url.ts). */
  source: z.string().max(2048),
  /**
   * The migration's secret (lowercase hex, 16..64 bytes): the dest proves it to the source on
   * every connection (auth.ts). Never logged, never shown.
   */
  secret: z
    .string()
    .max(2 * SECRET_MAX_BYTES)
    .optional(),
  regions: z.array(HandoffRegion).min(1).max(Limits.MAX_REGIONS),
  /**
   * This uffd was handed to a daemon before (which died): some pages may already be present and
   * faults it read are lost. The daemon wakes every range so blocked threads fault again.
   */
  resume: z.boolean().optional(),
});
export type HandoffRequest = z.infer<typeof HandoffRequest>;

export const HandoffReply = z.discriminatedUnion('type', [
  z.strictObject({ type: z.literal('ack'), migrationId: z.string(), totalPages: safeInt }),
  z.strictObject({
    type: z.literal('progress'),
    presentPages: safeInt,
    totalPages: safeInt,
  }),
  z.strictObject({
    type: z.literal('complete'),
    totalPages: safeInt,
    /** Data pages this daemon placed answering faults. */
    demandPages: safeInt,
    /** Data pages this daemon placed from the background stream. */
    backgroundPages: safeInt,
    /** Zero pages this daemon installed (zero runs and holes, from either channel). */
    zeroPages: safeInt,
    /** Pages found already present (placed before a resume, or by a racing delivery). */
    existedPages: safeInt,
    /** Pages the guest discarded (UFFD_EVENT_REMOVE) that never needed data. */
    discardedPages: safeInt,
  }),
  z.strictObject({ type: z.literal('error'), code: z.string(), message: z.string() }),
]);
export type HandoffReply = z.infer<typeof HandoffReply>;

/**
 * A power of two from 4 KiB to Limits.MAX_PAGE_BYTES (16 MiB): 4 KiB and 2 MiB pages; not 1 GiB
 * pages, which do not fit in one DATA frame (protocol/README.md, "Pages").
 */
function isPageSize(n: number): boolean {
  return n >= 4096 && n <= Limits.MAX_PAGE_BYTES && (n & (n - 1)) === 0;
}

/**
 * Checks what the schema cannot: each region is page-aligned in memory and in the image, its
 * page size a power of two, and no two regions overlap in memory or in the image.
 */
export function checkRegions(regions: readonly HandoffRegion[]): void {
  for (const r of regions) {
    const label = r.name ?? `0x${r.base.toString(16)}`;
    if (!isPageSize(r.pageSizeBytes)) {
      throw new ProtocolError(
        'HANDOFF_BAD_PAGE_SIZE',
        `region ${label}: page size ${r.pageSizeBytes} is not a power of two in [4 KiB, 16 MiB]`,
      );
    }
    if (r.base % r.pageSizeBytes || r.sizeBytes % r.pageSizeBytes || r.offset % r.pageSizeBytes) {
      throw new ProtocolError(
        'HANDOFF_UNALIGNED',
        `region ${label}: base, size and offset must be multiples of ${r.pageSizeBytes}`,
      );
    }
    // Ends must be exact numbers, or the overlap test below could round two regions apart.
    if (
      r.base + r.sizeBytes > Number.MAX_SAFE_INTEGER ||
      r.offset + r.sizeBytes > Number.MAX_SAFE_INTEGER
    ) {
      throw new ProtocolError('HANDOFF_INVALID', `region ${label}: ends beyond 2^53`);
    }
  }
  const overlaps = (key: 'base' | 'offset'): boolean => {
    const sorted = [...regions].sort((a, b) => a[key] - b[key]);
    return sorted.some((r, i) => i > 0 && sorted[i - 1]![key] + sorted[i - 1]!.sizeBytes > r[key]);
  };
  if (overlaps('base')) throw new ProtocolError('HANDOFF_OVERLAP', 'regions overlap in memory');
  if (overlaps('offset'))
    throw new ProtocolError('HANDOFF_OVERLAP', 'regions overlap in the image');
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Parses and validates one handoff line (without its newline). */
export function decodeHandoff(line: Uint8Array): HandoffRequest {
  if (line.byteLength >= MAX_HANDOFF_BYTES) {
    throw new ProtocolError(
      'HANDOFF_TOO_LARGE',
      `handoff line of ${line.byteLength} bytes; at most ${MAX_HANDOFF_BYTES - 1} plus newline`,
    );
  }
  let json: unknown;
  try {
    // fatal: invalid UTF-8 is bad JSON, not U+FFFD smuggled into names.
    json = JSON.parse(utf8.decode(line));
  } catch (err) {
    throw new ProtocolError('HANDOFF_BAD_JSON', 'handoff is not valid JSON', { cause: err });
  }
  const parsed = HandoffRequest.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue?.path.join('.') || '(root)';
    throw new ProtocolError('HANDOFF_INVALID', `handoff ${where}: ${issue?.message ?? 'invalid'}`);
  }
  parseSourceUrl(parsed.data.source);
  if (parsed.data.secret !== undefined && !parseSecret(parsed.data.secret)) {
    throw new ProtocolError('HANDOFF_INVALID', 'handoff secret: 16..64 bytes of lowercase hex');
  }
  checkRegions(parsed.data.regions);
  return parsed.data;
}

export function encodeHandoff(req: HandoffRequest): Buffer {
  return Buffer.from(JSON.stringify(req) + '\n', 'utf8');
}

export function encodeReply(reply: HandoffReply): Buffer {
  return Buffer.from(JSON.stringify(reply) + '\n', 'utf8');
}

/** Parses one reply line from the daemon (used by VMM-side clients). */
export function decodeReply(line: string): HandoffReply {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch (err) {
    throw new ProtocolError('HANDOFF_BAD_JSON', 'reply is not valid JSON', { cause: err });
  }
  const parsed = HandoffReply.safeParse(json);
  if (!parsed.success)
    throw new ProtocolError('HANDOFF_INVALID', `reply: ${parsed.error.issues[0]?.message}`);
  return parsed.data;
}
