/**
 * vm-sim: the reference VMM, and the oracle of every test and benchmark.
 *
 * 1. maps anonymous guest RAM, creates a userfaultfd and registers the RAM in MISSING mode;
 * 2. hands the uffd to `yabusame dest` (handoff line + SCM_RIGHTS over its UNIX socket) and keeps
 *    its own copy of the fd;
 * 3. starts the workload on worker threads as soon as the daemon acks (pages still arriving), so
 *    first touches fault in those threads exactly like vCPUs;
 * 4. after `complete`, stops the workload and verifies every page byte for byte: a page the
 *    workload wrote holds its last stamp over the image page; every other page equals the image.
 *
 * With `resumeOnDaemonDeath` (CLI --resume-timeout) a daemon that dies before `complete` is not
 * a failure: vm-sim keeps its uffd, so the workers stay blocked on their faults, reconnects to
 * the same socket with exponential backoff and hands the uffd over again with `"resume": true`
 * (protocol/README.md, Resuming); `resumes` in the result counts the daemons that took over.
 *
 * The main thread never touches guest RAM before `complete` (a fault there would block the event
 * loop that reads the daemon's replies). After `complete` it checks residency with mincore, then
 * unregisters the RAM so that a page the daemon never placed reads as zeros instead of hanging:
 * right for a zero page (the daemon leaves zero pages nobody touched unplaced), missing for any
 * other.
 *
 * Benchmarks use `touches` (a fixed number of first touches, then wait: faults measured in that
 * phase only), `workers: 0` (no workload: the background stream alone) and runVmSimTouches (end
 * after the touch phase, verifying only the pages placed so far).
 *
 * CLI: node dist/scripts/vm-sim/vm-sim.js --size 256M --image /path --source ws://127.0.0.1:7070 \
 *        --socket /run/yabusame/dest.sock --id vm1 [--workers 4] [--pattern mixed] [--touches N]
 *        [--resume-timeout MS] [--start-gate DIR] [--json]
 * exit 0: every page verified; 1: mismatch; 2: usage, handoff or migration error.
 */
import * as fs from 'node:fs';
import { parseArgs } from 'node:util';
import { pathToFileURL } from 'node:url';
import * as abi from '../../daemon/linux/abi.js';
import * as sys from '../../daemon/linux/sys.js';
import { mincore } from '../../daemon/linux/vmm-extra.js';
import * as uffd from '../../daemon/uffd/uffd.js';
import { HANDOFF_VERSION, encodeHandoff, type HandoffRequest } from '../../protocol/handoff.js';
import { IMAGE_PAGE_SIZE_BYTES, parseSize } from '../image/gen-image.js';
import { singleHandoffRegion } from '../image/regions.js';
import { connectHandoff, type HandoffClient } from '../lib/handoff-client.js';
import { HandoffDriver, type CompleteReply } from './handoff-driver.js';
import { waitAtGate } from './start-gate.js';
import { PATTERNS, type Pattern } from './shared.js';
import {
  VmSimError,
  type HandoffFn,
  type VmSimOptions,
  type VmSimPartialResult,
  type VmSimResult,
} from './types.js';
import { summarize, verifyPages } from './verify.js';
import { Workload } from './workload.js';

export type { Pattern } from './shared.js';
export * from './types.js';

const DEFAULTS = {
  workers: 4,
  pattern: 'mixed' as Pattern,
  writeFraction: 0.2,
  opsAfterComplete: 1000,
  seed: 1,
  maxMismatches: 100,
  latencyCapacity: 1 << 17,
};

