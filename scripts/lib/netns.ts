/**
 * An emulated network link for benchmarks: two network namespaces joined by a veth pair, each
 * end rate-limited by tbf (this kernel has no netem; delay is added by a proxy in the path,
 * scripts/bench/c/delay-proxy.c). Needs root and iproute2 (`ip`, `tc`).
 *
 *   ns <prefix>-<pid>-a  veth <a-if>  192.0.2.1/30  ──tbf──▶
 *   ns <prefix>-<pid>-b  veth <b-if>  192.0.2.2/30  ◀──tbf──
 *
 * The addresses are from TEST-NET-1 (RFC 5737), inside namespaces nothing else routes to. The
 * namespaces carry the creating process's pid in their names: `createLink` first removes the
 * links of processes that no longer exist (a bench killed with SIGKILL), ending whatever still
 * runs in them. `close()` is synchronous, so an exit or signal handler can call it; deleting
 * a namespace destroys its veth end and with it the pair. Processes started with `exec(ns)`
 * run there; a UNIX socket bound to a path is reachable across namespaces (only the network
 * is separate), so a handoff socket in the working folder still connects a VMM here with a
 * dest there.
 */
import { execFileSync } from 'node:child_process';

export interface LinkEnd {
  netns: string;
  ifname: string;
  address: string;
}

export interface NetLink {
  a: LinkEnd;
  b: LinkEnd;
  /** tbf's rate on each end, e.g. `2gbit`. */
  rate: string;
  /** Removes both namespaces (idempotent, synchronous). */
  close(): void;
}

export interface LinkOptions {
  /** Namespace name prefix (default `ybench`). */
  prefix?: string;
  /** tbf rate on each end's egress (default 2gbit); null: no rate limit. */
  rate?: string | null;
  /** tbf bucket size (default 256kb: a 64 KiB GSO packet always fits). */
  burst?: string;
  /** tbf queue limit as a delay at the rate (default 2ms). */
  latency?: string;
}

function ip(args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Why links cannot be created here, or null when they can. */
export function netnsUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'network namespaces need root (ip netns add)';
  try {
    ip(['netns', 'list']);
  } catch (err) {
    return `ip netns is not available: ${(err as Error).message.split('\n')[0]}`;
  }
  try {
    execFileSync('tc', ['-V'], { stdio: 'ignore' });
  } catch {
    return 'tc (iproute2) is not available';
  }
  return null;
}

/** Ends the processes in `netns` (SIGKILL) and deletes it; ignores what is already gone. */
export function removeNetns(netns: string): void {
  try {
    for (const pid of ip(['netns', 'pids', netns]).split(/\s+/).filter(Boolean)) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* gone already */
      }
    }
  } catch {
    /* no such namespace */
  }
  try {
    ip(['netns', 'del', netns]);
  } catch {
    /* no such namespace */
  }
}

/** Deletes the namespaces `prefix-<pid>-*` whose pid is no longer running. */
export function removeStaleLinks(prefix = 'ybench'): string[] {
  let names: string[];
  try {
    names = ip(['netns', 'list'])
      .split('\n')
      .map((l) => l.trim().split(/\s+/)[0] ?? '');
  } catch {
    return [];
  }
  const re = new RegExp(`^${prefix}-(\\d+)-[ab]$`);
  const stale = names.filter((n) => {
    const m = re.exec(n);
    return m && Number(m[1]) !== process.pid && !alive(Number(m[1]));
  });
  for (const n of stale) removeNetns(n);
  return stale;
}

export function createLink(o: LinkOptions = {}): NetLink {
  const prefix = o.prefix ?? 'ybench';
  removeStaleLinks(prefix);
  const a: LinkEnd = {
    netns: `${prefix}-${process.pid}-a`,
    ifname: `yb${process.pid}a`,
    address: '192.0.2.1',
  };
  const b: LinkEnd = {
    netns: `${prefix}-${process.pid}-b`,
    ifname: `yb${process.pid}b`,
    address: '192.0.2.2',
  };
  const rate = o.rate === undefined ? '2gbit' : o.rate;
  let closed = false;
  const link: NetLink = {
    a,
    b,
    rate: rate ?? 'unlimited',
    close() {
      if (closed) return;
      closed = true;
      removeNetns(a.netns);
      removeNetns(b.netns);
    },
  };
  try {
    ip(['netns', 'add', a.netns]);
    ip(['netns', 'add', b.netns]);
    // Created with each end already in its namespace: no moment where either is in ours.
    ip([
      'link',
      'add',
      a.ifname,
      'netns',
      a.netns,
      'type',
      'veth',
      'peer',
      'name',
      b.ifname,
      'netns',
      b.netns,
    ]);
    for (const end of [a, b]) {
      ip(['-n', end.netns, 'addr', 'add', `${end.address}/30`, 'dev', end.ifname]);
      ip(['-n', end.netns, 'link', 'set', 'lo', 'up']);
      ip(['-n', end.netns, 'link', 'set', end.ifname, 'up']);
      if (rate) {
        execFileSync(
          'tc',
          [
            '-n',
            end.netns,
            'qdisc',
            'add',
            'dev',
            end.ifname,
            'root',
            'tbf',
            'rate',
            rate,
            'burst',
            o.burst ?? '256kb',
            'latency',
            o.latency ?? '2ms',
          ],
          { stdio: ['ignore', 'pipe', 'pipe'] },
        );
      }
    }
  } catch (err) {
    link.close();
    throw err;
  }
  return link;
}
