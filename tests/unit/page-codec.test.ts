/**
 * Page protocol codec: hand-written hex fixtures (from the byte-layout tables of
 * protocol/README.md, so a layout change fails here; their checksums are checked with a CRC-32
 * of the test's own), round trips, a slow reference decoder compared with decodeFrame, truncation
 * at every byte, each malformed case by its code, every single-bit flip of a checksummed frame,
 * and the zero-copy promise for payloads.
 */
import { isDeepStrictEqual } from 'node:util';
import t from 'tap';
import { ProtocolError, FRAME_ERROR_CODES } from '../../protocol/errors.js';
import {
  decodeFrame,
  encodeComplete,
  encodeCredit,
  encodeData,
  encodeDataHeaderInto,
  encodeError,
  encodeHave,
  encodeHello,
  encodeProgress,
  encodeRequest,
  encodeWelcome,
  encodeZero,
  sourceReadSeconds,
  sourceSendSeconds,
  stampSourceTimes,
} from '../../protocol/page-codec.js';
import {
  Channel,
  DataFlag,
  FrameType,
  HaveFlag,
  HeaderSize,
  Limits,
  ProgressFlag,
  type Frame,
} from '../../protocol/wire.js';
import {
  crc32,
  encodeFrame,
  expectedChecksum,
  FRAME_TYPES,
  plain,
  randomFrame,
  reseal,
  Rng,
} from './protocol-gen.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');

/** The `t` of a subtest (tap's overloads end with the callback-only form). */
type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

/** Expects decodeFrame(bytes) to throw a ProtocolError with exactly this code. */
function rejects(t: Tap, bytes: Uint8Array, code: string, what: string): void {
  try {
    decodeFrame(bytes);
  } catch (err) {
    t.ok(err instanceof ProtocolError, `${what}: a ProtocolError`);
    t.equal((err as ProtocolError).code, code, what);
    return;
  }
  t.fail(`${what}: decoded, expected ${code}`);
}

interface Fixture {
  name: string;
  hex: string;
  frame: Frame;
  encode: () => Buffer;
}

const NONCE = Uint8Array.from({ length: 16 }, (_, i) => i);

// Every fixture is written from the layout tables, field by field, little-endian.
const fixtures: Fixture[] = [
  {
    name: 'HELLO',
    hex: `01 01 0100 5942534d 0200 0000 6d31`,
    frame: { type: 1, channel: 1, version: 1, migrationId: 'm1', auth: new Uint8Array(0) },
    encode: () => encodeHello(Channel.DEMAND, 1, 'm1'),
  },
  {
    name: 'HELLO with auth',
    hex: `01 02 0201 5942534d 0400 0200 766d2d37 aabb`,
    frame: {
      type: 1,
      channel: 2,
      version: 0x102,
      migrationId: 'vm-7',
      auth: Uint8Array.of(0xaa, 0xbb),
    },
    encode: () => encodeHello(Channel.BACKGROUND, 0x102, 'vm-7', Uint8Array.of(0xaa, 0xbb)),
  },
  {
    name: 'WELCOME',
    hex: `02 02 0100 0200 9f1b 000102030405060708090a0b0c0d0e0f
          0000000000000000 0000200000000000 00100000 0400 0000 72616d30
          0000000001000000 0000004000000000 00002000 0000 0000`,
    frame: {
      type: 2,
      channel: 2,
      version: 1,
      backgroundPort: 7071,
      nonce: NONCE,
      regions: [
        { offset: 0, sizeBytes: 0x200000, pageSizeBytes: 4096, name: 'ram0' },
        { offset: 2 ** 32, sizeBytes: 2 ** 30, pageSizeBytes: 2 ** 21, name: '' },
      ],
    },
    encode: () =>
      encodeWelcome(
        Channel.BACKGROUND,
        1,
        NONCE,
        [
          { offset: 0, sizeBytes: 0x200000, pageSizeBytes: 4096, name: 'ram0' },
          { offset: 2 ** 32, sizeBytes: 2 ** 30, pageSizeBytes: 2 ** 21, name: '' },
        ],
        7071,
      ),
  },
  {
    name: 'REQUEST',
    hex: `03 00 0200 00000000
          0010000000000000 00100000 00000000
          0090785634120000 00000200 00000000`,
    frame: {
      type: 3,
      ranges: [
        { offset: 0x1000, length: 0x1000 },
        { offset: 0x123456789000, length: 0x20000 },
      ],
    },
    encode: () =>
      encodeRequest([
        { offset: 0x1000, length: 0x1000 },
        { offset: 0x123456789000, length: 0x20000 },
      ]),
  },
  {
    // checksum: CRC-32 of `04 01 0000 04000000 0020000000000000 deadbeef`
    name: 'DATA',
    hex: `04 01 0000 04000000 0020000000000000 9a4faf99 00000000 deadbeef`,
    frame: {
      type: 4,
      flags: DataFlag.DEMAND,
      offset: 0x2000,
      checksum: 0x99af4f9a,
      payload: Uint8Array.of(0xde, 0xad, 0xbe, 0xef),
    },
    encode: () => encodeData(DataFlag.DEMAND, 0x2000, hex('deadbeef')),
  },
  {
    // checksum: CRC-32 of `05 00 0000 00000100 0030000000000000`
    name: 'ZERO',
    hex: `05 00 0000 00000100 0030000000000000 2f5843d1 00000000`,
    frame: { type: 5, flags: 0, offset: 0x3000, length: 0x10000 },
    encode: () => encodeZero(0, 0x3000, 0x10000),
  },
  {
    // checksum: CRC-32 of `0a 01 0200`, then the two entries
    name: 'HAVE',
    hex: `0a 01 0200 6446b4b2
          0010000000000000 0000100000000000
          0000000001000000 0000000000020000`,
    frame: {
      type: 10,
      flags: HaveFlag.LAST,
      ranges: [
        { offset: 0x1000, length: 0x100000 },
        { offset: 2 ** 32, length: 2 ** 41 },
      ],
    },
    encode: () =>
      encodeHave(HaveFlag.LAST, [
        { offset: 0x1000, length: 0x100000 },
        { offset: 2 ** 32, length: 2 ** 41 },
      ]),
  },
  {
    name: 'HAVE empty LAST',
    hex: `0a 01 0000 4f553b4f`,
    frame: { type: 10, flags: HaveFlag.LAST, ranges: [] },
    encode: () => encodeHave(HaveFlag.LAST, []),
  },
  {
    // not the last of its sync; the entry ends at 2^53 - 4096
    name: 'HAVE not LAST',
    hex: `0a 00 0100 99f81424 00e0ffffffff1f00 0010000000000000`,
    frame: { type: 10, flags: 0, ranges: [{ offset: 2 ** 53 - 8192, length: 4096 }] },
    encode: () => encodeHave(0, [{ offset: 2 ** 53 - 8192, length: 4096 }]),
  },
  {
    name: 'PROGRESS',
    hex: `06 01 0000 00000000 0010000000000000 0000000003000000`,
    frame: { type: 6, flags: ProgressFlag.DONE, sentBytes: 0x1000, totalBytes: 0x300000000 },
    encode: () => encodeProgress(ProgressFlag.DONE, 0x1000, 0x300000000),
  },
  {
    name: 'CREDIT',
    hex: `07 00 0000 00001000`,
    frame: { type: 7, bytes: 0x100000 },
    encode: () => encodeCredit(0x100000),
  },
  {
    name: 'COMPLETE',
    hex: `08 00 0000 45230100`,
    frame: { type: 8, pages: 0x12345 },
    encode: () => encodeComplete(0x12345),
  },
  {
    name: 'ERROR',
    hex: `09 09 0200 4241445f5354415445 6e6f`,
    frame: { type: 9, code: 'BAD_STATE', message: 'no' },
    encode: () => encodeError('BAD_STATE', 'no'),
  },
];

