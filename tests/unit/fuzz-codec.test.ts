/**
 * Deterministic fuzzing of the decoders that face untrusted peers: decodeFrame (the source and
 * the dest read each other's frames) and decodeHandoff (the dest reads a VMM's line). Every input
 * must decode or throw a ProtocolError with a documented code; nothing else may escape. Inputs are
 * random bytes and mutations of valid encodings; half of the mutated DATA, ZERO and HAVE frames
 * get their checksum recomputed, so the checks behind the checksum are fuzzed too, and the rest
 * must never decode to the same type with other content. Seeds are fixed: a failure names its
 * seed and iteration, and reproduces.
 */
import { isDeepStrictEqual } from 'node:util';
import t from 'tap';
import { FRAME_ERROR_CODES, HANDOFF_ERROR_CODES, ProtocolError } from '../../protocol/errors.js';
import { decodeFrame } from '../../protocol/page-codec.js';
import { checkRegions, decodeHandoff, decodeReply, encodeHandoff } from '../../protocol/handoff.js';
import { FrameType, Limits } from '../../protocol/wire.js';
import {
  encodeFrame,
  expectedChecksum,
  FRAME_TYPES,
  plain,
  randomFrame,
  randomHandoff,
  reseal,
  Rng,
} from './protocol-gen.js';

/** The codes decodeHandoff itself can throw (the rest of the handoff list comes from I/O). */
const HANDOFF_DECODE_CODES = [
  'HANDOFF_BAD_JSON',
  'HANDOFF_INVALID',
  'HANDOFF_BAD_PAGE_SIZE',
  'HANDOFF_UNALIGNED',
  'HANDOFF_OVERLAP',
  'HANDOFF_TOO_LARGE',
];

/** Runs `decode`, classifying the outcome; returns a problem description or null. */
function judge(decode: () => unknown, codes: readonly string[], check?: (v: unknown) => void) {
  let value: unknown;
  try {
    value = decode();
  } catch (err) {
    if (!(err instanceof ProtocolError)) return `threw ${String(err)}`;
    if (!codes.includes(err.code)) return `undocumented code ${err.code}`;
    return null;
  }
  try {
    check?.(value);
  } catch (err) {
    return `accepted, but ${String(err)}`;
  }
  return null;
}

/** One of several ways to damage a valid encoding. Returns a fresh buffer. */
function mutate(rng: Rng, input: Uint8Array, pool: readonly Uint8Array[]): Uint8Array {
  const buf = Buffer.from(input); // a copy: the input stays valid for the next round
  switch (rng.int(7)) {
    case 0: {
      // bit flips
      const flips = rng.range(1, 4);
      for (let i = 0; i < flips && buf.length; i++) buf[rng.int(buf.length)]! ^= 1 << rng.int(8);
      return buf;
    }
    case 1: // truncation
      return buf.subarray(0, rng.int(buf.length));
    case 2: // extension
      return Buffer.concat([buf, rng.bytes(rng.range(1, 16))]);
    case 3: // type byte swap: a valid body under another type, or an unknown type
      if (buf.length) buf[0] = rng.chance(0.8) ? rng.pick(FRAME_TYPES) : rng.int(256);
      return buf;
    case 4: {
      // overwrite an aligned 16- or 32-bit field (lengths, counts) with an edge value
      if (buf.length < 4) return buf;
      const at = rng.int(buf.length >> 1) * 2;
      const value = rng.pick([0, 1, 0xffff, 0xffffffff, 0x80000000, 4096, rng.u32()]);
      if (at + 4 <= buf.length) buf.writeUInt32LE(value >>> 0, at);
      else buf.writeUInt16LE(value & 0xffff, at);
      return buf;
    }
    case 5: // splice two frames
      return Buffer.concat([buf, rng.pick(pool)]);
    default: {
      // a random byte string overwriting a random window
      const at = rng.int(buf.length + 1);
      const junk = rng.bytes(rng.range(1, 8));
      return Buffer.concat([buf.subarray(0, at), junk, buf.subarray(Math.min(buf.length, at + 8))]);
    }
  }
}

