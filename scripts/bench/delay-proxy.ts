/**
 * The emulated link's delay (scripts/bench/c/delay-proxy.c): a TCP proxy that holds every chunk
 * a fixed time in each direction. The bench runs it with --fifo (SCHED_FIFO) and --spin-us 15
 * (the timer fires 15 µs early and the proxy spins to the due time): on this shared 2-core
 * machine a plain timer wake-up came about 7 µs late at the median and milliseconds late at p99;
 * with both, 0 µs and about 7 µs. `link/calibration` reports what it adds.
 */
import { compileC } from './cc.js';
import { startCHelper } from './c-proc.js';
import type { BenchContext } from './harness.js';

export interface ProxyStats {
  delayUs: number;
  connections: number;
  refused: number;
  bytesUp: number;
  bytesDown: number;
  chunks: number;
  /** How late chunks left against their due time, µs. */
  lateP50Us: number;
  lateP99Us: number;
  lateMaxUs: number;
}

export interface DelayProxy {
  /** Listening ports, in the order of `maps`. */
  ports: number[];
  stop(): Promise<ProxyStats>;
  kill(): void;
}

/** How the bench runs the proxy (see above). */
export const PROXY_PRECISION = { fifo: true, spinUs: 15 };

/**
 * Starts the proxy in `netns` (or here) forwarding each `listen` (host:port, port 0 picks one)
 * to its `target`, with `delayUs` added each way.
 */
export async function startDelayProxy(
  ctx: BenchContext,
  o: {
    delayUs: number;
    maps: Array<{ listen: string; target: string }>;
    netns?: string;
    fifo?: boolean;
    spinUs?: number;
  },
): Promise<DelayProxy> {
  const bin = await compileC(ctx, 'delay-proxy');
  const args = ['--delay-us', String(o.delayUs)];
  for (const m of o.maps) args.push('--map', `${m.listen}=${m.target}`);
  if (o.fifo ?? PROXY_PRECISION.fifo) args.push('--fifo');
  const spin = o.spinUs ?? PROXY_PRECISION.spinUs;
  if (spin > 0 && o.delayUs > 0) args.push('--spin-us', String(spin));
  const h = startCHelper(ctx, bin, args, { netns: o.netns });
  const line = await h.ready;
  const ports = line.split(' ').slice(1).map(Number);
  if (line.split(' ')[0] !== 'listening' || ports.length !== o.maps.length) {
    h.kill();
    throw new Error(`delay-proxy said ${JSON.stringify(line)}`);
  }
  return { ports, stop: () => h.finish<ProxyStats>(), kill: () => h.kill() };
}
