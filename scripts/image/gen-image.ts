/**
 * Memory-image generator: a deterministic (seeded) file that looks like a guest's RAM at 4 KiB
 * page granularity. It is the oracle of every test and benchmark: `yabusame source` serves it and
 * vm-sim compares every migrated page with it.
 *
 * Page classes, clustered in runs like a real guest (free memory comes in long zero runs, page
 * cache and heaps in shorter stretches of text or high-entropy data):
 * - hole: an all-zero page never written, so the file is sparse there (SEEK_HOLE finds it);
 * - zero: an all-zero page written as explicit zero bytes (a dump that did not punch holes);
 * - text: ASCII lines of words, prefixed with the page number so no two text pages are equal;
 * - random: AES-256-CTR keystream (seeded, fast, incompressible).
 *
 * `zeroFraction` is the share of all pages that are zero (holes included), `holeFraction` the
 * share of those that are holes, `textFraction` the share of all pages that are text; the rest
 * is random. Run lengths are random (log-uniform, so many short runs and a few long ones) and the
 * class of each next run is chosen by error diffusion towards the target fractions, which keeps
 * the totals within a few pages of the targets even for small images.
 *
 * CLI: node dist/scripts/image/gen-image.js --size 1G --seed 1 --out /path   (--help)
 */
import { createCipheriv, createHash, type Cipher } from 'node:crypto';
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';

export const IMAGE_PAGE_SIZE_BYTES = 4096;

/** The class of one page in a plan (one byte per page). */
export const PageClass = { Hole: 0, Zero: 1, Text: 2, Random: 3 } as const;
export type PageClass = (typeof PageClass)[keyof typeof PageClass];

export interface ImageOptions {
  /** Image size, bytes, a multiple of 4096. */
  sizeBytes: number;
  seed: number;
  /** Share of all pages that are all-zero (holes included), 0..1. */
  zeroFraction?: number;
  /** Share of the zero pages that are file holes, 0..1. */
  holeFraction?: number;
  /** Share of all pages that are ASCII text, 0..1 (zeroFraction + textFraction <= 1). */
  textFraction?: number;
}

export interface GenerateOptions extends ImageOptions {
  path: string;
}

export interface PageCounts {
  /** All-zero pages, holes included. */
  zero: number;
  /** Zero pages that are file holes (a subset of `zero`). */
  hole: number;
  text: number;
  random: number;
}

export interface GeneratedImage {
  path: string;
  sizeBytes: number;
  pages: PageCounts;
}

