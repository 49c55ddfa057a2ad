/**
 * Where a session's pages come from, seen from the session: a port with two implementations.
 *   remote-source.ts  a `yabusame source` on another host (demand channel here, background
 *                     channel on the bulk thread, reconnects, HAVE syncs, COMPLETE)
 *   local-source.ts   a memory file on this host (a Firecracker snapshot): demand reads here,
 *                     the background stream read on the bulk thread; no network, no other process
 * Both deliver verified runs of image bytes through `hooks.run`, which the session hands to its
 * placement (the one writer of the page map), so the session never knows which one it has.
 *
 * The contract, in the order a session uses it:
 *  1. open()       reach the pages and check them against the session's regions (hooks.mismatch);
 *                  faults read meanwhile are kept, not requested;
 *  2. start()      runs may flow (the VMM was acked);
 *  3. request()    fetch these awaited pages, as soon as possible; their runs come with path
 *                  'demand'. False when it cannot now: the pages are then asked for again on
 *                  hooks.demandOpened (every awaited page is re-requested there);
 *  4. openWindow() the background stream may start (after backgroundDelayMs; a local file's
 *                  recorded working set streams from start() on);
 *  5. complete()   every page is settled: let go of the source (a remote one is told COMPLETE and
 *                  may release its image); true when it acknowledged;
 *  6. close()      stop; resolves once no run can reach the session any more (the uffd and any
 *                  file are closed only then: their descriptor numbers could be reused).
 * A source that cannot go on calls hooks.fail with a handoff code (SOURCE_UNREACHABLE after
 * reconnectTimeoutMs, IMAGE_IO for a file that cannot be read, ...).
 */
import type { HandoffErrorCode } from '../../protocol/errors.js';
import type { PageRange, RegionInfo } from '../../protocol/wire.js';
import type { Logger } from '../ops/log.js';
import type { Run } from './placement.js';
import type { RegionTable } from './regions.js';

export interface PageSource {
  /** Rejects with a SessionError (SOURCE_UNREACHABLE, SOURCE_MISMATCH, IMAGE_IO, ...). */
  open(): Promise<void>;
  start(): void;
  openWindow(): void;
  request(batches: readonly PageRange[][]): boolean;
  complete(totalPages: number, timeoutMs: number): Promise<boolean>;
  /** A `code` tells the source why (VMM_GONE, DAEMON_STOPPING...), where it can hear it. */
  close(code?: string, message?: string): Promise<void>;
  /** Connections lost and restored (0 for a file). */
  readonly reconnects: number;
  /** The source has sent every page at least once. */
  readonly sourceDone: boolean;
  /** For logs and status: the source URL, or the file. */
  readonly label: string;
  /** For status: what else this source has to say (a file's prefetch). */
  info?(): Record<string, unknown>;
  /** Each channel to the source as status shows it (a file: up while it is open). */
  readonly links: Readonly<Record<'demand' | 'background', LinkStatus>>;
  /** Bytes received from the source (frames on both channels), or read from the file. */
  readonly receivedBytes: number;
  /** A remote source's DEMAND answer while it is placed, for the fault stages (a file: none). */
  readonly answer?: DemandAnswer;
  /**
   * Whether a sweep's fault should also ask for the pages after it (demandPrefetchBytes): worth
   * it across a network round trip; a local file reads a page in microseconds, and what its
   * faults ask for is the working set it records.
   */
  readonly prefetches: boolean;
}

/**
 * The DEMAND answer being placed, while it is (`end` is -1 otherwise): its image range and its
 * times, so the session can time the stages of the faults it answers. One object, reused.
 */
export interface DemandAnswer {
  offset: number;
  end: number;
  /** performance.now() when its message was received, and when it was decoded and verified. */
  receivedAt: number;
  verifiedAt: number;
  /** The message (its source times: protocol/README.md). */
  message: Uint8Array | null;
}

/**
 * A channel as status shows it: connecting (the first connection), up, reconnecting (lost,
 * being re-established), closed (on purpose: the last page is in, or the session ended).
 */
export type LinkState = 'connecting' | 'up' | 'reconnecting' | 'closed';
export interface LinkStatus {
  state: LinkState;
  /** When it entered that state, ms since the epoch. */
  since: number;
}

/** What a page source needs from its session. */
export interface SourceHooks {
  /** A verified run to place (demand answers at once, background runs from the bulk queue). */
  run(run: Run): void;
  /** A (new) demand connection is up: request every awaited page again. */
  demandOpened(reconnect: boolean): void;
  /** Why these source regions cannot serve the session, or null. */
  mismatch(regions: readonly RegionInfo[]): string | null;
  /** The settled pages as image ranges (a HAVE sync). */
  settledRanges(): PageRange[];
  /** Every page settled? (a PROGRESS DONE before that means a resync). */
  complete(): boolean;
  /** The source cannot serve the session any more. */
  fail(code: HandoffErrorCode, message: string): void;
}

/**
 * Makes a session's page source. Called once, when the session starts; a throw (a SessionError:
 * a source this daemon may not use, no secret...) refuses the handoff with its code.
 */
export type PageSourceFactory = (
  hooks: SourceHooks,
  ctx: { table: RegionTable; log: Logger },
) => PageSource;