t.test('hex fixtures: encoders produce them, decodeFrame reads them', async (t) => {
  const seen = new Set<number>();
  for (const f of fixtures) {
    const bytes = hex(f.hex);
    t.equal(f.encode().toString('hex'), bytes.toString('hex'), `${f.name} encodes`);
    t.same(plain(decodeFrame(bytes)), plain(f.frame), `${f.name} decodes`);
    seen.add(bytes[0]!);
  }
  t.same([...seen].sort(), Object.values(FrameType).sort(), 'a fixture for every frame type');
});

t.test('checksums: the reference CRC-32, and the fixtures carry it', async (t) => {
  t.equal(crc32(Buffer.from('123456789')), 0xcbf43926, 'reference CRC-32 check value');
  t.equal(crc32(Buffer.from('1234'), Buffer.from('56789')), 0xcbf43926, 'over concatenated parts');
  t.equal(crc32(), 0, 'of nothing');
  for (const f of fixtures) {
    const bytes = hex(f.hex);
    const want = expectedChecksum(bytes);
    if (!want) continue;
    t.equal(bytes.readUInt32LE(want.at), want.crc, `${f.name}: checksum field is the CRC-32`);
  }
  const data = hex(fixtures.find((f) => f.name === 'DATA')!.hex);
  const f = decodeFrame(data);
  if (f.type === FrameType.DATA) t.equal(f.checksum, data.readUInt32LE(16), 'DATA reports it');
});

t.test('fixed header sizes match the layout', async (t) => {
  t.equal(encodeZero(0, 0, 4096).length, HeaderSize.ZERO);
  t.equal(HeaderSize.ZERO, 24);
  t.equal(encodeHave(0, []).length, HeaderSize.HAVE);
  t.equal(
    encodeHave(0, [{ offset: 0, length: 1 }]).length,
    HeaderSize.HAVE + HeaderSize.HAVE_ENTRY,
  );
  t.equal(encodeProgress(0, 0, 0).length, HeaderSize.PROGRESS);
  t.equal(encodeCredit(0).length, HeaderSize.CREDIT);
  t.equal(encodeComplete(0).length, HeaderSize.COMPLETE);
  t.equal(encodeData(0, 0, new Uint8Array(1)).length, HeaderSize.DATA + 1);
  t.equal(encodeRequest([{ offset: 0, length: 1 }]).length, HeaderSize.REQUEST + 16);
});

