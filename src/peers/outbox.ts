// PeerOutbox: the queue of changes owed to one peer. Pure (no I/O, no timers).
//
// - Coalesced by identity: a newer resourceVersion replaces the queued one, so a burst of N
//   changes to K routes owes the peer at most K entries.
// - Bounded: past `maxRoutes` the oldest queued change is dropped and reported, since
//   reconciliation repairs whatever a peer missed.
// - At most one batch in flight (taken by the sender); changes that arrive meanwhile wait for
//   the next batch, which is what makes a burst cost far fewer requests than changes.
// - Ack waiters: a lifecycle call waits for (identity, version, op); an ack of that identity
//   satisfies it only when the acked change is at least as strong by the order `supersedes`
//   keeps: a newer version, or the same version and the same op, or a delete at the same
//   version. So a delete at the version of an upsert still in flight (a manager deletes at the
//   sandbox's current version) waits for its own ack, not the upsert's. Failures likewise.
import { changeKey, changeVersion, compareResourceVersions, type RouteChange } from '../routes/route.js';
import type { PeerErrorClass } from './client.js';

/** How one peer's delivery of a change ended, as far as a waiting call is concerned. */
export type DeliveryOutcome =
  | { readonly status: 'acked' }
  | { readonly status: 'failed'; readonly errorClass: PeerErrorClass | 'outbox_full' | 'peer_removed' | 'rejected' }
  | { readonly status: 'pending'; readonly reason: 'ejected' | 'in_flight' | 'retrying' | 'shutdown' };

/**
 * Told once how this peer's delivery of one change (`op` at `version`, or a stronger one) ended. The fan-out
 * passes plain objects (one per peer and change, no closure or promise of their own): a
 * lifecycle call waits on every peer, and the per-peer promises it used to make were among the
 * largest allocations of a call under load (docs/benchmarks.md).
 */
export interface OutboxWatcher {
  readonly version: string;
  readonly op: RouteChange['op'];
  settle(outcome: DeliveryOutcome): void;
}

const ACKED: DeliveryOutcome = { status: 'acked' };
const REJECTED: DeliveryOutcome = { status: 'failed', errorClass: 'rejected' };

export class PeerOutbox {
  private pending = new Map<string, RouteChange>();
  private inFlight: RouteChange[] = [];
  /** The identity keys of `inFlight`, index for index (made once, when the change was queued). */
  private inFlightKeys: string[] = [];
  private readonly waiters = new Map<string, OutboxWatcher[]>();

  constructor(readonly maxRoutes: number) {}

  /** Changes queued and not yet taken by the sender. */
  get pendingCount(): number {
    return this.pending.size;
  }

  /** Changes queued or in flight. */
  get size(): number {
    return this.pending.size + this.inFlight.length;
  }

  get waiterCount(): number {
    let count = 0;
    for (const list of this.waiters.values()) count += list.length;
    return count;
  }

  /** The batch taken by `takeBatch` and not yet acknowledged or failed (empty when none). */
  get inFlightBatch(): readonly RouteChange[] {
    return this.inFlight;
  }

  /**
   * Queue a change; returns the changes dropped to stay within the bound (their waiters are
   * told). `key` is `changeKey(change)`, passed in when the caller has it already (the fan-out
   * queues the same change for every peer).
   */
  enqueue(change: RouteChange, key = changeKey(change)): RouteChange[] {
    const queued = this.pending.get(key);
    if (queued && !supersedes(change, queued)) return [];
    this.pending.set(key, change);
    return this.dropOverBound();
  }

  /** Drop the oldest queued changes past the bound, telling their waiters; returns them. */
  private dropOverBound(): RouteChange[] {
    const dropped: RouteChange[] = [];
    while (this.pending.size > this.maxRoutes) {
      const oldest = this.pending.entries().next().value as [string, RouteChange];
      this.pending.delete(oldest[0]);
      dropped.push(oldest[1]);
      // A call waiting for an older change of this identity that is in flight is not told: its
      // change was not dropped, and the answer to the batch in flight settles it.
      const inFlightIndex = this.inFlightKeys.indexOf(oldest[0]);
      this.settle(oldest[0], oldest[1], { status: 'failed', errorClass: 'outbox_full' }, inFlightIndex >= 0 ? this.inFlight[inFlightIndex] : undefined);
    }
    return dropped;
  }

  /** Tell `watcher` once this peer acknowledges `key` by a change at least as strong as the watched one, or its delivery fails. */
  watch(key: string, watcher: OutboxWatcher): void {
    const list = this.waiters.get(key);
    if (list) list.push(watcher);
    else this.waiters.set(key, [watcher]);
  }

  /** Stop telling `watcher` (the caller's deadline passed); the change itself stays queued. */
  unwatch(key: string, watcher: OutboxWatcher): void {
    const list = this.waiters.get(key);
    if (!list) return;
    const index = list.indexOf(watcher);
    if (index >= 0) list.splice(index, 1);
    if (list.length === 0) this.waiters.delete(key);
  }

  /**
   * Move up to `max` queued changes into flight and return them. A change `stillOwed` refuses is
   * dropped instead (see PeerSyncOptions.stillOwed); a call waiting on it ends at its deadline.
   */
  takeBatch(max: number, stillOwed?: (change: RouteChange, key: string) => boolean): RouteChange[] {
    if (this.inFlight.length > 0) throw new Error('a batch is already in flight');
    const batch: RouteChange[] = [];
    const keys: string[] = [];
    for (const [key, change] of this.pending) {
      if (batch.length >= max) break;
      if (stillOwed && !stillOwed(change, key)) {
        this.pending.delete(key);
        continue;
      }
      batch.push(change);
      keys.push(key);
      this.pending.delete(key);
    }
    this.inFlight = batch;
    this.inFlightKeys = keys;
    return batch;
  }

