/**
 * vm-sim's side of one migration's handoff: sends the request with the uffd, follows the
 * daemon's replies (ack → progress → complete, or error), and, when asked to survive the
 * daemon's death, hands the same uffd over again with `"resume": true` to whichever daemon
 * listens next on the same socket (protocol/README.md, Resuming). The workers stay blocked on
 * their faults meanwhile: they never read zeros.
 */
import type { HandoffReply, HandoffRequest } from '../../protocol/handoff.js';
import {
  VmSimError,
  type HandoffFn,
  type HandoffSession,
  type HandoffSink,
  type VmSimResult,
} from './types.js';

/** Connect/send failures that mean "no daemon listening yet" while one restarts. */
const RESUME_RETRY_CODES = new Set([
  'ECONNREFUSED',
  'ENOENT',
  'ECONNRESET',
  'EPIPE',
  'EAGAIN',
  'ENOTCONN',
]);
const RESUME_BACKOFF_FIRST_MS = 10;
const RESUME_BACKOFF_MAX_MS = 500;

/** Whether a handoff that failed to connect may be retried while waiting for a restarted daemon. */
function isRetryableHandoffError(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e && depth < 4; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && RESUME_RETRY_CODES.has(code)) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}

export type CompleteReply = VmSimResult['daemonReport'];

export interface HandoffDriverHooks {
  /** The first ack (a resumed handoff's ack does not call it again). */
  acked(): void;
  progress(p: { presentPages: number; totalPages: number }): void;
  complete(report: CompleteReply): void;
  failed(err: Error): void;
}

export interface HandoffDriverOptions {
  handoff: HandoffFn;
  request: HandoffRequest;
  uffdFd: number;
  totalPages: number;
  /** Resume with the next daemon for up to this long after a loss; undefined: a loss fails. */
  resumeTimeoutMs: number | undefined;
}

export class HandoffDriver {
  /** Resumed handoffs a restarted daemon acked. */
  resumes = 0;
  private attempt = 0;
  private acked = false;
  private ackedOnce = false;
  private ended = false;
  private session: HandoffSession | undefined;
  /** When the connection was lost with no ack since (the resume deadline runs from there). */
  private lostAt: number | undefined;
  private backoffTimer: NodeJS.Timeout | undefined;
  private backoffWake = (): void => undefined;
  /** The running resume loop (it never rejects): the uffd stays open until it has stopped. */
  private resuming: Promise<void> | undefined;

  constructor(
    private readonly o: HandoffDriverOptions,
    private readonly hooks: HandoffDriverHooks,
  ) {}

  /** Sends the first handoff; rejects if it cannot be delivered. */
  async start(): Promise<void> {
    const first = await this.o.handoff(this.o.request, this.o.uffdFd, this.sink(++this.attempt));
    // A connection lost before this line already started a resume, which owns the session.
    if (this.attempt === 1) this.session = first;
    else first.close();
  }

  /** No more replies matter (the run ended); waits for a resume in progress to stop. */
  async stop(): Promise<void> {
    this.ended = true;
    if (this.backoffTimer) clearTimeout(this.backoffTimer);
    this.backoffTimer = undefined;
    this.backoffWake();
    // A handoff still connecting would send the uffd's number after it is closed.
    await this.resuming;
  }

  /** Closes the connection to the daemon (after the run, or on failure). */
  close(): void {
    this.session?.close();
    this.session = undefined;
  }

  private fail(err: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.hooks.failed(err);
  }

  /** Each attempt gets its own sink: replies of a superseded one (a dead daemon's) are ignored. */
  private sink(serial: number): HandoffSink {
    return {
      reply: (r) => {
        if (!this.ended && serial === this.attempt) this.onReply(serial, r);
      },
      closed: (err) => {
        if (this.ended || serial !== this.attempt) return;
        const why = `the daemon closed the handoff connection before complete${err ? `: ${err.message}` : ''}`;
        if (this.o.resumeTimeoutMs === undefined) {
          this.fail(new VmSimError('VMSIM_CLOSED', why, { cause: err }));
          return;
        }
        this.resuming = this.resume(why);
      },
    };
  }

  private onReply(serial: number, r: HandoffReply): void {
    switch (r.type) {
      case 'ack':
        if (this.acked) return this.fail(new VmSimError('VMSIM_PROTOCOL', 'a second ack'));
        if (r.totalPages !== this.o.totalPages) {
          return this.fail(
            new VmSimError(
              'VMSIM_PROTOCOL',
              `ack for ${r.totalPages} pages, the guest has ${this.o.totalPages}`,
            ),
          );
        }
        this.acked = true;
        this.lostAt = undefined;
        if (serial > 1) this.resumes++; // a restarted daemon took the resumed handoff
        if (!this.ackedOnce) {
          this.ackedOnce = true;
          this.hooks.acked();
        }
        return;
      case 'progress':
        if (!this.acked) return this.fail(new VmSimError('VMSIM_PROTOCOL', 'progress before ack'));
        this.hooks.progress({ presentPages: r.presentPages, totalPages: r.totalPages });
        return;
      case 'complete':
        if (!this.acked) return this.fail(new VmSimError('VMSIM_PROTOCOL', 'complete before ack'));
        this.ended = true;
        this.hooks.complete(r);
        return;
      case 'error':
        return this.fail(new VmSimError(r.code, `daemon error ${r.code}: ${r.message}`));
    }
  }

  /**
   * The daemon is gone: keep the uffd (faulting threads stay blocked in the kernel) and hand it
   * over again, with `resume: true`, to whichever daemon listens next on the same path.
   */
  private async resume(why: string): Promise<void> {
    const serial = ++this.attempt;
    this.acked = false;
    this.lostAt ??= performance.now();
    const limitMs = this.o.resumeTimeoutMs!;
    const deadline = this.lostAt + limitMs;
    this.close();
    let last: string;
    for (let delayMs = RESUME_BACKOFF_FIRST_MS; ;) {
      if (this.ended || serial !== this.attempt) return;
      try {
        const s = await this.o.handoff(
          { ...this.o.request, resume: true },
          this.o.uffdFd,
          this.sink(serial),
        );
        if (this.ended || serial !== this.attempt) s.close();
        else this.session = s;
        return;
      } catch (err) {
        if (!isRetryableHandoffError(err)) {
          this.fail(
            err instanceof Error ? err : new VmSimError('VMSIM_HANDOFF_FAILED', String(err)),
          );
          return;
        }
        last = (err as Error).message;
      }
      const leftMs = deadline - performance.now();
      if (leftMs <= 0) {
        this.fail(
          new VmSimError(
            'VMSIM_RESUME_TIMEOUT',
            `no daemon took the resumed handoff within ${limitMs} ms (${why}); last: ${last}`,
          ),
        );
        return;
      }
      await new Promise<void>((r) => {
        this.backoffWake = r;
        this.backoffTimer = setTimeout(r, Math.min(delayMs, leftMs));
      });
      this.backoffTimer = undefined;
      delayMs = Math.min(delayMs * 2, RESUME_BACKOFF_MAX_MS);
    }
  }
}
