// RouteTable: the sandbox route table. A pure data structure: no I/O, no timers; the clock is
// injected. Every mutation returns a result and a reason.
//
// Invariants (each is tested in test/unit/table.test.ts):
//  1. Identity is namespace/name. An identity is either a live route or a deletion fence
//     (tombstone), never both.
//  2. An upsert applies only if its resourceVersion is strictly greater than the stored
//     route's, or than the fence's; otherwise it is ignored as `stale_resource_version`.
//  3. A delete applies when its resourceVersion is >= the stored route's (a manager deletes at
//     the sandbox's current version) and leaves a fence at that version. A later delete with a
//     greater version advances the fence's version; the fence's expiry is counted from its
//     first creation (`fencedAtMs`, carried between replicas so that they expire the same fence
//     together; never later than this table's now, so a peer's clock ahead of ours cannot
//     stretch a fence past the TTL). A delete that removes a live route starts a fence now,
//     whatever time it carries, and of the same delete's times the latest is kept: a peer that
//     missed the route's re-creation carries an older fence's time, which would expire the
//     deletion while a replica cut off with the route is not yet suspect. A newer delete never
//     moves a live fence's expiry earlier (one carrying an older time, or one whose own fence has
//     expired, advances the version at the live fence's expiry), and a delete whose own fence has
//     expired is forgotten (`fence_expired`) where there is no fence: no change lowers the version an
//     identity is guarded at (only the sweep of an expired fence and dropWithoutFence do).
//  4. The table's state is a function of the set of changes applied, not of their order (a
//     property test checks this; a fence's creation time aside, see 3, and a deletion whose
//     fence has expired, which is forgotten if it arrives where nothing is to fence): in particular the
//     route serving a sandbox ID is the one with the greatest resourceVersion among the live
//     routes carrying that ID (ties: the smallest identity key). Kubernetes resourceVersions of all objects come from one etcd counter, so
//     "greatest" means "newest": a newer identity takes the ID over (`id_takeover`).
//  5. The digest is maintained incrementally: each bucket holds the XOR of a 64-bit hash of
//     (kind, identity, resourceVersion) over its routes and fences, so two tables with the same
//     content have the same digest and a one-route difference shows in exactly one bucket.
import { performance } from 'node:perf_hooks';
import {
  compareResourceVersions,
  identityKey,
  routeKey,
  splitIdentityKey,
  type Route,
  type RouteChange,
  type RouteDeletion,
} from './route.js';

export type ApplyReason =
  | 'created'
  | 'updated'
  | 'deleted'
  | 'fenced'
  | 'stale_resource_version'
  | 'not_found'
  | 'fence_expired'
  | 'dropped';

export interface ApplyResult {
  readonly outcome: 'applied' | 'ignored';
  readonly reason: ApplyReason;
  /** Identity key, `namespace/name`. */
  readonly key: string;
  /** The version the change was applied or judged at (a delete without one takes the stored route's). */
  readonly resourceVersion?: string;
  /** Set when this upsert took a sandbox ID over from another identity. */
  readonly idTakeover?: { readonly id: string; readonly from: string };
}

export interface Fence {
  readonly resourceVersion: string;
  readonly fencedAtMs: number;
}

export interface RouteTableOptions {
  /** Deletion-fence retention, counted from the fence's first creation. */
  readonly tombstoneTtlMs: number;
  /**
   * How long past its TTL a fence may still be held for a peer that has not caught up on it
   * (see caughtUpThrough). Default 0: a fence ends at its TTL.
   */
  readonly fenceHoldMaxMs?: number;
  /**
   * The time (the monotonicNow clock) through which every peer has caught up on this table:
   * has pulled it, or found it equal, from a digest taken then. A fence past its TTL that arrived
   * here at or after this time is held (up to fenceHoldMaxMs): a peer that has not seen it may
   * still hold the route it deleted, and once the fence is gone here that route would be taken
   * back from it. +Infinity when there are no peers; -Infinity while some peer has never caught
   * up. Default: +Infinity (nothing held).
   */
  readonly caughtUpThrough?: () => number;
  /**
   * The clock of fence arrivals and of caughtUpThrough: monotonic (a wall clock stepped back
   * would date arrivals before a peer's earlier report, and release fences it has not seen).
   * Default: performance.timeOrigin + performance.now(), as the Reconciler's.
   */
  readonly monotonicNow?: () => number;
  /** Wall clock in ms (fences travel between replicas, so this is Date.now, not a monotonic clock). */
  readonly now?: () => number;
  /** Digest buckets, a power of two. */
  readonly digestBuckets?: number;
}