const CHECKSUMMED = new Set<number>([FrameType.DATA, FrameType.ZERO, FrameType.HAVE]);

/**
 * A decoded frame must re-encode to bytes that decode to the same frame. A DATA frame's checksum
 * is left out: it also covers reserved bytes 2..3, which the encoder writes as zero.
 */
function roundTrips(value: unknown): void {
  const frame = value as ReturnType<typeof decodeFrame>;
  const again = decodeFrame(encodeFrame(frame));
  const strip = (f: typeof frame) => {
    const p = plain(f);
    delete p.checksum;
    return p;
  };
  if (!isDeepStrictEqual(strip(again), strip(frame))) throw new Error('re-encoding changed it');
}

t.test('decodeFrame: random and mutated messages', async (t) => {
  const seed = 0xf00d0001;
  const rng = new Rng(seed);
  const pool = Array.from({ length: 200 }, () => encodeFrame(randomFrame(rng)));
  const problems: string[] = [];
  let decoded = 0;
  let sealedDecoded = 0;
  const N = 30000;
  for (let i = 0; i < N; i++) {
    let input: Uint8Array;
    let origin: Uint8Array | null = null;
    if (i % 5 === 0) {
      // pure noise, with a plausible type byte most of the time
      input = rng.bytes(rng.int(80));
      if (input.length && rng.chance(0.8)) input[0] = rng.pick(FRAME_TYPES);
    } else {
      origin = rng.pick(pool);
      input = mutate(rng, origin, pool);
      if (rng.chance(0.3)) input = mutate(rng, input, pool);
      if (expectedChecksum(input) && rng.chance(0.5)) {
        reseal(input);
        origin = null; // a forged checksum: other content is allowed
      }
    }
    const problem = judge(
      () => decodeFrame(input),
      FRAME_ERROR_CODES,
      (v) => {
        roundTrips(v);
        const f = v as ReturnType<typeof decodeFrame>;
        if (f.type === FrameType.DATA && f.checksum !== expectedChecksum(input)?.crc) {
          throw new Error('DATA checksum field is not the CRC-32 of the frame');
        }
        if (origin && CHECKSUMMED.has(f.type) && f.type === origin[0]) {
          // Damage under an unchanged checksum must not pass (barring CRC-32 collisions).
          if (!isDeepStrictEqual(plain(f), plain(decodeFrame(origin)))) {
            throw new Error('damaged, yet it passed its checksum');
          }
        }
        if (!origin && CHECKSUMMED.has(f.type)) sealedDecoded++;
        decoded++;
      },
    );
    if (problem && problems.length < 10) {
      problems.push(
        `seed ${seed.toString(16)} #${i} ${Buffer.from(input).toString('hex')}: ${problem}`,
      );
    }
  }
  t.same(problems, [], `${N} inputs, ${decoded} decoded, the rest rejected with FRAME_* codes`);
  t.ok(decoded > N / 50, 'the mutations leave some frames valid (the fuzzer reaches the end)');
  t.ok(sealedDecoded > N / 200, `resealed DATA/ZERO/HAVE mutants decode too (${sealedDecoded})`);
});

