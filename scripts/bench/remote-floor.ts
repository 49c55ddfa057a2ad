/**
 * The remote floor (scripts/bench/c/remote-floor.c): a C page server and a C fault handler in
 * two processes, one TCP connection between them, one request per fault. vm-sim hands the
 * handler its userfaultfd through `remoteFloorHandoff` (the fd is inherited at fd 3 instead of
 * sent over a UNIX socket: how the fd arrives does not change what a fault costs), and its
 * worker threads raise the faults, exactly as in demand-idle. `ping` measures the network and
 * the server alone.
 */
import type { HandoffFn } from '../vm-sim/vm-sim.js';
import { compileC } from './cc.js';
import { startCHelper, type CHelper } from './c-proc.js';
import type { BenchContext } from './harness.js';

export interface ServeStats {
  requests: number;
  zeroAnswers: number;
  /** CPU of the server process per request, first request to last answer, ns. */
  cpuNsPerRequest: number;
  /** Request read → answer written, µs. */
  serviceP50Us: number;
  serviceP99Us: number;
}

export interface HandleStats {
  faults: number;
  zeroPages: number;
  /** CPU of the handler process per fault, first fault to last placement, ns. */
  cpuNsPerFault: number;
  /** Fault event read → page placed, µs. */
  serviceP50Us: number;
  serviceP99Us: number;
}

export interface PingStats {
  count: number;
  length: number;
  depth: number;
  p50Us: number;
  p99Us: number;
  minUs: number;
  maxUs: number;
  bytesPerSec: number;
  cpuNsPerRequest: number;
}

export interface RemoteFloorServer {
  /** host:port to connect to. */
  address: string;
  port: number;
  stop(): Promise<ServeStats>;
  kill(): void;
}

/** Starts the page server on `host` (port chosen by the kernel), in `netns` if given. */
export async function startRemoteFloorServer(
  ctx: BenchContext,
  o: { image: string; host?: string; netns?: string },
): Promise<RemoteFloorServer> {
  const bin = await compileC(ctx, 'remote-floor');
  const host = o.host ?? '127.0.0.1';
  const h = startCHelper(ctx, bin, ['serve', '--listen', `${host}:0`, '--image', o.image], {
    netns: o.netns,
  });
  const line = await h.ready;
  const port = Number(/^listening (\d+)$/.exec(line)?.[1]);
  if (!port) {
    h.kill();
    throw new Error(`remote-floor serve said ${JSON.stringify(line)}`);
  }
  return {
    address: `${host}:${port}`,
    port,
    stop: () => h.finish<ServeStats>(),
    kill: () => h.kill(),
  };
}

/**
 * A vm-sim handoff that serves the faults with the C handler connected to `server` (host:port),
 * in `netns` if given. `stats()` closes the handler (vm-sim closes the session first) and
 * resolves with its figures.
 */
export async function remoteFloorHandoff(
  ctx: BenchContext,
  o: { server: string; netns?: string },
): Promise<{ handoff: HandoffFn; stats(): Promise<HandleStats>; kill(): void }> {
  const bin = await compileC(ctx, 'remote-floor');
  let helper: CHelper | undefined;
  let stats: Promise<HandleStats> | undefined;
  const handoff: HandoffFn = async (request, uffdFd, sink) => {
    const region = request.regions[0];
    if (request.regions.length !== 1 || !region) throw new RangeError('one region expected');
    // stdio 0-2, then the uffd at fd 3 (spawn dup2()s it there, without O_CLOEXEC).
    const args = ['handle', '--connect', o.server, '--uffd', '3'];
    args.push('--base', String(region.base), '--size', String(region.sizeBytes));
    helper = startCHelper(ctx, bin, args, { netns: o.netns, fds: [uffdFd] });
    await helper.ready;
    setImmediate(() =>
      sink.reply({
        type: 'ack',
        migrationId: request.migrationId,
        totalPages: region.sizeBytes / region.pageSizeBytes,
      }),
    );
    return {
      close: () => {
        stats ??= helper!.finish<HandleStats>();
        stats.catch(() => undefined);
      },
    };
  };
  return {
    handoff,
    stats: () => {
      if (!helper) return Promise.reject(new Error('the handoff never happened'));
      stats ??= helper.finish<HandleStats>();
      return stats;
    },
    kill: () => helper?.kill(),
  };
}

/** Round trips (depth 1) or throughput (depth > 1) of the network and the server alone. */
export async function ping(
  ctx: BenchContext,
  o: {
    server: string;
    pages: number;
    count: number;
    length?: number;
    depth?: number;
    netns?: string;
  },
): Promise<PingStats> {
  const bin = await compileC(ctx, 'remote-floor');
  const args = [
    'ping',
    '--connect',
    o.server,
    '--pages',
    String(o.pages),
    '--count',
    String(o.count),
  ];
  if (o.length) args.push('--length', String(o.length));
  if (o.depth) args.push('--depth', String(o.depth));
  const h = startCHelper(ctx, bin, args, { netns: o.netns });
  await h.ready; // ping prints only its result, once done
  return h.finish<PingStats>();
}