t.test('encodeDataHeaderInto writes the header in front of a payload in place', async (t) => {
  const payload = hex('0102030405060708');
  const frame = Buffer.alloc(HeaderSize.DATA + payload.length, 0xee);
  payload.copy(frame, HeaderSize.DATA);
  encodeDataHeaderInto(frame, DataFlag.DEMAND, 2 ** 40);
  t.equal(frame.toString('hex'), encodeData(DataFlag.DEMAND, 2 ** 40, payload).toString('hex'));
  t.equal(frame.readUInt32LE(16), expectedChecksum(frame)!.crc, 'checksum of the payload there');
  t.throws(() => encodeDataHeaderInto(Buffer.alloc(HeaderSize.DATA), 0, 0), RangeError);
  // A frame that is a view at an odd offset of a larger buffer (a slab): only its bytes count.
  const slab = Buffer.alloc(7 + HeaderSize.DATA + payload.length + 5, 0xee);
  const view = slab.subarray(7, 7 + HeaderSize.DATA + payload.length);
  payload.copy(view, HeaderSize.DATA);
  encodeDataHeaderInto(view, 0, 4096);
  t.equal(Buffer.from(view).toString('hex'), encodeData(0, 4096, payload).toString('hex'));
  t.equal(slab[6], 0xee, 'the byte before is untouched');
  t.equal(slab[slab.length - 5], 0xee, 'the byte after is untouched');
});

t.test(
  'page-sized payloads carry the reference CRC-32 too (the codec checksums them another way)',
  async (t) => {
    // Payloads of 256 bytes and more go through a SIMD CRC-32, headers through zlib's: both must
    // agree with the test's own table-driven CRC-32, at odd sizes and offsets.
    for (const size of [255, 256, 4096, 4096 + 13, 256 * 1024]) {
      const slab = Buffer.alloc(3 + HeaderSize.DATA + size);
      for (let i = 0; i < slab.length; i++) slab[i] = (i * 2654435761) >>> 24;
      const frame = slab.subarray(3);
      encodeDataHeaderInto(frame, DataFlag.DEMAND, 4096 * size);
      t.equal(frame.readUInt32LE(16), expectedChecksum(frame)!.crc, `${size}-byte payload`);
      t.equal(decodeFrame(frame).type, FrameType.DATA, 'and it decodes');
    }
  },
);

t.test('encodeHave: limits', async (t) => {
  const max = Array.from({ length: Limits.MAX_HAVE_ENTRIES }, (_, i) => ({
    offset: i * 8192,
    length: 4096,
  }));
  const f = decodeFrame(encodeHave(HaveFlag.LAST, max));
  t.equal(f.type, FrameType.HAVE);
  if (f.type === FrameType.HAVE) t.same(f.ranges, max, `${max.length} entries round trip`);
  t.throws(
    () => encodeHave(0, [...max, { offset: 2 ** 30, length: 4096 }]),
    RangeError,
    '4097 entries',
  );
});

t.test('encodeError keeps frames decodable', async (t) => {
  // 1023 ASCII bytes then a 3-byte character: a byte cut at 1024 would split it.
  const long = 'x'.repeat(1023) + '€€';
  const f = decodeFrame(encodeError('IMAGE_IO', long));
  t.equal(f.type, FrameType.ERROR);
  if (f.type === FrameType.ERROR) t.equal(f.message, 'x'.repeat(1023), 'cut at a boundary');
  const exactFit = 'é'.repeat(512);
  const g = decodeFrame(encodeError('IMAGE_IO', exactFit + 'tail'));
  if (g.type === FrameType.ERROR) t.equal(g.message, exactFit, '1024 bytes kept whole');
  t.throws(() => encodeError('bad code', 'x'), RangeError);
  t.throws(() => encodeError('', 'x'), RangeError);
  t.throws(() => encodeError('A'.repeat(65), 'x'), RangeError);
});

/**
 * The reference: reads the layout byte by byte with BigInt arithmetic and copies every byte
 * string. Slow and obviously correct for valid frames; it validates nothing but the checksums
 * (with the test's own CRC-32), so it also checks the encoders' checksums.
 */
