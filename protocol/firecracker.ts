/**
 * Firecracker's handshake with an external page-fault handler (its `Uffd` memory backend): one
 * sendmsg carrying a compact JSON array of regions, with the userfaultfd as SCM_RIGHTS, no
 * newline, and nothing ever read back (protocol/README.md, "Firecracker handshake";
 * tests/fixtures/firecracker/README.md has the facts by release). Pure: bytes in, regions out.
 *
 * The fields by release (Firecracker's `GuestRegionUffdMapping`, serialised by serde_json):
 *   v1.1 - v1.6    base_host_virt_addr, size, offset
 *   v1.7 - v1.11   ... page_size_kib, which holds BYTES (4096 or 2097152) whatever its name says
 *   v1.12 -        ... page_size, page_size_kib (both the same value, in bytes)
 * Unknown fields are ignored (a later release may add some); missing or mistyped required ones,
 * bad page sizes and unaligned or overlapping regions are refused with the handoff codes.
 */
import { ProtocolError } from './errors.js';
import { checkRegions, MAX_HANDOFF_BYTES, type HandoffRegion } from './handoff.js';
import { Limits } from './wire.js';

/** Which release family sent a message, by the fields it carries. */
export type FirecrackerFormat = 'v1.1' | 'v1.7' | 'v1.12';

/** The page size of a v1.1 - v1.6 message, which carries none: those releases had no huge pages. */
export const FIRECRACKER_DEFAULT_PAGE_BYTES = 4096;

export interface FirecrackerHandshake {
  format: FirecrackerFormat;
  /**
   * The regions in the order Firecracker listed them (guest-physical order), named `region<i>`;
   * `offset` is the region's offset in the snapshot memory file.
   */
  regions: HandoffRegion[];
}

const isWs = (b: number): boolean => b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d;

/**
 * Where a complete message ends in `buf[0, len)`: the index just past the `]` that closes the
 * top-level array, or -1 while it is incomplete. Firecracker sends no newline and keeps its
 * socket open from v1.12 on, so the end of the array is the only end there is. Throws
 * HANDOFF_BAD_JSON as soon as the bytes cannot start an array.
 */
export function firecrackerMessageEnd(buf: Uint8Array, len: number): number {
  let depth = 0;
  let inString = false;
  let escaped = false;
  let started = false;
  for (let i = 0; i < len; i++) {
    const b = buf[i]!;
    if (!started) {
      if (isWs(b)) continue;
      if (b !== 0x5b /* [ */) {
        throw new ProtocolError(
          'HANDOFF_BAD_JSON',
          `a Firecracker handshake is a JSON array; it starts with byte 0x${b.toString(16).padStart(2, '0')}`,
        );
      }
      started = true;
      depth = 1;
      continue;
    }
    if (inString) {
      if (escaped) escaped = false;
      else if (b === 0x5c /* \ */) escaped = true;
      else if (b === 0x22 /* " */) inString = false;
      continue;
    }
    if (b === 0x22) inString = true;
    else if (b === 0x5b || b === 0x7b) depth++;
    else if (b === 0x5d || b === 0x7d) {
      depth--;
      if (depth === 0) return i + 1;
    }
  }
  return -1;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function field(o: Record<string, unknown>, name: string, i: number, required: boolean): number {
  const v = o[name];
  if (v === undefined && !required) return NaN;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw new ProtocolError(
      'HANDOFF_INVALID',
      v === undefined
        ? `region ${i}: "${name}" is missing`
        : `region ${i}: "${name}" must be a whole number from 0 to 2^53 - 1, got ${JSON.stringify(v)}`,
    );
  }
  return v;
}

/**
 * Decodes one Firecracker handshake (the bytes of its message, without anything after the
 * array) into regions. Throws ProtocolError: HANDOFF_TOO_LARGE, HANDOFF_BAD_JSON,
 * HANDOFF_INVALID (not an array of objects, a required field missing or not a whole number, a
 * region of size 0, over 64 regions), HANDOFF_BAD_PAGE_SIZE (not a power of two from 4 KiB to
 * 16 MiB, or page_size and page_size_kib differ), HANDOFF_UNALIGNED, HANDOFF_OVERLAP.
 */
