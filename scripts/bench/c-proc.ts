/**
 * Running the bench's C helpers (remote-floor, delay-proxy): each prints one line when it is
 * ready, serves until its stdin closes, then prints its figures as one JSON line and exits.
 * A helper can run inside a network namespace (`ip netns exec`, which execs it: the child's pid
 * is the helper's own) and can inherit descriptors of ours at fd 3 and up.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { BenchContext } from './harness.js';

/** The command line that runs `cmd args` in network namespace `netns` (or here). */
export function inNetns(
  netns: string | undefined,
  cmd: string,
  args: string[],
): [string, string[]] {
  return netns ? ['ip', ['netns', 'exec', netns, cmd, ...args]] : [cmd, args];
}

export interface CHelper {
  child: ChildProcess;
  /** Its first stdout line (it is ready); rejects if it exits first. */
  ready: Promise<string>;
  /** Closes its stdin and resolves with the JSON line it prints before exiting. */
  finish<T = Record<string, unknown>>(timeoutMs?: number): Promise<T>;
  /** Ends it at once (SIGKILL), e.g. after a failed run. */
  kill(): void;
}

export function startCHelper(
  ctx: BenchContext,
  bin: string,
  args: string[],
  opts: { netns?: string; fds?: number[] } = {},
): CHelper {
  const [cmd, argv] = inNetns(opts.netns, bin, args);
  const child = spawn(cmd, argv, { stdio: ['pipe', 'pipe', 'pipe', ...(opts.fds ?? [])] });
  ctx.track(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => {
    child.once('error', (err) => {
      stderr += String(err);
      resolve(-1);
    });
    child.once('exit', (code) => resolve(code));
  });
  const name = bin.split('/').pop();
  const ready = new Promise<string>((resolve, reject) => {
    const onData = (): void => {
      const nl = stdout.indexOf('\n');
      if (nl < 0) return;
      child.stdout!.off('data', onData);
      resolve(stdout.slice(0, nl));
    };
    child.stdout!.on('data', onData);
    void exited.then((code) =>
      reject(
        new Error(`${name} exited (${code}) before it was ready: ${stderr.trim().slice(-1000)}`),
      ),
    );
  });
  ready.catch(() => undefined);
  return {
    child,
    ready,
    async finish<T>(timeoutMs = 10_000): Promise<T> {
      child.stdin!.end();
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      const code = await exited;
      clearTimeout(timer);
      const last = stdout.trim().split('\n').pop() ?? '';
      if (code !== 0 || !last.startsWith('{')) {
        throw new Error(`${name} exited with ${code}: ${stderr.trim().slice(-1000)}`);
      }
      return JSON.parse(last) as T;
    },
    kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    },
  };
}
