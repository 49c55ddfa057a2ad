/**
 * The handoff's `source`: a ws:// or wss:// URL naming a host and a port, parsed once. Page
 * connections are made to URLs built from these parts and a fixed path (`/v1/pages`), never by
 * appending to what the VMM sent: a path, query, fragment or credentials in it are refused
 * (they would reach the source's HTTP server, and credentials would end up in logs).
 */
import { ProtocolError } from './errors.js';
import { channelName, type ChannelKind } from './wire.js';

export interface SourceAddress {
  scheme: 'ws' | 'wss';
  /** Host name, IPv4 address, or IPv6 address without brackets. */
  host: string;
  port: number;
}

/** Parses a handoff's `source`; throws ProtocolError HANDOFF_INVALID saying what is wrong. */
export function parseSourceUrl(text: string): SourceAddress {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new ProtocolError('HANDOFF_INVALID', 'source is not a URL');
  }
  const scheme = url.protocol === 'ws:' ? 'ws' : url.protocol === 'wss:' ? 'wss' : null;
  if (!scheme) throw new ProtocolError('HANDOFF_INVALID', 'source must be a ws:// or wss:// URL');
  if (url.username || url.password) {
    throw new ProtocolError('HANDOFF_INVALID', 'source must not carry credentials');
  }
  if ((url.pathname !== '' && url.pathname !== '/') || url.search || url.hash) {
    throw new ProtocolError('HANDOFF_INVALID', 'source names a host and a port only');
  }
  const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
  const port = url.port ? Number(url.port) : scheme === 'wss' ? 443 : 80;
  return { scheme, host, port };
}

/** `host:port` for logs and URLs (IPv6 in brackets). */
export function formatHostPort(a: { host: string; port: number }): string {
  return `${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

/** The URL of a channel's connections: a fixed path, the channel in the query. */
export function pagesUrl(a: SourceAddress, kind: ChannelKind): string {
  return `${a.scheme}://${formatHostPort(a)}/v1/pages?channel=${channelName(kind)}`;
}