export function decodeFirecrackerHandshake(bytes: Uint8Array): FirecrackerHandshake {
  if (bytes.byteLength > MAX_HANDOFF_BYTES) {
    throw new ProtocolError(
      'HANDOFF_TOO_LARGE',
      `a handshake of ${bytes.byteLength} bytes; at most ${MAX_HANDOFF_BYTES}`,
    );
  }
  let json: unknown;
  try {
    json = JSON.parse(utf8.decode(bytes));
  } catch (err) {
    throw new ProtocolError('HANDOFF_BAD_JSON', 'the handshake is not valid UTF-8 JSON', {
      cause: err,
    });
  }
  if (!Array.isArray(json)) {
    throw new ProtocolError('HANDOFF_INVALID', 'a Firecracker handshake is a JSON array');
  }
  if (json.length === 0 || json.length > Limits.MAX_REGIONS) {
    throw new ProtocolError(
      'HANDOFF_INVALID',
      `${json.length} regions; a handshake lists 1 to ${Limits.MAX_REGIONS}`,
    );
  }
  let format: FirecrackerFormat = 'v1.12';
  const regions = json.map((e: unknown, i): HandoffRegion => {
    if (e === null || typeof e !== 'object' || Array.isArray(e)) {
      throw new ProtocolError('HANDOFF_INVALID', `region ${i} is not a JSON object`);
    }
    const o = e as Record<string, unknown>;
    const base = field(o, 'base_host_virt_addr', i, true);
    const sizeBytes = field(o, 'size', i, true);
    const offset = field(o, 'offset', i, true);
    const pageSize = field(o, 'page_size', i, false);
    // Bytes, not KiB (Firecracker's HugePageConfig::page_size_kib returns 4096 or 2097152).
    const pageSizeKib = field(o, 'page_size_kib', i, false);
    if (sizeBytes === 0) throw new ProtocolError('HANDOFF_INVALID', `region ${i} has size 0`);
    if (!Number.isNaN(pageSize) && !Number.isNaN(pageSizeKib) && pageSize !== pageSizeKib) {
      throw new ProtocolError(
        'HANDOFF_BAD_PAGE_SIZE',
        `region ${i}: page_size ${pageSize} and page_size_kib ${pageSizeKib} differ (Firecracker sends the same bytes in both)`,
      );
    }
    // A message is as old as its oldest region says (Firecracker sends one shape throughout).
    if (Number.isNaN(pageSize)) format = Number.isNaN(pageSizeKib) ? 'v1.1' : minFormat(format);
    const pageSizeBytes = !Number.isNaN(pageSize)
      ? pageSize
      : !Number.isNaN(pageSizeKib)
        ? pageSizeKib
        : FIRECRACKER_DEFAULT_PAGE_BYTES;
    return { name: `region${i}`, base, sizeBytes, offset, pageSizeBytes };
  });
  checkRegions(regions);
  return { format, regions };
}

const minFormat = (f: FirecrackerFormat): FirecrackerFormat => (f === 'v1.1' ? 'v1.1' : 'v1.7');

/**
 * Whether a Firecracker of this format keeps its end of the socket open for the VM's lifetime
 * (v1.12 on: it leaks the fd on purpose), so that EOF means the process is gone. Earlier ones
 * close it right after sending: EOF then means nothing.
 */
export const keepsSocketOpen = (format: FirecrackerFormat): boolean => format === 'v1.12';

/**
 * The bytes Firecracker of `format` sends for `regions` (serde_json's compact output: keys in
 * declaration order, no spaces, no newline), for clients and tests that stand in for it.
 */
export function encodeFirecrackerHandshake(
  format: FirecrackerFormat,
  regions: ReadonlyArray<Pick<HandoffRegion, 'base' | 'sizeBytes' | 'offset' | 'pageSizeBytes'>>,
): Buffer {
  const items = regions.map((r) => {
    let s = `{"base_host_virt_addr":${r.base},"size":${r.sizeBytes},"offset":${r.offset}`;
    if (format === 'v1.12') s += `,"page_size":${r.pageSizeBytes}`;
    if (format !== 'v1.1') s += `,"page_size_kib":${r.pageSizeBytes}`;
    return s + '}';
  });
  return Buffer.from(`[${items.join(',')}]`, 'utf8');
}
