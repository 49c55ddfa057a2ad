/**
 * The narrow metric ports the cores depend on. daemon/ops/metrics.ts implements them with
 * prom-client (the only importer); tests pass the no-op versions below or a counting fake.
 * Units are base units (seconds, bytes). No label ever carries an address. The migration id is
 * a label only of the per-migration series (trackMigration): sampled at each scrape, removed
 * when the migration ends, and capped in number by the implementation.
 */
export type PagePath = 'demand' | 'background';
export type PageKind = 'data' | 'zero';
export type ChannelName = 'demand' | 'background';

/** What a dest session reports about itself at each scrape (its per-migration series). */
export interface DestMigrationSample {
  totalPages: number;
  /** Pages settled: placed, found present, or discarded by the guest. */
  presentPages: number;
  /** Faults whose page has not arrived yet (vCPUs waiting). */
  faultsWaiting: number;
  /** Frame bytes received from the source, both channels (only ever grows). */
  receivedBytes: number;
  /** Connections lost and restored (only ever grows). */
  reconnects: number;
  /**
   * Each channel that should be connected: true when it is, false while it (re)connects.
   * A channel closed on purpose (the background after the last page) is absent.
   */
  links: Partial<Record<ChannelName, boolean>>;
  /** When the session started, ms since the epoch. */
  startedAtMs: number;
}

/** What a source migration reports about itself at each scrape. */
export interface SourceMigrationSample {
  state: 'registered' | 'frozen';
  totalPages: number;
  /** Pages the dest was sent or said it holds (may drop after a background reconnect). */
  sentPages: number;
  /** Pages sent by either path, counting repeats (only ever grows). */
  pagesSent: number;
  connections: Record<ChannelName, boolean>;
  /** REQUEST frames held until the freeze. */
  heldRequests: number;
}

/**
 * The stages of a demand fault on the dest, in order (each from the end of the one before):
 * `request` fault read → its REQUEST handed to the connection; `wire` → the answer's message
 * received (the network both ways and the source, whose own part is `source_read` (REQUEST
 * read → pages read) and `source_send` (→ frame handed to its connection), from the answer);
 * `verify` → the frame decoded and its checksum verified; `place` → UFFDIO_COPY (or ZEROPAGE)
 * returned, which also wakes the faulting threads.
 */
export type FaultStage = 'request' | 'wire' | 'source_read' | 'source_send' | 'verify' | 'place';
export const FAULT_STAGES: readonly FaultStage[] = [
  'request',
  'wire',
  'source_read',
  'source_send',
  'verify',
  'place',
];

export interface SourceMetrics {
  /** Pages sent, by why (demand answer or background stream) and how (DATA or ZERO run). */
  pagesSent(path: PagePath, kind: PageKind, pages: number): void;
  /** Frame bytes written to a connection. */
  bytesSent(channel: ChannelName, bytes: number): void;
  /** Time from a REQUEST frame's arrival to its DATA being handed to the socket. */
  demandServiceSeconds(seconds: number): void;
  /** Connections accepted (after a valid HELLO). */
  connectionOpened(channel: ChannelName): void;
  /** A coded error (protocol, image, I/O). */
  error(code: string): void;
  /** A migration reached a state: registered, frozen, complete, aborted. */
  migrationEvent(event: 'registered' | 'frozen' | 'complete' | 'aborted'): void;
  /**
   * Exports per-migration series for `migrationId`, read from `sample` at each scrape, until
   * the returned function is called (the migration completed, was aborted or disposed).
   */
  trackMigration(migrationId: string, sample: () => SourceMigrationSample): () => void;
}

export interface DestMetrics {
  /** One userfaultfd page fault read. */
  fault(): void;
  /** Time from reading a fault to the page being placed (what the vCPU feels). */
  faultServiceSeconds(seconds: number): void;
  /** One stage of a demand fault answered by a DEMAND frame (FaultStage). */
  faultStage(stage: FaultStage, seconds: number): void;
  /** Pages placed, by path and kind. */
  pagesPlaced(path: PagePath, kind: PageKind, pages: number): void;
  /** Frame bytes received on a connection. */
  bytesReceived(channel: ChannelName, bytes: number): void;
  /** A placement found the page already present (demand and background raced). */
  placeExists(): void;
  /** A placement answered EAGAIN and was retried after draining events. */
  placeRetry(): void;
  /** A handoff ended: 'ok' or the error code it was refused with. */
  handoff(result: string): void;
  /** A session ended: 'complete' or the error code that ended it. */
  sessionEnded(result: string): void;
  /** Sessions currently running (gauge). */
  sessionsActive(n: number): void;
  /** A connection to the source was lost and is being re-established. */
  reconnect(channel: ChannelName): void;
  /** A coded error. */
  error(code: string): void;
  /**
   * Exports per-migration series for `migrationId`, read from `sample` at each scrape, until
   * the returned function is called (the session ended).
   */
  trackMigration(migrationId: string, sample: () => DestMigrationSample): () => void;
  /**
   * A VM the dest cannot serve (a Firecracker whose handshake was refused or whose session
   * failed): it hangs at its next fault unless killed, which `killed` says was done.
   */
  vmUnserved(code: string, killed: boolean): void;
}

const noop = (): void => {};
export const noopSourceMetrics: SourceMetrics = {
  pagesSent: noop,
  bytesSent: noop,
  demandServiceSeconds: noop,
  connectionOpened: noop,
  error: noop,
  migrationEvent: noop,
  trackMigration: () => noop,
};
export const noopDestMetrics: DestMetrics = {
  fault: noop,
  faultServiceSeconds: noop,
  faultStage: noop,
  pagesPlaced: noop,
  bytesReceived: noop,
  placeExists: noop,
  placeRetry: noop,
  handoff: noop,
  sessionEnded: noop,
  sessionsActive: noop,
  reconnect: noop,
  error: noop,
  trackMigration: () => noop,
  vmUnserved: noop,
};
