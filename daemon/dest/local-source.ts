/**
 * Where a session's pages come from when they come from a memory file on this host: a
 * Firecracker snapshot's memory file, restored lazily, with no network and no second process.
 * It is the remote source's counterpart behind the same port (page-source.ts):
 *  - demand: the session's awaited pages are read here, on the main thread, with pread (a page
 *    in the page cache costs microseconds; a hop to another thread would cost more), and placed
 *    at once as 'demand' runs; holes (lseek SEEK_DATA/SEEK_HOLE) and all-zero pages go as zero
 *    runs (UFFDIO_ZEROPAGE: no memory);
 *  - background: a file lane on the bulk thread (file-lane.ts) reads every other page into the
 *    payload ring, and the daemon-wide queue places it between faults, as for a connection.
 *
 * The file's regions are the handed-over ones: Firecracker lays its regions out back to back in
 * the memory file (offset(i) = the sum of the sizes before it), so they must tile it exactly; a
 * handshake that does not is refused with SOURCE_MISMATCH. A file that cannot be opened or read
 * is IMAGE_IO (refused at the handshake, or ending the session later).
 *
 * Prefetch (working-set.ts): with a working-set file configured, a restore that finds none for
 * this snapshot records the order of its demand faults and writes it when it completes; a
 * restore that finds one streams those pages first, in that order, from start() on (not held
 * back by backgroundDelayMs: they stand for the demand to come), and records nothing.
 */
import { fstatSync } from 'node:fs';
import { O_NONBLOCK, O_RDONLY } from '../linux/abi.js';
import * as sys from '../linux/sys.js';
import type { PageRange, RegionInfo } from '../../protocol/wire.js';
import { scanExtents, type DataExtents } from '../source/extents.js';
import type { Logger } from '../ops/log.js';
import type { BulkLaneFactory, FileLane } from './bulk.js';
import type { LinkStatus, PageSource, PageSourceFactory, SourceHooks } from './page-source.js';
import type { RegionTable } from './regions.js';
import { SessionError } from './session-error.js';
import {
  readWorkingSet,
  snapshotIdentity,
  writeWorkingSet,
  type SnapshotIdentity,
} from './working-set.js';

export interface LocalSourceOptions {
  /** The memory file. */
  path: string;
  /** Background bytes in flight. */
  windowBytes: number;
  /** The working-set file (prefetch on), or null (off). */
  workingSetFile: string | null;
}

/** What prefetch did on a restore, for logs and status. */
export type PrefetchMode = 'off' | 'record' | 'replay';

/** Largest demand read at once, bytes (a run of adjacent faults; at least one page). */
const DEMAND_READ_BYTES = 1024 * 1024;

export class LocalFileSource implements PageSource {
  readonly reconnects = 0;
  sourceDone = false;
  readonly label: string;
  /** Demand prefetch (page-source.ts): not for a file. */
  readonly prefetches = false;
  prefetch: PrefetchMode = 'off';
  /** Pages streamed first (replay), or recorded so far (record). */
  prefetchPages = 0;
  /** Bytes read from the file (demand and background). */
  receivedBytes = 0;
  /** As status shows a source's channels: the file is "up" while it is open. */
  links: Record<'demand' | 'background', LinkStatus> = {
    demand: { state: 'connecting', since: Date.now() },
    background: { state: 'connecting', since: Date.now() },
  };
  private fd = -1;
  private extents: DataExtents | null = null;
  private identity: SnapshotIdentity | null = null;
  private lane: FileLane | null = null;
  private recorded: number[] | null = null;
  /** Demand ranges not read yet (request() while reading queues here). */
  private readonly queue: PageRange[] = [];
  private reading = false;
  private scratch = Buffer.alloc(0);
  private readonly zero = new Map<number, Buffer>();
  private resyncSent = false;
  private closing: Promise<void> | null = null;
  private failed = false;

  constructor(
    private readonly opts: LocalSourceOptions,
    private readonly hooks: SourceHooks,
    private readonly deps: { table: RegionTable; log: Logger; bulk: BulkLaneFactory },
  ) {
    this.label = opts.path;
  }

