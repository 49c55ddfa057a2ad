/**
 * Working sets for prefetch (REAP, FaaSnap: restores of one snapshot fault on nearly the same
 * pages, in nearly the same order). A restore without a usable working set records the image
 * offsets of its demand faults, in order, and writes them beside the snapshot when it completes;
 * the next restore of the same snapshot streams those pages first, in that order.
 *
 * "The same snapshot" is checked, not assumed: the file records the snapshot's size, its mtime
 * (nanoseconds) and a SHA-256 over 16 pages sampled across it; a snapshot rewritten in place, or
 * replaced by another, does not match, and the restore records afresh. The file is written
 * atomically (a temporary file in the same folder, fsync, rename, fsync of the folder): a
 * restore never reads half a working set.
 */
import { createHash, randomBytes } from 'node:crypto';
import { fstatSync, readFileSync, readSync } from 'node:fs';
import { open, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { z } from 'zod';

/** What makes a snapshot memory file the same one as before. */
export interface SnapshotIdentity {
  sizeBytes: number;
  /** Modification time, nanoseconds since the epoch (decimal: beyond 2^53). */
  mtimeNs: string;
  /** SHA-256 (hex) of SAMPLES pages of SAMPLE_BYTES spread evenly over the file. */
  sampleSha256: string;
}

const SAMPLES = 16;
const SAMPLE_BYTES = 4096;
/** At most this many offsets are kept (a 64 GiB guest touching every page is 16 Mi pages). */
export const MAX_WORKING_SET_PAGES = 16 * 1024 * 1024;

/** The identity of the open file `fd`. */
export function snapshotIdentity(fd: number): SnapshotIdentity {
  const st = fstatSync(fd, { bigint: true });
  const size = Number(st.size);
  const hash = createHash('sha256');
  const buf = Buffer.alloc(SAMPLE_BYTES);
  for (let i = 0; i < SAMPLES; i++) {
    const at = Math.floor((size * i) / SAMPLES / SAMPLE_BYTES) * SAMPLE_BYTES;
    const n = size > at ? readSync(fd, buf, 0, Math.min(SAMPLE_BYTES, size - at), at) : 0;
    hash.update(buf.subarray(0, n));
  }
  return { sizeBytes: size, mtimeNs: st.mtimeNs.toString(), sampleSha256: hash.digest('hex') };
}

const safeInt = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const WorkingSetFile = z.strictObject({
  format: z.literal('yabusame-working-set'),
  version: z.literal(1),
  snapshot: z.strictObject({
    sizeBytes: safeInt,
    mtimeNs: z.string().regex(/^\d{1,30}$/),
    sampleSha256: z.string().regex(/^[0-9a-f]{64}$/),
  }),
  recordedAt: z.string().max(64),
  /** Image (= file) offsets of the pages, in the order they faulted. */
  offsets: z.array(safeInt).max(MAX_WORKING_SET_PAGES),
});

export type WorkingSetRead =
  | { offsets: number[]; recordedAt: string }
  /** Why it cannot be used (the restore records a new one). */
  | { unusable: string };

/** Reads the working set in `file` if it was recorded for `identity`. */
export function readWorkingSet(file: string, identity: SnapshotIdentity): WorkingSetRead {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    const code = (err as { code?: string }).code;
    return { unusable: code === 'ENOENT' ? 'none recorded yet' : `unreadable (${code})` };
  }
  let parsed;
  try {
    parsed = WorkingSetFile.safeParse(JSON.parse(text));
  } catch {
    return { unusable: 'not JSON' };
  }
  if (!parsed.success) return { unusable: `invalid: ${parsed.error.issues[0]?.message}` };
  const s = parsed.data.snapshot;
  if (
    s.sizeBytes !== identity.sizeBytes ||
    s.mtimeNs !== identity.mtimeNs ||
    s.sampleSha256 !== identity.sampleSha256
  ) {
    return { unusable: 'recorded for another snapshot (size, mtime or content differ)' };
  }
  return { offsets: parsed.data.offsets, recordedAt: parsed.data.recordedAt };
}

/** Writes a working set for `identity` to `file`, atomically. */
export async function writeWorkingSet(
  file: string,
  identity: SnapshotIdentity,
  offsets: readonly number[],
): Promise<void> {
  const body = JSON.stringify({
    format: 'yabusame-working-set',
    version: 1,
    snapshot: identity,
    recordedAt: new Date().toISOString(),
    offsets: offsets.slice(0, MAX_WORKING_SET_PAGES),
  });
  const dir = dirname(file);
  const tmp = join(dir, `.${basename(file)}.${randomBytes(6).toString('hex')}.tmp`);
  const f = await open(tmp, 'wx', 0o640);
  try {
    await f.writeFile(body + '\n');
    await f.sync();
  } catch (err) {
    await f.close();
    await unlink(tmp).catch(() => {});
    throw err;
  }
  await f.close();
  try {
    await rename(tmp, file);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
  // The rename itself is durable once the folder is synced.
  const d = await open(dir, 'r');
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}
