/**
 * vm-sim's oracle: compares every page of guest RAM with the image (and the stamps the workers
 * wrote), and summarizes the fault latencies the workers measured.
 */
import * as fs from 'node:fs';
import * as sys from '../../daemon/linux/sys.js';
import { IMAGE_PAGE_SIZE_BYTES } from '../image/gen-image.js';
import { STAMP_BYTES, writeStamp } from './shared.js';
import { VmSimError, type LatencySummary, type Mismatch } from './types.js';

export function summarize(samples: Float64Array[], count: number, max: number): LatencySummary {
  let n = 0;
  for (const s of samples) n += s.length;
  const all = new Float64Array(n);
  let off = 0;
  for (const s of samples) {
    all.set(s, off);
    off += s.length;
  }
  all.sort();
  const q = (p: number): number =>
    all.length ? all[Math.min(all.length - 1, Math.floor(p * all.length))]! : 0;
  const round = (x: number): number => Math.round(x * 10) / 10;
  return { count, p50: round(q(0.5)), p99: round(q(0.99)), p999: round(q(0.999)), max: round(max) };
}

export function verifyPages(
  base: number,
  sizeBytes: number,
  imagePath: string,
  stamps: Uint32Array,
  residency: Uint8Array,
  partial: boolean,
  o: { maxMismatches: number },
): {
  verified: number;
  count: number;
  writtenPages: number;
  /** Absent pages that must not be (they should hold data or a stamp). */
  missing: number;
  mismatches: Mismatch[];
} {
  const P = IMAGE_PAGE_SIZE_BYTES;
  const totalPages = sizeBytes / P;
  const chunkPages = 1024;
  const mem = Buffer.alloc(chunkPages * P);
  const img = Buffer.alloc(chunkPages * P);
  const stamp = Buffer.alloc(STAMP_BYTES);
  const mismatches: Mismatch[] = [];
  let verified = 0;
  let count = 0;
  let writtenPages = 0;
  let missing = 0;
  const note = (page: number, reason: string): void => {
    count++;
    if (mismatches.length < o.maxMismatches) mismatches.push({ page, reason });
  };
  const fd = fs.openSync(imagePath, 'r');
  try {
    for (let first = 0; first < totalPages; first += chunkPages) {
      const pages = Math.min(chunkPages, totalPages - first);
      const len = pages * P;
      sys.readMemory(base + first * P, mem, len);
      let got = 0;
      while (got < len) {
        const n = fs.readSync(fd, img, got, len - got, first * P + got);
        if (n === 0) throw new VmSimError('VMSIM_IMAGE', `image shorter than ${sizeBytes} bytes`);
        got += n;
      }
      for (let i = 0; i < pages; i++) {
        const page = first + i;
        const m = mem.subarray(i * P, (i + 1) * P);
        const e = img.subarray(i * P, (i + 1) * P);
        const version = stamps[page]!;
        if (version) {
          writtenPages++;
          writeStamp(stamp, 0, page, version);
        }
        if ((residency[page]! & 1) === 0) {
          // Absent at complete: right only for a page that is zero in the image, which the
          // daemon may leave unplaced (a worker's first touch after complete reads zeros, the
          // RAM being unregistered by then); it is compared below like any page. Every other
          // one is missing. A partial run verifies placed pages only.
          if (partial || e.some((b) => b !== 0)) {
            missing++;
            if (!partial) note(page, 'missing: never placed by the daemon');
            continue;
          }
        }
        const headOk = version
          ? m.subarray(0, STAMP_BYTES).equals(stamp)
          : m.subarray(0, STAMP_BYTES).equals(e.subarray(0, STAMP_BYTES));
        if (headOk && m.subarray(STAMP_BYTES).equals(e.subarray(STAMP_BYTES))) {
          verified++;
          continue;
        }
        const want = version ? Buffer.concat([stamp, e.subarray(STAMP_BYTES)]) : e;
        let at = 0;
        while (at < P && m[at] === want[at]) at++;
        note(
          page,
          `differs at byte ${at}: 0x${m[at]!.toString(16)}, expected 0x${want[at]!.toString(16)}` +
            (version ? ` (stamp v${version})` : ''),
        );
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return { verified, count, writtenPages, missing, mismatches };
}

// --- CLI ---
