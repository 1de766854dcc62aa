import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Route, RouteChange } from '../../src/routes/route.js';
import { RouteTable } from '../../src/routes/table.js';

function route(name: string, resourceVersion: string, extra: Partial<Route> = {}): Route {
  return { namespace: 'ns', name, id: `id-${name}`, uid: `uid-${name}`, resourceVersion, ip: '10.0.0.1', state: 'running', ...extra };
}

function clockAt(start: number) {
  const clock = { now: start, tick: (ms: number) => (clock.now += ms) };
  return clock;
}

describe('RouteTable', () => {
  it('applies an upsert only when its version is strictly newer', () => {
    const table = new RouteTable({ tombstoneTtlMs: 1000 });
    expect(table.upsert(route('a', '5'))).toMatchObject({ outcome: 'applied', reason: 'created' });
    expect(table.upsert(route('a', '5', { ip: '10.9.9.9' }))).toMatchObject({ outcome: 'ignored', reason: 'stale_resource_version' });
    expect(table.upsert(route('a', '4'))).toMatchObject({ outcome: 'ignored', reason: 'stale_resource_version' });
    expect(table.upsert(route('a', '10', { ip: '10.0.0.2' }))).toMatchObject({ outcome: 'applied', reason: 'updated' });
    expect(table.get('ns', 'a')?.ip).toBe('10.0.0.2');
  });

  it('orders versions numerically, not as text', () => {
    const table = new RouteTable({ tombstoneTtlMs: 1000 });
    table.upsert(route('a', '99999999999999999999999'));
    expect(table.upsert(route('a', '100000000000000000000000')).outcome).toBe('applied');
    expect(table.upsert(route('a', '99999999999999999999999')).outcome).toBe('ignored');
  });

  it('deletes at the stored version or later and fences the identity', () => {
    const table = new RouteTable({ tombstoneTtlMs: 1000 });
    table.upsert(route('a', '5'));
    expect(table.delete({ namespace: 'ns', name: 'a', resourceVersion: '4' })).toMatchObject({ outcome: 'ignored', reason: 'stale_resource_version' });
    expect(table.get('ns', 'a')).toBeDefined();
    expect(table.delete({ namespace: 'ns', name: 'a', resourceVersion: '5' })).toMatchObject({ outcome: 'applied', reason: 'deleted' });
    expect(table.get('ns', 'a')).toBeUndefined();
    expect(table.getById('id-a')).toBeUndefined();
    expect(table.getFence('ns', 'a')?.resourceVersion).toBe('5');
    // The fence blocks resurrection at or below its version, not above.
    expect(table.upsert(route('a', '5'))).toMatchObject({ outcome: 'ignored', reason: 'stale_resource_version' });
    expect(table.upsert(route('a', '6'))).toMatchObject({ outcome: 'applied', reason: 'created' });
    expect(table.getFence('ns', 'a')).toBeUndefined();
  });

  it('deletes without a version at the stored version, and is a no-op for an unknown identity', () => {
    const table = new RouteTable({ tombstoneTtlMs: 1000 });
    expect(table.delete({ namespace: 'ns', name: 'ghost' })).toMatchObject({ outcome: 'ignored', reason: 'not_found' });
    expect(table.fenceCount).toBe(0);
    table.upsert(route('a', '12'));
    expect(table.delete({ namespace: 'ns', name: 'a' })).toMatchObject({ outcome: 'applied', reason: 'deleted', resourceVersion: '12' });
    expect(table.upsert(route('a', '12')).outcome).toBe('ignored');
  });

  it('fences an identity never seen, and a later delete advances the version but not the expiry', () => {
    const clock = clockAt(1_000_000);
    const table = new RouteTable({ tombstoneTtlMs: 10_000, now: () => clock.now });
    expect(table.delete({ namespace: 'ns', name: 'b', resourceVersion: '3' })).toMatchObject({ outcome: 'applied', reason: 'fenced' });
    clock.tick(6_000);
    expect(table.delete({ namespace: 'ns', name: 'b', resourceVersion: '8' })).toMatchObject({ outcome: 'applied', reason: 'fenced' });
    expect(table.getFence('ns', 'b')).toEqual({ resourceVersion: '8', fencedAtMs: 1_000_000 });
    expect(table.upsert(route('b', '7')).outcome).toBe('ignored');
    clock.tick(4_000); // 10 s after the first creation: expired, although the advance was 4 s ago
    expect(table.getFence('ns', 'b')).toBeUndefined();
    expect(table.upsert(route('b', '7')).outcome).toBe('applied');
  });

  it('sweeps expired fences, and keeps the later of two times a peer gives for the same delete', () => {
    const clock = clockAt(50_000);
    const table = new RouteTable({ tombstoneTtlMs: 10_000, now: () => clock.now });
    table.delete({ namespace: 'ns', name: 'c', resourceVersion: '3', fencedAtMs: 45_000 });
    expect(table.getFence('ns', 'c')?.fencedAtMs).toBe(45_000);
    // An earlier time changes nothing; a later one (a peer that fenced it later) is adopted.
    table.delete({ namespace: 'ns', name: 'c', resourceVersion: '3', fencedAtMs: 44_000 });
    expect(table.getFence('ns', 'c')?.fencedAtMs).toBe(45_000);
    table.delete({ namespace: 'ns', name: 'c', resourceVersion: '3', fencedAtMs: 46_000 });
    expect(table.getFence('ns', 'c')?.fencedAtMs).toBe(46_000);
    // The manager repeating its delete (no time of its own) does not stretch it.
    clock.tick(1_000);
    table.delete({ namespace: 'ns', name: 'c', resourceVersion: '3' });
    expect(table.getFence('ns', 'c')?.fencedAtMs).toBe(46_000);
    clock.tick(4_999);
    expect(table.sweepExpiredFences()).toBe(0);
    clock.tick(1);
    expect(table.sweepExpiredFences()).toBe(1);
    expect(table.fenceCount).toBe(0);
    // A deletion whose fence already expired elsewhere leaves no fence here either.
    expect(table.delete({ namespace: 'ns', name: 'd', resourceVersion: '1', fencedAtMs: 0 })).toMatchObject({ reason: 'fence_expired' });
    expect(table.fenceCount).toBe(0);
  });

  it("starts the fence of a delete that removes a live route now, not at an older fence's time the delete carries", () => {
    // A peer that missed the identity's re-creation (at 12) still held the fence of its first
    // deletion (at 11, 8 s ago) and advanced it to the new delete (13) without a new expiry.
    // Taken here, where the route was live, that time would expire this deletion in 2 s.
    const clock = clockAt(100_000);
    const table = new RouteTable({ tombstoneTtlMs: 10_000, now: () => clock.now });
    table.upsert(route('h', '12'));
    expect(table.delete({ namespace: 'ns', name: 'h', resourceVersion: '13', fencedAtMs: 92_000 })).toMatchObject({ outcome: 'applied', reason: 'deleted' });
    expect(table.getFence('ns', 'h')).toEqual({ resourceVersion: '13', fencedAtMs: 100_000 });
    clock.tick(9_999);
    expect(table.upsert(route('h', '12')).outcome, 'the re-created route, offered back by a replica cut off with it').toBe('ignored');
    // Even a delete whose carried time has long expired leaves a fence where it removed a route.
    table.upsert(route('k', '5'));
    table.delete({ namespace: 'ns', name: 'k', resourceVersion: '5', fencedAtMs: 0 });
    expect(table.getFence('ns', 'k')?.fencedAtMs).toBe(clock.now);
  });

  it("advances a live fence to a newer delete whose own fence has expired, at the live fence's expiry", () => {
    // The newer delete was queued (or held by a peer) for longer than the TTL. Ending the live
    // fence with it would let an upsert below the live fence's version be created: the deleted
    // route back. A later delete advances the fence's version, not its expiry.
    const clock = clockAt(100_000);
    const table = new RouteTable({ tombstoneTtlMs: 10_000, now: () => clock.now });
    expect(table.delete({ namespace: 'ns', name: 'm', resourceVersion: '5' })).toMatchObject({ outcome: 'applied', reason: 'fenced' });
    clock.tick(4_000);
    expect(table.delete({ namespace: 'ns', name: 'm', resourceVersion: '7', fencedAtMs: 1 })).toMatchObject({ outcome: 'applied', reason: 'fenced', resourceVersion: '7' });
    expect(table.getFence('ns', 'm')).toEqual({ resourceVersion: '7', fencedAtMs: 100_000 });
    for (const version of ['4', '6', '7']) expect(table.upsert(route('m', version))).toMatchObject({ outcome: 'ignored', reason: 'stale_resource_version' });
    expect(table.get('ns', 'm')).toBeUndefined();
    clock.tick(6_000);
    expect(table.sweepExpiredFences(), 'the live fence expires when it would have').toBe(1);
    // Where nothing is fenced, the same expired delete is forgotten.
    expect(table.delete({ namespace: 'ns', name: 'n', resourceVersion: '7', fencedAtMs: 1 })).toMatchObject({ outcome: 'ignored', reason: 'fence_expired' });
  });

  it("never moves a live fence's expiry earlier: a newer delete carrying an older fence's time advances the version only", () => {
    // This table removed the live route at 12 (fence 13, now). A peer that missed the
    // re-creation still holds its first deletion's time (8 s older) and deletes at 14: taken, that
    // time would expire the deletion 8 s early, while a replica cut off with route 12 is trusted.
    const clock = clockAt(100_000);
    const table = new RouteTable({ tombstoneTtlMs: 10_000, now: () => clock.now });
    table.upsert(route('h', '12'));
    table.delete({ namespace: 'ns', name: 'h', resourceVersion: '13' });
    clock.tick(1_000);
    expect(table.delete({ namespace: 'ns', name: 'h', resourceVersion: '14', fencedAtMs: 92_000 })).toMatchObject({ outcome: 'applied', reason: 'fenced' });
    expect(table.getFence('ns', 'h')).toEqual({ resourceVersion: '14', fencedAtMs: 100_000 });
    clock.tick(1_500); // 10.5 s after the peer's first fence, 2.5 s after this table removed the route
    expect(table.upsert(route('h', '12')).outcome, 'the re-created route, offered back by a replica cut off with it').toBe('ignored');
  });

  it('holds a fence past its TTL while a peer has not caught up on it, for at most the hold bound', () => {
    const clock = clockAt(100_000);
    let caughtUpThrough = Number.NEGATIVE_INFINITY;
    const table = new RouteTable({ tombstoneTtlMs: 10_000, fenceHoldMaxMs: 50_000, now: () => clock.now, monotonicNow: () => clock.now, caughtUpThrough: () => caughtUpThrough });
    table.delete({ namespace: 'ns', name: 'p', resourceVersion: '4' }); // arrives at 100_000
    clock.tick(10_000);
    // Past its TTL, but a peer has never caught up: held, still blocking, offered to pulls, counted.
    expect(table.sweepExpiredFences()).toBe(0);
    expect(table.heldFenceCount).toBe(1);
    expect(table.upsert(route('p', '3')).outcome).toBe('ignored');
    expect(table.allChanges()).toHaveLength(1);
    // Every peer caught up on a digest taken before the fence arrived: still held.
    caughtUpThrough = 99_999;
    expect(table.getFence('ns', 'p')).toBeDefined();
    // ... taken in the same millisecond: still held (it may have been taken just before).
    caughtUpThrough = 100_000;
    expect(table.getFence('ns', 'p')).toBeDefined();
    // ... taken after: the fence ends.
    caughtUpThrough = 100_001;
    expect(table.sweepExpiredFences()).toBe(1);
    expect(table.heldFenceCount).toBe(0);
    expect(table.upsert(route('p', '3')).outcome).toBe('applied');
    // A peer that never catches up holds a fence for the hold bound past its TTL, no longer.
    caughtUpThrough = Number.NEGATIVE_INFINITY;
    table.delete({ namespace: 'ns', name: 'q', resourceVersion: '1' });
    clock.tick(10_000 + 49_999);
    expect(table.getFence('ns', 'q')).toBeDefined();
    clock.tick(1);
    expect(table.getFence('ns', 'q')).toBeUndefined();
    expect(table.allChanges()).toEqual([{ op: 'upsert', route: table.get('ns', 'p') }]);
  });

  it('adopts a pulled fence past its TTL as held only while bootstrapping or rebuilding, within the hold bound', () => {
    const clock = clockAt(100_000);
    const table = new RouteTable({ tombstoneTtlMs: 10_000, fenceHoldMaxMs: 50_000, now: () => clock.now, caughtUpThrough: () => Number.NEGATIVE_INFINITY });
    const pulled = (name: string, fencedAtMs: number) => table.delete({ namespace: 'ns', name, resourceVersion: '2', fencedAtMs });
    expect(pulled('s', 85_000)).toMatchObject({ reason: 'fence_expired' });
    table.adoptHeldFences = true;
    expect(pulled('s', 85_000)).toMatchObject({ outcome: 'applied', reason: 'fenced' });
    expect(table.getFence('ns', 's')).toEqual({ resourceVersion: '2', fencedAtMs: 85_000 });
    expect(pulled('t', 100_000 - 10_000 - 50_000), 'past the hold bound').toMatchObject({ reason: 'fence_expired' });
  });

  it('holds nothing past the TTL by default (no peers: nobody to catch up)', () => {
    const clock = clockAt(100_000);
    const table = new RouteTable({ tombstoneTtlMs: 10_000, fenceHoldMaxMs: 50_000, now: () => clock.now });
    table.delete({ namespace: 'ns', name: 'r', resourceVersion: '1' });
    clock.tick(10_000);
    expect(table.sweepExpiredFences()).toBe(1);
  });

  it('drops a route without a fence only while it is the route stored, and a later upsert at its version applies', () => {
    const table = new RouteTable({ tombstoneTtlMs: 10_000 });
    const held = route('g', '5');
    table.upsert(held);
    const emptyDigest = new RouteTable({ tombstoneTtlMs: 10_000 }).rootDigest();
    expect(table.dropWithoutFence(held)).toMatchObject({ outcome: 'applied', reason: 'dropped', key: 'ns/g' });
    expect(table.get('ns', 'g')).toBeUndefined();
    expect(table.getFence('ns', 'g')).toBeUndefined();
    expect(table.getById(held.id)).toBeUndefined();
    expect(table.rootDigest()).toBe(emptyDigest);
    // No fence: the same route offered again (a peer that holds it) is taken back.
    expect(table.upsert(route('g', '5'))).toMatchObject({ outcome: 'applied', reason: 'created' });
    // A route replaced since it was read is not the one to drop.
    table.upsert(route('g', '6'));
    expect(table.dropWithoutFence(held)).toMatchObject({ outcome: 'ignored', reason: 'not_found' });
    expect(table.get('ns', 'g')?.resourceVersion).toBe('6');
  });

  it("clamps a peer's fencedAtMs in the future to now, so the fence still expires within the TTL", () => {
    const clock = clockAt(50_000);
    const table = new RouteTable({ tombstoneTtlMs: 10_000, now: () => clock.now });
    // A peer whose clock is ahead, or a bad one: far in the future, and the largest value parseChange takes.
    table.upsert(route('e', '3'));
    expect(table.delete({ namespace: 'ns', name: 'e', resourceVersion: '3', fencedAtMs: 50_000 + 3_600_000 })).toMatchObject({ outcome: 'applied', reason: 'deleted' });
    expect(table.delete({ namespace: 'ns', name: 'f', resourceVersion: '1', fencedAtMs: Number.MAX_SAFE_INTEGER })).toMatchObject({ outcome: 'applied', reason: 'fenced' });
    expect(table.getFence('ns', 'e')?.fencedAtMs).toBe(50_000);
    expect(table.getFence('ns', 'f')?.fencedAtMs).toBe(50_000);
    // What a pull offers the fleet carries the clamped time too.
    const offered = table.allChanges().map((change) => (change.op === 'delete' ? change.deletion.fencedAtMs : undefined));
    expect(offered).toEqual([50_000, 50_000]);
    // A later future-dated delete does not push the expiry out either.
    clock.tick(5_000);
    table.delete({ namespace: 'ns', name: 'f', resourceVersion: '2', fencedAtMs: Number.MAX_SAFE_INTEGER });
    expect(table.getFence('ns', 'f')).toEqual({ resourceVersion: '2', fencedAtMs: 50_000 });
    clock.tick(5_000);
    expect(table.sweepExpiredFences()).toBe(2);
    expect(table.upsert(route('f', '2')).outcome).toBe('applied');
  });

  it('lets a newer identity take a sandbox ID over', () => {
    const table = new RouteTable({ tombstoneTtlMs: 1000 });
    table.upsert(route('old', '5', { id: 'shared', ip: '10.0.0.1' }));
    const result = table.upsert(route('new', '9', { id: 'shared', ip: '10.0.0.2' }));
    expect(result.idTakeover).toEqual({ id: 'shared', from: 'ns/old' });
    expect(table.getById('shared')?.name).toBe('new');
    // The old identity's update does not win the ID back unless it is newer.
    table.upsert(route('old', '7', { id: 'shared', ip: '10.0.0.3' }));
    expect(table.getById('shared')?.name).toBe('new');
    // When the owner goes away, the remaining holder of the ID serves it.
    table.delete({ namespace: 'ns', name: 'new', resourceVersion: '9' });
    expect(table.getById('shared')?.name).toBe('old');
    // An identity moving to another ID releases the old one.
    table.upsert(route('old', '20', { id: 'other' }));
    expect(table.getById('shared')).toBeUndefined();
    expect(table.getById('other')?.name).toBe('old');
  });

  it('keeps a digest that changes in exactly one bucket for a one-route difference', () => {
    const a = new RouteTable({ tombstoneTtlMs: 1000 });
    const b = new RouteTable({ tombstoneTtlMs: 1000 });
    for (let i = 0; i < 500; i++) {
      a.upsert(route(`r${i}`, '1'));
      b.upsert(route(`r${i}`, '1'));
    }
    expect(a.rootDigest()).toBe(b.rootDigest());
    b.upsert(route('r42', '2'));
    const da = a.digest();
    const db = b.digest();
    const differing = da.flatMap((digest, i) => (digest === db[i] ? [] : [i]));
    expect(differing).toEqual([b.bucketOf('ns/r42')]);
    expect(b.changesInBuckets(differing).some((c) => c.op === 'upsert' && c.route.name === 'r42')).toBe(true);
    a.upsert(route('r42', '2'));
    expect(a.rootDigest()).toBe(b.rootDigest());
  });
});