/** The default handoff: `yabusame dest` on a UNIX socket. */
export function socketHandoff(path: string): HandoffFn {
  return (request, uffdFd, sink) => {
    let client: HandoffClient;
    try {
      client = connectHandoff(path);
    } catch (err) {
      throw new VmSimError('VMSIM_HANDOFF_FAILED', `connect ${path}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    // The fd travels with the first bytes of the line (protocol/README.md).
    const line = encodeHandoff(request);
    try {
      const sent = client.send(line, [uffdFd]);
      if (sent < line.length) client.send(line.subarray(sent));
    } catch (err) {
      client.close();
      throw new VmSimError('VMSIM_HANDOFF_FAILED', `sendmsg to ${path}`, { cause: err });
    }
    client.onReply(
      (reply) => sink.reply(reply),
      (err) => sink.closed(err),
    );
    return { close: () => client.close() };
  };
}

export async function runVmSim(opts: VmSimOptions): Promise<VmSimResult> {
  const r = await runCore(opts, false);
  return r as VmSimResult; // never partial: it waited for complete
}

/**
 * Like runVmSim with a touch phase (`touches` is required), but ends the run as soon as every
 * worker finished its touches, without waiting for `complete` (benchmarks of demand faults with
 * the background stream held back). If the migration completes first, this is a full run.
 */
export async function runVmSimTouches(
  opts: VmSimOptions & { touches: number },
): Promise<VmSimPartialResult> {
  if (!(opts.touches >= 0) || (opts.workers ?? DEFAULTS.workers) < 1) {
    throw new VmSimError('VMSIM_USAGE', 'runVmSimTouches needs touches >= 0 and workers >= 1');
  }
  return runCore(opts, true);
}

type Options = typeof DEFAULTS & VmSimOptions;

/** Checks the options; returns the guest RAM size and the handoff to use. */
function checkOptions(o: Options): { sizeBytes: number; handoff: HandoffFn } {
  const imageSize = fs.statSync(o.image).size;
  const sizeBytes = o.sizeBytes ?? imageSize;
  const P = IMAGE_PAGE_SIZE_BYTES;
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % P) {
    throw new VmSimError('VMSIM_USAGE', `RAM size ${sizeBytes} is not a positive multiple of ${P}`);
  }
  if (sizeBytes > imageSize) {
    throw new VmSimError('VMSIM_USAGE', `RAM size ${sizeBytes} exceeds the image (${imageSize})`);
  }
  if (!PATTERNS.includes(o.pattern)) throw new VmSimError('VMSIM_USAGE', `pattern ${o.pattern}`);
  if (!(o.workers >= 0 && Number.isInteger(o.workers)))
    throw new VmSimError('VMSIM_USAGE', 'workers must be a non-negative integer');
  if (o.touches !== undefined && !(o.touches >= 0 && Number.isSafeInteger(o.touches)))
    throw new VmSimError('VMSIM_USAGE', 'touches must be a non-negative integer');
  if (o.resumeOnDaemonDeath && !(o.resumeOnDaemonDeath.timeoutMs >= 0)) {
    throw new VmSimError('VMSIM_USAGE', 'resumeOnDaemonDeath.timeoutMs must be >= 0');
  }
  const handoff = o.handoff ?? (o.destSocket ? socketHandoff(o.destSocket) : undefined);
  if (!handoff) throw new VmSimError('VMSIM_USAGE', 'destSocket or handoff is required');
  return { sizeBytes, handoff };
}

/** Anonymous guest RAM registered (MISSING) with a new userfaultfd, as a VMM would have it. */
class GuestRam {
  readonly base: number;
  readonly fd: number;
  private registered = true;

  constructor(readonly sizeBytes: number) {
    this.base = sys.mmap(
      sizeBytes,
      abi.PROT_READ | abi.PROT_WRITE,
      abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_NORESERVE,
    );
    try {
      // No non-cooperative events (REMOVE/UNMAP): they would make our own munmap wait for a
      // daemon that may already have stopped reading. THREAD_ID lets a handler see which
      // thread faulted.
      this.fd = uffd.create(abi.UFFD_FEATURE_THREAD_ID).fd;
      uffd.registerMissing(this.fd, this.base, sizeBytes);
    } catch (err) {
      sys.munmap(this.base, sizeBytes);
      throw err;
    }
  }

  /**
   * Unregisters the RAM: every thread blocked on a fault wakes and sees ordinary anonymous
   * memory, so none can hang on a page the daemon will never place.
   */
  release(): void {
    if (!this.registered) return;
    this.registered = false;
    uffd.unregister(this.fd, this.base, this.sizeBytes);
  }

  /** Pages not resident now (mincore never faults), with the residency map. */
  residency(): { vec: Uint8Array; missing: number } {
    const vec = new Uint8Array(this.sizeBytes / IMAGE_PAGE_SIZE_BYTES);
    mincore(this.base, this.sizeBytes, vec);
    let missing = 0;
    for (const v of vec) if ((v & 1) === 0) missing++;
    return { vec, missing };
  }

  close(): void {
    this.release();
    sys.close(this.fd);
    sys.munmap(this.base, this.sizeBytes);
  }
}

/** How the migration phase ended. */
type Outcome = { kind: 'complete'; report: CompleteReply } | { kind: 'touched' };

async function runCore(opts: VmSimOptions, endAfterTouches: boolean): Promise<VmSimPartialResult> {
  const o: Options = { ...DEFAULTS, ...stripUndefined(opts) };
  const { sizeBytes, handoff } = checkOptions(o);
  const totalPages = sizeBytes / IMAGE_PAGE_SIZE_BYTES;
  const ram = new GuestRam(sizeBytes);
  const workload = new Workload({
    workers: o.workers,
    base: ram.base,
    sizeBytes,
    pageSizeBytes: IMAGE_PAGE_SIZE_BYTES,
    imagePath: o.image,
    pattern: o.pattern,
    writeFraction: o.writeFraction,
    seed: o.seed,
    opsAfterComplete: o.opsAfterComplete,
    touches: o.touches,
    latencyCapacity: DEFAULTS.latencyCapacity,
    maxMismatches: o.maxMismatches,
  });
  let driver: HandoffDriver | undefined;
  let timer: NodeJS.Timeout | undefined;
  const onAbort = (): void =>
    settle.reject(new VmSimError('VMSIM_ABORTED', `aborted: ${String(o.signal?.reason ?? '')}`));
  let settle!: { resolve(outcome: Outcome): void; reject(err: Error): void };
  const outcome = new Promise<Outcome>((resolve, reject) => (settle = { resolve, reject }));
  outcome.catch(() => undefined); // awaited below; this only keeps an early failure handled
  try {
    // --- the workload threads, loaded before the handoff so they start the instant it acks ---
    await workload.ready();
    workload.failed.catch((err: Error) => settle.reject(err));
    if (endAfterTouches) {
      workload.onAllTouched = () => {
        o.onPhaseEnd?.('touched');
        settle.resolve({ kind: 'touched' });
      };
    }
    if (o.timeoutMs && o.timeoutMs > 0) {
      timer = setTimeout(
        () =>
          settle.reject(new VmSimError('VMSIM_TIMEOUT', `not complete after ${o.timeoutMs} ms`)),
        o.timeoutMs,
      );
    }
    if (o.signal?.aborted) onAbort();
    o.signal?.addEventListener('abort', onAbort, { once: true });

    // --- the handoff; its replies drive the run ---
    const request: HandoffRequest = {
      type: 'handoff',
      version: HANDOFF_VERSION,
      migrationId: o.migrationId,
      source: o.source,
      ...(o.secret ? { secret: o.secret } : {}),
      regions: singleHandoffRegion(ram.base, sizeBytes),
    };
    driver = new HandoffDriver(
      {
        handoff,
        request,
        uffdFd: ram.fd,
        totalPages,
        resumeTimeoutMs: o.resumeOnDaemonDeath?.timeoutMs,
      },
      {
        acked: () => {
          if (!o.startGate) workload.go();
          else o.startGate().then(() => workload.go(), settle.reject);
        },
        progress: (p) => o.onProgress?.(p),
        complete: (report) => {
          o.onPhaseEnd?.('complete');
          o.onProgress?.({ presentPages: report.totalPages, totalPages: report.totalPages });
          settle.resolve({ kind: 'complete', report });
        },
        failed: (err) => settle.reject(err),
      },
    );
    const started = performance.now();
    const startedAtMs = Date.now();
    await driver.start();
    const end = await outcome;
    const elapsedMs = performance.now() - started;
    await driver.stop();
    const partial = end.kind === 'touched';

    // --- residency first (never block on a page the daemon did not place) ---
    // Ended after the touch phase: unregister first, so the daemon can place nothing more and
    // residency is final; the workers are all waiting, none is blocked on a fault.
    if (partial) ram.release();
    const { vec: residency, missing: absentPages } = ram.residency();
    if (absentPages > 0) ram.release();
    const results = await (partial ? workload.halt() : workload.complete());
    ram.release();

    // --- final verification, 4 MiB at a time ---
    const verifyStart = performance.now();
    const verify = verifyPages(
      ram.base,
      sizeBytes,
      o.image,
      workload.stamps,
      residency,
      partial,
      o,
    );
    const verifyMs = performance.now() - verifyStart;
    const perWorker = results.map((r) => r.stats);
    const sum = (k: Parameters<typeof Workload.sum>[1]): number => Workload.sum(perWorker, k);
    return {
      totalPages,
      pagesVerified: verify.verified,
      mismatches: [...verify.mismatches, ...workload.online].slice(0, o.maxMismatches),
      mismatchCount: verify.count + workload.onlineCount,
      missingPages: verify.missing,
      writtenPages: verify.writtenPages,
      faultLatencyUs: summarize(
        results.map((r) => r.latencies),
        results.reduce((n, r) => n + r.latencyCount, 0),
        results.reduce((n, r) => Math.max(n, r.latencyMaxUs), 0),
      ),
      elapsedMs: Math.round(elapsedMs),
      verifyMs: Math.round(verifyMs),
      partial,
      ...(end.kind === 'complete' ? { daemonReport: end.report } : {}),
      presentPages: totalPages - absentPages,
      startedAtMs,
      ...(workload.touchPhaseMs === undefined ? {} : { touchPhaseMs: workload.touchPhaseMs }),
      resumes: driver.resumes,
      workload: {
        ops: sum('ops'),
        reads: sum('reads'),
        writes: sum('writes'),
        firstTouches: sum('firstTouches'),
        faults: sum('faults'),
        prePlaced: sum('prePlaced'),
        perWorker,
      },
    };
  } finally {
    if (timer) clearTimeout(timer);
    o.signal?.removeEventListener('abort', onAbort);
    await driver?.stop();
    ram.release();
    await workload.stop();
    driver?.close();
    ram.close();
  }
}

function stripUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

// --- CLI ---

const USAGE = `usage: vm-sim --image <path> --source <ws-url> --socket <path> --id <migration-id> [options]

The reference VMM: maps guest RAM, hands its userfaultfd to \`yabusame dest\`, runs a workload on
worker threads while pages arrive, then verifies every page against the image.

  --image <path>     memory image the source serves (the oracle)
  --size <n>         guest RAM size (e.g. 256M); default the image size
  --source <url>     ws URL of \`yabusame source\`
  --secret-file <f>  the migration's secret (hex), handed to the daemon with the uffd
  --socket <path>    UNIX socket of \`yabusame dest\`
  --id <id>          migration id
  --workers <n>      workload threads (default 4; 0: no workload, background only)
  --touches <n>      touch phase: first-touch n distinct pages in all, then wait for complete
  --pattern <p>      mixed | sequential | random | hotset (default mixed)
  --write-fraction <f>  share of writes (default 0.2)
  --ops-after-complete <n>  operations per worker after complete (default 1000)
  --seed <n>         workload seed (default 1)
  --timeout <s>      fail if not complete after this many seconds (default: none)
  --resume-timeout <ms>  survive the daemon's death: if the handoff connection is lost before
                     complete, hand the uffd over again (resume) to the daemon restarted on the
                     same socket, waiting up to this long for it (default: a loss fails the run)
  --start-gate <dir>  at the handoff's ack create <dir>/<id>.acked, then start the workload
                     only once <dir>/go exists (benchmarks: many VMs' faults start together)
  --json             print the result as JSON on stdout
  -h, --help         this text

exit status: 0 every page verified, 1 mismatch, 2 usage, handoff or migration error
`;

async function main(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseArgs({
      args: argv,
      options: {
        image: { type: 'string' },
        size: { type: 'string' },
        source: { type: 'string' },
        'secret-file': { type: 'string' },
        socket: { type: 'string' },
        id: { type: 'string' },
        workers: { type: 'string' },
        touches: { type: 'string' },
        pattern: { type: 'string' },
        'write-fraction': { type: 'string' },
        'ops-after-complete': { type: 'string' },
        seed: { type: 'string' },
        timeout: { type: 'string' },
        'resume-timeout': { type: 'string' },
        'start-gate': { type: 'string' },
        json: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }).values;
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n${USAGE}`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const missing = (['image', 'source', 'socket', 'id'] as const).filter((k) => !args[k]);
  if (missing.length) {
    process.stderr.write(`missing ${missing.map((k) => `--${k}`).join(', ')}\n${USAGE}`);
    return 2;
  }
  const num = (s: string | undefined): number | undefined =>
    s === undefined ? undefined : Number(s);
  const tty = process.stderr.isTTY;
  let lastPct = -1;
  let result: VmSimResult;
  try {
    result = await runVmSim({
      image: args.image!,
      sizeBytes: args.size ? parseSize(args.size) : undefined,
      source: args.source!,
      secret: args['secret-file'] ? fs.readFileSync(args['secret-file'], 'utf8').trim() : undefined,
      destSocket: args.socket!,
      migrationId: args.id!,
      workers: num(args.workers),
      touches: num(args.touches),
      pattern: args.pattern as Pattern | undefined,
      writeFraction: num(args['write-fraction']),
      opsAfterComplete: num(args['ops-after-complete']),
      seed: num(args.seed),
      timeoutMs: args.timeout ? Number(args.timeout) * 1000 : undefined,
      resumeOnDaemonDeath:
        args['resume-timeout'] === undefined
          ? undefined
          : { timeoutMs: Number(args['resume-timeout']) },
      startGate: args['start-gate'] ? () => waitAtGate(args['start-gate']!, args.id!) : undefined,
      onProgress: ({ presentPages, totalPages }) => {
        const pct = Math.floor((100 * presentPages) / totalPages);
        if (pct === lastPct) return;
        lastPct = pct;
        const text = `vm-sim: ${presentPages}/${totalPages} pages present (${pct}%)`;
        process.stderr.write(tty ? `\r${text}` : `${text}\n`);
      },
    });
  } catch (err) {
    if (tty && lastPct >= 0) process.stderr.write('\n');
    const code = (err as { code?: string }).code ?? 'VMSIM_FAILED';
    process.stderr.write(`vm-sim: ${code}: ${(err as Error).message}\n`);
    return 2;
  }
  if (tty) process.stderr.write('\n');
  const ok = result.mismatchCount === 0 && result.pagesVerified === result.totalPages;
  if (args.json) {
    const { perWorker: _perWorker, ...workload } = result.workload;
    process.stdout.write(`${JSON.stringify({ ok, ...result, workload })}\n`);
  } else {
    const l = result.faultLatencyUs;
    process.stdout.write(
      `${ok ? 'OK' : 'MISMATCH'}: ${result.pagesVerified}/${result.totalPages} pages verified, ` +
        `${result.mismatchCount} mismatches, ${result.writtenPages} pages written; ` +
        `migration ${result.elapsedMs} ms, verify ${result.verifyMs} ms; faults ${l.count} ` +
        `p50 ${l.p50} µs p99 ${l.p99} µs p99.9 ${l.p999} µs max ${l.max} µs\n`,
    );
    for (const m of result.mismatches.slice(0, 20)) {
      process.stdout.write(`  page ${m.page}: ${m.reason}\n`);
    }
  }
  return ok ? 0 : 1;
}

if (process.argv[1] && import.meta.url === pathToFileURL(fs.realpathSync(process.argv[1])).href) {
  main(process.argv.slice(2)).then((code) => (process.exitCode = code));
}