function referenceDecode(bytes: Uint8Array): Frame {
  let pos = 0;
  const uint = (n: number): number => {
    let v = 0n;
    for (let i = 0; i < n; i++) v += BigInt(bytes[pos++]!) << BigInt(8 * i);
    return Number(v);
  };
  const take = (n: number): Uint8Array => bytes.slice(pos, (pos += n));
  const str = (n: number): string => new TextDecoder().decode(take(n));
  const skip = (n: number): void => {
    pos += n;
  };
  const type = uint(1);
  let frame: Frame;
  switch (type) {
    case 1: {
      const channel = uint(1) as 1 | 2;
      const version = uint(2);
      skip(4); // magic
      const idLen = uint(2);
      const authLen = uint(2);
      frame = { type: 1, channel, version, migrationId: str(idLen), auth: take(authLen) };
      break;
    }
    case 2: {
      const channel = uint(1) as 1 | 2;
      const version = uint(2);
      const count = uint(2);
      const backgroundPort = uint(2);
      const nonce = take(16);
      const regions = [];
      for (let i = 0; i < count; i++) {
        const offset = uint(8);
        const sizeBytes = uint(8);
        const pageSizeBytes = uint(4);
        const nameLen = uint(2);
        skip(2);
        regions.push({ offset, sizeBytes, pageSizeBytes, name: str(nameLen) });
      }
      frame = { type: 2, channel, version, backgroundPort, nonce, regions };
      break;
    }
    case 3: {
      skip(1);
      const count = uint(2);
      skip(4);
      const ranges = [];
      for (let i = 0; i < count; i++) {
        const offset = uint(8);
        const length = uint(4);
        skip(4);
        ranges.push({ offset, length });
      }
      frame = { type: 3, ranges };
      break;
    }
    case 4: {
      const flags = uint(1);
      skip(2);
      const length = uint(4);
      const offset = uint(8);
      const checksum = uint(4);
      skip(4);
      const payload = take(length);
      if (checksum !== crc32(bytes.subarray(0, 16), payload)) throw new Error('reference: CRC');
      frame = { type: 4, flags, offset, checksum, payload };
      break;
    }
    case 5: {
      const flags = uint(1);
      skip(2);
      const length = uint(4);
      const offset = uint(8);
      if (uint(4) !== crc32(bytes.subarray(0, 16))) throw new Error('reference: CRC');
      skip(4);
      frame = { type: 5, flags, length, offset };
      break;
    }
    case 6: {
      const flags = uint(1);
      skip(6);
      frame = { type: 6, flags, sentBytes: uint(8), totalBytes: uint(8) };
      break;
    }
    case 7:
      skip(3);
      frame = { type: 7, bytes: uint(4) };
      break;
    case 8:
      skip(3);
      frame = { type: 8, pages: uint(4) };
      break;
    case 9: {
      const codeLen = uint(1);
      const msgLen = uint(2);
      frame = { type: 9, code: str(codeLen), message: str(msgLen) };
      break;
    }
    case 10: {
      const flags = uint(1);
      const count = uint(2);
      const checksum = uint(4);
      if (checksum !== crc32(bytes.subarray(0, 4), bytes.subarray(8))) {
        throw new Error('reference: CRC');
      }
      const ranges = [];
      for (let i = 0; i < count; i++) ranges.push({ offset: uint(8), length: uint(8) });
      frame = { type: 10, flags, ranges };
      break;
    }
    default:
      throw new Error(`reference: type ${type}`);
  }
  if (pos !== bytes.length) throw new Error(`reference: ${bytes.length - pos} bytes left`);
  return frame;
}

t.test('decodeFrame agrees with the reference on random valid frames', async (t) => {
  const seed = 0x5eed0001;
  const rng = new Rng(seed);
  let mismatches = 0;
  const N = 3000;
  for (let i = 0; i < N; i++) {
    const frame = randomFrame(rng);
    const bytes = encodeFrame(frame);
    const fast = plain(decodeFrame(bytes));
    const slow = plain(referenceDecode(bytes));
    const want = plain(frame);
    if (!isDeepStrictEqual(fast, want) || !isDeepStrictEqual(slow, want)) {
      if (mismatches++ < 3) t.same({ fast, slow }, { fast: want, slow: want }, `frame ${i}`);
    }
  }
  t.equal(mismatches, 0, `${N} frames (seed ${seed.toString(16)}): codec, reference, input agree`);
});

t.test('every proper prefix is rejected with a FRAME_* code', async (t) => {
  const rng = new Rng(0x5eed0002);
  const samples = [...fixtures.map((f) => hex(f.hex))];
  for (const type of FRAME_TYPES) {
    for (let i = 0; i < 5; i++) samples.push(encodeFrame(randomFrame(rng, type)));
  }
  const problems: string[] = [];
  for (const bytes of samples) {
    for (let cut = 0; cut < bytes.length; cut++) {
      try {
        decodeFrame(bytes.subarray(0, cut));
        problems.push(`type ${bytes[0]} cut at ${cut}/${bytes.length}: decoded`);
      } catch (err) {
        const code = err instanceof ProtocolError ? err.code : String(err);
        if (!(FRAME_ERROR_CODES as readonly string[]).includes(code)) {
          problems.push(`type ${bytes[0]} cut at ${cut}: ${code}`);
        }
      }
    }
    // One byte too many is as wrong as one too few: every frame's length is exact.
    try {
      decodeFrame(Buffer.concat([bytes, Buffer.of(0)]));
      problems.push(`type ${bytes[0]} extended: decoded`);
    } catch (err) {
      if (!(err instanceof ProtocolError) || err.code !== 'FRAME_BAD_LENGTH') {
        problems.push(`type ${bytes[0]} extended: ${String(err)}`);
      }
    }
  }
  t.same(problems, [], `${samples.length} frames cut at every byte`);
});

/**
 * A fixture with some bytes overwritten at a byte offset. Its checksum (DATA, ZERO, HAVE) is
 * then recomputed, so the frame shows the one defect under test, unless `keepChecksum`.
 */
function patched(name: string, at: number, bytesHex: string, keepChecksum = false): Buffer {
  const f = fixtures.find((x) => x.name === name)!;
  const buf = hex(f.hex);
  hex(bytesHex).copy(buf, at);
  return keepChecksum ? buf : reseal(buf);
}

