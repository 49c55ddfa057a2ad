/**
 * A fault-injecting TCP proxy for loopback tests: put it between `yabusame dest` and
 * `yabusame source` (the handoff names `ws://127.0.0.1:<proxy port>` as the source) and it
 * forwards every connection both ways, and on command or at random (a seeded PRNG):
 *
 * - **cut**: destroys both sockets of a connection (a dropped link);
 * - **stall**: stops forwarding in both directions, sockets kept open, for N ms or until cut (a
 *   link that went silent: only heartbeats notice). Bytes that arrive meanwhile are held and
 *   delivered in order when the stall ends; a peer that closes a stalled connection cuts it;
 * - **corrupt**: flips one random bit of a forwarded chunk, source→dest only, never in the first
 *   `corruptSkipBytes` bytes of a connection (the HTTP upgrade and WELCOME get through).
 *
 * It learns which channel a connection carries (demand or background) by reading the dest's
 * first WebSocket frame (HELLO), so faults can target a channel. It listens on 127.0.0.1 and
 * refuses any target that is not loopback.
 */
import * as net from 'node:net';

export type FaultKind = 'cut' | 'stall' | 'corrupt';
export type ChannelName = 'demand' | 'background';

/** Which connections a fault targets: all (default), one channel, or one connection id. */
export type ConnFilter = { channel?: ChannelName; id?: number };

export interface ConnInfo {
  id: number;
  /** From the dest's HELLO; undefined until it has been seen (or for a non-yabusame peer). */
  channel: ChannelName | undefined;
  openedAt: number;
  /** dest→source bytes received by the proxy. */
  bytesUp: number;
  /** source→dest bytes received by the proxy. */
  bytesDown: number;
  stalled: boolean;
}

export interface RandomFaults {
  /** Expected faults per second of each kind, over all connections (0 or absent: none). */
  cutPerSec?: number;
  stallPerSec?: number;
  corruptPerSec?: number;
  /** A random stall lasts between these, ms. Default [200, 1500]. */
  stallMs?: [number, number];
  /** How often the dice are rolled, ms. Default 50. */
  tickMs?: number;
}

export interface FaultEvent {
  kind: FaultKind;
  conn: number;
  channel: ChannelName | undefined;
  at: number;
  /** stall: its length (Infinity until cut); corrupt: the connection byte offset flipped. */
  detail?: number;
  random: boolean;
}

export interface ProxyStats {
  accepted: number;
  open: number;
  /** Connections whose upstream (the source) could not be reached. */
  upstreamRefused: number;
  cuts: number;
  stalls: number;
  corruptions: number;
  bytesUp: number;
  bytesDown: number;
}

export interface ChaosProxyOptions {
  /** Where to forward: must be loopback. */
  target: { host?: string; port: number };
  /** Port to listen on (127.0.0.1); 0 (default) picks a free one. */
  port?: number;
  /** PRNG seed (random faults, bit choice). Default 1. */
  seed?: number;
  /** Source→dest bytes of each connection never corrupted. Default 512. */
  corruptSkipBytes?: number;
  /** Random faults from the start; see setRandom(). */
  random?: RandomFaults | null;
  /** Every injected fault, as it happens. */
  onFault?: (e: FaultEvent) => void;
  /**
   * A slow link: each connection forwards at most this many source→dest bytes per second
   * (0 or absent: as fast as the sockets go). Not a fault; it makes a migration last long enough
   * to be hit several times, whatever the machine's speed.
   */
  downBytesPerSec?: number;
}

/** A small, fast, seedable PRNG (mulberry32). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** True for 127.0.0.0/8, ::1, ::ffff:127.x and `localhost`. */
export function isLoopback(host: string): boolean {
  if (host === 'localhost' || host === '::1' || host === '[::1]') return true;
  const v4 = host.startsWith('::ffff:') ? host.slice(7) : host;
  return net.isIPv4(v4) && v4.split('.')[0] === '127';
}