  /** Opens the file and checks that the regions tile it; throws SessionError. */
  async open(): Promise<void> {
    let size: number;
    try {
      this.fd = sys.open(this.opts.path, O_RDONLY | O_NONBLOCK);
      const st = fstatSync(this.fd);
      if (!st.isFile()) throw new Error('not a regular file');
      size = st.size;
      this.extents = scanExtents(this.fd, 0, size);
    } catch (err) {
      throw new SessionError(
        'IMAGE_IO',
        `cannot read the memory file ${this.opts.path}: ${(err as Error).message}`,
        { cause: err },
      );
    }
    const regions: RegionInfo[] = [...this.deps.table.regions]
      .sort((a, b) => a.offset - b.offset)
      .map((r) => ({
        name: r.name,
        offset: r.offset,
        sizeBytes: r.sizeBytes,
        pageSizeBytes: r.pageSizeBytes,
      }));
    let end = 0;
    for (const r of regions) {
      if (r.offset !== end) {
        throw new SessionError(
          'SOURCE_MISMATCH',
          `region ${r.name} starts at byte ${r.offset} of ${this.opts.path}, not at ${end}: Firecracker's regions lie back to back in its memory file`,
        );
      }
      end = r.offset + r.sizeBytes;
    }
    if (end !== size) {
      throw new SessionError(
        'SOURCE_MISMATCH',
        `the regions cover ${end} bytes but the memory file ${this.opts.path} has ${size}`,
      );
    }
    const why = this.hooks.mismatch(regions);
    if (why) throw new SessionError('SOURCE_MISMATCH', why);
    const first = this.preparePrefetch(regions);
    const up: LinkStatus = { state: 'up', since: Date.now() };
    this.links = { demand: up, background: up };
    this.lane = this.deps.bulk.fileLane(
      {
        fd: this.fd,
        path: this.opts.path,
        regions,
        windowBytes: this.opts.windowBytes,
        first,
      },
      {
        run: (r) => {
          this.receivedBytes += r.data?.length ?? 0;
          this.hooks.run({ offset: r.offset, length: r.length, data: r.data, path: 'background' });
        },
        sourceDone: () => this.onSourceDone(),
        fail: (code, message) => this.fail(code, message),
      },
      first ? [first.buffer as ArrayBuffer] : [],
    );
  }

  /** Reads the working set (replay) or starts recording one; the pages to stream first. */
  private preparePrefetch(regions: readonly RegionInfo[]): Float64Array | null {
    const file = this.opts.workingSetFile;
    if (!file) return null;
    try {
      this.identity = snapshotIdentity(this.fd);
    } catch (err) {
      this.deps.log.warn('prefetch off: cannot identify the memory file', { err });
      return null;
    }
    const ws = readWorkingSet(file, this.identity);
    if ('unusable' in ws) {
      this.prefetch = 'record';
      this.recorded = [];
      this.deps.log.info("prefetch: recording this restore's working set", {
        workingSetFile: file,
        because: ws.unusable,
      });
      return null;
    }
    // Only whole pages inside the file are streamed (a stale entry is dropped, not trusted).
    const valid = ws.offsets.filter((off) => {
      const r = regions.find((x) => off >= x.offset && off < x.offset + x.sizeBytes);
      return r !== undefined && (off - r.offset) % r.pageSizeBytes === 0;
    });
    this.prefetch = 'replay';
    this.prefetchPages = valid.length;
    this.deps.log.info('prefetch: streaming the recorded working set first', {
      workingSetFile: file,
      pages: valid.length,
      recordedAt: ws.recordedAt,
    });
    return Float64Array.from(valid);
  }

  info(): Record<string, unknown> {
    return { prefetch: this.prefetch, prefetchPages: this.prefetchPages };
  }

  start(): void {
    this.lane?.start();
  }

  openWindow(): void {
    this.lane?.openWindow();
  }

  /**
   * Reads the awaited pages and hands them to the session at once. Placing them settles pages,
   * which may send more requests here: those are queued and read in this same loop.
   */
  request(batches: readonly PageRange[][]): boolean {
    if (this.failed) return false;
    for (const b of batches) this.queue.push(...b);
    if (this.reading) return true;
    this.reading = true;
    const served: PageRange[] = [];
    try {
      while (this.queue.length > 0 && !this.failed) {
        const range = this.queue.shift()!;
        this.serve(range);
        served.push(range);
      }
    } finally {
      this.reading = false;
    }
    if (served.length > 0) this.lane?.demanded(served);
    return true;
  }