t.test('malformed frames: each case has its code', async (t) => {
  rejects(t, new Uint8Array(0), 'FRAME_EMPTY', 'empty message');
  for (const type of [0x00, 0x0b, 0x7f, 0xff]) {
    rejects(t, Uint8Array.of(type, 0, 0, 0, 0, 0, 0, 0), 'FRAME_UNKNOWN_TYPE', `type 0x${type}`);
  }
  rejects(t, new Uint8Array(Limits.MAX_FRAME_BYTES + 1).fill(4), 'FRAME_BAD_LENGTH', 'too large');

  // HELLO
  rejects(t, patched('HELLO', 4, '5942534e'), 'FRAME_BAD_MAGIC', 'HELLO bad magic');
  rejects(t, patched('HELLO', 4, '4d534259'), 'FRAME_BAD_MAGIC', 'HELLO magic byte-swapped');
  rejects(t, patched('HELLO', 1, '00'), 'FRAME_BAD_CHANNEL', 'HELLO channel 0');
  rejects(t, patched('HELLO', 1, '03'), 'FRAME_BAD_CHANNEL', 'HELLO channel 3');
  rejects(t, patched('HELLO', 8, '0300'), 'FRAME_BAD_LENGTH', 'HELLO idLen past the end');
  rejects(t, patched('HELLO', 8, '0100'), 'FRAME_BAD_LENGTH', 'HELLO idLen short of the end');
  rejects(t, patched('HELLO', 12, 'ff31'), 'FRAME_BAD_VALUE', 'HELLO id invalid UTF-8');
  rejects(t, patched('HELLO', 12, 'c3a9'), 'FRAME_BAD_VALUE', 'HELLO id valid UTF-8, bad chars');
  rejects(t, patched('HELLO', 12, '6d20'), 'FRAME_BAD_VALUE', 'HELLO id with a space');
  rejects(t, encodeHello(1, 1, ''), 'FRAME_BAD_VALUE', 'HELLO empty id');
  rejects(t, encodeHello(1, 1, 'a'.repeat(129)), 'FRAME_BAD_VALUE', 'HELLO id of 129 bytes');
  t.equal(decodeFrame(encodeHello(1, 1, 'a'.repeat(128))).type, 1, 'HELLO id of 128 bytes');
  rejects(t, encodeHello(1, 1, 'm', new Uint8Array(257)), 'FRAME_BAD_VALUE', 'HELLO auth 257');
  t.equal(decodeFrame(encodeHello(1, 1, 'm', new Uint8Array(256))).type, 1, 'HELLO auth 256');

  // WELCOME (region 0 starts at byte 24, region 1 at byte 52)
  rejects(t, patched('WELCOME', 1, '03'), 'FRAME_BAD_CHANNEL', 'WELCOME channel 3');
  rejects(t, patched('WELCOME', 4, '0300'), 'FRAME_TRUNCATED', 'WELCOME count past the end');
  rejects(t, patched('WELCOME', 4, '0100'), 'FRAME_BAD_LENGTH', 'WELCOME count short');
  rejects(t, patched('WELCOME', 4, '0000'), 'FRAME_BAD_VALUE', 'WELCOME without regions');
  rejects(t, patched('WELCOME', 4, '4100'), 'FRAME_BAD_VALUE', 'WELCOME with 65 regions');
  rejects(t, patched('WELCOME', 24 + 6, '2000'), 'FRAME_BAD_VALUE', 'region offset 2^53');
  rejects(t, patched('WELCOME', 24 + 14, '2000'), 'FRAME_BAD_VALUE', 'region size 2^53');
  rejects(t, patched('WELCOME', 24 + 16, '00000000'), 'FRAME_BAD_VALUE', 'page size 0');
  rejects(t, patched('WELCOME', 24 + 16, '00080000'), 'FRAME_BAD_VALUE', 'page size 2048');
  rejects(t, patched('WELCOME', 24 + 16, '00300000'), 'FRAME_BAD_VALUE', 'page size 12288');
  rejects(t, patched('WELCOME', 24 + 16, '00000080'), 'FRAME_BAD_VALUE', 'page size 2^31');
  rejects(t, patched('WELCOME', 24 + 16, '00000040'), 'FRAME_BAD_VALUE', 'page size 1 GiB');
  rejects(t, patched('WELCOME', 24 + 16, '00000002'), 'FRAME_BAD_VALUE', 'page size 32 MiB');
  rejects(t, patched('WELCOME', 24, '0002'), 'FRAME_BAD_VALUE', 'region offset unaligned');
  rejects(t, patched('WELCOME', 24 + 8, '0002'), 'FRAME_BAD_VALUE', 'region size unaligned');
  rejects(t, patched('WELCOME', 24 + 8, '00000000'), 'FRAME_BAD_VALUE', 'region size 0');
  rejects(t, patched('WELCOME', 52, '0000000000000000'), 'FRAME_BAD_VALUE', 'regions overlap');
  rejects(t, patched('WELCOME', 24 + 28, 'ff'), 'FRAME_BAD_VALUE', 'region name not UTF-8');
  rejects(t, patched('WELCOME', 24 + 20, '4100'), 'FRAME_BAD_VALUE', 'region name 65 bytes');
  const unsorted = encodeWelcome(1, 1, NONCE, [
    { offset: 0x10000, sizeBytes: 4096, pageSizeBytes: 4096, name: 'b' },
    { offset: 0, sizeBytes: 4096, pageSizeBytes: 4096, name: 'a' },
  ]);
  rejects(t, unsorted, 'FRAME_BAD_VALUE', 'regions out of order');
  const adjacent = encodeWelcome(1, 1, NONCE, [
    { offset: 0, sizeBytes: 4096, pageSizeBytes: 4096, name: 'a' },
    { offset: 4096, sizeBytes: 4096, pageSizeBytes: 4096, name: 'b' },
  ]);
  t.equal(decodeFrame(adjacent).type, FrameType.WELCOME, 'adjacent regions are fine');

  // REQUEST
  rejects(t, patched('REQUEST', 2, '0000'), 'FRAME_BAD_VALUE', 'REQUEST with 0 entries');
  rejects(t, patched('REQUEST', 2, '0300'), 'FRAME_BAD_LENGTH', 'REQUEST count past the end');
  rejects(t, patched('REQUEST', 2, '0104'), 'FRAME_BAD_VALUE', 'REQUEST with 1025 entries');
  rejects(t, patched('REQUEST', 8 + 8, '00000000'), 'FRAME_BAD_VALUE', 'zero-length entry');
  rejects(t, patched('REQUEST', 8 + 6, '2000'), 'FRAME_BAD_VALUE', 'entry offset 2^53');
  rejects(t, patched('REQUEST', 8 + 4, 'ffffffff'), 'FRAME_BAD_VALUE', 'entry offset 2^64-ish');
  rejects(
    t,
    encodeRequest([{ offset: 2 ** 53 - 4096, length: 4096 }]),
    'FRAME_BAD_VALUE',
    'entry ends at 2^53',
  );
  const full = encodeRequest(
    Array.from({ length: Limits.MAX_REQUEST_ENTRIES }, (_, i) => ({ offset: i, length: 1 })),
  );
  t.equal(decodeFrame(full).type, FrameType.REQUEST, 'REQUEST with 1024 entries');
  rejects(t, Buffer.of(3, 0, 1, 0), 'FRAME_TRUNCATED', 'REQUEST header cut');

  // DATA
  rejects(t, patched('DATA', 4, '05000000'), 'FRAME_BAD_LENGTH', 'DATA length past the end');
  rejects(t, patched('DATA', 4, '03000000'), 'FRAME_BAD_LENGTH', 'DATA length short');
  rejects(t, patched('DATA', 4, '00000000'), 'FRAME_BAD_VALUE', 'DATA of 0 bytes');
  rejects(t, patched('DATA', 4, '01000001'), 'FRAME_BAD_VALUE', 'DATA over 16 MiB');
  rejects(t, patched('DATA', 8 + 6, '2000'), 'FRAME_BAD_VALUE', 'DATA offset 2^53');
  const maxOffset = patched('DATA', 8, 'fcffffffffff1f00'); // 2^53 - 4, payload 4: ends at 2^53
  rejects(t, maxOffset, 'FRAME_BAD_VALUE', 'DATA ends beyond 2^53 - 1');
  const lastOk = patched('DATA', 8, 'fbffffffffff1f00'); // 2^53 - 5, ends at 2^53 - 1
  t.equal(decodeFrame(lastOk).type, FrameType.DATA, 'DATA ending at 2^53 - 1');
  rejects(t, hex('04 00 0000 01000000 00'), 'FRAME_TRUNCATED', 'DATA header cut');
  rejects(t, patched('DATA', 16, '00000000', true), 'FRAME_CHECKSUM', 'DATA checksum 0');
  rejects(t, patched('DATA', 24, 'df', true), 'FRAME_CHECKSUM', 'DATA payload changed');
  rejects(t, patched('DATA', 8, '0030', true), 'FRAME_CHECKSUM', 'DATA offset changed');
  rejects(t, patched('DATA', 1, '00', true), 'FRAME_CHECKSUM', 'DATA flags changed');
  rejects(t, patched('DATA', 2, '0100', true), 'FRAME_CHECKSUM', 'DATA bytes 2..3 are covered');
  const swapped = hex(fixtures.find((f) => f.name === 'DATA')!.hex);
  swapped.writeUInt32BE(swapped.readUInt32LE(16), 16);
  rejects(t, swapped, 'FRAME_CHECKSUM', 'DATA checksum big-endian');

  // ZERO: 24 bytes, checksum over bytes 0..15
  rejects(t, patched('ZERO', 4, '00000000'), 'FRAME_BAD_VALUE', 'zero-length ZERO run');
  rejects(t, patched('ZERO', 8 + 6, '2000'), 'FRAME_BAD_VALUE', 'ZERO offset 2^53');
  const zeroEnd = reseal(hex('05 00 0000 00100000 00f0ffffffff1f00 00000000 00000000'));
  rejects(t, zeroEnd, 'FRAME_BAD_VALUE', 'ZERO ends at 2^53');
  const zero = hex(fixtures.find((f) => f.name === 'ZERO')!.hex);
  rejects(t, zero.subarray(0, 16), 'FRAME_BAD_LENGTH', 'ZERO of 16 bytes (the old layout)');
  rejects(t, zero.subarray(0, 23), 'FRAME_BAD_LENGTH', 'ZERO of 23 bytes');
  rejects(t, Buffer.concat([zero, Buffer.of(0)]), 'FRAME_BAD_LENGTH', 'ZERO of 25 bytes');
  rejects(t, patched('ZERO', 16, '00000000', true), 'FRAME_CHECKSUM', 'ZERO checksum 0');
  rejects(t, patched('ZERO', 4, '00000200', true), 'FRAME_CHECKSUM', 'ZERO length changed');
  rejects(t, patched('ZERO', 12, '01', true), 'FRAME_CHECKSUM', 'ZERO offset high changed');

  // HAVE (entries from byte 8, 16 bytes each)
  rejects(t, hex('0a 01 00'), 'FRAME_TRUNCATED', 'HAVE header cut');
  rejects(t, patched('HAVE', 2, '0300'), 'FRAME_BAD_LENGTH', 'HAVE count past the end');
  rejects(t, patched('HAVE', 2, '0100'), 'FRAME_BAD_LENGTH', 'HAVE count short');
  rejects(t, reseal(hex('0a 01 0110 00000000')), 'FRAME_BAD_VALUE', 'HAVE with 4097 entries');
  const over = Buffer.alloc(HeaderSize.HAVE + 4097 * HeaderSize.HAVE_ENTRY);
  over.set(hex('0a 01 0110'));
  for (let i = 0; i < 4097; i++) {
    over.writeUInt32LE(i * 8192, 8 + i * 16);
    over.writeUInt32LE(4096, 8 + i * 16 + 8);
  }
  rejects(t, reseal(over), 'FRAME_BAD_VALUE', 'HAVE with 4097 entries, every one present');
  rejects(t, patched('HAVE', 8 + 8, '0000000000000000'), 'FRAME_BAD_VALUE', 'zero-length entry');
  rejects(t, patched('HAVE', 8 + 6, '2000'), 'FRAME_BAD_VALUE', 'HAVE entry offset 2^53');
  rejects(t, patched('HAVE', 8 + 14, '2000'), 'FRAME_BAD_VALUE', 'HAVE entry length 2^53');
  rejects(
    t,
    encodeHave(HaveFlag.LAST, [{ offset: 2 ** 53 - 4096, length: 4096 }]),
    'FRAME_BAD_VALUE',
    'HAVE entry ends at 2^53',
  );
  const endsLast = encodeHave(0, [{ offset: 2 ** 53 - 4097, length: 4096 }]);
  t.equal(decodeFrame(endsLast).type, FrameType.HAVE, 'HAVE entry ending at 2^53 - 1');
  rejects(t, patched('HAVE', 4, '00000000', true), 'FRAME_CHECKSUM', 'HAVE checksum 0');
  rejects(t, patched('HAVE', 1, '00', true), 'FRAME_CHECKSUM', 'HAVE LAST cleared');
  rejects(t, patched('HAVE', 8 + 16 + 4, '02', true), 'FRAME_CHECKSUM', 'HAVE entry changed');
  rejects(t, patched('HAVE empty LAST', 1, '00', true), 'FRAME_CHECKSUM', 'empty HAVE, flags');
  rejects(t, hex('0a 01 0000 00000000'), 'FRAME_CHECKSUM', 'empty HAVE, checksum 0');

  // PROGRESS
  rejects(t, patched('PROGRESS', 8, '0000000004000000'), 'FRAME_BAD_VALUE', 'sent > total');
  rejects(t, patched('PROGRESS', 16 + 6, '2000'), 'FRAME_BAD_VALUE', 'total 2^53');

  // CREDIT / COMPLETE: fixed sizes
  rejects(t, hex('07 00 0000 00001000 00'), 'FRAME_BAD_LENGTH', 'CREDIT 9 bytes');
  rejects(t, hex('08 00 0000 452301'), 'FRAME_BAD_LENGTH', 'COMPLETE 7 bytes');

  // ERROR
  rejects(t, hex('09 00 0000'), 'FRAME_BAD_VALUE', 'ERROR empty code');
  rejects(t, hex('09 01 0000 61'), 'FRAME_BAD_VALUE', 'ERROR lowercase code');
  rejects(t, hex('09 01 0100 41 ff'), 'FRAME_BAD_VALUE', 'ERROR message not UTF-8');
  rejects(t, hex('09 02 0000 41'), 'FRAME_BAD_LENGTH', 'ERROR code past the end');
  rejects(t, hex('09 01'), 'FRAME_TRUNCATED', 'ERROR header cut');
  const longCode = Buffer.concat([hex('09 41 0000'), Buffer.alloc(65, 0x41)]);
  rejects(t, longCode, 'FRAME_BAD_VALUE', 'ERROR code of 65 bytes');
  const longMsg = Buffer.concat([hex('09 01 0104 41'), Buffer.alloc(1025, 0x61)]);
  rejects(t, longMsg, 'FRAME_BAD_VALUE', 'ERROR message of 1025 bytes');
});