t.test('decodeFrame: mutated HAVE frames', async (t) => {
  const seed = 0xf00d0004;
  const rng = new Rng(seed);
  const pool = Array.from({ length: 100 }, () => encodeFrame(randomFrame(rng, FrameType.HAVE)));
  const problems: string[] = [];
  const codes = new Set<string>();
  let decoded = 0;
  const N = 5000;
  for (let i = 0; i < N; i++) {
    const input = mutate(rng, rng.pick(pool), pool);
    if (input.length) input[0] = FrameType.HAVE;
    if (rng.chance(0.7)) reseal(input);
    const problem = judge(
      () => decodeFrame(input),
      FRAME_ERROR_CODES,
      (v) => {
        roundTrips(v);
        const f = v as ReturnType<typeof decodeFrame>;
        if (f.type !== FrameType.HAVE) throw new Error(`decoded as type ${f.type}`);
        for (const r of f.ranges) {
          if (r.length < 1 || r.offset + r.length > Number.MAX_SAFE_INTEGER) {
            throw new Error(`range ${r.offset}+${r.length}`);
          }
        }
        if (f.ranges.length > Limits.MAX_HAVE_ENTRIES) throw new Error('too many entries');
        decoded++;
      },
    );
    try {
      decodeFrame(input);
    } catch (err) {
      if (err instanceof ProtocolError) codes.add(err.code);
    }
    if (problem && problems.length < 10) {
      problems.push(`seed ${seed.toString(16)} #${i}: ${problem}`);
    }
  }
  t.same(problems, [], `${N} inputs, ${decoded} decoded`);
  t.ok(decoded > N / 50, 'some mutants stay valid');
  for (const code of ['FRAME_CHECKSUM', 'FRAME_BAD_LENGTH', 'FRAME_BAD_VALUE']) {
    t.ok(codes.has(code), `reaches ${code}`);
  }
});

t.test('decodeFrame: the size cap is checked before anything else', async (t) => {
  const huge = new Uint8Array(Limits.MAX_FRAME_BYTES + 1);
  for (const type of [0, 1, 4, 0xff]) {
    huge[0] = type;
    t.throws(() => decodeFrame(huge), { code: 'FRAME_BAD_LENGTH' }, `type ${type}`);
  }
});

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

function randomJson(rng: Rng, depth = 0): Json {
  switch (rng.int(depth > 2 ? 4 : 6)) {
    case 0:
      return null;
    case 1:
      return rng.chance(0.5);
    case 2:
      return rng.pick([
        0,
        -1,
        1,
        1.5,
        4096,
        4097,
        2 ** 21,
        2 ** 30,
        2 ** 53,
        -(2 ** 53),
        1e308,
        rng.u32(),
      ]);
    case 3:
      return rng.pick(['', 'handoff', 'ws://x', 'é', '\u0000', 'a'.repeat(200), String(rng.u32())]);
    case 4:
      return Array.from({ length: rng.int(4) }, () => randomJson(rng, depth + 1));
    default: {
      const o: Record<string, Json> = {};
      for (let i = rng.int(4); i > 0; i--) {
        o[rng.pick(['base', 'name', 'type', '__proto__', 'constructor', 'x'])] = randomJson(
          rng,
          depth + 1,
        );
      }
      return o;
    }
  }
}

/** Damages the request as a JSON value: drop, replace or add a field, at the top or in a region. */
function mutateJson(rng: Rng, req: Record<string, Json>): Record<string, Json> {
  const regions = req.regions as Record<string, Json>[];
  const target: Record<string, Json> = rng.chance(0.5) && regions.length ? rng.pick(regions) : req;
  const keys = Object.keys(target);
  switch (rng.int(5)) {
    case 0:
      delete target[rng.pick(keys)];
      break;
    case 1:
      target[rng.pick(keys)] = randomJson(rng);
      break;
    case 2:
      target[rng.pick(['extra', '__proto__', 'fd'])] = randomJson(rng);
      break;
    case 3: {
      // a numeric field nudged off alignment or to an edge
      const key = rng.pick(['base', 'sizeBytes', 'offset', 'pageSizeBytes']);
      const r = rng.pick(regions);
      if (r && typeof r[key] === 'number') {
        r[key] = rng.pick([(r[key] as number) + rng.pick([1, 512, 4096, 2 ** 21]), 0, 2 ** 53 - 1]);
      }
      break;
    }
    default:
      // duplicate a region (an overlap) or empty the list
      req.regions = rng.chance(0.7) && regions.length ? [...regions, { ...rng.pick(regions) }] : [];
  }
  return req;
}

function checkAccepted(value: unknown): void {
  const req = value as ReturnType<typeof decodeHandoff>;
  checkRegions(req.regions);
  const again = decodeHandoff(encodeHandoff(req).subarray(0, -1));
  // Compared as JSON: a "-0" in the input is accepted as the number 0 and re-encodes as "0".
  if (JSON.stringify(again) !== JSON.stringify(req)) throw new Error('re-encoding changed it');
}