  private serve(range: PageRange): void {
    this.deps.table.pieces(range.offset, range.length, (r, first, count) => {
      const ps = r.pageSizeBytes;
      if (this.recorded) {
        for (let i = 0; i < count; i++) {
          this.recorded.push(r.imageOffset(first + i));
          this.prefetchPages++;
        }
      }
      const step = Math.max(1, Math.floor(DEMAND_READ_BYTES / ps));
      for (let p = first; p < first + count && !this.failed; p += step) {
        this.readRun(r.imageOffset(p), Math.min(step, first + count - p), ps);
      }
    });
  }

  /** Reads `count` pages at image (= file) offset `offset` and hands them over as runs. */
  private readRun(offset: number, count: number, ps: number): void {
    const len = count * ps;
    if (this.extents!.isHole(offset, offset + len)) {
      this.hooks.run({ offset, length: len, data: null, path: 'demand' });
      return;
    }
    if (this.scratch.length < len) this.scratch = Buffer.alloc(Math.max(len, 64 * 1024));
    const buf = this.scratch;
    try {
      for (let done = 0; done < len;) {
        const n = sys.pread(this.fd, buf.subarray(done), len - done, offset + done);
        if (n === 0) throw new Error(`the file ends at byte ${offset + done}: truncated?`);
        done += n;
      }
    } catch (err) {
      this.fail('IMAGE_IO', `reading ${this.opts.path}: ${(err as Error).message}`);
      return;
    }
    this.receivedBytes += len;
    let zero = this.zero.get(ps);
    if (!zero) this.zero.set(ps, (zero = Buffer.alloc(ps)));
    // Runs of all-zero pages are placed as zeros, the rest as data (run.data is only read
    // during the call, so the scratch buffer is reused for the next read).
    let i = 0;
    while (i < count) {
      const isZero = zero.compare(buf, i * ps, (i + 1) * ps) === 0;
      let j = i + 1;
      while (j < count && (zero.compare(buf, j * ps, (j + 1) * ps) === 0) === isZero) j++;
      this.hooks.run({
        offset: offset + i * ps,
        length: (j - i) * ps,
        data: isZero ? null : buf.subarray(i * ps, j * ps),
        path: 'demand',
      });
      i = j;
    }
  }

  private onSourceDone(): void {
    this.sourceDone = true;
    // Every page was streamed, yet some are missing (a placement that had to give up, a run of a
    // resync): stream what the session does not hold, once per pass.
    if (!this.hooks.complete() && !this.resyncSent) {
      this.resyncSent = true;
      this.lane?.have(this.hooks.settledRanges());
    }
  }

  private fail(code: Parameters<SourceHooks['fail']>[0], message: string): void {
    if (this.failed) return;
    this.failed = true;
    this.hooks.fail(code, message);
  }

  /** Every page is settled: stops the stream, writes the working set if one was recorded. */
  async complete(): Promise<boolean> {
    await this.lane?.close();
    const file = this.opts.workingSetFile;
    if (file && this.recorded && this.recorded.length > 0 && this.identity) {
      try {
        await writeWorkingSet(file, this.identity, this.recorded);
        this.deps.log.info('prefetch: working set recorded', {
          workingSetFile: file,
          pages: this.recorded.length,
        });
      } catch (err) {
        this.deps.log.warn('prefetch: cannot write the working set', { workingSetFile: file, err });
      }
    }
    return true;
  }

  /** Stops the stream, then closes the file (the bulk thread no longer reads it). */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.lane?.close();
      if (this.fd >= 0) sys.close(this.fd);
      this.fd = -1;
      const closed: LinkStatus = { state: 'closed', since: Date.now() };
      this.links = { demand: closed, background: closed };
    })();
    return this.closing;
  }
}

/** The page source of a session served from the memory file `opts.path`. */
export function localPageSource(
  opts: LocalSourceOptions,
  deps: { bulk: BulkLaneFactory },
  onCreated?: (source: LocalFileSource) => void,
): PageSourceFactory {
  return (hooks, { table, log }) => {
    const source = new LocalFileSource(opts, hooks, { table, log, bulk: deps.bulk });
    onCreated?.(source);
    return source;
  };
}
