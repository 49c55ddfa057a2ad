/**
 * Which sources a dest may connect to, so a handoff cannot point the daemon at an arbitrary
 * host (an internal admin API, a port scan): an optional allowlist of CIDRs and host names, and
 * plaintext (ws://) only to a loopback source unless the operator allows it. IP literals are
 * checked at the handoff; host names when they are resolved, at every connection (a name may
 * resolve elsewhere later), through the lookup given to the socket.
 */
import { lookup as dnsLookup, type LookupAddress } from 'node:dns';
import { BlockList, isIP, type LookupFunction } from 'node:net';
import { ProtocolError } from '../../protocol/errors.js';
import type { SourceAddress } from '../../protocol/source-url.js';

/** Structured-cloneable: the bulk thread builds its own lookup from it. */
export interface SourcePolicy {
  /** CIDRs (`10.0.0.0/8`, `fd00::/8`), addresses and host names; empty: any source. */
  allowed: readonly string[];
  /** Allow ws:// to a source that is not on loopback (its traffic is then plaintext). */
  allowPlaintext: boolean;
  /** No secrets (--insecure-no-auth): only loopback sources. */
  loopbackOnly: boolean;
}

const LOOPBACK = new BlockList();
LOOPBACK.addSubnet('127.0.0.0', 8, 'ipv4');
LOOPBACK.addAddress('::1', 'ipv6');

const family = (ip: string): 'ipv4' | 'ipv6' => (isIP(ip) === 6 ? 'ipv6' : 'ipv4');

function isLoopback(host: string): boolean {
  return host === 'localhost' || (isIP(host) !== 0 && LOOPBACK.check(host, family(host)));
}

/** The allowlist as a BlockList of addresses and a set of names. */
function compile(allowed: readonly string[]): { nets: BlockList; names: Set<string> } {
  const nets = new BlockList();
  const names = new Set<string>();
  for (const entry of allowed) {
    const [ip, bits] = entry.split('/');
    if (ip && isIP(ip)) {
      if (bits === undefined) nets.addAddress(ip, family(ip));
      else nets.addSubnet(ip, Number(bits), family(ip));
    } else {
      names.add(entry.toLowerCase());
    }
  }
  return { nets, names };
}

/** Refuses a source the policy does not allow: ProtocolError SOURCE_DENIED. */
export function checkSource(a: SourceAddress, policy: SourcePolicy): void {
  const where = `${a.scheme}://${a.host}:${a.port}`;
  if (policy.loopbackOnly && !isLoopback(a.host)) {
    throw new ProtocolError(
      'SOURCE_DENIED',
      `${where}: without authentication (--insecure-no-auth) only loopback sources are allowed`,
    );
  }
  if (a.scheme === 'ws' && !isLoopback(a.host) && !policy.allowPlaintext) {
    throw new ProtocolError(
      'SOURCE_DENIED',
      `${where}: plaintext to a source off this host; use wss://, or allowPlaintextSources`,
    );
  }
  if (policy.allowed.length === 0 || isIP(a.host) === 0) return;
  if (!compile(policy.allowed).nets.check(a.host, family(a.host))) {
    throw new ProtocolError('SOURCE_DENIED', `${where} is not in allowedSources`);
  }
}

/**
 * A lookup for the source's socket that only returns allowed addresses (a host name on the
 * allowlist may resolve anywhere); undefined when every source is allowed.
 */
export function policyLookup(policy: SourcePolicy): LookupFunction | undefined {
  if (policy.allowed.length === 0 && !policy.loopbackOnly) return undefined;
  const { nets, names } = compile(policy.allowed);
  const ok = (host: string, address: string): boolean =>
    policy.loopbackOnly
      ? LOOPBACK.check(address, family(address))
      : names.has(host.toLowerCase()) || nets.check(address, family(address));
  return ((hostname: string, options: { all?: boolean }, callback: LookupCallback) => {
    dnsLookup(hostname, { ...options, all: true }, (err, addresses: LookupAddress[]) => {
      if (err) return callback(err, options.all ? [] : '', 4);
      const allowed = addresses.filter((a) => ok(hostname, a.address));
      if (allowed.length === 0) {
        const denied = Object.assign(
          new Error(`${hostname} resolves to no address the dest may connect to`),
          { code: 'SOURCE_DENIED' },
        );
        return callback(denied, options.all ? [] : '', 4);
      }
      if (options.all) return callback(null, allowed);
      callback(null, allowed[0]!.address, allowed[0]!.family);
    });
  }) as unknown as LookupFunction;
}

type LookupCallback = (
  err: NodeJS.ErrnoException | null,
  address: string | LookupAddress[],
  family?: number,
) => void;
