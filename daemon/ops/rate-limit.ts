/**
 * Log lines that a peer can provoke at will (refused handoffs, refused page connections, failed
 * proofs, accept errors) go through a limiter: at most `max` lines per key in each interval, then
 * one line saying how many were suppressed. A flood costs a few lines, not a full disk.
 */
import type { LogFields, Logger, LogLevel } from './log.js';

export interface RateLimitedLog {
  (level: LogLevel, key: string, msg: string, fields?: LogFields): void;
}

export function rateLimitedLog(log: Logger, max = 10, intervalMs = 60_000): RateLimitedLog {
  const windows = new Map<string, { since: number; lines: number; suppressed: number }>();
  return (level, key, msg, fields) => {
    const now = Date.now();
    let w = windows.get(key);
    if (!w || now - w.since >= intervalMs) {
      if (w && w.suppressed > 0) {
        log.warn('log lines suppressed', { key, suppressed: w.suppressed, intervalMs });
      }
      // Keys are codes: a bounded set, but never let the map grow without limit.
      if (!w && windows.size >= 256) windows.clear();
      w = { since: now, lines: 0, suppressed: 0 };
      windows.set(key, w);
    }
    if (w.lines < max) {
      w.lines++;
      log[level](msg, fields);
    } else {
      w.suppressed++;
    }
  };
}
