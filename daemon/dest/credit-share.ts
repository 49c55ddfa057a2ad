/**
 * How the bulk thread shares background credit among sessions (pure arithmetic; bulk-worker.ts
 * keeps the state). What every session was granted and has not had placed yet stays within the
 * payload ring, where verified runs wait for the main thread: a run that does not fit there is
 * transferred and lives in memory of its own until collected (16 sessions with a full 8 MiB
 * window each held 128 MiB that way: dest peak RSS 341 MiB in the bench's many-vms, 172 MiB
 * with the windows cut to fit the ring, at the same 0.5 GB/s).
 *
 * Each session whose window is open gets an equal share of the ring, at most its
 * backgroundWindowBytes and at least its least share. A grant never takes the daemon-wide total
 * past the ring, except to give a session its least share: a session that opens while the
 * others hold the ring starts with that much and gets the rest as their runs are placed (their
 * shares shrank, so they do not take it back).
 */

/** The least share of a session, unless its window is smaller: one frame and more. */
export const MIN_SHARE_BYTES = 512 * 1024;

/**
 * A session's least share: MIN_SHARE_BYTES, or its configured window if smaller (a small
 * window is an operator's choice, e.g. to keep heartbeats from queueing behind data on a slow
 * link), and never less than two of its largest pages (a source sends a page only with credit
 * for all of it: a share below a 2 MiB page would stall the stream).
 */
export function leastShare(windowBytes: number, largestPageBytes: number): number {
  return Math.max(Math.min(MIN_SHARE_BYTES, windowBytes), 2 * largestPageBytes);
}

/** A session's share of a ring of `ringBytes` while `open` sessions have their window open. */
export function shareOf(
  ringBytes: number,
  open: number,
  windowBytes: number,
  largestPageBytes: number,
): number {
  const fair = Math.floor(ringBytes / Math.max(1, open));
  return Math.max(leastShare(windowBytes, largestPageBytes), Math.min(windowBytes, fair));
}

/**
 * What to grant a session now (0: nothing): what its share leaves, within the ring's free room
 * or up to its least share, in steps of a quarter share or more (a CREDIT frame per quarter
 * keeps the stream full without chatter). `outstanding`: the session's credit not placed yet;
 * `granted`: every session's.
 */
export function grantNow(o: {
  share: number;
  least: number;
  outstanding: number;
  ringBytes: number;
  granted: number;
}): number {
  const room = Math.max(o.ringBytes - o.granted, o.least - o.outstanding);
  const want = Math.min(o.share - o.outstanding, room);
  if (want <= 0 || (want < o.share / 4 && o.outstanding > 0)) return 0;
  return want;
}