export interface TableSnapshot {
  readonly routes: readonly Route[];
  readonly fences: readonly (Fence & { readonly key: string })[];
  readonly idOwners: readonly (readonly [string, string])[];
}

/** Two 32-bit lanes of a 64-bit non-cryptographic hash (FNV-1a and a Murmur3-style mix, different seeds). */
export function hash64(text: string): [number, number] {
  let a = 0x811c9dc5;
  let b = 0x9747b28c;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    a = Math.imul(a ^ c, 0x01000193);
    b = Math.imul(b ^ c, 0x5bd1e995);
    b ^= b >>> 15;
  }
  b = Math.imul(b ^ (b >>> 13), 0xc2b2ae35);
  b ^= b >>> 16;
  a ^= a >>> 15;
  return [a >>> 0, b >>> 0];
}

export const DEFAULT_DIGEST_BUCKETS = 1024;

export class RouteTable {
  readonly tombstoneTtlMs: number;
  readonly digestBuckets: number;
  private readonly now: () => number;
  private readonly routes = new Map<string, Route>();
  private readonly fences = new Map<string, Fence>();
  /** When each fence's current version arrived here (the monotonicNow clock): what peers must catch up on. */
  private readonly fenceArrivals = new Map<string, number>();
  private readonly fenceHoldMaxMs: number;
  private readonly caughtUpThrough: () => number;
  private readonly monotonicNow: () => number;
  private held = 0;
  /**
   * Set by the Reconciler while it bootstraps or rebuilds this table: a pulled fence past its
   * TTL (held by its source for a peer that has not caught up) is kept here too, as held, rather
   * than forgotten. Otherwise restarting the replicas that hold a fence one at a time (a rolling
   * restart), each bootstrapping from another holder, would lose it. Only then: replicas in touch
   * trading a held fence back and forth would keep it alive to the bound.
   */
  adoptHeldFences = false;
  /** Sandbox ID -> the route serving it. */
  private readonly idOwner = new Map<string, Route>();
  /** Only for IDs carried by more than one identity: ID -> those identities' keys. */
  private readonly idContenders = new Map<string, Set<string>>();
  /** Per bucket: [lane A, lane B] XOR accumulators. */
  private readonly digestLanes: Uint32Array;
  private readonly bucketMask: number;

  constructor(options: RouteTableOptions) {
    this.tombstoneTtlMs = options.tombstoneTtlMs;
    this.now = options.now ?? Date.now;
    this.fenceHoldMaxMs = options.fenceHoldMaxMs ?? 0;
    this.caughtUpThrough = options.caughtUpThrough ?? (() => Number.POSITIVE_INFINITY);
    this.monotonicNow = options.monotonicNow ?? monotonicClock;
    this.digestBuckets = options.digestBuckets ?? DEFAULT_DIGEST_BUCKETS;
    if (!Number.isInteger(this.digestBuckets) || this.digestBuckets < 1 || (this.digestBuckets & (this.digestBuckets - 1)) !== 0) {
      throw new RangeError('digestBuckets must be a power of two');
    }
    this.bucketMask = this.digestBuckets - 1;
    this.digestLanes = new Uint32Array(this.digestBuckets * 2);
  }

  get size(): number {
    return this.routes.size;
  }

  get fenceCount(): number {
    return this.fences.size;
  }

  /** Fences past their TTL held for a peer that has not caught up on them, as of the last sweep. */
  get heldFenceCount(): number {
    return this.held;
  }