  /**
   * The peer answered the batch in flight: every entry is acknowledged but those at the indexes
   * in `rejectedAt` (ascending), which it refused to apply. Those fail `rejected` and are not
   * queued again: sending the same bytes cannot change the peer's answer.
   */
  ackInFlight(rejectedAt: readonly number[] = []): void {
    const batch = this.inFlight;
    const keys = this.inFlightKeys;
    this.inFlight = [];
    this.inFlightKeys = [];
    let next = 0;
    for (let i = 0; i < batch.length; i++) {
      const rejected = rejectedAt[next] === i;
      if (rejected) next++;
      this.settle(keys[i]!, batch[i]!, rejected ? REJECTED : ACKED);
    }
  }

  /**
   * The batch in flight failed. With `requeue` its changes go back in the queue (unless a newer
   * version was queued meanwhile) for background delivery; the calls waiting on them are told.
   */
  failInFlight(outcome: DeliveryOutcome, requeue: boolean): RouteChange[] {
    const batch = this.inFlight;
    const keys = this.inFlightKeys;
    this.inFlight = [];
    this.inFlightKeys = [];
    const dropped = requeue ? this.requeueInFront(batch, keys) : [];
    for (let i = 0; i < batch.length; i++) this.settle(keys[i]!, batch[i]!, outcome);
    return dropped;
  }

  /**
   * The peer refused the whole batch in flight for the entries at the indexes in `rejectedAt`
   * (ascending) and applied none: those fail `rejected` and are not queued again; the rest go
   * back in front of the queue to be sent again at once, the calls waiting on them still
   * waiting. Returns what the outbox bound dropped.
   */
  refuseInFlight(rejectedAt: readonly number[]): RouteChange[] {
    const batch = this.inFlight;
    const keys = this.inFlightKeys;
    this.inFlight = [];
    this.inFlightKeys = [];
    const kept: RouteChange[] = [];
    const keptKeys: string[] = [];
    let next = 0;
    for (let i = 0; i < batch.length; i++) {
      if (rejectedAt[next] === i) {
        next++;
        this.settle(keys[i]!, batch[i]!, REJECTED);
      } else {
        kept.push(batch[i]!);
        keptKeys.push(keys[i]!);
      }
    }
    return this.requeueInFront(kept, keptKeys);
  }

  /** Changes back in front of anything queued meanwhile, in their original order, unless a newer version was queued. */
  private requeueInFront(batch: readonly RouteChange[], keys: readonly string[]): RouteChange[] {
    const merged = new Map<string, RouteChange>();
    for (let i = 0; i < batch.length; i++) {
      const key = keys[i]!;
      const change = batch[i]!;
      const newer = this.pending.get(key);
      merged.set(key, newer && supersedes(newer, change) ? newer : change);
    }
    for (const [key, change] of this.pending) if (!merged.has(key)) merged.set(key, change);
    this.pending = merged;
    return this.dropOverBound();
  }

  /** Tell every waiting call the same outcome (peer ejected, removed, shutting down). */
  settleAll(outcome: DeliveryOutcome): void {
    const all = [...this.waiters.values()];
    this.waiters.clear();
    for (const list of all) for (const waiter of list) waiter.settle(outcome);
  }

  /** Forget everything queued (a removed peer). */
  clear(): void {
    this.pending.clear();
    this.inFlight = [];
    this.inFlightKeys = [];
  }

  /**
   * Tell the waiters of `key` whose change `change` delivers (or, failing, fails to) the outcome
   * of `change`, but those that `except` (a change still in flight) delivers.
   */
  private settle(key: string, change: RouteChange, outcome: DeliveryOutcome, except?: RouteChange): void {
    const list = this.waiters.get(key);
    if (!list) return;
    const version = changeVersion(change);
    const exceptVersion = except && changeVersion(except);
    // Nearly always one call waits for a route at a time: no new array (or closure) for it.
    if (list.length === 1) {
      if (!delivers(change.op, version, list[0]!) || (except && delivers(except.op, exceptVersion!, list[0]!))) return;
      this.waiters.delete(key);
      list[0]!.settle(outcome);
      return;
    }
    const remaining = list.filter((waiter) => {
      if (delivers(change.op, version, waiter) && !(except && delivers(except.op, exceptVersion!, waiter))) {
        waiter.settle(outcome);
        return false;
      }
      return true;
    });
    if (remaining.length === 0) this.waiters.delete(key);
    else this.waiters.set(key, remaining);
  }
}

/**
 * Does `next` replace `queued` for the same identity? Newer version; at the same version a
 * delete wins. The table's order too: an upsert applies over a strictly lower version, a
 * delete over the same or a lower one.
 */
function supersedes(next: RouteChange, queued: RouteChange): boolean {
  const order = compareResourceVersions(changeVersion(next), changeVersion(queued));
  if (order !== 0) return order > 0;
  return next.op === 'delete' && queued.op === 'upsert';
}

/**
 * Does delivering `op` at `version` deliver what `watcher` waits for? Exactly when it is not
 * superseded by the watched change (the same order, seen from the other side): a newer version,
 * or the same version and the same op, or a delete at the same version. An upsert's ack at the
 * version of a watched delete is not the delete's.
 */
function delivers(op: RouteChange['op'], version: string, watcher: OutboxWatcher): boolean {
  const order = compareResourceVersions(version, watcher.version);
  if (order !== 0) return order > 0;
  return op === watcher.op || op === 'delete';
}
