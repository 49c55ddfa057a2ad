/**
 * Test helpers shared by the protocol codec tests: a seeded PRNG (runs are reproducible: print
 * the seed, rerun with it), generators of random *valid* frames and handoffs, a generic encoder
 * over the Frame union, and a CRC-32 of our own (table-driven, independent of node:zlib) to check
 * and forge the checksums of DATA, ZERO and HAVE. Not a test file itself (tap runs *.test.js).
 */
import {
  encodeComplete,
  encodeCredit,
  encodeData,
  encodeError,
  encodeHave,
  encodeHello,
  encodeProgress,
  encodeRequest,
  encodeWelcome,
  encodeZero,
} from '../../protocol/page-codec.js';
import {
  Channel,
  FrameType,
  Limits,
  type Frame,
  type PageRange,
  type RegionInfo,
} from '../../protocol/wire.js';
import type { HandoffRequest } from '../../protocol/handoff.js';

/** CRC-32 as in zlib, gzip, PNG: reflected polynomial 0xEDB88320, init and final xor ~0. */
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

/** CRC-32 of the concatenation of `parts`. */
export function crc32(...parts: Uint8Array[]): number {
  let c = 0xffffffff;
  for (const part of parts) for (const b of part) c = CRC_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/**
 * The checksum a DATA, ZERO or HAVE message should carry, by the README's definition, and the
 * byte offset of its field; null for other types or messages too short to hold the field.
 */
export function expectedChecksum(msg: Uint8Array): { at: number; crc: number } | null {
  switch (msg[0]) {
    case FrameType.DATA:
      return msg.length >= 24
        ? { at: 16, crc: crc32(msg.subarray(0, 16), msg.subarray(24)) }
        : null;
    case FrameType.ZERO:
      return msg.length >= 20 ? { at: 16, crc: crc32(msg.subarray(0, 16)) } : null;
    case FrameType.HAVE:
      return msg.length >= 8 ? { at: 4, crc: crc32(msg.subarray(0, 4), msg.subarray(8)) } : null;
    default:
      return null;
  }
}

/** Rewrites the checksum field of a (possibly damaged) message to match its bytes, in place. */
export function reseal<T extends Uint8Array>(msg: T): T {
  const want = expectedChecksum(msg);
  if (want)
    new DataView(msg.buffer, msg.byteOffset, msg.byteLength).setUint32(want.at, want.crc, true);
  return msg;
}

/** mulberry32: small, fast, deterministic; good enough to drive a fuzzer. */
export class Rng {
  private state: number;
  constructor(seed: number) {
    this.state = seed >>> 0;
  }
  /** Uniform u32. */
  u32(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** Uniform integer in [0, n), n <= 2^32. */
  int(n: number): number {
    return Math.floor((this.u32() / 2 ** 32) * n);
  }
  /** Uniform integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  /** Uniform safe integer in [0, 2^53). */
  safe(): number {
    return this.int(2 ** 21) * 2 ** 32 + this.u32();
  }
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.u32() & 0xff;
    return out;
  }
}

const ID_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-';
const CODE_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_';
/** Pieces of text with 1-, 2-, 3- and 4-byte UTF-8 characters. */
const TEXT_PIECES = ['a', 'ram', ' ', 'é', 'ß', '日本', '€', '😀', '\n', '"', '\\'];
export const PAGE_SIZES = [4096, 8192, 16384, 65536, 2 ** 21, 2 ** 24] as const;

export function randomId(rng: Rng, maxLen: number = Limits.MAX_ID_BYTES): string {
  let id = '';
  const len = rng.chance(0.1) ? maxLen : rng.range(1, Math.min(24, maxLen));
  for (let i = 0; i < len; i++) id += rng.pick([...ID_CHARS]);
  return id;
}

/** Random text of at most maxBytes UTF-8 bytes. */
export function randomText(rng: Rng, maxBytes: number): string {
  let s = '';
  const target = rng.int(maxBytes + 1);
  for (;;) {
    const next = s + rng.pick(TEXT_PIECES);
    if (Buffer.byteLength(next) > target) return s;
    s = next;
  }
}

export function randomRegions(rng: Rng, count: number): RegionInfo[] {
  const regions: RegionInfo[] = [];
  let cursor = 0;
  for (let i = 0; i < count; i++) {
    const pageSizeBytes = rng.pick(PAGE_SIZES);
    const offset = Math.ceil(cursor / pageSizeBytes) * pageSizeBytes + rng.int(4) * pageSizeBytes;
    const sizeBytes = rng.range(1, 512) * pageSizeBytes;
    regions.push({ offset, sizeBytes, pageSizeBytes, name: randomText(rng, 64) });
    cursor = offset + sizeBytes;
  }
  return regions;
}

/** An offset and a length that end at or below 2^53 - 1, as the decoder demands. */
function range(rng: Rng, maxLen: number): { offset: number; length: number } {
  const length = rng.range(1, maxLen);
  const offset = Math.min(rng.safe(), Number.MAX_SAFE_INTEGER - length);
  return { offset, length };
}

/** A HAVE entry: u64 length >= 1, ending at or below 2^53 - 1. */
function haveRange(rng: Rng): PageRange {
  const length = rng.chance(0.7) ? rng.range(1, 2 ** 32 - 1) : Math.max(1, rng.safe());
  return { offset: Math.min(rng.safe(), Number.MAX_SAFE_INTEGER - length), length };
}

/** Every frame type, for generators. */
export const FRAME_TYPES: readonly number[] = Object.values(FrameType);

/** A random frame that the decoder must accept, of the given type or a random one. */
export function randomFrame(rng: Rng, type: number = rng.pick(FRAME_TYPES)): Frame {
  const channel = rng.pick([Channel.DEMAND, Channel.BACKGROUND]);
  switch (type) {
    case FrameType.HELLO:
      return {
        type: FrameType.HELLO,
        channel,
        version: rng.int(0x10000),
        migrationId: randomId(rng),
        auth: rng.bytes(rng.chance(0.1) ? Limits.MAX_AUTH_BYTES : rng.int(40)),
      };
    case FrameType.WELCOME:
      return {
        type: FrameType.WELCOME,
        channel,
        version: rng.int(0x10000),
        backgroundPort: rng.int(0x10000),
        nonce: rng.bytes(16),
        regions: randomRegions(rng, rng.chance(0.05) ? Limits.MAX_REGIONS : rng.range(1, 4)),
      };
    case FrameType.REQUEST: {
      const count = rng.chance(0.02) ? Limits.MAX_REQUEST_ENTRIES : rng.range(1, 8);
      const ranges = [];
      for (let i = 0; i < count; i++) ranges.push(range(rng, 2 ** 32 - 1));
      return { type: FrameType.REQUEST, ranges };
    }
    case FrameType.DATA: {
      const { offset, length } = range(rng, rng.chance(0.1) ? 8192 : 64);
      const flags = rng.int(256);
      const payload = rng.bytes(length);
      const header = Buffer.alloc(16);
      header.writeUInt8(FrameType.DATA, 0);
      header.writeUInt8(flags, 1);
      header.writeUInt32LE(length, 4);
      header.writeBigUInt64LE(BigInt(offset), 8);
      return { type: FrameType.DATA, flags, offset, checksum: crc32(header, payload), payload };
    }
    case FrameType.ZERO:
      return { type: FrameType.ZERO, flags: rng.int(256), ...range(rng, 2 ** 32 - 1) };
    case FrameType.HAVE: {
      const count = rng.chance(0.02)
        ? Limits.MAX_HAVE_ENTRIES
        : rng.chance(0.1)
          ? 0
          : rng.range(1, 8);
      const ranges = Array.from({ length: count }, () => haveRange(rng));
      return { type: FrameType.HAVE, flags: rng.int(256), ranges };
    }
    case FrameType.PROGRESS: {
      const totalBytes = rng.safe();
      return {
        type: FrameType.PROGRESS,
        flags: rng.int(256),
        sentBytes: rng.int(totalBytes + 1),
        totalBytes,
      };
    }
    case FrameType.CREDIT:
      return { type: FrameType.CREDIT, bytes: rng.u32() };
    case FrameType.COMPLETE:
      return { type: FrameType.COMPLETE, pages: rng.u32() };
    case FrameType.ERROR: {
      let code = '';
      const len = rng.range(1, Limits.MAX_ERROR_CODE_BYTES);
      for (let i = 0; i < len; i++) code += rng.pick([...CODE_CHARS]);
      return { type: FrameType.ERROR, code, message: randomText(rng, 1024) };
    }
    default:
      throw new RangeError(`no frame type ${type}`);
  }
}

/** Encodes any frame with the production encoders. */
export function encodeFrame(f: Frame): Buffer {
  switch (f.type) {
    case FrameType.HELLO:
      return encodeHello(f.channel, f.version, f.migrationId, f.auth);
    case FrameType.WELCOME:
      return encodeWelcome(f.channel, f.version, f.nonce, f.regions, f.backgroundPort);
    case FrameType.REQUEST:
      return encodeRequest(f.ranges);
    case FrameType.DATA:
      return encodeData(f.flags, f.offset, f.payload); // the checksum is always computed
    case FrameType.ZERO:
      return encodeZero(f.flags, f.offset, f.length);
    case FrameType.HAVE:
      return encodeHave(f.flags, f.ranges);
    case FrameType.PROGRESS:
      return encodeProgress(f.flags, f.sentBytes, f.totalBytes);
    case FrameType.CREDIT:
      return encodeCredit(f.bytes);
    case FrameType.COMPLETE:
      return encodeComplete(f.pages);
    case FrameType.ERROR:
      return encodeError(f.code, f.message);
  }
}

/** Byte arrays as hex, so frames compare by value whatever the array class. */
export function plain(f: Frame): Record<string, unknown> {
  return Object.fromEntries(
    Object.entries(f).map(([k, v]) => [
      k,
      v instanceof Uint8Array
        ? Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('hex')
        : v,
    ]),
  );
}

/**
 * A valid handoff request: 1..4 page-aligned regions, disjoint in memory and in the image;
 * sometimes a resumed one.
 */
export function randomHandoff(rng: Rng): HandoffRequest {
  const count = rng.range(1, 4);
  const regions: HandoffRequest['regions'] = [];
  let base = 0x7f0000000000;
  let offset = 0;
  for (let i = 0; i < count; i++) {
    const pageSizeBytes = rng.pick([4096, 2 ** 21]);
    base = Math.ceil(base / pageSizeBytes) * pageSizeBytes + rng.int(3) * pageSizeBytes;
    offset = Math.ceil(offset / pageSizeBytes) * pageSizeBytes;
    const sizeBytes = rng.range(1, 1024) * pageSizeBytes;
    const r: HandoffRequest['regions'][number] = { base, sizeBytes, offset, pageSizeBytes };
    if (rng.chance(0.5)) r.name = `ram${i}`;
    regions.push(r);
    base += sizeBytes;
    offset += sizeBytes;
  }
  const req: HandoffRequest = {
    type: 'handoff',
    version: 1,
    migrationId: randomId(rng),
    source: rng.pick(['ws://10.0.0.5:7070', 'wss://src.example:443', 'ws://[::1]:7070/']),
    regions,
  };
  if (rng.chance(0.3)) req.resume = rng.chance(0.7);
  return req;
}