  get(namespace: string, name: string): Route | undefined {
    return this.routes.get(identityKey(namespace, name));
  }

  getByKey(key: string): Route | undefined {
    return this.routes.get(key);
  }

  /** The route serving a sandbox ID, if any (the data plane's lookup). */
  getById(id: string): Route | undefined {
    return this.idOwner.get(id);
  }

  getFence(namespace: string, name: string): Fence | undefined {
    return this.liveFence(identityKey(namespace, name));
  }

  /** The live fence of an identity key (`namespace/name`), as getFence. */
  getFenceByKey(key: string): Fence | undefined {
    return this.liveFence(key);
  }

  list(): Route[] {
    return [...this.routes.values()];
  }

  apply(change: RouteChange): ApplyResult {
    return change.op === 'upsert' ? this.upsert(change.route) : this.delete(change.deletion);
  }

  upsert(route: Route): ApplyResult {
    const key = routeKey(route);
    const stored = this.routes.get(key);
    const fence = this.liveFence(key);
    const floor = stored?.resourceVersion ?? fence?.resourceVersion;
    if (floor !== undefined && compareResourceVersions(route.resourceVersion, floor) <= 0) {
      return { outcome: 'ignored', reason: 'stale_resource_version', key, resourceVersion: route.resourceVersion };
    }
    const previousOwner = this.idOwner.get(route.id);
    if (fence) this.removeFence(key, fence);
    if (stored) this.removeRoute(key, stored);
    this.addRoute(key, route);
    const result: { -readonly [K in keyof ApplyResult]: ApplyResult[K] } = {
      outcome: 'applied',
      reason: stored ? 'updated' : 'created',
      key,
      resourceVersion: route.resourceVersion,
    };
    if (previousOwner && routeKey(previousOwner) !== key && this.idOwner.get(route.id) === route) {
      result.idTakeover = { id: route.id, from: routeKey(previousOwner) };
    }
    return result;
  }

  /**
   * Delete at a resourceVersion. Without one (an informer's delete whose final state is
   * unknown) the route is removed and fenced at its stored version; unknown identity: no-op.
   */
  delete(deletion: Omit<RouteDeletion, 'resourceVersion'> & { readonly resourceVersion?: string | undefined }): ApplyResult {
    const key = identityKey(deletion.namespace, deletion.name);
    const stored = this.routes.get(key);
    const fence = this.liveFence(key);
    const version = deletion.resourceVersion ?? stored?.resourceVersion;
    if (version === undefined) {
      return { outcome: 'ignored', reason: fence ? 'stale_resource_version' : 'not_found', key, ...(fence ? { resourceVersion: fence.resourceVersion } : {}) };
    }
    const now = this.now();
    // A peer's fencedAtMs is clamped to now: one in the future (a clock ahead, or a bad pusher)
    // would keep the fence past the TTL, up to for ever, and pulls would copy it fleet-wide.
    const carriedAtMs = deletion.fencedAtMs === undefined ? undefined : Math.min(deletion.fencedAtMs, now);

    if (stored) {
      if (compareResourceVersions(version, stored.resourceVersion) < 0) {
        return { outcome: 'ignored', reason: 'stale_resource_version', key, resourceVersion: version };
      }
      this.removeRoute(key, stored);
      // A fence made here, now, whatever time the delete carries: the route was live here, so
      // another replica may hold it too. A time carried from a fence that never saw this route
      // (a peer that missed its re-creation keeps an older fence's first creation) would expire
      // this deletion early, and a replica cut off holding the route could offer it back.
      this.addFence(key, { resourceVersion: version, fencedAtMs: now });
      return { outcome: 'applied', reason: 'deleted', key, resourceVersion: version };
    }
    if (fence) {
      const same = compareResourceVersions(version, fence.resourceVersion);
      if (same <= 0) {
        // The same delete from a peer whose fence of it started later (one that removed the live
        // route later, see above): its time is adopted, so that every replica expires the fence
        // as late as the latest of them. Never past now (the clamp above), and only a peer's
        // time: a manager repeating its delete does not stretch the fence. An older delete
        // changes nothing.
        if (same === 0 && carriedAtMs !== undefined && carriedAtMs > fence.fencedAtMs) {
          this.fences.set(key, { resourceVersion: fence.resourceVersion, fencedAtMs: carriedAtMs });
        }
        return { outcome: 'ignored', reason: 'stale_resource_version', key, resourceVersion: version };
      }
      // A later delete advances the fence's version, not its expiry, whatever time it carries.
      // An older time comes from a replica whose fence began before this one's: one that missed
      // the route's re-creation (it kept its first deletion's time), or one whose own fence began
      // a TTL ago or more (a push queued that long). Taken, it would end this fence early, while a
      // replica cut off holding the re-created route is not suspect yet, and that route would
      // come back. (A later time is not taken either: a pusher with a clock ahead, or a bad one,
      // could then keep the fence for ever with ever newer deletes.)
      this.removeFence(key, fence);
      this.addFence(key, { resourceVersion: version, fencedAtMs: fence.fencedAtMs });
      return { outcome: 'applied', reason: 'fenced', key, resourceVersion: version };
    }
    const fencedAtMs = carriedAtMs ?? now;
    const dueMs = fencedAtMs + this.tombstoneTtlMs;
    if (dueMs <= now && (!this.adoptHeldFences || dueMs + this.fenceHoldMaxMs <= now)) {
      return { outcome: 'ignored', reason: 'fence_expired', key, resourceVersion: version };
    }
    this.addFence(key, { resourceVersion: version, fencedAtMs });
    return { outcome: 'applied', reason: 'fenced', key, resourceVersion: version };
  }