t.test('reserved bytes are ignored on receipt', async (t) => {
  // DATA and ZERO bytes 2..3 are reserved but under the checksum: a sender that sets them seals
  // them in. Bytes 20..23 lie outside it.
  const data = patched('DATA', 2, 'ffff');
  hex('ffffffff').copy(data, 20);
  t.equal(decodeFrame(data).type, FrameType.DATA, 'DATA reserved');
  const zero = patched('ZERO', 2, 'ffff');
  hex('ffffffff').copy(zero, 20);
  t.same(plain(decodeFrame(zero)), plain(fixtures.find((f) => f.name === 'ZERO')!.frame), 'ZERO');
  const reservedFlag = decodeFrame(encodeData(0x02, 0, Uint8Array.of(1)));
  t.equal(reservedFlag.type, FrameType.DATA, 'DATA flag 0x02 (reserved) does not matter');
  t.equal(decodeFrame(patched('REQUEST', 1, 'ff')).type, FrameType.REQUEST, 'REQUEST byte 1');
  t.equal(decodeFrame(patched('CREDIT', 1, 'ffffff')).type, FrameType.CREDIT, 'CREDIT 1..3');
});

t.test("the source's times in a DEMAND answer: outside the checksum, 100 ns units", async (t) => {
  const data = encodeData(DataFlag.DEMAND, 4096, new Uint8Array(4096).fill(7));
  const zero = encodeZero(DataFlag.DEMAND, 8192, 4096);
  t.equal(sourceReadSeconds(data), 0, 'unstamped: 0');
  stampSourceTimes(data, 0.0123, 0.5); // ms
  stampSourceTimes(zero, 0, 10); // 10 ms saturates
  t.same(data.subarray(20, 24), Buffer.from([123, 0, 0x88, 0x13]), 'u16 LE each');
  t.ok(Math.abs(sourceReadSeconds(data) - 12.3e-6) < 1e-12);
  t.ok(Math.abs(sourceSendSeconds(data) - 500e-6) < 1e-12);
  t.equal(sourceReadSeconds(zero), 0);
  t.ok(Math.abs(sourceSendSeconds(zero) - 0xffff * 1e-7) < 1e-12, 'saturates at 6.5535 ms');
  t.equal(decodeFrame(data).type, FrameType.DATA, 'DATA still verifies');
  t.equal(decodeFrame(zero).type, FrameType.ZERO, 'ZERO still verifies');
});