/** xoshiro128** over 32-bit words, seeded through splitmix32: fast and reproducible. */
export class Prng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  constructor(seed: number) {
    let s = seed >>> 0 || 0x9e3779b9;
    const next = (): number => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = next();
    this.b = next();
    this.c = next();
    this.d = next();
  }
  /** Uniform unsigned 32-bit integer. */
  u32(): number {
    const result = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0;
    const t = this.b << 9;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = rotl(this.d, 11);
    return result;
  }
  /** Uniform in [0, 1). */
  float(): number {
    return this.u32() / 2 ** 32;
  }
  /** Uniform integer in [0, n). */
  below(n: number): number {
    return Math.floor(this.float() * n);
  }
  /** Log-uniform integer in [1, max]: many short runs, a few long ones. */
  runLength(max: number): number {
    return Math.min(max, Math.floor(Math.exp(this.float() * Math.log(max + 1))));
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

function checkOptions(o: ImageOptions): Required<ImageOptions> {
  const full = {
    sizeBytes: o.sizeBytes,
    seed: o.seed,
    zeroFraction: o.zeroFraction ?? 0.4,
    holeFraction: o.holeFraction ?? 0.5,
    textFraction: o.textFraction ?? 0.3,
  };
  if (!Number.isSafeInteger(full.sizeBytes) || full.sizeBytes <= 0) {
    throw new RangeError(`image size must be a positive integer, got ${full.sizeBytes}`);
  }
  if (full.sizeBytes % IMAGE_PAGE_SIZE_BYTES !== 0) {
    throw new RangeError(`image size ${full.sizeBytes} is not a multiple of 4096`);
  }
  if (!Number.isSafeInteger(full.seed)) throw new RangeError(`seed must be an integer`);
  for (const k of ['zeroFraction', 'holeFraction', 'textFraction'] as const) {
    if (!(full[k] >= 0 && full[k] <= 1)) throw new RangeError(`${k} must be in [0, 1]`);
  }
  if (full.zeroFraction + full.textFraction > 1 + 1e-9) {
    throw new RangeError('zeroFraction + textFraction must not exceed 1');
  }
  return full;
}

/**
 * The class of every page, as a pure function of the options: one byte per page (PageClass).
 * generateImage writes exactly this plan.
 */
export function planImage(options: ImageOptions): Uint8Array {
  const o = checkOptions(options);
  const pages = o.sizeBytes / IMAGE_PAGE_SIZE_BYTES;
  const plan = new Uint8Array(pages);
  const rng = new Prng(o.seed ^ 0x5a17c0de);
  // Run caps scale down for tiny images so a single run cannot swamp the fractions.
  // Caps: 1 MiB zero runs, 512 KiB data runs (means of about 46 and 26 pages).
  const zeroRunMax = Math.max(1, Math.min(256, pages >> 5));
  const dataRunMax = Math.max(1, Math.min(128, pages >> 5));
  const subRunMax = 32;
  const textShareOfData = o.zeroFraction < 1 ? o.textFraction / (1 - o.zeroFraction) : 0;
  let zero = 0;
  let hole = 0;
  let text = 0;
  let data = 0;
  let p = 0;
  while (p < pages) {
    const isZero = o.zeroFraction >= 1 || (o.zeroFraction > 0 && zero <= o.zeroFraction * p);
    const len = Math.min(pages - p, rng.runLength(isZero ? zeroRunMax : dataRunMax));
    const end = p + len;
    while (p < end) {
      const sub = Math.min(end - p, rng.runLength(subRunMax));
      let cls: PageClass;
      if (isZero) {
        cls = o.holeFraction > 0 && hole <= o.holeFraction * zero ? PageClass.Hole : PageClass.Zero;
        if (o.holeFraction >= 1) cls = PageClass.Hole;
        zero += sub;
        if (cls === PageClass.Hole) hole += sub;
      } else {
        cls =
          textShareOfData > 0 && text <= textShareOfData * data ? PageClass.Text : PageClass.Random;
        if (textShareOfData >= 1) cls = PageClass.Text;
        data += sub;
        if (cls === PageClass.Text) text += sub;
      }
      plan.fill(cls, p, p + sub);
      p += sub;
    }
  }
  return plan;
}

export function countPages(plan: Uint8Array): PageCounts {
  const n = [0, 0, 0, 0];
  for (let i = 0; i < plan.length; i++) n[plan[i]!]!++;
  return { zero: n[0]! + n[1]!, hole: n[0]!, text: n[2]!, random: n[3]! };
}

const WORDS = (
  'the of and to in is was for on that with as by at from this be are or it an which not ' +
  'kernel page memory guest host migration fault thread socket buffer device driver queue ' +
  'request reply error state config value index offset length region cache table entry ' +
  'process signal timer network packet stream file block inode mount user group session ' +
  'alpha beta gamma delta epoch lambda vector matrix cluster node shard replica leader'
).split(' ');

/** A seeded corpus of text lines; text pages are 4 KiB windows of it. */
function makeCorpus(rng: Prng, bytes: number): Buffer {
  const out = Buffer.alloc(bytes + IMAGE_PAGE_SIZE_BYTES);
  let off = 0;
  let line = 0;
  while (off < out.length) {
    let s = `${(line++).toString().padStart(6, '0')} `;
    const words = 4 + rng.below(14);
    for (let i = 0; i < words; i++) {
      const w = WORDS[rng.below(WORDS.length)]!;
      s += (i ? ' ' : '') + (rng.below(9) === 0 ? w.toUpperCase() : w);
      if (rng.below(12) === 0) s += rng.below(2) ? ',' : `=${rng.below(100000)}`;
    }
    s += '.\n';
    off += out.write(s, off, 'latin1');
  }
  return out;
}

/** Deterministic keystream source for random pages. */
function keystream(seed: number): Cipher {
  const key = createHash('sha256').update(`yabusame-image-v1:${seed}`).digest();
  return createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
}

const CHUNK_PAGES = 2048; // 8 MiB per write pass

/** Writes the image to `path` (truncating it); holes are skipped with positional writes. */
export async function generateImage(options: GenerateOptions): Promise<GeneratedImage> {
  const o = checkOptions(options);
  const plan = planImage(o);
  const pages = plan.length;
  const rng = new Prng(o.seed ^ 0x7e47);
  const corpus = makeCorpus(rng, 256 * 1024);
  const corpusWindows = corpus.length - IMAGE_PAGE_SIZE_BYTES;
  const cipher = keystream(o.seed);
  const zeros = Buffer.alloc(CHUNK_PAGES * IMAGE_PAGE_SIZE_BYTES);
  const chunk = Buffer.alloc(CHUNK_PAGES * IMAGE_PAGE_SIZE_BYTES);
  const P = IMAGE_PAGE_SIZE_BYTES;
  const fd = fs.openSync(options.path, 'w', 0o644);
  try {
    for (let first = 0; first < pages; first += CHUNK_PAGES) {
      const last = Math.min(pages, first + CHUNK_PAGES);
      let p = first;
      while (p < last) {
        const cls = plan[p]!;
        let end = p + 1;
        while (end < last && plan[end] === cls) end++;
        const off = (p - first) * P;
        const len = (end - p) * P;
        if (cls === PageClass.Zero) {
          chunk.fill(0, off, off + len);
        } else if (cls === PageClass.Random) {
          // One keystream call per run; the copy into the chunk is a memcpy.
          chunk.set(cipher.update(zeros.subarray(0, len)), off);
        } else if (cls === PageClass.Text) {
          for (let q = p; q < end; q++) {
            const at = off + (q - p) * P;
            const w = rng.below(corpusWindows);
            corpus.copy(chunk, at, w, w + P);
            chunk.write(`[page ${q.toString(16).padStart(8, '0')}] `, at, 'latin1');
          }
        }
        p = end;
      }
      // Write each maximal run of non-hole pages with one positional write.
      p = first;
      while (p < last) {
        if (plan[p] === PageClass.Hole) {
          p++;
          continue;
        }
        let end = p + 1;
        while (end < last && plan[end] !== PageClass.Hole) end++;
        const off = (p - first) * P;
        const len = (end - p) * P;
        let done = 0;
        while (done < len) {
          done += fs.writeSync(fd, chunk, off + done, len - done, p * P + done);
        }
        p = end;
      }
    }
    // Trailing holes: the file still has its full length.
    fs.ftruncateSync(fd, o.sizeBytes);
  } finally {
    fs.closeSync(fd);
  }
  return { path: options.path, sizeBytes: o.sizeBytes, pages: countPages(plan) };
}

/** Parses `4096`, `64K`, `256M`, `1G`, `1GiB`, `2T` (binary units) into bytes. */
export function parseSize(text: string): number {
  const m = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(text.trim());
  if (!m) throw new RangeError(`bad size "${text}" (examples: 4096, 64M, 1G)`);
  const unit = { '': 0, k: 1, m: 2, g: 3, t: 4 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't'];
  const n = Number(m[1]) * 1024 ** unit;
  if (!Number.isSafeInteger(n)) throw new RangeError(`size "${text}" is too large`);
  return n;
}

const USAGE = `usage: gen-image --size <bytes|K|M|G> --seed <n> --out <path> [options]

Writes a deterministic, sparse memory image (4 KiB pages: zero runs, holes, text, random).

  --size <n>            image size (e.g. 64M, 1G); a multiple of 4096
  --seed <n>            PRNG seed (integer); same seed and options => same bytes
  --out <path>          output file (truncated)
  --zero-fraction <f>   share of zero pages, holes included (default 0.4)
  --hole-fraction <f>   share of zero pages left as file holes (default 0.5)
  --text-fraction <f>   share of text pages (default 0.3); the rest is random
  --json                print the result as JSON
  -h, --help            this text
`;

async function main(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseArgs({
      args: argv,
      options: {
        size: { type: 'string' },
        seed: { type: 'string', default: '1' },
        out: { type: 'string' },
        'zero-fraction': { type: 'string' },
        'hole-fraction': { type: 'string' },
        'text-fraction': { type: 'string' },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }).values;
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (!args.size || !args.out) {
    process.stderr.write(`--size and --out are required\n${USAGE}`);
    return 2;
  }
  const num = (s: string | undefined): number | undefined =>
    s === undefined ? undefined : Number(s);
  const started = performance.now();
  let result: GeneratedImage;
  try {
    result = await generateImage({
      path: args.out,
      sizeBytes: parseSize(args.size),
      seed: Number(args.seed),
      zeroFraction: num(args['zero-fraction']),
      holeFraction: num(args['hole-fraction']),
      textFraction: num(args['text-fraction']),
    });
  } catch (err) {
    process.stderr.write(`gen-image: ${(err as Error).message}\n`);
    return 2;
  }
  const elapsedMs = Math.round(performance.now() - started);
  if (args.json) {
    process.stdout.write(`${JSON.stringify({ ...result, elapsedMs })}\n`);
  } else {
    const { zero, hole, text, random } = result.pages;
    process.stdout.write(
      `${result.path}: ${result.sizeBytes} bytes in ${elapsedMs} ms; pages zero=${zero} ` +
        `(hole=${hole}) text=${text} random=${random}\n`,
    );
  }
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then((code) => (process.exitCode = code));
}
