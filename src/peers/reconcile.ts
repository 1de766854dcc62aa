// Reconciler: anti-entropy rounds and bootstrap. Pushes are best-effort; this is what makes
// every replica converge anyway, without anyone re-sending.
//
// A round (one per jittered interval):
//  1. pick ONE peer, round-robin over the healthy peers from a random start, so each replica
//     costs the fleet one small request per interval however large the fleet is;
//  2. GET /v1/peer/digest?root=1 from it (~150 bytes); equal roots: done (`in_sync`);
//  3. otherwise GET /v1/peer/digest (one 16-hex-digit digest per bucket, ~20 KB for 1024
//     buckets), compare bucket by bucket, POST /v1/peer/pull for the differing buckets only,
//     and apply what comes back through RouteService.applyRemote(..., 'reconcile') — the same
//     table rules as every push. Bytes moved grow with the difference, not with the table.
//
// Pull-only, in both directions: a round never pushes. If this replica holds something newer
// than the peer, the peer's own rounds pull it from us (every replica visits every peer once
// per `peers` rounds), and the local change is in the peer's outbox anyway (hinted handoff).
//
// Spread: past LARGE_FLEET_PEERS peers the interval grows with the peer count
// (interval × peers / LARGE_FLEET_PEERS), so the whole fleet's digest traffic stops growing
// with its size (a fleet of 500 at 5 s does 50 requests per second in all, not 500). A missed
// push is repaired by the missing replica's next round, since almost every peer has it.
//
// No resurrection (the rule, precisely): a deletion fence lives tombstoneTtlMs everywhere,
// counted from its first creation. A replica holding a route that was deleted elsewhere can
// only bring it back by offering it after every fence of it has expired. So:
//  - A replica is SUSPECT when it has peers and has not completed a round with a non-suspect
//    peer for longer than SUSPECT_AFTER_TTL_FRACTION (1/2) of tombstoneTtlMs. The half-TTL
//    margin covers a fence that reached the peers this replica talks to later than the
//    deletion itself (it spreads by push in milliseconds and by these pulls in a few rounds).
//  - A suspect replica says `suspect: true` in its digest; peers never pull from a suspect
//    (or still bootstrapping) replica, and count the round as `skipped`.
//  - A suspect replica's next successful contact with a non-suspect peer REBUILDS: it pulls
//    the peer's whole table, applies it, and drops every local route the peer has neither as a
//    route nor as a fence, unless the local manager changed that identity since the last good
//    contact and less than LOCAL_CHANGE_TRUSTED_TTL_FRACTION (3/4) of tombstoneTtlMs ago (any
//    deletion that supersedes it was made later, so its fence still lives wherever it reached;
//    the change reaches the peer by push or by its own pulls), or it arrived or changed while
//    the rebuild ran (a push into a bucket already pulled). An older local change is dropped
//    like any stale route, and the warning names it: a deletion made elsewhere may have
//    outlived its fences, and sparing it would bring the route back. Its manager's sync reached
//    no peer (acked 0, the rest pending), so the manager sends it again. Dropped WITHOUT a
//    fence: a fence at a route's live version would travel and delete it everywhere if it is
//    live after all (a push the source has not had yet); real deletions are carried by the
//    source's own fences, which the pull brings.
//  - A rebuild needs a trustworthy source: a SEEDED peer (one that started alone, bootstrapped
//    from a peer, or has since completed a round with a seeded peer). A replica that turned
//    ready empty after a bootstrap timeout is not seeded: its table is only what its manager
//    did since it started. Except when the whole fleet is starting fresh (replicas started
//    together all see each other bootstrapping): if every peer answered during the bootstrap,
//    unseeded and not out of contact, and its table was merged, this table holds all there is
//    and the replica seeds itself (seedFreshFleet); otherwise nothing would ever seed such a
//    fleet. When a suspect replica finds every one of its peers untrustworthy
//    (suspect, or not seeded), its table is the best copy there is: the replica with the
//    smallest instance ID among the suspect ones (a seeded one before any unseeded one, whose
//    table may be empty) declares itself the reference (`kept`), and
//    the others rebuild from it. Without this, a lone survivor whose only peer restarted empty
//    would either stay suspect for ever or rebuild from an empty table and lose every route.
//  - Pushes: a replica pushes only changes its own manager made, but one queued through a long
//    cut can be older than a deletion made elsewhere whose fence has expired at the peer. The
//    fan-out asks stillOwed as each change leaves the outbox: an upsert of an identity this
//    table no longer holds is dropped (the delete that removed it supersedes it), and a
//    suspect replica pushes only upserts still current here and changed locally within 3/4 of
//    the TTL.
import { performance } from 'node:perf_hooks';
import { setTimeout as delay } from 'node:timers/promises';
import { LOCAL_CHANGE_TRUSTED_TTL_FRACTION, maxReconcileIntervalMs, RECONCILE_JITTER_MAX, SUSPECT_AFTER_TTL_FRACTION, type Config } from '../config.js';
import { RepeatedWarnings, type Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import {
  changeKey,
  changeToWire,
  identityKey,
  localChangeAt,
  markLocalChange,
  parseChanges,
  routeKey,
  splitIdentityKey,
  type Route,
  type RouteChange,
} from '../routes/route.js';
import { monotonicClock, type RouteTable } from '../routes/table.js';
import type { RouteService } from '../service.js';
import { attemptSignal, classifyPeerError, failureKey, INSTANCE_HEADER, PeerRequestError, SyncAbortedError, type PeerClient } from './client.js';
import type { PeerSync } from './fanout.js';

export const DIGEST_PATH = '/v1/peer/digest';
export const PULL_PATH = '/v1/peer/pull';
/** Past this many peers the interval grows with the peer count (see the header). */
export const LARGE_FLEET_PEERS = 50;
/** The identity key of a pulled entry this version refuses, when it names one at all. */
function refusedEntryKey(entry: unknown): string | undefined {
  if (typeof entry !== 'object' || entry === null) return undefined;
  const { namespace, name } = entry as { namespace?: unknown; name?: unknown };
  return typeof namespace === 'string' && typeof name === 'string' ? identityKey(namespace, name) : undefined;
}

/** A rebuild's warning names at most this many of the old local changes it dropped. */
const LOGGED_KEYS_MAX = 20;
/** Suspect after this fraction of the fence TTL without contact: config's constant, which also bounds the interval. */
export { SUSPECT_AFTER_TTL_FRACTION };
/** Buckets per pull request: with 100,000 routes over 1024 buckets, ~6,000 routes (~1.3 MB) a request. */
export const PULL_BUCKETS_PER_REQUEST = 64;
/** Peers asked at once for their digest during bootstrap (the first good answer wins). */
const BOOTSTRAP_FANOUT = 8;
/** Pause between bootstrap attempts when no peer answered. */
const BOOTSTRAP_RETRY_MS = 200;
/** The least time between two sweeps of expired fences for a digest (sweepFencesSoon). */
const FENCE_SWEEP_MIN_GAP_MS = 1000;

export type ReconcileConfig = Pick<Config, 'reconcileIntervalMs' | 'bootstrapTimeoutMs' | 'tombstoneTtlMs' | 'tombstoneHoldMaxMs'> &
  /** Bounds the local deletions kept through a cut, as it bounds each outbox (default 100,000). */
  Partial<Pick<Config, 'outboxMaxRoutes'>>;
/** Departed peers remembered as still owed fences, at most (see caughtUpThrough). */
const DEPARTED_PEERS_MAX = 1024;

/** GET /v1/peer/digest's body (the wire contract; extra fields allowed). */
export interface TableDigest {
  readonly instance: string;
  readonly buckets: number;
  readonly root: string;
  readonly digests?: readonly string[];
  readonly routes: number;
  readonly fences: number;
  /** True while this replica's table must not be offered: suspect, or not bootstrapped yet. */
  readonly suspect: boolean;
  /** False for a replica that turned ready empty after a bootstrap timeout and has not met a seeded peer since. */
  readonly seeded: boolean;
  /** True while still bootstrapping (then `suspect` is true too, but its table is new, not out of date). */
  readonly bootstrapping: boolean;
  /**
   * The answering replica's clock when it took this digest. A peer that has caught up on it
   * (found the table equal, or pulled every bucket that differed) reports it back as
   * `caughtUpTo` in its next digest request, and the answering replica holds a fence past its
   * TTL until every peer has caught up on it (see caughtUpThrough). Absent from older replicas.
   */
  readonly asOfMs?: number;
}

/** A peer's word, with a digest request, that it has caught up on this table as of asOfMs. */
export interface CaughtUpReport {
  /** The reporting replica's instance ID (its requests' x-routesync-instance header). */
  readonly instance: string;
  /** An asOfMs of this replica's, from a digest it answered that peer. */
  readonly caughtUpToMs: number;
  /** The instance whose digest that was: a report to a replica restarted since is ignored. */
  readonly digestOf: string;
}

export type RoundResult = 'in_sync' | 'repaired' | 'unchanged' | 'rebuilt' | 'kept' | 'skipped' | 'failed' | 'no_peers';

export interface RoundReport {
  readonly peer: string | null;
  readonly result: RoundResult;
  /** Routes and fences the round changed. */
  readonly repaired: number;
  /** Response bytes the round received. */
  readonly bytes: number;
  readonly buckets: number;
  readonly errorClass?: string;
}

export type BootstrapOutcome = 'no_peers' | 'pulled' | 'timeout';

export interface BootstrapOptions {
  /** False when peer discovery (DNS) has not answered yet: an empty peer list then proves nothing. */
  readonly peersKnown?: boolean;
  /** The pull's time budget; ROUTESYNC_BOOTSTRAP_TIMEOUT_MS unless the caller spent part of it. */
  readonly timeoutMs?: number;
}

export interface ReconcilerOptions {
  readonly config: ReconcileConfig;
  readonly table: RouteTable;
  readonly service: RouteService;
  readonly sync: PeerSync;
  readonly client: PeerClient;
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly instanceId: string;
  /**
   * The clock of elapsed time: contact age and suspicion, the local changes' stamps and trust
   * window, departed peers. Default: monotonicNow (monotonicClock: no steps back, suspends
   * counted). Never the wall clock: one stepped back during a cut (NTP) kept a replica cut off
   * past the fence TTL "in contact", so it offered its table at the heal instead of rebuilding,
   * and a route deleted elsewhere came back.
   */
  readonly now?: () => number;
  /** Random source for jitter and the round-robin start, in [0, 1). */
  readonly random?: () => number;
  /** The caught-up clock (asOfMs); the table's monotonicNow must be the same. Default: monotonicClock. */
  readonly monotonicNow?: () => number;
}

export class Reconciler {
  private readonly config: ReconcileConfig;
  private readonly table: RouteTable;
  private readonly service: RouteService;
  private readonly sync: PeerSync;
  private readonly client: PeerClient;
  private readonly metrics: Metrics;
  private readonly logger: Logger;
  private readonly instanceId: string;
  private readonly now: () => number;
  private readonly random: () => number;
  private readonly stop = new AbortController();
  /**
   * The origin of the local-change stamps (markLocalChange): stamps are ms since it, small
   * integers that a route holds in a slot of its own for 24 days of uptime without a boxed number.
   */
  private readonly clockOriginMs: number;
  /** Last completed round with a non-suspect peer (or the start of this replica's life). */
  private lastContactMs: number;
  /** When sweepFencesSoon last swept. */
  private lastFenceSweepMs = Number.NEGATIVE_INFINITY;
  private bootstrapped = false;
  private seeded = false;
  /**
   * During bootstrap: each peer that answered but could not be bootstrapped from, and whether its
   * last answer leaves it consistent with a fleet starting fresh (unseeded, not out of contact,
   * and its table merged into this one). See seedFreshFleet.
   */
  private readonly freshPeers = new Map<string, boolean>();
  /** While suspect: peers that answered but cannot be rebuilt from, with their instance and whether they are suspect and seeded. */
  private readonly untrusted = new Map<string, { instance: string; suspect: boolean; seeded: boolean }>();
  /**
   * Identities the local manager deleted since the last contact, with the deletion's version. A
   * fence of its own outlives no cut longer than the TTL, and the pulls of a rebuild would then
   * bring the deleted route back from a source that never saw the deletion (see rebuildFrom).
   * Emptied at every contact, so it holds only the deletions of one cut (or one interval).
   */
  private readonly localDeletions = new Map<string, string>();
  /** Local deletions dropped past the bound (ROUTESYNC_OUTBOX_MAX_ROUTES) since the process started. */
  private forgottenLocalDeletions = 0;
  private readonly deletionWarnings = new RepeatedWarnings();
  /** Per peer instance: the time (this replica's clock) through which it last said it has caught up on this table. */
  private readonly caughtUpBy = new Map<string, number>();
  /** Per peer address: the instance its last digest answer named. */
  private readonly peerInstances = new Map<string, string>();
  /** Per peer address: the instance and asOfMs of its digest this replica last caught up on, reported back to it. */
  private readonly caughtUpOn = new Map<string, { readonly instance: string; readonly asOfMs: number }>();
  /** Peers discovery dropped, by address: their last instance and when (see caughtUpThrough). */
  private readonly departed = new Map<string, { readonly instance: string | undefined; readonly atMs: number }>();
  /** Grows with every change caughtUpThrough depends on, but for the peer set (which has its own). */
  private caughtUpVersion = 0;
  private caughtUpCache: { readonly peersVersion: number; readonly version: number; readonly value: number } | undefined;
  /**
   * Peers whose last pull here skipped entries this version refuses (see caughtUpOnDigest), with
   * the instance pulled from: another replica at the address since has not been pulled from.
   */
  private readonly pulledWithRefusals = new Map<string, string>();
  /** Per peer, its failed rounds' warnings, until a round with it completes. */
  private readonly roundWarnings = new Map<string, RepeatedWarnings>();
  private readonly monotonicNow: () => number;
  private cursor: number;
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<RoundReport> | null = null;
  private closed = false;

  constructor(options: ReconcilerOptions) {
    this.config = options.config;
    this.table = options.table;
    this.service = options.service;
    this.sync = options.sync;
    this.client = options.client;
    this.metrics = options.metrics;
    this.logger = options.logger;
    this.instanceId = options.instanceId;
    this.random = options.random ?? Math.random;
    this.monotonicNow = options.monotonicNow ?? monotonicClock;
    this.now = options.now ?? this.monotonicNow;
    this.sync.onPeerDeparted((address) => this.peerDeparted(address));
    this.lastContactMs = this.now();
    this.clockOriginMs = this.lastContactMs;
    this.cursor = Math.floor(this.random() * 1_000_000);
  }

  // --- serving side ----------------------------------------------------------------------

  /** Whether this replica's table is a trustworthy source (see the header). */
  isSeeded(): boolean {
    return this.seeded;
  }

  /**
   * Record a change the local manager made: a suspect rebuild spares a route its manager changed
   * since the cut began. The record is a stamp on the route itself (markLocalChange), ~8 B,
   * where a map of identities to times cost ~50 B a route; it goes with the route, and one
   * older than the last contact is simply not counted. A deletion has no route to carry a stamp:
   * it is kept in localDeletions until the next contact.
   */
  noteLocalChange(key: string): void {
    const route = this.table.getByKey(key);
    if (route) {
      // Whole ms, rounded up (never before the contact it follows): a small integer the route
      // keeps in its own slot (a fraction is a heap number, 16 B).
      markLocalChange(route, Math.ceil(this.now() - this.clockOriginMs));
      this.localDeletions.delete(key);
      return;
    }
    const fence = this.table.getFenceByKey(key);
    if (!fence) return;
    // Re-inserted, so the first key is the oldest deletion.
    this.localDeletions.delete(key);
    this.localDeletions.set(key, fence.resourceVersion);
    // Bounded like an outbox: a replica out of contact for weeks would otherwise keep every
    // deletion of them. Past the bound the oldest is forgotten; a rebuild no longer deletes it
    // again, and a source that never saw that deletion can bring its route back.
    const bound = this.config.outboxMaxRoutes ?? 100_000;
    if (this.localDeletions.size > bound) {
      this.localDeletions.delete(this.localDeletions.keys().next().value!);
      this.forgottenLocalDeletions++;
      // A warning when out of contact (no round for two intervals): a rebuild is then near, and
      // may need them. A burst larger than the bound within one interval of a replica in
      // contact, or alone, loses nothing a rebuild needs: the next round empties the record.
      const outOfContact = this.sync.peerCount > 0 && this.contactAgeMs() > 2 * this.config.reconcileIntervalMs;
      this.logger[outOfContact ? this.deletionWarnings.level('forgotten') : 'debug'](
        { bound, forgotten: this.forgottenLocalDeletions },
        'out of contact: the oldest local deletions are forgotten; a rebuild may bring their routes back',
      );
    }
  }

  /**
   * How many live routes a suspect rebuild would spare as changed by the local manager since the
   * last contact (and recently enough to be trusted: see trustedLocalChangeSince).
   */
  rememberedLocalChanges(): number {
    const since = this.sparedSince(this.lastContactMs);
    let count = 0;
    for (const route of this.table.list()) if (this.changedLocallySince(route, since)) count++;
    return count;
  }

  private changedLocallySince(route: Route, sinceMs: number): boolean {
    const at = localChangeAt(route);
    return at !== undefined && at + this.clockOriginMs >= sinceMs;
  }

  /** Before this time a local change is too old to be trusted over the fleet's word (see the header). */
  private trustedLocalChangeSince(): number {
    return this.now() - this.config.tombstoneTtlMs * LOCAL_CHANGE_TRUSTED_TTL_FRACTION;
  }

  /** A rebuild after a cut begun at `cutStartMs` spares the local changes made since this time. */
  private sparedSince(cutStartMs: number): number {
    return Math.max(cutStartMs, this.trustedLocalChangeSince());
  }

  /**
   * Whether a queued change is still owed to peers (PeerSyncOptions.stillOwed), asked as it
   * leaves the outbox. A deletion always is. An upsert of an identity this table no longer holds
   * never is: what removed it (a delete, whose fence is at or above every version this table
   * held) supersedes it, and the peer gets that from the delete's own pushes or a round. Pushed,
   * it did nothing where the fence was, and a peer without it took the deleted route, for good
   * once the fences had ended: a fence's time is this replica's own (a delete that removes a live
   * route starts it then) and is not in the digest, so one here can outlive the same delete's
   * fence on a peer by up to the gap between the two. One this table still holds is owed while
   * it is the table's current route and its local change is recent: any deletion that
   * supersedes it was made later, so its fence lives wherever it reached. Anything else (a
   * replay's old stamp, a route since replaced by a pull) is pushed only by a replica that is
   * not suspect: a suspect one may have missed a deletion whose fence has expired at the peer
   * (see the header, "Pushes").
   */
  stillOwed(change: RouteChange, key: string): boolean {
    if (change.op !== 'upsert') return true;
    const route = this.table.getByKey(key);
    if (route === undefined) return false;
    if (change.route === route && this.changedLocallySince(route, this.trustedLocalChangeSince())) return true;
    return !this.isSuspect();
  }

  /**
   * Sweep expired fences, at most once a second: a sweep walks every fence (~1 ms for 100,000,
   * ~14 ms when they are all held through a split), and digests are served several times an
   * interval.
   */
  private sweepFencesSoon(): void {
    const now = this.now();
    if (now - this.lastFenceSweepMs < FENCE_SWEEP_MIN_GAP_MS) return;
    this.lastFenceSweepMs = now;
    this.table.sweepExpiredFences();
  }

  /** How long since the last contact, on the elapsed-time clock (monotonicClock: no steps back, suspends counted). */
  private contactAgeMs(): number {
    return this.now() - this.lastContactMs;
  }

  /** Out of contact for too long while having peers: this table must not be offered. */
  isSuspect(): boolean {
    if (this.sync.peerCount === 0) {
      this.alone();
      return false;
    }
    return this.contactAgeMs() > this.config.tombstoneTtlMs * SUSPECT_AFTER_TTL_FRACTION;
  }

  /** GET /v1/peer/digest; `report`, the requester's word that it caught up on an earlier one. */
  digest(withBuckets: boolean, report?: CaughtUpReport): TableDigest {
    // The caught-up clock is monotonic (see RouteTable's monotonicNow), whole ms on the wire.
    const asOfMs = Math.floor(this.monotonicNow());
    if (report) this.noteCaughtUpBy(report, asOfMs);
    // Fences past their TTL leave the digest now, not at the next sweep (up to a minute away):
    // a pull never returns them, so two equal tables differed on their bucket until then, and
    // every round re-pulled it for nothing (and `ctl diff` showed a difference that was none).
    this.sweepFencesSoon();
    return {
      instance: this.instanceId,
      buckets: this.table.digestBuckets,
      root: this.table.rootDigest(),
      ...(withBuckets ? { digests: this.table.digest() } : {}),
      routes: this.table.size,
      fences: this.table.fenceCount,
      suspect: !this.bootstrapped || this.isSuspect(),
      seeded: this.seeded,
      bootstrapping: !this.bootstrapped,
      asOfMs,
    };
  }

  /**
   * The time (this replica's monotonic clock) through which every peer has caught up on this
   * table, by their reports: a fence that arrived here at or after it is held past its TTL (the
   * table asks; see RouteTable's caughtUpThrough). +Infinity without peers; -Infinity while any
   * peer has not reported (or this replica has not yet learnt its instance from its digest).
   * "Every peer" counts the current ones and those discovery dropped within the longest a fence
   * can be held (TTL + hold bound): one listed again later may still hold a route deleted
   * meanwhile, and its copy would be taken back once the fence is gone. Cached until a report,
   * an instance or the peer set changes: the table asks for every operation on a held fence.
   */
  caughtUpThrough(): number {
    const cache = this.caughtUpCache;
    if (cache?.peersVersion === this.sync.peersVersion && cache.version === this.caughtUpVersion) return cache.value;
    let through = Number.POSITIVE_INFINITY;
    const least = (instance: string | undefined): void => {
      const at = instance === undefined ? undefined : this.caughtUpBy.get(instance);
      through = Math.min(through, at ?? Number.NEGATIVE_INFINITY);
    };
    for (const peer of this.sync.peerAddresses()) {
      this.departed.delete(peer);
      least(this.peerInstances.get(peer));
    }
    const forgetBefore = this.now() - this.config.tombstoneTtlMs - this.config.tombstoneHoldMaxMs;
    for (const [address, gone] of this.departed) {
      if (gone.atMs < forgetBefore) this.departed.delete(address);
      else least(gone.instance);
    }
    this.caughtUpCache = { peersVersion: this.sync.peersVersion, version: this.caughtUpVersion, value: through };
    return through;
  }

  /** Discovery dropped `address`: it stays owed the fences it has not caught up on (caughtUpThrough). */
  private peerDeparted(address: string): void {
    this.departed.delete(address);
    this.departed.set(address, { instance: this.peerInstances.get(address), atMs: this.now() });
    // Bounded: past the bound the oldest departure is forgotten (the table's hold bound stays).
    if (this.departed.size > DEPARTED_PEERS_MAX) this.departed.delete(this.departed.keys().next().value!);
    this.caughtUpVersion++;
  }

  private noteCaughtUpBy(report: CaughtUpReport, asOfMs: number): void {
    // A report of another instance's digest (this address's replica before a restart) says
    // nothing of this table; and no peer has caught up on a table this replica has not shown yet.
    if (report.digestOf !== this.instanceId) return;
    const through = Math.min(report.caughtUpToMs, asOfMs);
    const before = this.caughtUpBy.get(report.instance);
    if (before !== undefined && through <= before) return;
    this.caughtUpBy.set(report.instance, through);
    this.caughtUpVersion++;
    this.forgetOldPeers();
  }

  /** The per-peer maps keep current and departed peers (and a few more): addresses and instances churn. */
  private forgetOldPeers(): void {
    const bound = 2 * (this.sync.peerCount + this.departed.size) + 16;
    if (
      this.caughtUpBy.size <= bound &&
      this.peerInstances.size <= bound &&
      this.caughtUpOn.size <= bound &&
      this.roundWarnings.size <= bound &&
      this.pulledWithRefusals.size <= bound
    ) {
      return;
    }
    const current = new Set(this.sync.peerAddresses());
    for (const address of this.roundWarnings.keys()) if (!current.has(address)) this.roundWarnings.delete(address);
    for (const address of this.pulledWithRefusals.keys()) if (!current.has(address)) this.pulledWithRefusals.delete(address);
    for (const address of this.peerInstances.keys()) if (!current.has(address)) this.peerInstances.delete(address);
    for (const address of this.caughtUpOn.keys()) if (!current.has(address)) this.caughtUpOn.delete(address);
    const instances = new Set([...this.peerInstances.values(), ...[...this.departed.values()].map((gone) => gone.instance)]);
    for (const instance of this.caughtUpBy.keys()) if (!instances.has(instance)) this.caughtUpBy.delete(instance);
    this.caughtUpVersion++;
  }

  /** This replica has caught up on `peer`'s table as of that digest: said in the next digest request to it. */
  private caughtUpOnDigest(peer: string, digest: TableDigest): void {
    // A pull that skipped entries this version refuses has not caught up on them: one may be a
    // fence of a route this replica holds, and the peer would let it go.
    if (this.pulledWithRefusals.get(peer) === digest.instance) return;
    if (digest.asOfMs !== undefined && digest.instance !== '') this.caughtUpOn.set(peer, { instance: digest.instance, asOfMs: digest.asOfMs });
  }

  /** POST /v1/peer/pull: every route and live fence in the buckets, in push wire form. */
  pull(buckets: readonly number[]): Record<string, unknown>[] {
    return this.table.changesInBuckets(buckets).map(changeToWire);
  }

  /** Seconds since the last completed round with a non-suspect peer. */
  lagSeconds(): number {
    return Math.max(0, this.contactAgeMs()) / 1000;
  }

  // --- bootstrap -------------------------------------------------------------------------

  /**
   * Pull the table from the first peer that answers (and is not itself suspect or still
   * bootstrapping), within bootstrapTimeoutMs. Never throws. Local changes made meanwhile
   * (a manager's batch push at start) stay: the pull merges through the usual rules.
   */
  async bootstrap(options: BootstrapOptions = {}): Promise<BootstrapOutcome> {
    const started = performance.now();
    const peersKnown = options.peersKnown ?? true;
    // A fence its source holds past the TTL is kept here too (see RouteTable.adoptHeldFences).
    this.table.adoptHeldFences = true;
    try {
      if (this.sync.peerCount === 0) {
        // Closed while discovery was awaited: not ready, so nothing to say.
        if (this.closed) return 'timeout';
        if (!peersKnown) {
          // No peer known is not "no peers" while discovery has not answered: the fleet may
          // hold routes. Ready, so that the manager's pushes are served, but not seeded.
          this.logger.warn(
            { timeoutMs: this.config.bootstrapTimeoutMs },
            'bootstrap: peer discovery has not answered; ready with the table as it is (reconciliation fills it once peers are found)',
          );
          return 'timeout';
        }
        this.logger.info('no peers: ready at once with the table as it is');
        this.seeded = true;
        return 'no_peers';
      }
      const { signal, clear } = attemptSignal(options.timeoutMs ?? this.config.bootstrapTimeoutMs, this.stop.signal);
      try {
        let lastError: PeerRequestError | undefined;
        while (!signal.aborted) {
          try {
            const report = await this.bootstrapOnce(signal);
            this.logger.info(
              { peer: report.peer, routes: this.table.size, fences: this.table.fenceCount, bytes: report.bytes, ms: Math.round(performance.now() - started) },
              'bootstrap: table pulled from a peer',
            );
            this.seeded = true;
            return 'pulled';
          } catch (error) {
            lastError = classifyPeerError(error);
            if (peersKnown && this.sync.peerCount === 0) {
              // Every address listed was this replica: it has no peers after all.
              this.logger.info('no peers (every peer address was this replica): ready at once with the table as it is');
              this.seeded = true;
              return 'no_peers';
            }
            if (signal.aborted) break;
            await delay(BOOTSTRAP_RETRY_MS, undefined, { signal }).catch(() => undefined);
          }
        }
        if (this.closed) return 'timeout';
        // Peers discovery has not named yet may be seeded: no fresh-fleet seeding without them.
        if (peersKnown && this.seedFreshFleet()) return 'timeout';
        this.logger.warn(
          {
            peers: this.sync.peerCount,
            timeoutMs: this.config.bootstrapTimeoutMs,
            ...(lastError ? { errorClass: lastError.errorClass, code: lastError.code } : {}),
          },
          'bootstrap: no peer answered in time; ready with the table as it is (reconciliation fills it later)',
        );
        return 'timeout';
      } finally {
        clear();
      }
    } finally {
      this.table.adoptHeldFences = false;
      this.freshPeers.clear();
      this.bootstrapped = true;
      this.lastContactMs = this.now();
    }
  }

  /**
   * Bootstrap found no seeded source. If every known peer answered during it, none is seeded,
   * and none is out of contact (each is bootstrapping too, or ready and not suspect), the fleet
   * is starting fresh - replicas started together all see each other bootstrapping - and no
   * replica holds anything this one lacks: each such peer's table was merged into this one as
   * it answered. So this table is as complete as any in the fleet, and this replica seeds
   * itself; without that, nothing would ever seed the fleet (seeded spreads only from a seeded
   * replica), every later restart would turn ready empty, and a cut-off replica would find no
   * one to rebuild from. If any peer did not answer, it does not: that peer may be seeded and
   * cut off from us. Nor if one answered seeded (it holds history this table lacks) or out of
   * contact (its table may hold routes deleted elsewhere, which were therefore not merged).
   */
  private seedFreshFleet(): boolean {
    const peers = this.sync.peerAddresses();
    if (peers.length === 0 || !peers.every((peer) => this.freshPeers.get(peer) === true)) return false;
    this.seeded = true;
    this.logger.info(
      { peers: peers.length, routes: this.table.size, fences: this.table.fenceCount, timeoutMs: this.config.bootstrapTimeoutMs },
      'bootstrap: every peer answered, none is seeded and none is out of contact: the fleet is starting fresh; their tables are merged and this replica seeds itself',
    );
    return true;
  }

  /**
   * A peer that cannot be bootstrapped from. One that is not seeded either and whose table is
   * new (bootstrapping) or kept in contact (not suspect) has nothing a peer could not offer in
   * a round: merge it now, so that if every peer turns out so, this table holds all there is.
   */
  private async noteUnfitSource(peer: string, digest: TableDigest, signal: AbortSignal): Promise<void> {
    this.freshPeers.set(peer, false);
    if (digest.seeded || (digest.suspect && !digest.bootstrapping)) return;
    await this.pullAndApply(peer, digest.instance, this.differingBuckets(digest), signal);
    this.caughtUpOnDigest(peer, digest);
    this.freshPeers.set(peer, true);
  }

  /**
   * Ask up to BOOTSTRAP_FANOUT peers at once (those not heard from yet first, so that in a
   * larger fleet every peer is asked); pull from the first non-suspect, seeded one that answers.
   */
  private async bootstrapOnce(signal: AbortSignal): Promise<RoundReport> {
    const peers = this.shuffled(this.sync.peerAddresses())
      .sort((x, y) => Number(this.freshPeers.has(x)) - Number(this.freshPeers.has(y)))
      .slice(0, BOOTSTRAP_FANOUT);
    if (peers.length === 0) throw new PeerRequestError('unreachable', 'no peers');
    const losers = new AbortController();
    const combined = AbortSignal.any([signal, losers.signal]);
    const answers = peers.map(async (peer) => {
      const { digest, bytes } = await this.fetchDigest(peer, true, combined).catch((error: unknown) => {
        // An address that is this replica under another name (a StatefulSet hostname in the
        // static list, ROUTESYNC_SELF the pod IP) leaves the peer set now, not at the first
        // round: a fresh fleet seeds itself only once every peer left has answered.
        if (classifyPeerError(error).errorClass === 'self') this.sync.excludeSelf(peer);
        throw error;
      });
      if (digest.suspect || !digest.seeded) {
        await this.noteUnfitSource(peer, digest, combined);
        throw new PeerRequestError('unknown', `peer ${peer} is suspect, bootstrapping or not seeded`, { code: 'ROUTESYNC_PEER_UNTRUSTED' });
      }
      return { peer, digest, bytes };
    });
    let first: Awaited<(typeof answers)[number]>;
    try {
      first = await Promise.any(answers);
    } catch (error) {
      const errors = error instanceof AggregateError ? error.errors : [error];
      throw classifyPeerError(errors[0]);
    } finally {
      losers.abort(new SyncAbortedError('another peer answered first'));
      for (const answer of answers) answer.catch(() => undefined);
    }
    const differing = this.differingBuckets(first.digest);
    const pulled = await this.pullAndApply(first.peer, first.digest.instance, differing, signal);
    this.caughtUpOnDigest(first.peer, first.digest);
    this.sync.markReconciled(first.peer);
    this.metrics.reconcileDigests.inc();
    return { peer: first.peer, result: 'repaired', repaired: pulled.repaired, bytes: first.bytes + pulled.bytes, buckets: differing.length };
  }

  // --- rounds ----------------------------------------------------------------------------

  /** Start the jittered timer (after bootstrap). */
  start(): void {
    this.schedule();
  }

  /**
   * The interval for the current peer count, before jitter: stretched past LARGE_FLEET_PEERS,
   * but never past the longest interval config allows for the fence TTL (below TTL / 5), or a
   * large enough fleet's healthy replicas would go half a TTL between rounds and turn suspect.
   */
  intervalMs(peerCount = this.sync.peerCount): number {
    const stretched = this.config.reconcileIntervalMs * Math.max(1, peerCount / LARGE_FLEET_PEERS);
    return Math.min(stretched, Math.max(this.config.reconcileIntervalMs, maxReconcileIntervalMs(this.config.tombstoneTtlMs)));
  }

  /**
   * One round now (the timer calls this; tests may too). Never throws: every failure is
   * classified, counted and logged. Rounds never overlap: a call during a round joins it.
   */
  runRound(): Promise<RoundReport> {
    this.running ??= this.round().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.stop.abort(new SyncAbortedError('shutting down'));
  }

  private schedule(): void {
    if (this.closed) return;
    // ±25 % jitter: replicas started together drift apart, and the next round is never later
    // than RECONCILE_JITTER_MAX (1.25) intervals, so a healed cut converges within two intervals
    // (and config bounds the interval by the same figure).
    const spread = RECONCILE_JITTER_MAX - 1;
    const waitMs = this.intervalMs() * (1 - spread + 2 * spread * this.random());
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.runRound().finally(() => this.schedule());
    }, waitMs);
    this.timer.unref();
  }

  private async round(): Promise<RoundReport> {
    const peer = this.pickPeer();
    if (!peer) {
      this.alone();
      this.metrics.convergenceLag.set(this.lagSeconds());
      return { peer: null, result: 'no_peers', repaired: 0, bytes: 0, buckets: 0 };
    }
    this.metrics.convergenceLag.set(this.lagSeconds());
    // The whole round shares one budget: its own interval (at least 1 s, at most 30 s), so a
    // slow peer costs one round, never a pile-up of them.
    const budgetMs = Math.max(1000, Math.min(this.intervalMs(), 30_000));
    const { signal, clear } = attemptSignal(budgetMs, this.stop.signal);
    const wasSuspect = this.isSuspect();
    let bytes = 0;
    try {
      // This side's expired fences leave the digest before it is compared (see digest()).
      this.sweepFencesSoon();
      const head = await this.fetchDigest(peer, false, signal);
      bytes += head.bytes;
      this.metrics.reconcileDigests.inc();
      let report: RoundReport;
      const remote = head.digest;
      if (wasSuspect && (remote.suspect || !remote.seeded)) {
        report = this.untrustedPeer(peer, remote, bytes);
        if (report.result === 'skipped') {
          this.metrics.reconcileRounds.inc({ result: 'skipped' });
          return report;
        }
      } else if (remote.suspect) {
        report = { peer, result: 'skipped', repaired: 0, bytes, buckets: 0 };
        this.metrics.reconcileRounds.inc({ result: 'skipped' });
        this.logger.debug({ peer }, 'reconcile: peer is suspect or bootstrapping; not pulling from it');
        return report;
      } else if (wasSuspect) {
        // Every bucket is pulled after the head digest was taken: the whole table, in 16
        // requests, which a large table cannot fit in one round's budget, and a rebuild that
        // ran out of it started over the next round, for ever (200,000 routes missed a 1 s
        // budget here). So each request gets the round's budget, and the rebuild as a whole a
        // quarter of the fence TTL (the round's, if longer), which the suspect state it ends can
        // afford: rounds do not overlap, the next one waits for this one.
        const rebuildMs = Math.max(budgetMs, this.config.tombstoneTtlMs / 4);
        const rebuild = attemptSignal(rebuildMs, this.stop.signal);
        try {
          report = await this.rebuildFrom(peer, remote.instance, rebuild.signal, bytes, budgetMs);
        } finally {
          rebuild.clear();
        }
        this.caughtUpOnDigest(peer, remote);
      } else if (head.digest.root === this.table.rootDigest()) {
        report = { peer, result: 'in_sync', repaired: 0, bytes, buckets: 0 };
        this.caughtUpOnDigest(peer, remote);
      } else {
        const full = await this.fetchDigest(peer, true, signal);
        bytes += full.bytes;
        // The head digest said the peer could be pulled from; a restart since (a new instance,
        // bootstrapping or suspect) says otherwise.
        if (full.digest.instance !== remote.instance) throw peerRestarted(peer);
        if (full.digest.suspect) throw new PeerRequestError('unknown', `peer ${peer} turned suspect or is bootstrapping`, { code: 'ROUTESYNC_PEER_UNTRUSTED' });
        const differing = this.differingBuckets(full.digest);
        const pulled = await this.pullAndApply(peer, full.digest.instance, differing, signal);
        this.caughtUpOnDigest(peer, full.digest);
        bytes += pulled.bytes;
        report = { peer, result: pulled.repaired > 0 ? 'repaired' : 'unchanged', repaired: pulled.repaired, bytes, buckets: differing.length };
      }
      this.contact(peer);
      this.roundWarnings.delete(peer);
      if (remote.seeded || report.result === 'kept') this.seeded = true;
      this.metrics.reconcileRounds.inc({ result: report.result });
      if (report.repaired > 0) {
        this.logger.info({ peer, repaired: report.repaired, buckets: report.buckets, bytes: report.bytes, result: report.result }, 'reconcile: repaired from peer');
      }
      return report;
    } catch (error) {
      const classified = this.closed ? new PeerRequestError('aborted', 'shutting down', { cause: error }) : classifyPeerError(error);
      if (classified.errorClass === 'self') this.sync.excludeSelf(peer);
      // Finding this replica's own address is not a failed round (excludeSelf logs it).
      if (classified.errorClass !== 'aborted' && classified.errorClass !== 'self') {
        this.metrics.reconcileRounds.inc({ result: 'failed' });
        this.sync.markReconcileFailed(peer, classified.errorClass);
        // A peer that stays down would fail a round every interval: one warning a minute.
        let warnings = this.roundWarnings.get(peer);
        if (!warnings) this.roundWarnings.set(peer, (warnings = new RepeatedWarnings()));
        this.logger[warnings.level(failureKey(classified))](
          { peer, errorClass: classified.errorClass, code: classified.code, status: classified.status },
          'reconcile round failed',
        );
      }
      return { peer, result: 'failed', repaired: 0, bytes, buckets: 0, errorClass: classified.errorClass };
    } finally {
      clear();
      this.metrics.convergenceLag.set(this.lagSeconds());
    }
  }

  /** Round-robin over healthy peers (all peers if every one is ejected), from a random start. */
  private pickPeer(): string | undefined {
    let candidates = this.sync.healthyPeerAddresses();
    if (candidates.length === 0) candidates = this.sync.peerAddresses();
    if (candidates.length === 0) return undefined;
    candidates.sort();
    return candidates[this.cursor++ % candidates.length];
  }

  /**
   * A suspect replica met a peer it cannot rebuild from. Once every current peer has answered
   * so, and no suspect one among them outranks it, this table is the reference. A seeded table
   * outranks an unseeded one (an unseeded replica holds only what its manager did since it
   * turned ready, often nothing: kept, it would wipe the seeded one's table in its rebuild);
   * between equals, the smaller instance ID wins.
   */
  private untrustedPeer(peer: string, remote: TableDigest, bytes: number): RoundReport {
    this.untrusted.set(peer, { instance: remote.instance, suspect: remote.suspect, seeded: remote.seeded });
    const peers = this.sync.peerAddresses();
    // Only current peers count: one that has left the peer set since it answered (scaled down,
    // dropped by discovery) will never keep its table, and would outrank this one for ever.
    const current = new Set(peers);
    for (const address of this.untrusted.keys()) if (!current.has(address)) this.untrusted.delete(address);
    const allUntrusted = peers.every((address) => this.untrusted.has(address));
    const outranked = [...this.untrusted.values()].some(
      (other) =>
        other.suspect &&
        (other.seeded !== this.seeded ? other.seeded : other.instance !== '' && other.instance < this.instanceId),
    );
    if (!allUntrusted || outranked) {
      this.logger.debug({ peer, suspect: remote.suspect, seeded: remote.seeded }, 'reconcile: suspect, and this peer cannot be rebuilt from');
      return { peer, result: 'skipped', repaired: 0, bytes, buckets: 0 };
    }
    this.logger.warn(
      { peers: peers.length, outOfContactMs: Math.round(this.contactAgeMs()) },
      'reconcile: table was suspect but no peer is a trustworthy source; keeping it as the reference',
    );
    return { peer, result: 'kept', repaired: 0, bytes, buckets: 0 };
  }

  /** A completed round with a non-suspect peer. */
  private contact(peer: string): void {
    this.untrusted.clear();
    this.localDeletions.clear();
    this.lastContactMs = this.now();
    this.sync.markReconciled(peer);
  }

  /**
   * No peers (a single replica, the default; or every peer gone from discovery): there is no one
   * to have missed a deletion from, so this counts as contact. Each round does this, so the
   * clock starts afresh with the first peer that appears, and what the local manager changed
   * before then no longer counts as changed since the last contact.
   */
  private alone(): void {
    this.localDeletions.clear();
    this.lastContactMs = this.now();
  }

  /**
   * The suspect rebuild (see the header): pull the peer's whole table, apply it, then drop,
   * without a fence, every route held since before the rebuild that the peer does not hold,
   * unless the local manager changed it since the cut began.
   */
  private async rebuildFrom(peer: string, instance: string, signal: AbortSignal, bytesSoFar: number, requestBudgetMs: number): Promise<RoundReport> {
    const cutStartMs = this.lastContactMs;
    // Only routes held as the rebuild begins can be stale. The pulls take many requests, and
    // pushes (and local changes) keep landing meanwhile, some in buckets already pulled: such a
    // route is live, and the source simply answered before it had it.
    const heldAtStart = this.table.list();
    const all = Array.from({ length: this.table.digestBuckets }, (_, i) => i);
    const seen = new Set<string>();
    this.table.adoptHeldFences = true;
    let pulled: { repaired: number; bytes: number };
    try {
      pulled = await this.pullAndApply(peer, instance, all, signal, seen, requestBudgetMs);
    } finally {
      this.table.adoptHeldFences = false;
    }
    // From here to dropStale nothing awaits: no push can land between the check and the drop.
    // What the local manager deleted since the cut began, deleted again: past a cut longer than
    // the TTL its fence has expired here before any peer saw it (its push may still be queued,
    // or dropped), so the pull has just brought the route back from the source, and the source's
    // next pull of ours would spread it again. Fenced anew (now): that fence is the deletion's
    // only carrier to peers that do not have it yet. A newer route or fence pulled is left as is.
    const redeleted = this.service
      .applyRemote(
        [...this.localDeletions].map(([key, resourceVersion]): RouteChange => ({ op: 'delete', deletion: { ...splitIdentityKey(key), resourceVersion } })),
        'reconcile',
      )
      .filter((result) => result.outcome === 'applied').length;
    this.metrics.reconcileRepaired.inc(redeleted);
    // A local change is spared only while recent enough that a deletion superseding it still has
    // its fence wherever the deletion reached (see the header); older ones are dropped like any
    // other stale route, and named in the log: their manager's sync reached no peer.
    const trustedSince = this.sparedSince(cutStartMs);
    const stale: Route[] = [];
    const untrustedLocal: string[] = [];
    let untrustedLocalCount = 0;
    for (const route of heldAtStart) {
      const key = routeKey(route);
      if (seen.has(key)) continue;
      // Replaced or removed since the rebuild began (routes are immutable: an update is a new object).
      if (this.table.getByKey(key) !== route) continue;
      if (this.changedLocallySince(route, trustedSince)) continue;
      if (this.changedLocallySince(route, cutStartMs)) {
        untrustedLocalCount++;
        if (untrustedLocal.length < LOGGED_KEYS_MAX) untrustedLocal.push(key);
      }
      // Dropped without a fence (see dropWithoutFence). A live route dropped here comes back
      // with the next pull from a peer that holds it.
      stale.push(route);
    }
    const dropped = this.service.dropStale(stale).filter((result) => result.outcome === 'applied').length;
    this.metrics.reconcileRepaired.inc(dropped);
    this.logger.warn(
      {
        peer,
        outOfContactMs: Math.round(this.now() - cutStartMs),
        pulledChanges: seen.size,
        repaired: pulled.repaired,
        redeleted,
        droppedStale: dropped,
        ...(untrustedLocalCount > 0 ? { droppedOldLocalChanges: untrustedLocalCount, droppedOldLocalKeys: untrustedLocal } : {}),
      },
      'reconcile: table was suspect (out of contact too long); rebuilt from a peer',
    );
    return { peer, result: 'rebuilt', repaired: pulled.repaired + redeleted + dropped, bytes: bytesSoFar + pulled.bytes, buckets: all.length };
  }

  private differingBuckets(remote: TableDigest): number[] {
    const digests = remote.digests;
    if (!digests || remote.buckets !== this.table.digestBuckets || digests.length !== this.table.digestBuckets) {
      throw new PeerRequestError('protocol', `peer digest has ${remote.buckets} buckets, this replica ${this.table.digestBuckets}`);
    }
    const differing: number[] = [];
    for (let i = 0; i < digests.length; i++) if (digests[i] !== this.table.bucketDigest(i)) differing.push(i);
    return differing;
  }

  /**
   * Pull buckets in chunks and apply each chunk as it arrives; `seen` collects the keys pulled.
   * With `requestBudgetMs`, each request also has that long of its own.
   *
   * Every answer must come from `instance`, the replica whose digest chose the buckets: a peer
   * that restarts on the same address mid-pull (empty, bootstrapping) answers the rest from a
   * table that is not the one the digest described, and a rebuild took its empty answers for
   * "the source holds none of these" and dropped the live routes of most of the table, for good
   * once the restarted peer bootstrapped from what was left. Such an answer ends the pull
   * before it is applied; what was applied before it is a merge, harmless.
   */
  private async pullAndApply(
    peer: string,
    instance: string,
    buckets: readonly number[],
    signal: AbortSignal,
    seen?: Set<string>,
    requestBudgetMs?: number,
  ): Promise<{ repaired: number; bytes: number }> {
    let repaired = 0;
    let bytes = 0;
    this.pulledWithRefusals.delete(peer);
    for (let i = 0; i < buckets.length; i += PULL_BUCKETS_PER_REQUEST) {
      const chunk = buckets.slice(i, i + PULL_BUCKETS_PER_REQUEST);
      const started = performance.now();
      let body: unknown;
      const request = requestBudgetMs === undefined ? undefined : attemptSignal(requestBudgetMs, signal);
      try {
        const answer = await this.requestJson(peer, 'POST', PULL_PATH, JSON.stringify({ buckets: chunk }), request?.signal ?? signal);
        bytes += answer.bytes;
        if (instance !== '' && answer.instance !== instance) throw peerRestarted(peer);
        body = answer.json;
      } finally {
        request?.clear();
        this.metrics.peerRequestDuration.observe({ kind: 'pull' }, (performance.now() - started) / 1000);
      }
      const entries = (body as { changes?: unknown } | null)?.changes;
      if (!Array.isArray(entries)) throw new PeerRequestError('protocol', `peer ${peer} answered a pull without "changes"`);
      // Unlike a push (all or nothing: the pusher is told), a pull skips what this version
      // refuses: a peer of another version may hold a route stored under rules this one does not
      // accept (say, from before names were checked as Kubernetes names), and failing the whole
      // pull would fail every round with that peer over one entry, for every bucket it shares,
      // until this replica turned suspect. The skipped entry's bucket stays different, is pulled
      // again each round, and is counted each time.
      const { changes, invalid } = parseChanges(entries);
      // The peer holds each refused identity, in a form this version refuses: a rebuild must
      // not count a local route of it as one the source lacks and drop it.
      for (const { index } of invalid) {
        const key = refusedEntryKey(entries[index]);
        if (seen && key !== undefined) seen.add(key);
      }
      const [refusal] = invalid;
      if (refusal) {
        this.pulledWithRefusals.set(peer, instance);
        this.metrics.reconcileRefused.inc(invalid.length);
        // The reason and field only: an entry's values may hold an access token.
        this.logger.warn({ peer, refused: invalid.length, reason: refusal.reason, field: refusal.field }, 'pull: skipped changes this replica refuses (a peer of another version?)');
      }
      if (seen) for (const change of changes) seen.add(changeKey(change));
      const applied = this.service.applyRemote(changes, 'reconcile').filter((result) => result.outcome === 'applied').length;
      repaired += applied;
      this.metrics.reconcileRepaired.inc(applied);
    }
    return { repaired, bytes };
  }

  private async fetchDigest(peer: string, withBuckets: boolean, signal: AbortSignal): Promise<{ digest: TableDigest; bytes: number }> {
    const started = performance.now();
    const query: string[] = withBuckets ? [] : ['root=1'];
    const caughtUp = this.caughtUpOn.get(peer);
    if (caughtUp !== undefined) query.push(`caughtUpTo=${caughtUp.asOfMs}`, `digestOf=${encodeURIComponent(caughtUp.instance)}`);
    try {
      const path = query.length > 0 ? `${DIGEST_PATH}?${query.join('&')}` : DIGEST_PATH;
      const { json, bytes } = await this.requestJson(peer, 'GET', path, undefined, signal);
      const digest = parseDigest(peer, json, withBuckets);
      if (digest.instance !== '' && this.peerInstances.get(peer) !== digest.instance) {
        this.peerInstances.set(peer, digest.instance);
        this.caughtUpVersion++;
        this.forgetOldPeers();
      }
      return { digest, bytes };
    } finally {
      this.metrics.peerRequestDuration.observe({ kind: 'digest' }, (performance.now() - started) / 1000);
    }
  }

  /** One request through the shared PeerClient, counting the response bytes; `instance`, the answering replica's instance header. */
  private async requestJson(
    peer: string,
    method: 'GET' | 'POST',
    path: string,
    body: string | undefined,
    signal: AbortSignal,
  ): Promise<{ json: unknown; bytes: number; instance: string | undefined }> {
    const response = await this.client.request(peer, method, path, body, signal);
    const header = response.headers[INSTANCE_HEADER];
    const instance = typeof header === 'string' ? header : undefined;
    let raw: ArrayBuffer;
    try {
      raw = await response.body.arrayBuffer();
    } catch (error) {
      throw classifyPeerError(error);
    }
    this.metrics.reconcileBytes.inc(raw.byteLength);
    try {
      return { json: JSON.parse(Buffer.from(raw).toString('utf8')) as unknown, bytes: raw.byteLength, instance };
    } catch (error) {
      throw new PeerRequestError('protocol', `peer ${peer} sent a body that is not JSON`, { cause: error });
    }
  }

  private shuffled(list: readonly string[]): string[] {
    const out = [...list];
    for (let i = out.length - 1; i > 0; i--) {
      const j = Math.floor(this.random() * (i + 1));
      [out[i], out[j]] = [out[j]!, out[i]!];
    }
    return out;
  }
}