/**
 * Flips every bit of `msg`, one at a time. A flip must be rejected with a FRAME_* code or decode
 * to the very frame `msg` encodes (a reserved bit outside the checksum); anything else is listed.
 */
function bitFlipEscapes(msg: Buffer, label: string): string[] {
  const original = plain(decodeFrame(msg));
  const escapes: string[] = [];
  const buf = Buffer.from(msg);
  for (let bit = 0; bit < buf.length * 8; bit++) {
    const at = bit >> 3;
    buf[at]! ^= 1 << (bit & 7);
    try {
      const got = plain(decodeFrame(buf));
      if (!isDeepStrictEqual(got, original)) {
        escapes.push(`${label} byte ${at} bit ${bit & 7}: ${JSON.stringify(got)}`);
      }
    } catch (err) {
      if (!(err instanceof ProtocolError) || !err.code.startsWith('FRAME_')) {
        escapes.push(`${label} byte ${at} bit ${bit & 7}: ${String(err)}`);
      }
    }
    buf[at]! ^= 1 << (bit & 7);
  }
  return escapes;
}

t.test(
  'no single-bit flip of a DATA, ZERO or HAVE frame is accepted as other content',
  async (t) => {
    const rng = new Rng(0x5eed0003);
    const samples: [Buffer, string][] = fixtures
      .filter((f) => [FrameType.DATA, FrameType.ZERO, FrameType.HAVE].includes(f.frame.type as 4))
      .map((f) => [hex(f.hex), f.name]);
    samples.push([encodeData(0, 0x10000, rng.bytes(4096)), 'DATA of a 4 KiB page']);
    samples.push([encodeData(DataFlag.DEMAND, 2 ** 52, rng.bytes(3)), 'DATA far out']);
    samples.push([encodeZero(DataFlag.DEMAND, 2 ** 40, 2 ** 31), 'ZERO big']);
    for (const type of [FrameType.DATA, FrameType.ZERO, FrameType.HAVE]) {
      for (let n = 0; n < 6;) {
        const f = randomFrame(rng, type);
        if (f.type === FrameType.HAVE && (f.ranges.length === 0 || f.ranges.length > 8)) continue;
        samples.push([encodeFrame(f), `random ${type}`]);
        n++;
      }
    }
    const escapes = samples.flatMap(([msg, label]) => bitFlipEscapes(msg, label));
    // An 8-byte HAVE (no entries) whose type byte 0x0A loses bit 1 has COMPLETE's type and size;
    // COMPLETE's reserved bytes must be zero, and the LAST flag in byte 1 makes them non-zero.
    t.same(escapes, [], `${samples.length} frames, every bit of header and payload`);
  },
);