  /**
   * Remove a route and leave no fence: what a suspect rebuild does with a route its source does
   * not hold (the source's real deletions come with its pull, as fences). A fence made here would
   * sit at the route's live version and travel, deleting it fleet-wide if it is live after all.
   * Only the very route given is removed: one stored since (an update is a new object) stays.
   */
  dropWithoutFence(route: Route): ApplyResult {
    const key = routeKey(route);
    if (this.routes.get(key) !== route) return { outcome: 'ignored', reason: 'not_found', key, resourceVersion: route.resourceVersion };
    this.removeRoute(key, route);
    return { outcome: 'applied', reason: 'dropped', key, resourceVersion: route.resourceVersion };
  }

  /** Remove every fence that has expired (see isExpired); returns how many. Called by the owner's timer. */
  sweepExpiredFences(): number {
    const now = this.now();
    const through = this.lazyCaughtUpThrough();
    let removed = 0;
    let held = 0;
    for (const [key, fence] of this.fences) {
      if (this.isExpired(key, fence, now, through)) {
        this.removeFence(key, fence);
        removed++;
      } else if (fence.fencedAtMs + this.tombstoneTtlMs <= now) held++;
    }
    this.held = held;
    return removed;
  }

  // --- digest and pull ----------------------------------------------------------------

  bucketOf(key: string): number {
    return hash64(key)[0] & this.bucketMask;
  }

  /** Per bucket, a 16-hex-digit digest; equal tables have equal digests. */
  digest(): string[] {
    const out = new Array<string>(this.digestBuckets);
    for (let i = 0; i < this.digestBuckets; i++) {
      out[i] = this.bucketDigest(i);
    }
    return out;
  }

  bucketDigest(bucket: number): string {
    const a = this.digestLanes[bucket * 2] ?? 0;
    const b = this.digestLanes[bucket * 2 + 1] ?? 0;
    return a.toString(16).padStart(8, '0') + b.toString(16).padStart(8, '0');
  }

  /** One digest of the whole table (a quick "are we equal at all" check). */
  rootDigest(): string {
    let a = 0;
    let b = 0;
    for (let i = 0; i < this.digestBuckets; i++) {
      const [x, y] = hash64(`${i}:${this.bucketDigest(i)}`);
      a = (a ^ x) >>> 0;
      b = (b ^ y) >>> 0;
    }
    return a.toString(16).padStart(8, '0') + b.toString(16).padStart(8, '0');
  }

