/**
 * The service manager's side of sd_notify and the fd store, for tests and the bench on hosts
 * where systemd is not PID 1: a datagram socket ($NOTIFY_SOCKET) that records READY=1, STATUS=
 * and WATCHDOG=1 and keeps the descriptors sent with FDSTORE=1 (dropping them on
 * FDSTOREREMOVE=1), and a way to start a daemon the way systemd restarts one: with the stored
 * descriptors as LISTEN_FDS from fd 3, named in LISTEN_FDNAMES, LISTEN_PID its own pid.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import * as sys from '../../daemon/linux/sys.js';

export interface StoredFd {
  name: string;
  fd: number;
}

export class FakeSystemd {
  readonly socketPath: string;
  /** The fd store, in the order the descriptors arrived. */
  readonly store: StoredFd[] = [];
  /** Every notification received, fields as sent. */
  readonly messages: Array<Record<string, string>> = [];
  private readonly fd: number;
  private readonly watch: sys.FdWatch;
  private waiters: Array<() => void> = [];

  constructor(dir: string) {
    this.socketPath = join(dir, `notify-${randomBytes(4).toString('hex')}.sock`);
    this.fd = sys.socketUnixDgram(true);
    sys.bindUnix(this.fd, this.socketPath);
    const buf = Buffer.alloc(64 * 1024);
    this.watch = sys.watchReadable(this.fd, () => {
      for (;;) {
        const r = sys.tryRecvWithFds(this.fd, buf, 253);
        if (typeof r === 'number') return;
        this.receive(buf.subarray(0, r.bytes).toString('utf8'), r.fds);
      }
    });
  }

  /** The environment that makes a daemon talk to us. */
  get env(): Record<string, string> {
    return { NOTIFY_SOCKET: this.socketPath };
  }

  private receive(text: string, fds: number[]): void {
    const fields: Record<string, string> = {};
    for (const line of text.split('\n')) {
      const eq = line.indexOf('=');
      if (eq > 0) fields[line.slice(0, eq)] = line.slice(eq + 1);
    }
    this.messages.push(fields);
    const name = fields['FDNAME'] ?? 'stored';
    if (fields['FDSTORE'] === '1') {
      for (const fd of fds) this.store.push({ name, fd });
    } else {
      for (const fd of fds) sys.close(fd);
    }
    if (fields['FDSTOREREMOVE'] === '1') {
      for (let i = this.store.length - 1; i >= 0; i--) {
        if (this.store[i]!.name === name) {
          sys.close(this.store[i]!.fd);
          this.store.splice(i, 1);
        }
      }
    }
    for (const w of this.waiters.splice(0)) w();
  }

  /** Resolves once `done()` holds after some notification (checked at once too). */
  async until(done: () => boolean, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!done()) {
      if (Date.now() > deadline) throw new Error('the awaited notification did not come');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 50);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Names currently in the fd store (each once). */
  storedNames(): string[] {
    return [...new Set(this.store.map((s) => s.name))];
  }

  /**
   * Starts `command` as systemd restarts a service: `extra` descriptors first (e.g. a socket
   * unit's), then the fd store, from fd 3, with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID.
   */
  spawn(
    command: string,
    args: string[],
    opts: { env?: NodeJS.ProcessEnv; extra?: StoredFd[] } = {},
  ): ChildProcess {
    const fds = [...(opts.extra ?? []), ...this.store];
    // LISTEN_PID must be the daemon's own pid: a shell learns it ($$) and execs the daemon.
    return spawn('/bin/sh', ['-c', 'LISTEN_PID=$$ exec "$0" "$@"', command, ...args], {
      stdio: ['ignore', 'pipe', 'pipe', ...fds.map((f) => f.fd)],
      env: {
        ...(opts.env ?? process.env),
        ...this.env,
        LISTEN_FDS: String(fds.length),
        LISTEN_FDNAMES: fds.map((f) => f.name).join(':'),
      },
    });
  }

  close(): void {
    this.watch.stop();
    sys.close(this.fd);
    rmSync(this.socketPath, { force: true });
    for (const s of this.store.splice(0)) sys.close(s.fd);
  }
}
