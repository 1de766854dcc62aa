// Discovery: the current peer set, with this replica's own address excluded.
//
// Static peers come from ROUTESYNC_PEERS. This replica's own address is ROUTESYNC_SELF when
// set; otherwise it is derived: the peer listen address, or, when that is a wildcard
// (0.0.0.0 / ::), every address of this host's interfaces at the peer port. Peers named by a
// host name that is really this replica are caught at the first request: the peer API answers
// with its instance ID and PeerSync drops a peer that answers with ours.
import { networkInterfaces } from 'node:os';
import type { Config } from '../config.js';
import { formatHostPort, parseHostPort } from '../config.js';

/** The addresses (canonical host:port) that mean "this replica". */
export function selfAddresses(config: Pick<Config, 'self' | 'peerAddr'>, boundPort?: number): Set<string> {
  const own = new Set<string>();
  if (config.self !== '') {
    const parsed = parseHostPort(config.self);
    if (parsed) own.add(formatHostPort(parsed.host, parsed.port));
    return own;
  }
  const port = boundPort ?? config.peerAddr.port;
  const host = config.peerAddr.host;
  if (host !== '0.0.0.0' && host !== '::') {
    own.add(formatHostPort(host, port));
    return own;
  }
  for (const list of Object.values(networkInterfaces())) {
    for (const info of list ?? []) own.add(formatHostPort(info.address, port));
  }
  own.add(formatHostPort('localhost', port));
  return own;
}

/** The static peer list minus this replica. */
export function staticPeers(config: Pick<Config, 'peers'>, self: ReadonlySet<string>): string[] {
  return config.peers.filter((peer) => !self.has(peer));
}