// Property: the table is a function of the set of changes applied, not of their order.
const names = ['a', 'b', 'c', 'd'];
const ids = ['x', 'y', 'z'];
const changeArb: fc.Arbitrary<RouteChange> = fc.oneof(
  fc.record({ name: fc.constantFrom(...names), id: fc.constantFrom(...ids), version: fc.integer({ min: 1, max: 30 }), ip: fc.constantFrom('10.0.0.1', '10.0.0.2') }).map(
    ({ name, id, version, ip }) => ({ op: 'upsert' as const, route: route(name, String(version), { id, ip: `${ip}`, uid: `uid-${name}-${version}` }) }),
  ),
  fc.record({ name: fc.constantFrom(...names), version: fc.integer({ min: 1, max: 30 }) }).map(({ name, version }) => ({
    op: 'delete' as const,
    deletion: { namespace: 'ns', name, resourceVersion: String(version) },
  })),
);

describe('RouteTable properties', () => {
  it('converges to the same state whatever the order of the same changes', () => {
    fc.assert(
      fc.property(
        // Within one identity, the same version always carries the same content (as in Kubernetes).
        fc.array(changeArb, { maxLength: 40 }).map((changes) => dedupeVersions(changes)),
        fc.integer(),
        (changes, seed) => {
          const a = new RouteTable({ tombstoneTtlMs: 60_000, now: () => 1 });
          const b = new RouteTable({ tombstoneTtlMs: 60_000, now: () => 1 });
          for (const change of changes) a.apply(change);
          for (const change of shuffle(changes, seed)) b.apply(change);
          expect(b.snapshot()).toEqual(a.snapshot());
          expect(b.rootDigest()).toBe(a.rootDigest());
        },
      ),
      { numRuns: 500 },
    );
  });

  it('no change lowers the version an identity is guarded at (only the sweep of an expired fence and dropWithoutFence may)', () => {
    // The guard is the stored route's version or the fence's: an upsert must be above it to apply.
    // Deletions carry fence times as peers' do: none, recent, long expired, in the future.
    const now = 1_000_000;
    const ttl = 60_000;
    const timed = fc.tuple(changeArb, fc.constantFrom(undefined, now - 1_000, now - ttl - 1, 0, now + 5_000)).map(([change, fencedAtMs]) =>
      change.op === 'delete' && fencedAtMs !== undefined ? { ...change, deletion: { ...change.deletion, fencedAtMs } } : change,
    );
    const guard = (table: RouteTable, name: string) => Number(table.get('ns', name)?.resourceVersion ?? table.getFence('ns', name)?.resourceVersion ?? 0);
    fc.assert(
      fc.property(fc.array(timed, { maxLength: 40 }), (changes) => {
        const table = new RouteTable({ tombstoneTtlMs: ttl, now: () => now });
        for (const change of changes) {
          const before = names.map((name) => guard(table, name));
          table.apply(change);
          expect(names.map((name) => guard(table, name))).toSatisfy((after: number[]) => after.every((version, i) => version >= before[i]!));
        }
      }),
      { numRuns: 500 },
    );
  });

  it('applying a change twice is the same as applying it once', () => {
    fc.assert(
      fc.property(fc.array(changeArb, { maxLength: 30 }).map(dedupeVersions), (changes) => {
        const once = new RouteTable({ tombstoneTtlMs: 60_000, now: () => 1 });
        const twice = new RouteTable({ tombstoneTtlMs: 60_000, now: () => 1 });
        for (const change of changes) once.apply(change);
        for (const change of [...changes, ...changes]) twice.apply(change);
        expect(twice.snapshot()).toEqual(once.snapshot());
      }),
      { numRuns: 300 },
    );
  });
});

function dedupeVersions(changes: RouteChange[]): RouteChange[] {
  const seen = new Map<string, RouteChange>();
  return changes.map((change) => {
    const key = change.op === 'upsert' ? `${change.route.name}@${change.route.resourceVersion}:u` : `${change.deletion.name}@${change.deletion.resourceVersion}:d`;
    const first = seen.get(key);
    if (first) return first;
    seen.set(key, change);
    return change;
  });
}

function shuffle<T>(items: readonly T[], seed: number): T[] {
  const out = [...items];
  let state = seed >>> 0 || 1;
  for (let i = out.length - 1; i > 0; i--) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    const j = state % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}
