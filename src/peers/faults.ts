// PeerFaults: a test hook that cuts a replica off from its peers without touching the network,
// so tests (and the chaos test) wait for events rather than sleep through a real partition.
//
// Off by default and free when off: every check is a Set lookup on an empty Set. Nothing in the
// product turns it on; only code holding the Replica object (tests, benchmarks) can.
//
//   replica.faults.blockPushes(peer)     this replica's pushes (and probes) to `peer` fail
//   replica.faults.blockReconcile(peer)  this replica's digest/pull requests to `peer` fail
//   replica.faults.blockPeer(peer)       both of the above
//   replica.faults.isolate()             every outgoing peer request fails, and the peer
//                                        listener answers 503 to every peer request but
//                                        /readyz and /metrics: a full partition, one switch
//   replica.faults.heal(peer?)           lift the blocks on `peer`, or every block and isolation
//
// `peer` is a peer address as the replica knows it (`host:port`), or '*' for every peer.
// A blocked request fails as a transient `refused` error with code ROUTESYNC_FAULT_INJECTED,
// so the fan-out and the reconciler treat it exactly like a refused connection.
import type { IncomingMessage } from 'node:http';
import { PeerRequestError } from './client.js';

export type FaultKind = 'push' | 'reconcile';

export const FAULT_CODE = 'ROUTESYNC_FAULT_INJECTED';

/** Paths of reconciliation requests (everything else a replica sends a peer is a push or a probe). */
const RECONCILE_PREFIXES = ['/v1/peer/digest', '/v1/peer/pull'];
/** Paths the peer listener keeps answering while isolated: the kubelet and Prometheus are not peers. */
const OPEN_WHILE_ISOLATED = new Set(['/readyz', '/metrics']);

export class PeerFaults {
  private readonly blocked: Record<FaultKind, Set<string>> = { push: new Set(), reconcile: new Set() };
  private isolated = false;

  blockPushes(peer = '*'): void {
    this.blocked.push.add(peer);
  }

  blockReconcile(peer = '*'): void {
    this.blocked.reconcile.add(peer);
  }

  blockPeer(peer = '*'): void {
    this.blockPushes(peer);
    this.blockReconcile(peer);
  }

  isolate(): void {
    this.isolated = true;
  }

  heal(peer?: string): void {
    if (peer === undefined) {
      this.blocked.push.clear();
      this.blocked.reconcile.clear();
      this.isolated = false;
      return;
    }
    this.blocked.push.delete(peer);
    this.blocked.reconcile.delete(peer);
  }

  get active(): boolean {
    return this.isolated || this.blocked.push.size > 0 || this.blocked.reconcile.size > 0;
  }

  /** Called before every outgoing peer request; throws the injected failure when blocked. */
  checkOutgoing(peer: string, path: string): void {
    if (!this.active) return;
    const kind: FaultKind = RECONCILE_PREFIXES.some((prefix) => path.startsWith(prefix)) ? 'reconcile' : 'push';
    const set = this.blocked[kind];
    if (this.isolated || set.has('*') || set.has(peer)) {
      throw new PeerRequestError('refused', `fault injected: ${kind} to ${peer} blocked`, { code: FAULT_CODE });
    }
  }

  /** Whether the peer listener should refuse this incoming request (isolation only). */
  refusesIncoming(req: IncomingMessage): boolean {
    if (!this.isolated) return false;
    const path = (req.url ?? '/').split('?')[0] ?? '/';
    return !OPEN_WHILE_ISOLATED.has(path);
  }
}