/** Bytes a direction may hold during a stall before the proxy stops reading it. */
const MAX_HELD_BYTES = 64 << 20;
/** The dest's upgrade request plus its first frame must fit here, or the channel stays unknown. */
const SNIFF_LIMIT = 16 << 10;

class Pipe {
  /** Chunks held while stalled. */
  held: Buffer[] = [];
  heldBytes = 0;
  /** `from` ended its stream in order (FIN). */
  ended = false;
  constructor(
    readonly from: net.Socket,
    readonly to: net.Socket,
  ) {}
}

class Conn {
  channel: ChannelName | undefined;
  readonly openedAt = Date.now();
  bytesUp = 0;
  bytesDown = 0;
  stalled = false;
  private stallTimer: NodeJS.Timeout | null = null;
  /** Pacing of source→dest bytes: when the bytes forwarded so far are due (performance.now()). */
  private paceDue = 0;
  private paceTimer: NodeJS.Timeout | null = null;
  private closed = false;
  private sniff: Buffer | null = Buffer.alloc(0);
  readonly up: Pipe;
  readonly down: Pipe;

  constructor(
    readonly id: number,
    readonly client: net.Socket,
    readonly upstream: net.Socket,
    private readonly proxy: ChaosProxy,
    private readonly onClosed: (c: Conn) => void,
  ) {
    this.up = new Pipe(client, upstream);
    this.down = new Pipe(upstream, client);
    for (const p of [this.up, this.down]) {
      p.from.on('data', (chunk: Buffer) => this.onData(p, chunk));
      p.from.on('end', () => {
        p.ended = true;
        // A peer that leaves a stalled connection cuts it; otherwise pass the half-close on.
        if (this.stalled) this.destroy();
        else p.to.end();
      });
      p.from.on('error', () => this.destroy());
      p.from.on('close', () => {
        // Closed after an orderly end in both directions: the other socket closes on its own.
        // Anything else (a reset, an error) is passed on as a cut.
        if (this.client.destroyed && this.upstream.destroyed) this.destroy();
        else if (!p.ended || this.stalled) this.destroy();
      });
      p.to.on('drain', () => this.resumeIfFree(p));
    }
    // Nothing is read from the dest before the source answers the connect.
    client.pause();
  }

  info(): ConnInfo {
    return {
      id: this.id,
      channel: this.channel,
      openedAt: this.openedAt,
      bytesUp: this.bytesUp,
      bytesDown: this.bytesDown,
      stalled: this.stalled,
    };
  }