  /**
   * Every route and live fence in the given buckets, as changes a peer can apply. The table is
   * scanned: an index of keys per bucket cost ~26 B a route (1,024 sets) to save a pass that
   * a pull request makes once (a round asks for the differing buckets, a rebuild or a bootstrap
   * 64 at a time), and the hash is the digest's own.
   */
  changesInBuckets(buckets: Iterable<number>): RouteChange[] {
    const wanted = new Uint8Array(this.digestBuckets);
    let any = false;
    for (const bucket of buckets) {
      if (Number.isInteger(bucket) && bucket >= 0 && bucket < this.digestBuckets) {
        wanted[bucket] = 1;
        any = true;
      }
    }
    const out: RouteChange[] = [];
    if (!any) return out;
    for (const [key, route] of this.routes) if (wanted[this.bucketOf(key)] === 1) out.push({ op: 'upsert', route });
    const now = this.now();
    const through = this.lazyCaughtUpThrough();
    for (const [key, fence] of this.fences) {
      if (wanted[this.bucketOf(key)] !== 1 || this.isExpired(key, fence, now, through)) continue;
      out.push({ op: 'delete', deletion: { ...splitIdentityKey(key), resourceVersion: fence.resourceVersion, fencedAtMs: fence.fencedAtMs } });
    }
    return out;
  }

  /** Every route and live fence: a full export for bootstrap. */
  allChanges(): RouteChange[] {
    return this.changesInBuckets(Array.from({ length: this.digestBuckets }, (_, i) => i));
  }

  /** Drop everything (a replica that rebuilds a suspect table from its peers). */
  clear(): void {
    this.routes.clear();
    this.fences.clear();
    this.fenceArrivals.clear();
    this.idOwner.clear();
    this.idContenders.clear();
    this.digestLanes.fill(0);
  }

  /** A canonical, order-free view of the whole state, for equality checks. */
  snapshot(): TableSnapshot {
    const routes = [...this.routes.values()].sort((x, y) => cmpText(routeKey(x), routeKey(y)));
    const fences = [...this.fences.entries()].map(([key, fence]) => ({ key, ...fence })).sort((x, y) => cmpText(x.key, y.key));
    const idOwners = [...this.idOwner.entries()].map(([id, route]) => [id, routeKey(route)] as const).sort((x, y) => cmpText(x[0], y[0]));
    return { routes, fences, idOwners };
  }

  // --- internals ---------------------------------------------------------------------

  private liveFence(key: string): Fence | undefined {
    const fence = this.fences.get(key);
    if (fence && this.isExpired(key, fence, this.now(), this.caughtUpThrough)) {
      this.removeFence(key, fence);
      return undefined;
    }
    return fence;
  }

  /**
   * A fence expires at its TTL, unless some peer has not caught up on it yet (it arrived
   * here at or after caughtUpThrough): then it is held until every peer has, for at most
   * fenceHoldMaxMs past the TTL. Without the hold, a split into groups that each keep in touch
   * (so nobody turns suspect) and outlasts the TTL brought a deletion made on one side back: its
   * fences expired there, and the other side offered the route back at the heal.
   */
  private isExpired(key: string, fence: Fence, now: number, caughtUpThrough: () => number): boolean {
    const dueMs = fence.fencedAtMs + this.tombstoneTtlMs;
    if (dueMs > now) return false;
    if (dueMs + this.fenceHoldMaxMs <= now) return true;
    return (this.fenceArrivals.get(key) ?? Number.NEGATIVE_INFINITY) < caughtUpThrough();
  }

  /** caughtUpThrough, asked at most once per pass (and only for a fence past its TTL). */
  private lazyCaughtUpThrough(): () => number {
    let through: number | undefined;
    return () => (through ??= this.caughtUpThrough());
  }