t.test('decodeHandoff: random and mutated lines', async (t) => {
  const seed = 0xf00d0002;
  const rng = new Rng(seed);
  const problems: string[] = [];
  let decoded = 0;
  const N = 6000;
  for (let i = 0; i < N; i++) {
    let input: Uint8Array;
    const valid = randomHandoff(rng) as unknown as Record<string, Json>;
    switch (i % 4) {
      case 0: // structural damage
        input = Buffer.from(JSON.stringify(mutateJson(rng, valid)));
        break;
      case 1: // byte damage to a valid line
        input = mutate(rng, Buffer.from(JSON.stringify(valid)), [
          Buffer.from('{"type":"handoff"}'),
        ]);
        break;
      case 2: // JSON-significant characters dropped into a valid line
        {
          const s = JSON.stringify(valid);
          const at = rng.int(s.length);
          const ch = rng.pick([
            '{',
            '}',
            '[',
            ']',
            '"',
            ',',
            ':',
            '0',
            '-',
            '.',
            'e',
            '\\',
            '\u00e9',
          ]);
          input = Buffer.from(s.slice(0, at) + ch + s.slice(at + (rng.chance(0.5) ? 1 : 0)));
        }
        break;
      default: // noise, or a random JSON value
        input = rng.chance(0.5)
          ? rng.bytes(rng.int(100))
          : Buffer.from(JSON.stringify(randomJson(rng)));
    }
    const problem = judge(
      () => decodeHandoff(input),
      HANDOFF_DECODE_CODES,
      (v) => {
        checkAccepted(v);
        decoded++;
      },
    );
    if (problem && problems.length < 10) {
      problems.push(
        `seed ${seed.toString(16)} #${i} ${Buffer.from(input).toString('utf8')}: ${problem}`,
      );
    }
  }
  t.same(problems, [], `${N} inputs, ${decoded} decoded, the rest rejected with HANDOFF_* codes`);
  t.ok(HANDOFF_DECODE_CODES.every((c) => (HANDOFF_ERROR_CODES as readonly string[]).includes(c)));
});

t.test('decodeHandoff: pathological but small JSON', async (t) => {
  const deep = '['.repeat(30000) + ']'.repeat(30000);
  const cases = [
    deep,
    `{"type":"handoff","version":1,"migrationId":"m","source":"ws://h","regions":${deep}}`,
    '{"__proto__":{"polluted":1},"type":"handoff"}',
    '{"type":"handoff","type":"handoff"}',
    '"\\ud800"',
    '1e999999',
  ];
  for (const s of cases) {
    const problem = judge(() => decodeHandoff(Buffer.from(s)), HANDOFF_DECODE_CODES, checkAccepted);
    t.equal(problem, null, s.slice(0, 40));
  }
  t.equal(({} as Record<string, unknown>).polluted, undefined, 'no prototype pollution');
});

t.test('decodeReply: random and mutated lines', async (t) => {
  const rng = new Rng(0xf00d0003);
  const problems: string[] = [];
  const samples = [
    '{"type":"ack","migrationId":"vm","totalPages":10}',
    '{"type":"progress","presentPages":3,"totalPages":10}',
    '{"type":"complete","totalPages":10,"demandPages":1,"backgroundPages":5,"zeroPages":4}',
    '{"type":"error","code":"SESSION_FAILED","message":"source closed"}',
  ];
  const pool = samples.map((s) => Buffer.from(s));
  for (let i = 0; i < 3000; i++) {
    const bytes = mutate(rng, rng.pick(pool), pool);
    const problem = judge(
      () => decodeReply(Buffer.from(bytes).toString('utf8')),
      ['HANDOFF_BAD_JSON', 'HANDOFF_INVALID'],
    );
    if (problem && problems.length < 10) problems.push(`#${i}: ${problem}`);
  }
  t.same(problems, []);
});
