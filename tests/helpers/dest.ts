/**
 * In-process pieces for dest tests: a dest daemon with quick timeouts and no HTTP endpoint, and
 * guest RAM registered with a userfaultfd, as a VMM would hand it over. The daemon runs without
 * secrets unless `requireSecret` (its scripted sources speak no authentication), so only
 * loopback sources are allowed, as with --insecure-no-auth.
 */
import * as sys from '../../daemon/linux/sys.js';
import * as abi from '../../daemon/linux/abi.js';
import * as uffd from '../../daemon/uffd/uffd.js';
import { startDestDaemon, type DestDaemon } from '../../daemon/dest/daemon.js';
import { silentLogger } from '../../daemon/ops/log.js';
import { noopDestMetrics, type DestMetrics } from '../../daemon/ops/metric-ports.js';

export interface TestDestOptions {
  /** Handoff and connect timeouts, ms. */
  timeoutMs?: number;
  connectTimeoutMs?: number;
  reconnectTimeoutMs?: number;
  metrics?: DestMetrics;
  /** Nice value of the bulk thread (the daemon's default when absent). */
  bulkNice?: number;
  /** A stand-in for the bulk thread. */
  bulkWorkerUrl?: URL;
  /** Handoffs must carry a secret (the daemon's default; off here). */
  requireSecret?: boolean;
  /** Background credit per session at most (1 MiB here). */
  backgroundWindowBytes?: number;
}

export function startTestDest(socketPath: string, o: TestDestOptions = {}): Promise<DestDaemon> {
  const timeoutMs = o.timeoutMs ?? 2000;
  return startDestDaemon({
    socketPath,
    http: null,
    maxSessions: 8,
    handoffTimeoutMs: timeoutMs,
    peers: {
      allowedUids: [process.getuid!()],
      allowedGids: [],
      maxSessionsPerUid: 8,
      maxPending: 16,
      maxPendingPerUid: 16,
    },
    session: {
      connectTimeoutMs: o.connectTimeoutMs ?? timeoutMs,
      completeTimeoutMs: timeoutMs,
      backgroundWindowBytes: o.backgroundWindowBytes ?? 1 << 20,
      progressIntervalMs: 1000,
      heartbeatMs: 0,
      reconnectTimeoutMs: o.reconnectTimeoutMs ?? 300,
      requireSecret: o.requireSecret ?? false,
      sourcePolicy: { allowed: [], allowPlaintext: false, loopbackOnly: !o.requireSecret },
    },
    log: silentLogger,
    metrics: o.metrics ?? noopDestMetrics,
    ...(o.bulkNice !== undefined ? { bulkNice: o.bulkNice } : {}),
    ...(o.bulkWorkerUrl ? { bulkWorkerUrl: o.bulkWorkerUrl } : {}),
  });
}

/** Anonymous guest RAM registered MISSING with a new userfaultfd (UFFDIO_API done). */
export function guestRam(sizeBytes: number, features = 0): { base: number; fd: number } {
  const base = sys.mmap(
    sizeBytes,
    abi.PROT_READ | abi.PROT_WRITE,
    abi.MAP_PRIVATE | abi.MAP_ANONYMOUS,
  );
  const { fd } = uffd.create(features);
  uffd.registerMissing(fd, base, sizeBytes);
  return { base, fd };
}