  private toggleDigest(kind: 'R' | 'F', key: string, resourceVersion: string): void {
    const bucket = this.bucketOf(key);
    const [a, b] = hash64(`${kind}\u0000${key}\u0000${resourceVersion}`);
    this.digestLanes[bucket * 2] = (this.digestLanes[bucket * 2]! ^ a) >>> 0;
    this.digestLanes[bucket * 2 + 1] = (this.digestLanes[bucket * 2 + 1]! ^ b) >>> 0;
  }

  private addFence(key: string, fence: Fence): void {
    this.fences.set(key, fence);
    this.fenceArrivals.set(key, this.monotonicNow());
    this.toggleDigest('F', key, fence.resourceVersion);
  }

  private removeFence(key: string, fence: Fence): void {
    this.fences.delete(key);
    this.fenceArrivals.delete(key);
    this.toggleDigest('F', key, fence.resourceVersion);
  }

  private addRoute(key: string, route: Route): void {
    this.routes.set(key, route);
    this.toggleDigest('R', key, route.resourceVersion);
    const owner = this.idOwner.get(route.id);
    if (!owner) {
      this.idOwner.set(route.id, route);
      return;
    }
    let contenders = this.idContenders.get(route.id);
    if (!contenders) {
      contenders = new Set([routeKey(owner)]);
      this.idContenders.set(route.id, contenders);
    }
    contenders.add(key);
    if (outranks(route, owner)) this.idOwner.set(route.id, route);
  }

  private removeRoute(key: string, route: Route): void {
    this.routes.delete(key);
    this.toggleDigest('R', key, route.resourceVersion);
    const contenders = this.idContenders.get(route.id);
    if (!contenders) {
      if (this.idOwner.get(route.id) === route) this.idOwner.delete(route.id);
      return;
    }
    contenders.delete(key);
    if (this.idOwner.get(route.id) === route) {
      let best: Route | undefined;
      for (const other of contenders) {
        const candidate = this.routes.get(other);
        if (candidate && (!best || outranks(candidate, best))) best = candidate;
      }
      if (best) this.idOwner.set(route.id, best);
      else this.idOwner.delete(route.id);
    }
    if (contenders.size <= 1) this.idContenders.delete(route.id);
  }
}

/**
 * A wall-clock gain over the monotonic clock this large, past any gain seen before, is time the
 * machine spent suspended (a paused VM), which the monotonic clock does not count.
 */
const SUSPEND_GAP_MS = 1000;
/** The largest (wall clock - monotonic clock) seen so far: a step back lowers it and is ignored. */
let highestOffsetMs = Date.now() - performance.now();
let suspendedMs = 0;

/**
 * ms of elapsed time, in the range of Date.now(): the default for fence arrivals, caught-up
 * reports, contact age and the local changes' stamps. It never steps back (a wall clock stepped
 * back during a cut made the cut look negative, and a replica cut off past the fence TTL was
 * still trusted) and, as Linux's CLOCK_BOOTTIME does, it counts time the machine spent
 * suspended (a VM paused past the TTL resumes with its fences expired elsewhere, and must know
 * it was away): whenever the wall clock has gained more than SUSPEND_GAP_MS on the monotonic
 * clock beyond its largest gain so far, the excess is added. A wall clock stepped forward reads
 * as a suspend too, as it did when these times were the wall clock's; one stepped back and then
 * forward again counts only what goes past where it was.
 */
export function monotonicClock(): number {
  const monotonic = performance.now();
  const offset = Date.now() - monotonic;
  if (offset > highestOffsetMs) {
    // A slow gain (the clock slewed) only moves the baseline; a jump counts as time away.
    if (offset - highestOffsetMs > SUSPEND_GAP_MS) suspendedMs += offset - highestOffsetMs;
    highestOffsetMs = offset;
  }
  return performance.timeOrigin + monotonic + suspendedMs;
}

/** Does `a` win the sandbox ID over `b`? Newer resourceVersion; ties by the smaller key. */
function outranks(a: Route, b: Route): boolean {
  const byVersion = compareResourceVersions(a.resourceVersion, b.resourceVersion);
  if (byVersion !== 0) return byVersion > 0;
  return cmpText(routeKey(a), routeKey(b)) < 0;
}

function cmpText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
