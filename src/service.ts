// RouteService: the operations the APIs offer, in one place, so every path a change arrives by
// (local manager, peer push, reconciliation) goes through the same table rules and the same
// accounting. Only local changes are fanned out: peers push to everyone themselves, and
// reconciliation repairs, it never re-broadcasts.
import type { Logger } from './log.js';
import type { Metrics } from './metrics.js';
import type { SyncOutcome, PeerSync } from './peers/fanout.js';
import { compareResourceVersions, splitIdentityKey, type Route, type RouteChange } from './routes/route.js';
import type { ApplyResult, RouteTable } from './routes/table.js';

export type ChangeSource = 'local' | 'peer' | 'reconcile';

export interface LocalChangeResult {
  readonly result: ApplyResult;
  /** null when nothing was sent (a stale change). */
  readonly sync: SyncOutcome | null;
}

export interface LocalBatchResult {
  readonly results: readonly ApplyResult[];
  readonly sync: SyncOutcome | null;
}

export class RouteService {
  /** Told of every change the local manager applied (the reconciler keeps them through a suspect rebuild). */
  onLocalApplied: ((key: string) => void) | undefined;

  constructor(
    private readonly table: RouteTable,
    private readonly sync: PeerSync,
    private readonly metrics: Metrics,
    private readonly logger: Logger,
  ) {}

  /**
   * Apply a change from the local manager, then sync it to every peer within the deadline.
   * `receivedAt` (performance.now() when the call arrived) is where the deadline counts from.
   */
  async applyLocal(change: RouteChange, receivedAt?: number): Promise<LocalChangeResult> {
    const result = this.apply(change, 'local');
    const outgoing = this.outgoing(result);
    return { result, sync: outgoing ? await this.sync.sync([outgoing], receivedAt) : null };
  }

  /** Delete from the local manager; without a version the stored route's version is used. */
  async deleteLocal(namespace: string, name: string, resourceVersion: string | undefined, receivedAt?: number): Promise<LocalChangeResult> {
    const result = this.table.delete({ namespace, name, resourceVersion });
    this.count('local', result);
    const outgoing = this.outgoing(result);
    return { result, sync: outgoing ? await this.sync.sync([outgoing], receivedAt) : null };
  }

  /** A manager's bulk push (an informer resync): apply all, sync all under one deadline. */
  async applyLocalBatch(changes: readonly RouteChange[], receivedAt?: number): Promise<LocalBatchResult> {
    const results = changes.map((change) => this.apply(change, 'local'));
    const outgoing = new Map<string, RouteChange>();
    for (const result of results) {
      const change = this.outgoing(result);
      if (change) outgoing.set(result.key, change);
    }
    return { results, sync: outgoing.size > 0 ? await this.sync.sync([...outgoing.values()], receivedAt) : null };
  }

  /** Changes pushed by a peer or pulled by reconciliation: applied, never re-broadcast. */
  applyRemote(changes: readonly RouteChange[], source: Exclude<ChangeSource, 'local'>): ApplyResult[] {
    return changes.map((change) => this.apply(change, source));
  }

  /** A suspect rebuild's stale routes: removed without a fence (RouteTable.dropWithoutFence). */
  dropStale(routes: readonly Route[]): ApplyResult[] {
    return routes.map((route) => {
      const result = this.table.dropWithoutFence(route);
      this.count('reconcile', result);
      return result;
    });
  }

  private apply(change: RouteChange, source: ChangeSource): ApplyResult {
    const result = this.table.apply(change);
    this.count(source, result);
    return result;
  }

  private count(source: ChangeSource, result: ApplyResult): void {
    if (source === 'local' && result.outcome === 'applied') this.onLocalApplied?.(result.key);
    this.metrics.changes.inc({ source, outcome: result.outcome, reason: result.reason });
    if (result.idTakeover) {
      this.logger.info({ id: result.idTakeover.id, from: result.idTakeover.from, to: result.key, source }, 'id_takeover');
    }
    this.logger.debug({ key: result.key, resourceVersion: result.resourceVersion, outcome: result.outcome, reason: result.reason, source }, 'route change');
  }

  /**
   * What to send peers after a local change: the table's current state of that identity when
   * the change applied, or when it replayed the stored version (a manager retrying a call that
   * timed out wants to know the peers have it). A stale change sends nothing.
   */
  private outgoing(result: ApplyResult): RouteChange | undefined {
    if (result.resourceVersion === undefined) return undefined;
    const route = this.table.getByKey(result.key);
    const fence = route ? undefined : this.table.getFenceByKey(result.key);
    const current = route?.resourceVersion ?? fence?.resourceVersion;
    if (current === undefined) return undefined;
    if (result.outcome === 'ignored' && compareResourceVersions(current, result.resourceVersion) !== 0) return undefined;
    if (route) return { op: 'upsert', route };
    return { op: 'delete', deletion: { ...splitIdentityKey(result.key), resourceVersion: fence!.resourceVersion, fencedAtMs: fence!.fencedAtMs } };
  }
}