  matches(f: ConnFilter | undefined): boolean {
    if (!f) return true;
    if (f.id !== undefined && f.id !== this.id) return false;
    if (f.channel !== undefined && f.channel !== this.channel) return false;
    return true;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private onData(p: Pipe, chunk: Buffer): void {
    if (this.closed) return;
    if (p === this.up) {
      this.bytesUp += chunk.length;
      if (this.sniff) this.sniffHello(chunk);
    } else {
      const start = this.bytesDown;
      this.bytesDown += chunk.length;
      this.proxy.maybeCorrupt(this, chunk, start);
      this.pace(chunk.length);
    }
    if (this.stalled) {
      p.held.push(chunk);
      p.heldBytes += chunk.length;
      if (p.heldBytes > MAX_HELD_BYTES) p.from.pause();
      return;
    }
    if (!p.to.write(chunk)) p.from.pause();
  }

  /** Reads from `p` again unless a stall, the pace or a full peer holds it. */
  private resumeIfFree(p: Pipe): void {
    if (this.closed || this.stalled || (p === this.down && this.paceTimer)) return;
    if (!p.to.writableNeedDrain) p.from.resume();
  }

  /** The link's pace changed: what was held back under the old one is due now. */
  repace(): void {
    if (this.paceTimer) clearTimeout(this.paceTimer);
    this.paceTimer = null;
    this.paceDue = 0;
    this.resumeIfFree(this.down);
  }

  /** Stops reading the source until `bytes` more are due at the configured rate. */
  private pace(bytes: number): void {
    const rate = this.proxy.downBytesPerSec;
    if (rate <= 0) return;
    const now = performance.now();
    this.paceDue = Math.max(this.paceDue, now) + (bytes * 1000) / rate;
    if (this.paceTimer || this.paceDue - now < 1) return;
    this.down.from.pause();
    this.paceTimer = setTimeout(() => {
      this.paceTimer = null;
      this.resumeIfFree(this.down);
    }, this.paceDue - now);
  }

  /** Reads the channel byte of the dest's HELLO: the first ws frame after the upgrade request. */
  private sniffHello(chunk: Buffer): void {
    const buf = Buffer.concat([this.sniff!, chunk]);
    this.sniff = buf.length > SNIFF_LIMIT ? null : buf;
    const end = buf.indexOf('\r\n\r\n');
    if (end < 0) return;
    let at = end + 4;
    if (buf.length < at + 2) return;
    const masked = (buf[at + 1]! & 0x80) !== 0;
    let len = buf[at + 1]! & 0x7f;
    at += 2;
    if (len === 126) {
      if (buf.length < at + 2) return;
      len = buf.readUInt16BE(at);
      at += 2;
    } else if (len === 127) {
      this.sniff = null;
      return;
    }
    const mask = masked ? buf.subarray(at, at + 4) : null;
    if (masked) at += 4;
    if (buf.length < at + 2 || len < 2) {
      if (len < 2) this.sniff = null;
      return;
    }
    const byte = (i: number): number => buf[at + i]! ^ (mask ? mask[i % 4]! : 0);
    this.sniff = null;
    if (byte(0) !== 0x01) return; // not a HELLO
    const ch = byte(1);
    this.channel = ch === 1 ? 'demand' : ch === 2 ? 'background' : undefined;
  }

  stall(ms: number): void {
    if (this.closed) return;
    if (this.stallTimer) clearTimeout(this.stallTimer);
    this.stalled = true;
    if (Number.isFinite(ms)) {
      this.stallTimer = setTimeout(() => this.unstall(), ms);
      this.stallTimer.unref();
    } else this.stallTimer = null;
  }

  unstall(): void {
    if (this.stallTimer) clearTimeout(this.stallTimer);
    this.stallTimer = null;
    if (!this.stalled || this.closed) return;
    this.stalled = false;
    for (const p of [this.up, this.down]) {
      const held = p.held;
      p.held = [];
      p.heldBytes = 0;
      let ok = true;
      for (const chunk of held) ok = p.to.write(chunk);
      if (ok) this.resumeIfFree(p);
      else p.from.pause();
    }
  }

  destroy(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.stallTimer) clearTimeout(this.stallTimer);
    this.stallTimer = null;
    if (this.paceTimer) clearTimeout(this.paceTimer);
    this.paceTimer = null;
    this.stalled = false;
    this.up.held = [];
    this.down.held = [];
    this.client.destroy();
    this.upstream.destroy();
    this.onClosed(this);
  }
}

export class ChaosProxy {
  readonly port: number;
  private readonly server: net.Server;
  private readonly conns = new Map<number, Conn>();
  private nextId = 1;
  private readonly rand: () => number;
  private readonly skip: number;
  private readonly target: { host: string; port: number };
  private readonly onFault: ((e: FaultEvent) => void) | undefined;
  /** See ChaosProxyOptions.downBytesPerSec (0: unpaced); setPace changes it. */
  downBytesPerSec: number;
  /** Armed corruptions, consumed in order by the next eligible chunk of a matching connection. */
  private armed: Array<{ filter: ConnFilter | undefined; random: boolean }> = [];
  private randomTimer: NodeJS.Timeout | null = null;
  private readonly counters: ProxyStats = {
    accepted: 0,
    open: 0,
    upstreamRefused: 0,
    cuts: 0,
    stalls: 0,
    corruptions: 0,
    bytesUp: 0,
    bytesDown: 0,
  };
  /** Totals of closed connections (bytes), so stats() stays cumulative. */
  private closedBytes = { up: 0, down: 0 };
  private readonly log: FaultEvent[] = [];

