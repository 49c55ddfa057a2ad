/**
 * Page protocol vocabulary (dest <-> source), version 1. Every ws binary message is exactly one
 * frame; ws delimits messages, so frames carry no outer length. Integers are little-endian.
 * Byte offsets are positions in the migration's *image address space* (the region table of the
 * WELCOME frame), u64 on the wire, exact as JS numbers below 2^53 (checked on decode).
 * protocol/README.md is the normative description; keep both in step.
 */

/** Version 2: HELLO's auth field carries the proof of the migration secret (auth.ts). */
export const PROTOCOL_VERSION = 2;
/** "YBSM" as little-endian u32: first field of HELLO. */
export const HELLO_MAGIC = 0x4d534259;

export const FrameType = {
  /** dest -> source, first frame of each connection. */
  HELLO: 0x01,
  /** source -> dest, answer to HELLO: version, nonce, region table. */
  WELCOME: 0x02,
  /** dest -> source (demand): pages wanted now. */
  REQUEST: 0x03,
  /** source -> dest: page contents. */
  DATA: 0x04,
  /** source -> dest: a run of all-zero pages (or file holes); no payload. */
  ZERO: 0x05,
  /** source -> dest (background): bytes sent so far; DONE flag once every page went out. */
  PROGRESS: 0x06,
  /** dest -> source (background): permission to send `bytes` more of DATA payload. */
  CREDIT: 0x07,
  /** dest -> source: every page is present; source -> dest: acknowledged, image released. */
  COMPLETE: 0x08,
  /** either way: a coded error; the sender closes the connection after it. */
  ERROR: 0x09,
  /**
   * dest -> source (background): ranges the dest already holds, sent after every WELCOME on
   * the background channel (a reconnect, a restarted peer) and again whenever PROGRESS says DONE
   * while the dest still misses pages. The last frame of a sync carries HaveFlag.LAST.
   */
  HAVE: 0x0a,
} as const;
export type FrameTypeValue = (typeof FrameType)[keyof typeof FrameType];

export const Channel = { DEMAND: 1, BACKGROUND: 2 } as const;
export type ChannelKind = (typeof Channel)[keyof typeof Channel];

/** A channel's name in logs, metrics labels and the connection URL (`?channel=`). */
export const channelName = (kind: ChannelKind): 'demand' | 'background' =>
  kind === Channel.DEMAND ? 'demand' : 'background';

/** DATA/ZERO flags. */
export const DataFlag = {
  /** Sent in answer to a REQUEST (demand), rather than by the background stream. */
  DEMAND: 0x01,
  /** Reserved (0x02 was "checksum present"; every DATA and ZERO frame now carries one). */
  RESERVED_CHECKSUM: 0x02,
} as const;

/** HAVE flags. */
export const HaveFlag = {
  /** The last HAVE frame of this sync: the source may stream what the ranges leave out. */
  LAST: 0x01,
} as const;

/** PROGRESS flags. */
export const ProgressFlag = {
  /** The background stream has sent every page of the image at least once. */
  DONE: 0x01,
} as const;

export const Limits = {
  /** Migration ids: 1..128 bytes of [A-Za-z0-9._:-]. */
  MAX_ID_BYTES: 128,
  /** HELLO auth field: the proof of the migration secret (auth.ts), or empty. */
  MAX_AUTH_BYTES: 256,
  MAX_REGIONS: 64,
  MAX_REGION_NAME_BYTES: 64,
  /** Entries in one REQUEST frame. */
  MAX_REQUEST_ENTRIES: 1024,
  /** Entries in one HAVE frame. */
  MAX_HAVE_ENTRIES: 4096,
  /** DATA payload bytes in one frame. */
  MAX_DATA_BYTES: 16 * 1024 * 1024,
  /**
   * Largest page size, bytes: a page travels in one DATA frame (UFFDIO_COPY places a huge page
   * whole), so it cannot exceed MAX_DATA_BYTES. 1 GiB pages need a page-fragment rule first.
   */
  MAX_PAGE_BYTES: 16 * 1024 * 1024,
  MAX_ERROR_CODE_BYTES: 64,
  MAX_ERROR_MESSAGE_BYTES: 1024,
  /** Largest ws message a peer accepts: a full DATA frame and its header. */
  MAX_FRAME_BYTES: 16 * 1024 * 1024 + 64,
} as const;

/** Fixed header sizes, in bytes. */
export const HeaderSize = {
  DATA: 24,
  ZERO: 24,
  HAVE: 8,
  HAVE_ENTRY: 16,
  REQUEST: 8,
  REQUEST_ENTRY: 16,
  PROGRESS: 24,
  CREDIT: 8,
  COMPLETE: 8,
} as const;

export interface RegionInfo {
  /** Start of the region in the image address space, bytes. */
  offset: number;
  /** Region length, bytes (a multiple of pageSizeBytes). */
  sizeBytes: number;
  /** Page size of the region, bytes (a power of two, 4096..Limits.MAX_PAGE_BYTES). */
  pageSizeBytes: number;
  name: string;
}

export interface PageRange {
  /** Image offset, bytes, page-aligned. */
  offset: number;
  /** Length, bytes, a whole number of pages. */
  length: number;
}

export type Frame =
  | {
      type: typeof FrameType.HELLO;
      version: number;
      channel: ChannelKind;
      migrationId: string;
      /** The proof of the migration secret (auth.ts), or empty when the source needs none. */
      auth: Uint8Array;
    }
  | {
      type: typeof FrameType.WELCOME;
      version: number;
      channel: ChannelKind;
      /**
       * Where background connections go: a TCP port of the source's host, or 0 for the port of
       * this connection.
       */
      backgroundPort: number;
      /** The connection's 16-byte nonce, as the upgrade response's nonce header sent it. */
      nonce: Uint8Array;
      regions: RegionInfo[];
    }
  | { type: typeof FrameType.REQUEST; ranges: PageRange[] }
  | {
      type: typeof FrameType.DATA;
      flags: number;
      offset: number;
      /** CRC-32 of header bytes 0..15 then the payload (verified by decodeFrame). */
      checksum: number;
      /** A view into the received message: no copy. */
      payload: Uint8Array;
    }
  | { type: typeof FrameType.ZERO; flags: number; offset: number; length: number }
  | { type: typeof FrameType.HAVE; flags: number; ranges: PageRange[] }
  | { type: typeof FrameType.PROGRESS; flags: number; sentBytes: number; totalBytes: number }
  | { type: typeof FrameType.CREDIT; bytes: number }
  | { type: typeof FrameType.COMPLETE; pages: number }
  | { type: typeof FrameType.ERROR; code: string; message: string };

export type FrameOf<T extends FrameTypeValue> = Extract<Frame, { type: T }>;