t.test('decoded byte strings are views of the message, not copies', async (t) => {
  // Place the frame at an odd offset inside a larger buffer, as a ws message may be.
  const frameBytes = hex(fixtures.find((f) => f.name === 'DATA')!.hex);
  const backing = new Uint8Array(frameBytes.length + 13);
  backing.set(frameBytes, 5);
  const msg = backing.subarray(5, 5 + frameBytes.length);
  const f = decodeFrame(msg);
  if (f.type !== FrameType.DATA) return t.fail('not DATA');
  t.equal(f.payload.buffer, backing.buffer, 'same ArrayBuffer');
  t.equal(f.payload.byteOffset, 5 + HeaderSize.DATA, 'payload starts after the header');
  t.equal(f.payload.byteLength, 4);
  msg[HeaderSize.DATA] = 0x11;
  t.equal(f.payload[0], 0x11, 'a write to the message shows in the payload');

  const hello = decodeFrame(hex(fixtures.find((x) => x.name === 'HELLO with auth')!.hex));
  if (hello.type === FrameType.HELLO) t.equal(hello.auth.byteLength, 2, 'auth is a view too');
  const welcomeMsg = hex(fixtures.find((x) => x.name === 'WELCOME')!.hex);
  const welcome = decodeFrame(welcomeMsg);
  if (welcome.type === FrameType.WELCOME) {
    t.equal(welcome.nonce.buffer, welcomeMsg.buffer, 'nonce is a view');
  }
});