  private constructor(server: net.Server, opts: ChaosProxyOptions) {
    this.server = server;
    this.port = (server.address() as net.AddressInfo).port;
    this.rand = prng(opts.seed ?? 1);
    this.skip = opts.corruptSkipBytes ?? 512;
    this.target = { host: opts.target.host ?? '127.0.0.1', port: opts.target.port };
    this.onFault = opts.onFault;
    this.downBytesPerSec = opts.downBytesPerSec ?? 0;
    server.on('connection', (client) => this.accept(client));
    if (opts.random) this.setRandom(opts.random);
  }

  /** Changes the pace of every connection, open or to come (0: unpaced), from now on. */
  setPace(downBytesPerSec: number): void {
    this.downBytesPerSec = downBytesPerSec;
    for (const c of this.conns.values()) c.repace();
  }

  /** Starts listening on 127.0.0.1. Throws if the target is not loopback. */
  static async start(opts: ChaosProxyOptions): Promise<ChaosProxy> {
    const host = opts.target.host ?? '127.0.0.1';
    if (!isLoopback(host)) throw new Error(`chaos proxy: target ${host} is not loopback`);
    if (!Number.isInteger(opts.target.port) || opts.target.port <= 0 || opts.target.port > 65535)
      throw new Error(`chaos proxy: bad target port ${opts.target.port}`);
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port ?? 0, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    return new ChaosProxy(server, opts);
  }

  /** The ws URL a dest's handoff names as its source. */
  get url(): string {
    return `ws://127.0.0.1:${this.port}`;
  }

  private accept(client: net.Socket): void {
    this.counters.accepted++;
    client.setNoDelay(true);
    const upstream = net.connect({
      host: this.target.host,
      port: this.target.port,
      allowHalfOpen: true,
    });
    upstream.setNoDelay(true);
    const id = this.nextId++;
    const conn = new Conn(id, client, upstream, this, (c) => {
      this.conns.delete(c.id);
      this.closedBytes.up += c.bytesUp;
      this.closedBytes.down += c.bytesDown;
      // A random flip aimed at this connection will never happen.
      this.armed = this.armed.filter((a) => a.filter?.id !== c.id || !a.random);
    });
    this.conns.set(id, conn);
    let connected = false;
    upstream.once('connect', () => {
      connected = true;
      client.resume();
    });
    upstream.once('error', () => {
      if (!connected) this.counters.upstreamRefused++;
    });
  }

  /** Open connections. */
  connections(filter?: ConnFilter): ConnInfo[] {
    return [...this.conns.values()].filter((c) => c.matches(filter)).map((c) => c.info());
  }

  stats(): ProxyStats {
    let up = this.closedBytes.up;
    let down = this.closedBytes.down;
    for (const c of this.conns.values()) {
      up += c.bytesUp;
      down += c.bytesDown;
    }
    return { ...this.counters, open: this.conns.size, bytesUp: up, bytesDown: down };
  }

  /** Every fault injected so far, in order. */
  faults(): FaultEvent[] {
    return [...this.log];
  }

  private record(kind: FaultKind, c: Conn, random: boolean, detail?: number): void {
    const e: FaultEvent = { kind, conn: c.id, channel: c.channel, at: Date.now(), random };
    if (detail !== undefined) e.detail = detail;
    this.log.push(e);
    if (kind === 'cut') this.counters.cuts++;
    else if (kind === 'stall') this.counters.stalls++;
    else this.counters.corruptions++;
    this.onFault?.(e);
  }

  private match(filter?: ConnFilter): Conn[] {
    return [...this.conns.values()].filter((c) => !c.isClosed && c.matches(filter));
  }

  /** Destroys both sockets of every matching connection; returns how many. */
  cutAll(filter?: ConnFilter): number {
    return this.cutConns(this.match(filter), false);
  }

  cut(id: number): boolean {
    return this.cutAll({ id }) === 1;
  }

  private cutConns(list: Conn[], random: boolean): number {
    for (const c of list) {
      this.record('cut', c, random);
      c.destroy();
    }
    return list.length;
  }