function parseDigest(peer: string, json: unknown, withBuckets: boolean): TableDigest {
  const body = json as Partial<Record<keyof TableDigest, unknown>> | null;
  const ok =
    typeof body === 'object' &&
    body !== null &&
    typeof body.root === 'string' &&
    typeof body.buckets === 'number' &&
    (!withBuckets || (Array.isArray(body.digests) && body.digests.every((digest) => typeof digest === 'string')));
  if (!ok) throw new PeerRequestError('protocol', `peer ${peer} answered a digest request with something else`);
  return {
    instance: typeof body.instance === 'string' ? body.instance : '',
    buckets: body.buckets as number,
    root: body.root as string,
    ...(withBuckets ? { digests: body.digests as string[] } : {}),
    routes: typeof body.routes === 'number' ? body.routes : 0,
    fences: typeof body.fences === 'number' ? body.fences : 0,
    suspect: body.suspect === true,
    // Replicas that predate the field are seeded as far as anyone can tell.
    seeded: body.seeded !== false,
    // Replicas that predate this one: a suspect one counts as out of contact (the safe reading).
    bootstrapping: body.bootstrapping === true,
    ...(typeof body.asOfMs === 'number' && Number.isSafeInteger(body.asOfMs) && body.asOfMs >= 0 ? { asOfMs: body.asOfMs } : {}),
  };
}

/** A peer whose answer came from another instance than the digest that started the exchange: it restarted meanwhile. */
function peerRestarted(peer: string): PeerRequestError {
  return new PeerRequestError('unknown', `peer ${peer} restarted during the exchange (another instance answered)`, { code: 'ROUTESYNC_PEER_RESTARTED' });
}