  /** Stops forwarding on every matching connection for `ms` (Infinity: until cut); returns how many. */
  stallAll(ms: number, filter?: ConnFilter): number {
    return this.stallConns(this.match(filter), ms, false);
  }

  stall(id: number, ms: number): boolean {
    return this.stallAll(ms, { id }) === 1;
  }

  private stallConns(list: Conn[], ms: number, random: boolean): number {
    for (const c of list) {
      this.record('stall', c, random, ms);
      c.stall(ms);
    }
    return list.length;
  }

  /** Ends every stall now (held bytes are delivered). */
  unstallAll(): void {
    for (const c of this.conns.values()) c.unstall();
  }

  /**
   * Arms `n` bit flips: each corrupts the next source→dest chunk (past corruptSkipBytes) of a
   * matching connection, present or future.
   */
  corruptNext(n: number, filter?: ConnFilter): void {
    for (let i = 0; i < n; i++) this.armed.push({ filter, random: false });
  }

  /** Corruptions armed but not yet applied. */
  get corruptionsPending(): number {
    return this.armed.length;
  }

  /** Called by a connection for each source→dest chunk, before it is forwarded or held. */
  maybeCorrupt(c: Conn, chunk: Buffer, connOffset: number): void {
    if (this.armed.length === 0) return;
    const firstEligible = Math.max(0, this.skip - connOffset);
    if (firstEligible >= chunk.length) return;
    const i = this.armed.findIndex((a) => c.matches(a.filter));
    if (i < 0) return;
    const { random } = this.armed.splice(i, 1)[0]!;
    const at = firstEligible + Math.floor(this.rand() * (chunk.length - firstEligible));
    chunk[at] = chunk[at]! ^ (1 << Math.floor(this.rand() * 8));
    this.record('corrupt', c, random, connOffset + at);
  }

  /**
   * Random faults (null stops them). Each tick, each kind fires with probability rate × tick on
   * one connection drawn at random; a random corruption arms one flip on that connection.
   */
  setRandom(r: RandomFaults | null): void {
    if (this.randomTimer) clearInterval(this.randomTimer);
    this.randomTimer = null;
    if (!r) return;
    const tickMs = r.tickMs ?? 50;
    const [sMin, sMax] = r.stallMs ?? [200, 1500];
    const p = (perSec: number | undefined): number => Math.min(1, ((perSec ?? 0) * tickMs) / 1000);
    const pCut = p(r.cutPerSec);
    const pStall = p(r.stallPerSec);
    const pCorrupt = p(r.corruptPerSec);
    this.randomTimer = setInterval(() => {
      // Roll every die each tick, so the sequence depends on the seed alone, not on traffic.
      const rolls = [this.rand(), this.rand(), this.rand(), this.rand(), this.rand()];
      const live = this.match().filter((c) => !c.stalled);
      if (live.length === 0) return;
      const pick = (x: number): Conn => live[Math.floor(x * live.length)]!;
      if (rolls[0]! < pCut) this.cutConns([pick(rolls[3]!)], true);
      else if (rolls[1]! < pStall) {
        const c = pick(rolls[3]!);
        this.stallConns([c], Math.round(sMin + rolls[4]! * (sMax - sMin)), true);
      } else if (rolls[2]! < pCorrupt)
        this.armed.push({ filter: { id: pick(rolls[3]!).id }, random: true });
    }, tickMs);
    this.randomTimer.unref();
  }

  /** Resolves when `pred` holds for the open connections, polling every few ms; rejects after timeoutMs. */
  async waitFor(pred: (conns: ConnInfo[]) => boolean, timeoutMs = 10_000): Promise<ConnInfo[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const conns = this.connections();
      if (pred(conns)) return conns;
      if (Date.now() > deadline) {
        throw new Error(`chaos proxy: condition not met within ${timeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** Stops random faults, cuts every connection (not counted as faults), stops listening. */
  async close(): Promise<void> {
    this.setRandom(null);
    this.armed = [];
    for (const c of [...this.conns.values()]) c.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
