// Anti-entropy between real replicas on loopback: bootstrap, repair after a cut, bytes moved
// for one difference in 100,000 routes, no resurrection, and the wire contract.
import net from 'node:net';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { configFromEnv } from '../../src/config.js';
import { PULL_BUCKETS_PER_REQUEST } from '../../src/peers/reconcile.js';
import { Replica, type ReplicaOptions } from '../../src/replica.js';
import { changeToWire, parseChange, type Route } from '../../src/routes/route.js';
import { monotonicClock } from '../../src/routes/table.js';
import { FakePeer } from '../helpers/fake-peer.js';
import { LogSink, TEST_ENV, makeRoute, putRoute } from '../helpers/cluster.js';
import { unusedPort } from '../helpers/upstream.js';
import { waitUntil } from '../helpers/wait.js';

interface Node {
  readonly replica: Replica;
  readonly logs: LogSink;
  readonly api: string;
  readonly peerUrl: string;
  /** Peer requests this replica sent, by `peer path` (the onPeerRequest hook). */
  readonly requests: { peer: string; path: string }[];
  /** Called synchronously as each peer request leaves, before it is dispatched. */
  onPeerRequest?: (peer: string, path: string) => void;
}

const nodes: Node[] = [];
const fakes: FakePeer[] = [];

const linkCleanups: (() => Promise<void>)[] = [];

afterEach(async () => {
  await Promise.all(nodes.splice(0).map((node) => node.replica.close()));
  await Promise.all(linkCleanups.splice(0).map((cleanup) => cleanup()));
  await Promise.all(fakes.splice(0).map((peer) => peer.close()));
});

async function start(env: Record<string, string> = {}, options: ReplicaOptions = {}): Promise<Node> {
  const logs = new LogSink();
  const requests: { peer: string; path: string }[] = [];
  const hook: { node?: Node } = {};
  const replica = await Replica.start(configFromEnv({ ...TEST_ENV, ...env }), {
    ...options,
    logDestination: logs,
    processMetrics: false,
    onPeerRequest: (peer, path) => {
      requests.push({ peer, path });
      hook.node?.onPeerRequest?.(peer, path);
    },
  });
  const node: Node = { replica, logs, api: `http://${replica.addresses.api}`, peerUrl: `http://${replica.addresses.peer}`, requests };
  hook.node = node;
  nodes.push(node);
  return node;
}

/** N replicas that know each other from the start (static peers), on fixed ports picked by a first bind. */
async function cluster(count: number, env: Record<string, string> = {}, options: ReplicaOptions = {}): Promise<Node[]> {
  const started: Node[] = [];
  for (let i = 0; i < count; i++) started.push(await start(env, options));
  for (const node of started) node.replica.sync.setPeers(started.filter((other) => other !== node).map((other) => other.replica.addresses.peer));
  await Promise.all(started.map((node) => node.replica.bootstrapped));
  return started;
}

/**
 * N replicas started at once, each with the others as static peers from the start (a fresh
 * install, a whole-fleet restart): each sees the others bootstrapping. `env(i)` restarts one.
 */
async function coldCluster(
  count: number,
  extra: Record<string, string>,
  otherPeers: readonly string[] = [],
  options: ReplicaOptions = {},
): Promise<{ started: Node[]; env: (i: number) => Record<string, string>; addresses: string[] }> {
  const addresses = (await Promise.all(Array.from({ length: count }, () => unusedPort()))).map((port) => `127.0.0.1:${port}`);
  const env = (i: number) => ({
    ...extra,
    ROUTESYNC_PEER_ADDR: addresses[i]!,
    ROUTESYNC_SELF: addresses[i]!,
    ROUTESYNC_PEERS: [...addresses.filter((_, j) => j !== i), ...otherPeers].join(','),
  });
  const started = await Promise.all(addresses.map((_, i) => start(env(i), options)));
  return { started, env, addresses };
}

/** Rounds only when the test runs them (a short fence TTL rules out an interval long enough for that). */
const MANUAL_ROUNDS: ReplicaOptions = { reconcileTimer: false };
/**
 * Fences end at their TTL, not held for a peer that has not caught up on them: as after a cut
 * longer than ROUTESYNC_TOMBSTONE_HOLD_MAX_MS, or when every replica that held a fence has
 * restarted. The suspect rule, the rebuild and the push rule must then keep a deletion alone.
 */
const NO_HOLD = { ROUTESYNC_TOMBSTONE_HOLD_MAX_MS: '0' };

async function counter(metric: { get(): Promise<{ values: { value: number; labels: Record<string, unknown> }[] }> }, labels: Record<string, string> = {}): Promise<number> {
  const { values } = await metric.get();
  return values.filter((entry) => Object.entries(labels).every(([key, value]) => entry.labels[key] === value)).reduce((sum, entry) => sum + entry.value, 0);
}

/**
 * The same routes, fences (identity and version) and ID owners. Not the fences' creation times:
 * a replica that removes a live route starts its fence when it does (src/routes/table.ts, 3), a
 * few ms apart from replica to replica.
 */
function same(a: Replica, b: Replica): boolean {
  const state = (replica: Replica) => {
    const { routes, fences, idOwners } = replica.table.snapshot();
    return JSON.stringify({ routes, fences: fences.map(({ key, resourceVersion }) => [key, resourceVersion]), idOwners });
  };
  return a.table.rootDigest() === b.table.rootDigest() && state(a) === state(b);
}

async function postBatch(api: string, routes: Record<string, unknown>[]): Promise<{ status: number; body: any }> {
  const response = await fetch(`${api}/v1/routes/batch`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ routes }) });
  return { status: response.status, body: await response.json() };
}

/** 1,000 changes: 600 creates, 200 updates of earlier routes, 200 deletes. */
function thousandChanges(existing: Record<string, unknown>[]): Record<string, unknown>[] {
  const creates = Array.from({ length: 600 }, (_, i) => makeRoute({ namespace: 'reconcile', resourceVersion: String(1000 + i) }));
  const updates = existing.slice(0, 200).map((route, i) => ({ ...route, resourceVersion: String(5000 + i), ip: '10.9.9.9' }));
  const deletes = existing.slice(200, 400).map((route, i) => ({ namespace: route.namespace, name: route.name, resourceVersion: String(6000 + i), state: 'dead' }));
  return [...creates, ...updates, ...deletes];
}

describe('bootstrap', () => {
  it('a replica stopped while 1,000 changes happen elsewhere and restarted empty is ready with the same table', async () => {
    const [a, b, c] = await cluster(3, { ROUTESYNC_RECONCILE_INTERVAL_MS: '60000', ROUTESYNC_EJECT_PROBE_MS: '100' });
    const initial = Array.from({ length: 400 }, (_, i) => makeRoute({ namespace: 'reconcile', resourceVersion: String(10 + i) }));
    expect((await postBatch(a!.api, initial)).body.sync.acked).toBe(2);
    expect(same(a!.replica, c!.replica)).toBe(true);

    const cPeerAddress = c!.replica.addresses.peer;
    await c!.replica.close();
    nodes.splice(nodes.indexOf(c!), 1);

    const { status, body } = await postBatch(a!.api, thousandChanges(initial));
    expect(status).toBe(200);
    expect(body.results.filter((result: { outcome: string }) => result.outcome === 'applied')).toHaveLength(1000);
    await waitUntil(() => same(a!.replica, b!.replica), 10_000, 'b to have the 1,000 changes');

    const restarted = await start({
      ROUTESYNC_PEER_ADDR: cPeerAddress,
      ROUTESYNC_PEERS: [a!.replica.addresses.peer, b!.replica.addresses.peer].join(','),
      ROUTESYNC_RECONCILE_INTERVAL_MS: '60000',
    });
    expect(restarted.replica.table.size).toBe(0);
    const outcome = await restarted.replica.bootstrapped;
    expect(outcome).toBe('pulled');
    // Ready, and at that very moment already equal: bootstrap ran before readiness.
    expect(restarted.replica.isReady()).toBe(true);
    expect(same(restarted.replica, a!.replica)).toBe(true);
    expect(restarted.replica.table.size).toBe(800);
    expect(restarted.replica.table.fenceCount).toBe(200);
    expect((await fetch(`${restarted.peerUrl}/readyz`)).status).toBe(200);
    expect(restarted.logs.lines.some((line) => line.includes('bootstrap: table pulled from a peer'))).toBe(true);
  });

  it('takes a batch push while bootstrapping, and turns ready empty with a warning when no peer answers in time', async () => {
    const hung = await FakePeer.start();
    fakes.push(hung);
    hung.mode = { kind: 'hang' };
    const node = await start({ ROUTESYNC_PEERS: hung.address, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '1500', ROUTESYNC_SYNC_DEADLINE_MS: '200' });
    expect(node.replica.isReady()).toBe(false);
    expect((await fetch(`${node.peerUrl}/readyz`)).status).toBe(503);

    const routes = Array.from({ length: 50 }, () => makeRoute({ namespace: 'boot' }));
    const { status, body } = await postBatch(node.api, routes);
    expect(status).toBe(200);
    expect(body.results.every((result: { outcome: string }) => result.outcome === 'applied')).toBe(true);
    expect(node.replica.table.size).toBe(50);

    expect(await node.replica.bootstrapped).toBe('timeout');
    expect((await fetch(`${node.peerUrl}/readyz`)).status).toBe(200);
    expect(node.replica.table.size).toBe(50);
    const warning = node.logs.lines.map((line) => JSON.parse(line)).find((line) => line.msg?.startsWith('bootstrap: no peer answered'));
    expect(warning).toMatchObject({ level: 'warn' });
  });

  it('a replica without peers is ready at once', async () => {
    const node = await start();
    expect(await node.replica.bootstrapped).toBe('no_peers');
    expect((await fetch(`${node.peerUrl}/readyz`)).status).toBe(200);
  });
});

describe('anti-entropy rounds', () => {
  it('keeps at most ROUTESYNC_OUTBOX_MAX_ROUTES local deletions through a cut, and says when it forgets the oldest', async () => {
    // A peer that never answers: no round completes, so the deletions of the cut are all kept.
    const node = await start({ ROUTESYNC_PEERS: `127.0.0.1:${await unusedPort()}`, ROUTESYNC_OUTBOX_MAX_ROUTES: '10', ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '0', ROUTESYNC_RECONCILE_INTERVAL_MS: '50' });
    const routes = Array.from({ length: 25 }, (_, i) => makeRoute({ namespace: 'gone', resourceVersion: String(100 + i) }));
    expect((await postBatch(node.api, routes)).status).toBe(200);
    // Out of contact: rounds have failed for more than two intervals.
    await waitUntil(async () => (await counter(node.replica.metrics.reconcileRounds, { result: 'failed' })) >= 4, 10_000, 'failed rounds');
    const deletes = routes.map((route, i) => ({ namespace: route.namespace, name: route.name, resourceVersion: String(200 + i), state: 'dead' }));
    expect((await postBatch(node.api, deletes)).status).toBe(200);
    const forgot = node.logs.lines.map((line) => JSON.parse(line) as { msg: string; level: string; bound?: number; forgotten?: number }).filter((entry) => entry.msg.startsWith('out of contact: the oldest local deletions are forgotten'));
    expect(forgot.at(-1)).toMatchObject({ bound: 10, forgotten: 15 });
    // One warning for the burst, the rest at debug.
    expect(forgot.filter((entry) => entry.level === 'warn')).toHaveLength(1);
    // A replica alone loses nothing a rebuild needs by the bound: no warning.
    const alone = await start({ ROUTESYNC_OUTBOX_MAX_ROUTES: '10', ROUTESYNC_RECONCILE_INTERVAL_MS: '50' });
    expect((await postBatch(alone.api, routes)).status).toBe(200);
    expect((await postBatch(alone.api, deletes)).status).toBe(200);
    const aloneLines = alone.logs.lines.map((line) => JSON.parse(line) as { msg: string; level: string }).filter((entry) => entry.msg.startsWith('out of contact'));
    expect(aloneLines.length).toBeGreaterThan(0);
    expect(aloneLines.every((entry) => entry.level === 'debug')).toBe(true);
  });

  it('warns once a minute, not every round, about a peer that stays down, and at once about a new failure after it recovered', async () => {
    const down = `127.0.0.1:${await unusedPort()}`;
    const node = await start({ ROUTESYNC_PEERS: down, ROUTESYNC_RECONCILE_INTERVAL_MS: '50', ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '0' });
    await waitUntil(async () => (await counter(node.replica.metrics.reconcileRounds, { result: 'failed' })) >= 4, 10_000, 'four failed rounds');
    const failures = () => node.logs.lines.map((line) => JSON.parse(line) as { msg: string; level: string }).filter((entry) => entry.msg === 'reconcile round failed');
    const levels = failures().map((entry) => entry.level);
    expect(levels.length).toBeGreaterThanOrEqual(4);
    expect(levels[0]).toBe('warn');
    expect(levels.slice(1).every((level) => level === 'debug')).toBe(true);
    // The peer comes up and a round with it completes; when it goes down again, that warns at once.
    const peer = await start({ ROUTESYNC_PEER_ADDR: down });
    const completed = async () => (await counter(node.replica.metrics.reconcileRounds)) - (await counter(node.replica.metrics.reconcileRounds, { result: 'failed' }));
    await waitUntil(async () => (await completed()) >= 1, 10_000, 'a completed round');
    nodes.splice(nodes.indexOf(peer), 1);
    const before = failures().length;
    await peer.replica.close();
    await waitUntil(() => failures().length >= before + 2, 10_000, 'two more failed rounds');
    expect(failures().slice(before).map((entry) => entry.level)).toEqual(['warn', ...Array(failures().length - before - 1).fill('debug')]);
  });

  it('a replica cut off from pushes converges by itself after the cut is lifted', async () => {
    const intervalMs = 1500;
    // A small outbox bound: what the cut keeps from C is dropped by A, so it is reconciliation,
    // not hinted handoff, that has to bring C up to date.
    const [a, b, c] = await cluster(3, { ROUTESYNC_RECONCILE_INTERVAL_MS: String(intervalMs), ROUTESYNC_OUTBOX_MAX_ROUTES: '10' });
    c!.replica.faults.isolate();

    const routes = Array.from({ length: 1000 }, () => makeRoute({ namespace: 'cut', resourceVersion: '7' }));
    expect((await postBatch(a!.api, routes)).status).toBe(200);
    await waitUntil(() => b!.replica.table.size === 1000, 10_000, 'b to have the batch');
    const failedBefore = await counter(c!.replica.metrics.reconcileRounds, { result: 'failed' });
    await waitUntil(async () => (await counter(c!.replica.metrics.reconcileRounds, { result: 'failed' })) >= failedBefore + 1, 10_000, 'a failed round on c during the cut');
    expect(c!.replica.table.size).toBe(0);

    c!.replica.faults.heal();
    const healedAt = performance.now();
    // Converging is the property (the time is printed): a jittered interval plus a pull of 1,000
    // routes on a slow shared machine can pass two intervals without anything being wrong.
    await waitUntil(() => same(c!.replica, a!.replica), 30 * intervalMs, 'c to converge');
    console.log(`cut lifted: converged after ${Math.round(performance.now() - healedAt)} ms (interval ${intervalMs} ms)`);
    expect(await counter(c!.replica.metrics.reconcileRepaired)).toBeGreaterThanOrEqual(1000 - 10);
    const status = (await (await fetch(`${c!.api}/v1/peers`)).json()) as { peers: { lastReconcile: string | null }[] };
    expect(status.peers.some((peer) => peer.lastReconcile !== null)).toBe(true);
  });

  it('with 100,000 routes and one difference, a round moves a small number of bytes', async () => {
    // No timer round during the test (one an hour; the 7-day fence TTL is what allows that interval).
    const [a, b] = await cluster(2, { ROUTESYNC_RECONCILE_INTERVAL_MS: '3600000', ROUTESYNC_TOMBSTONE_TTL_MS: '604800000' });
    const changes = Array.from({ length: 100_000 }, (_, i) =>
      parseChange({ namespace: `ns-${i % 50}`, name: `sandbox-${i}`, id: `sb-${i}`, uid: `uid-${i}`, resourceVersion: String(100 + i), ip: `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`, state: 'Running' }),
    );
    a!.replica.service.applyRemote(changes, 'peer');
    b!.replica.service.applyRemote(changes, 'peer');
    a!.replica.service.applyRemote([parseChange(makeRoute({ namespace: 'extra', resourceVersion: '999999' }))], 'peer');
    expect(a!.replica.table.rootDigest()).not.toBe(b!.replica.table.rootDigest());

    const fullTableBytes = Buffer.byteLength(JSON.stringify({ changes: a!.replica.table.allChanges().map(changeToWire) }));
    const requestsBefore = b!.requests.length;
    const report = await b!.replica.reconciler.runRound();
    expect(report).toMatchObject({ result: 'repaired', repaired: 1, buckets: 1 });
    expect(same(a!.replica, b!.replica)).toBe(true);
    // (A digest request may carry b's report that it caught up on an earlier digest of a's.)
    expect(b!.requests.slice(requestsBefore).map((request) => request.path.replace(/[?&]caughtUpTo=\d+$/, ''))).toEqual(['/v1/peer/digest?root=1', '/v1/peer/digest', '/v1/peer/pull']);
    expect(await counter(b!.replica.metrics.reconcileBytes)).toBe(report.bytes);
    console.log(`100,000 routes, 1 difference: round moved ${report.bytes} bytes; full table is ${fullTableBytes} bytes (${((100 * report.bytes) / fullTableBytes).toFixed(3)} %)`);
    expect(report.bytes).toBeLessThan(fullTableBytes / 100);

    // In sync now: the next round is the root digest alone.
    const next = await b!.replica.reconciler.runRound();
    expect(next).toMatchObject({ result: 'in_sync' });
    expect(next.bytes).toBeLessThan(300);
  });
});

describe('no resurrection', () => {
  it('a route deleted while a replica is cut off for longer than the TTL stays deleted everywhere after the cut heals', async () => {
    const ttlMs = 3000;
    const [a, b, c] = await cluster(3, { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '200', ROUTESYNC_EJECT_PROBE_MS: '100', ...NO_HOLD });
    const doomed = makeRoute({ namespace: 'zombie', resourceVersion: '10' });
    expect((await putRoute(a!.api, doomed)).body.sync.acked).toBe(2);
    expect(c!.replica.table.get('zombie', doomed.name as string)).toBeDefined();

    c!.replica.faults.isolate();
    const deleted = await fetch(`${a!.api}/v1/routes/zombie/${doomed.name as string}?resourceVersion=11`, { method: 'DELETE' });
    expect(((await deleted.json()) as any).result).toMatchObject({ outcome: 'applied', reason: 'deleted' });

    // The cut outlasts the fence: gone from A and B (route and fence), still held by C.
    await waitUntil(
      () => [a!, b!].every((node) => !node.replica.table.get('zombie', doomed.name as string) && !node.replica.table.getFence('zombie', doomed.name as string)),
      ttlMs + 5000,
      'the fence to expire on a and b',
    );
    expect(c!.replica.table.get('zombie', doomed.name as string)).toBeDefined();
    expect(c!.replica.reconciler.isSuspect()).toBe(true);
    expect(c!.replica.reconciler.digest(false).suspect).toBe(true);
    // A change C's own manager makes late in the cut (less than 3/4 of the TTL before the heal):
    // it must survive the rebuild and reach the others, although C is suspect.
    const local = makeRoute({ namespace: 'zombie', resourceVersion: '20' });
    expect((await putRoute(c!.api, local)).body.result.outcome).toBe('applied');

    c!.replica.faults.heal();
    await waitUntil(async () => (await counter(c!.replica.metrics.reconcileRounds, { result: 'rebuilt' })) >= 1, 10_000, 'c to rebuild');
    // Let A and B each run several more rounds against the healed C before judging.
    const roundsA = await counter(a!.replica.metrics.reconcileRounds);
    const roundsB = await counter(b!.replica.metrics.reconcileRounds);
    await waitUntil(
      async () => (await counter(a!.replica.metrics.reconcileRounds)) >= roundsA + 4 && (await counter(b!.replica.metrics.reconcileRounds)) >= roundsB + 4,
      10_000,
      'more rounds on a and b',
    );
    for (const node of [a!, b!, c!]) {
      expect(node.replica.table.get('zombie', doomed.name as string), 'the deleted route stays deleted').toBeUndefined();
      expect(node.replica.table.get('zombie', local.name as string)?.resourceVersion, "c's own change is everywhere").toBe('20');
    }
    expect(c!.replica.reconciler.isSuspect()).toBe(false);
    expect(c!.logs.lines.some((line) => line.includes('rebuilt from a peer'))).toBe(true);
  });

  it('a route deleted on a replica cut off for longer than the TTL stays deleted when its rebuild runs before its queued push of the delete', async () => {
    const ttlMs = 1000;
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50', ...NO_HOLD };
    const [a, b, c] = await cluster(3, env, MANUAL_ROUNDS);
    const all = [a!, b!, c!];
    const doomed = makeRoute({ namespace: 'zombie', resourceVersion: '10' });
    const name = doomed.name as string;
    expect((await putRoute(a!.api, doomed)).body.sync.acked).toBe(2);
    for (const node of all) expect((await node.replica.reconciler.runRound()).result).toBe('in_sync');

    // C is cut off, and its own manager deletes the sandbox there: the push of the delete stays
    // queued for A and B. A and B stay in contact; C's fence expires during the cut.
    c!.replica.faults.isolate();
    const deleted = await fetch(`${c!.api}/v1/routes/zombie/${name}?resourceVersion=11`, { method: 'DELETE' });
    expect(((await deleted.json()) as any).result).toMatchObject({ outcome: 'applied', reason: 'deleted' });
    await roundsInContactUntil(
      [a!, b!],
      () => c!.replica.reconciler.isSuspect() && c!.replica.table.getFence('zombie', name) === undefined,
      ttlMs + 5000,
      'c to turn suspect and its fence to expire',
    );

    // The cut heals for rounds first (its pushes wait for the ejected peers' next probe), then for pushes.
    c!.replica.faults.heal();
    c!.replica.faults.blockPushes();
    expect(await c!.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
    c!.replica.faults.heal();
    await waitUntil(() => c!.replica.sync.outboxSize() === 0, 5000, "c's queued delete to reach a and b");

    for (let k = 0; k < 3; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const node of all) expect(node.replica.table.get('zombie', name), 'the deleted route stays deleted').toBeUndefined();
  });

  it("an upsert queued for a replica cut off for longer than the TTL is not pushed once it was deleted elsewhere and the deletion's fence has expired", async () => {
    const ttlMs = 1000;
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50', ...NO_HOLD };
    const [a, b, c] = await cluster(3, env, MANUAL_ROUNDS);
    const all = [a!, b!, c!];
    const cAddress = c!.replica.addresses.peer;
    const doomed = makeRoute({ namespace: 'zombie', resourceVersion: '10' });
    const name = doomed.name as string;

    // C is cut off. A's manager creates the sandbox (its push to C stays queued in A's outbox);
    // the next lifecycle call, the delete, goes to B's manager (its push to C queued in B's).
    c!.replica.faults.isolate();
    expect((await putRoute(a!.api, doomed)).body.result.outcome).toBe('applied');
    const deleted = await fetch(`${b!.api}/v1/routes/zombie/${name}?resourceVersion=10`, { method: 'DELETE' });
    expect(((await deleted.json()) as any).result).toMatchObject({ outcome: 'applied', reason: 'deleted' });
    expect(a!.replica.table.get('zombie', name), 'the delete reached a').toBeUndefined();
    // The cut outlasts the fence; A and B stay in contact.
    await roundsInContactUntil(
      [a!, b!],
      () => c!.replica.reconciler.isSuspect() && [a!, b!].every((node) => node.replica.table.getFence('zombie', name) === undefined),
      ttlMs + 5000,
      'c to turn suspect and the fences on a and b to expire',
    );

    // The cut heals for rounds first (A's and B's pushes wait for their next probe of C): C rebuilds.
    for (const node of [a!, b!]) node.replica.faults.blockPushes(cAddress);
    c!.replica.faults.heal();
    expect(await c!.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
    // Then A's queued push goes out. The upsert is of a route A no longer holds, as a route or
    // as a fence: pushed, C would take it (no fence there) and offer it back to everyone.
    a!.replica.faults.heal(cAddress);
    await waitUntil(() => a!.replica.sync.status().find((peer) => peer.peer === cAddress)?.pendingRoutes === 0, 5000, "a's queue for c to empty");
    expect(c!.replica.table.get('zombie', name), 'the stale upsert did not reach c').toBeUndefined();

    b!.replica.faults.heal(cAddress);
    await waitUntil(() => b!.replica.sync.outboxSize() === 0, 5000, "b's queue for c to empty");
    for (let k = 0; k < 3; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const node of all) expect(node.replica.table.get('zombie', name), 'the deleted route stays deleted').toBeUndefined();
  });

  it('an upsert queued for a peer is not pushed once this replica holds a fence that supersedes it, even while that fence lives: the peer would serve the deleted sandbox', async () => {
    // A fence's time is this replica's own (a delete that removes a live route starts it now) and
    // is not in the digest, so a fence can live here past the same delete's fence elsewhere; a
    // superseded upsert pushed then was taken by a peer whose fence had ended, for good.
    const [a, b, c] = await cluster(3, { ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50' }, MANUAL_ROUNDS);
    const cAddress = c!.replica.addresses.peer;
    const route = makeRoute({ namespace: 'zombie', resourceVersion: '10' });
    const name = route.name as string;
    // A's push to C fails: the upsert waits in A's outbox. The delete goes through B, whose push
    // to C fails too; it reaches A, which fences the identity.
    a!.replica.faults.blockPushes(cAddress);
    b!.replica.faults.blockPushes(cAddress);
    expect((await putRoute(a!.api, route)).body.sync.acked).toBe(1);
    const deleted = await fetch(`${b!.api}/v1/routes/zombie/${name}?resourceVersion=11`, { method: 'DELETE' });
    expect(((await deleted.json()) as any).result).toMatchObject({ outcome: 'applied', reason: 'deleted' });
    expect(a!.replica.table.getFence('zombie', name)?.resourceVersion, 'the delete reached a').toBe('11');
    expect(c!.replica.table.get('zombie', name)).toBeUndefined();

    // A's queue for C drains: the upsert it still held is superseded by A's own fence.
    a!.replica.faults.heal(cAddress);
    await waitUntil(() => a!.replica.sync.status().find((peer) => peer.peer === cAddress)?.pendingRoutes === 0, 5000, "a's queue for c to empty");
    expect(c!.replica.table.get('zombie', name), 'c never serves the deleted sandbox').toBeUndefined();

    b!.replica.faults.heal(cAddress);
    await waitUntil(() => c!.replica.table.getFence('zombie', name) !== undefined, 5000, "b's delete to reach c");
    for (const node of [a!, b!, c!]) expect(node.replica.table.get('zombie', name)).toBeUndefined();
  });
});

/** Rounds on the replicas still in contact (one each, in turn) until `done` holds; the cut-off one runs none. */
async function roundsInContactUntil(inContact: readonly Node[], done: () => boolean, timeoutMs: number, what: string): Promise<void> {
  await waitUntil(
    async () => {
      for (const node of inContact) await node.replica.reconciler.runRound();
      return done();
    },
    timeoutMs,
    what,
  );
}

/**
 * Three replicas with manual rounds; C is cut off, and its own manager creates `name` at version
 * 10 (the push queued for A and B), then the sandbox is deleted through A at version 11. The cut
 * outlasts the fences on A and B. Returns with C still isolated and suspect.
 */
async function createdOnCutReplicaThenDeletedElsewhere(ttlMs: number): Promise<{ all: Node[]; name: string }> {
  const env = { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50', ...NO_HOLD };
  const [a, b, c] = await cluster(3, env, MANUAL_ROUNDS);
  const all = [a!, b!, c!];
  const route = makeRoute({ namespace: 'zombie', resourceVersion: '10' });
  const name = route.name as string;
  c!.replica.faults.isolate();
  expect((await putRoute(c!.api, route)).body.sync.acked, 'c is cut off').toBe(0);
  const deleted = await fetch(`${a!.api}/v1/routes/zombie/${name}?resourceVersion=11`, { method: 'DELETE' });
  expect(((await deleted.json()) as any).result.outcome).toBe('applied');
  expect(b!.replica.table.getFence('zombie', name), 'the fence reached b').toBeDefined();
  await roundsInContactUntil(
    [a!, b!],
    () => c!.replica.reconciler.isSuspect() && [a!, b!].every((node) => node.replica.table.getFence('zombie', name) === undefined),
    ttlMs + 5000,
    'c to turn suspect and the fences on a and b to expire',
  );
  expect(c!.replica.table.get('zombie', name), 'c still holds it').toBeDefined();
  return { all, name };
}

describe('no resurrection of a change made on a replica cut off for longer than the TTL', () => {
  it("the cut replica's queued push of a route deleted elsewhere is withheld once the deletion's fences have expired", async () => {
    const { all, name } = await createdOnCutReplicaThenDeletedElsewhere(1000);
    const [a, b, c] = all as [Node, Node, Node];
    // The cut heals for C's pushes first: A and B would take the route (no fence left) and spread it.
    for (const node of [a, b]) node.replica.faults.blockPushes(c.replica.addresses.peer);
    c.replica.faults.heal();
    await waitUntil(() => c.replica.sync.outboxSize() === 0, 5000, "c's queue to empty");
    for (const node of [a, b]) expect(node.replica.table.get('zombie', name), 'the push was withheld').toBeUndefined();

    expect(await c.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
    for (const node of [a, b]) node.replica.faults.heal();
    for (let k = 0; k < 3; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const node of all) expect(node.replica.table.get('zombie', name), 'the deleted route stays deleted').toBeUndefined();
  });

  it("the cut replica's rebuild drops a route deleted elsewhere although its own manager made it, once the change is older than 3/4 of the TTL", async () => {
    const { all, name } = await createdOnCutReplicaThenDeletedElsewhere(1000);
    const [a, b, c] = all as [Node, Node, Node];
    // The cut heals for rounds first: C rebuilds before any push goes out (its own, or A's of the delete).
    for (const node of [a, b]) node.replica.faults.blockPushes(c.replica.addresses.peer);
    c.replica.faults.heal();
    c.replica.faults.blockPushes();
    expect(await c.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
    expect(c.replica.table.get('zombie', name), 'dropped by the rebuild').toBeUndefined();
    const warning = c.logs.lines.find((line) => line.includes('rebuilt from a peer'));
    expect(warning && JSON.parse(warning)).toMatchObject({ droppedOldLocalChanges: 1, droppedOldLocalKeys: [`zombie/${name}`] });

    for (const node of all) node.replica.faults.heal();
    await waitUntil(() => c.replica.sync.outboxSize() === 0, 5000, "c's queue to empty");
    for (let k = 0; k < 3; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const node of all) expect(node.replica.table.get('zombie', name), 'the deleted route stays deleted').toBeUndefined();
  });

  it('a route created early in a long cut and deleted nowhere is dropped by the rebuild, named in its warning, and back everywhere when its manager sends it again', async () => {
    const ttlMs = 1000;
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50' };
    const [a, b, c] = await cluster(3, env, MANUAL_ROUNDS);
    const all = [a!, b!, c!];
    const route = makeRoute({ namespace: 'early', resourceVersion: '10' });
    const name = route.name as string;
    c!.replica.faults.isolate();
    const createdAt = Date.now();
    expect((await putRoute(c!.api, route)).body.sync.acked).toBe(0);
    await roundsInContactUntil(
      [a!, b!],
      () => c!.replica.reconciler.isSuspect() && Date.now() - createdAt > ttlMs,
      ttlMs + 5000,
      'c to turn suspect and its change to age past the TTL',
    );
    c!.replica.faults.heal();
    c!.replica.faults.blockPushes();
    expect(await c!.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
    expect(c!.replica.table.get('early', name)).toBeUndefined();
    const warning = c!.logs.lines.find((line) => line.includes('rebuilt from a peer'));
    expect(warning && JSON.parse(warning)).toMatchObject({ droppedOldLocalChanges: 1, droppedOldLocalKeys: [`early/${name}`] });
    c!.replica.faults.heal();
    await waitUntil(() => c!.replica.sync.outboxSize() === 0, 5000, "c's queue to empty");
    for (const node of [a!, b!]) expect(node.replica.table.get('early', name), 'the old queued push was withheld').toBeUndefined();

    // The manager was told its sync reached no peer; sending it again puts it everywhere.
    const again = await putRoute(c!.api, route);
    expect(again.body).toMatchObject({ result: { outcome: 'applied' }, sync: { acked: 2 } });
    for (const node of all) expect(node.replica.table.get('early', name)?.resourceVersion).toBe('10');
  });
});

/** Three replicas with manual rounds (fence TTL `ttlMs`) and a route at 10 made nowhere yet, for an identity that will be re-created. */
async function reusedIdentityCluster(ttlMs: number): Promise<{ all: [Node, Node, Node]; first: Record<string, unknown>; name: string }> {
  const env = { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50' };
  const [a, b, c] = await cluster(3, env, MANUAL_ROUNDS);
  const first = makeRoute({ namespace: 'reused', resourceVersion: '10' });
  return { all: [a!, b!, c!], first, name: first.name as string };
}

describe('no resurrection of a re-created identity', () => {
  it('a route re-created and deleted again stays deleted when a replica that missed the re-creation carries the first fence\'s time', async () => {
    // B must stay trusted (cut off for less than half a TTL) from the re-creation at 0.9 of the
    // TTL until the first fence has expired: 2.3 s of slack for a slow machine.
    const ttlMs = 6000;
    const { all, first, name } = await reusedIdentityCluster(ttlMs);
    const [a, b, c] = all;
    expect((await putRoute(a!.api, first)).body.sync.acked).toBe(2);
    const deleteAt = async (node: Node, version: number) =>
      ((await (await fetch(`${node.api}/v1/routes/reused/${name}?resourceVersion=${version}`, { method: 'DELETE' })).json()) as any).result.outcome;
    expect(await deleteAt(a!, 11)).toBe('applied');
    const firstFenceAt = Date.now();
    // Most of a TTL later the name is claimed again, through A; C misses that push.
    await roundsInContactUntil(all, () => Date.now() - firstFenceAt > 0.9 * ttlMs, ttlMs, '0.9 of the TTL');
    a!.replica.faults.blockPushes(c!.replica.addresses.peer);
    expect((await putRoute(a!.api, { ...first, resourceVersion: '12' })).body.result.outcome).toBe('applied');
    expect(b!.replica.table.get('reused', name)?.resourceVersion).toBe('12');
    expect(c!.replica.table.getFence('reused', name)?.resourceVersion, 'c missed the re-creation').toBe('11');
    // B is cut off holding it; the sandbox is deleted again through C, whose fence advances
    // from 11 to 13 keeping its first creation's time, which its push carries to A.
    b!.replica.faults.isolate();
    c!.replica.faults.blockPushes(b!.replica.addresses.peer);
    expect(await deleteAt(c!, 13)).toBe('applied');
    expect(a!.replica.table.get('reused', name), 'the delete reached a').toBeUndefined();
    // The first fence's TTL passes; B, cut off for less than half a TTL, is not suspect yet.
    await roundsInContactUntil([a!, c!], () => Date.now() - firstFenceAt > ttlMs + 100, 2 * ttlMs, 'the first fence to expire');
    expect(b!.replica.reconciler.isSuspect(), 'b is still trusted (else the test is too slow to show anything)').toBe(false);
    expect(a!.replica.table.getFence('reused', name), "a's fence dates from its own removal of the route").toBeDefined();

    b!.replica.faults.heal();
    for (let k = 0; k < 4; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const node of all) expect(node.replica.table.get('reused', name), 'the deleted route stays deleted').toBeUndefined();
  });
});

describe('no resurrection after a split into groups that outlasts the fence TTL', () => {
  it('a route deleted on one side of a 2|2 split stays deleted at the heal, and the held fences end once every peer has caught up', async () => {
    // Each side keeps in touch within itself, so nobody turns suspect. The fences of the delete
    // made on the C/D side are held past their TTL there, for A and B have not caught up on
    // them; without that they expired, and at the heal C and D took the route back from A and B.
    const ttlMs = 1000;
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50' };
    const [a, b, c, d] = await cluster(4, env, MANUAL_ROUNDS);
    const all = [a!, b!, c!, d!];
    const doomed = makeRoute({ namespace: 'split', resourceVersion: '10' });
    const name = doomed.name as string;
    expect((await putRoute(a!.api, doomed)).body.sync.acked).toBe(3);
    // Everyone catches up on everyone before the split (two rounds per pair: a report rides on the next).
    for (let k = 0; k < 2 * all.length; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const x of [a!, b!]) {
      for (const y of [c!, d!]) {
        x.replica.faults.blockPeer(y.replica.addresses.peer);
        y.replica.faults.blockPeer(x.replica.addresses.peer);
      }
    }
    // An openkruise manager on the C/D side deletes the sandbox: its /refresh reaches C and D only.
    for (const node of [c!, d!]) {
      const answer = await fetch(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify({ ...doomed, resourceVersion: '11', state: 'dead' }) });
      expect(answer.status).toBe(204);
    }
    const deletedAt = Date.now();
    await roundsInContactUntil(all, () => Date.now() - deletedAt > ttlMs + 300, ttlMs + 10_000, 'the split to outlast the fence TTL');
    expect(all.map((node) => node.replica.reconciler.isSuspect()), 'nobody is suspect: each side kept in touch').toEqual([false, false, false, false]);
    expect(a!.replica.table.get('split', name), 'the A/B side still holds the route').toBeDefined();
    for (const node of [c!, d!]) {
      expect(node.replica.table.getFence('split', name), 'the fence is held past its TTL').toBeDefined();
      node.replica.table.sweepExpiredFences();
      expect(node.replica.table.heldFenceCount).toBe(1);
    }

    for (const node of all) node.replica.faults.heal();
    for (let k = 0; k < 6; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const node of all) expect(node.replica.table.get('split', name), 'the deleted route stays deleted').toBeUndefined();
    // Every peer has caught up now: the fences end (the held ones, and those A and B made when
    // they removed the route, at their own TTL), and every table is the same again.
    await roundsInContactUntil(all, () => all.every((node) => node.replica.table.sweepExpiredFences() >= 0 && node.replica.table.fenceCount === 0), 10_000, 'the fences to end');
    for (const node of all) expect(same(node.replica, a!.replica)).toBe(true);
  });
});

/**
 * Four replicas with manual rounds, every one caught up on every other, holding a route at 10;
 * then a 2|2 split ({A, B} | {C, D}) and the route deleted at 11 on the C/D side by an openkruise
 * manager's /refresh (nothing re-sends it). `during` runs right after the split. Returns once the
 * split has outlasted the fence TTL, still split.
 */
async function deletedOnOneSideOfASplit(ttlMs: number, during: (nodes: Node[]) => void = () => {}): Promise<{ all: Node[]; name: string; env: Record<string, string> }> {
  const env = { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50' };
  const all = await cluster(4, env, MANUAL_ROUNDS);
  const [a, b, c, d] = all as [Node, Node, Node, Node];
  const doomed = makeRoute({ namespace: 'split', resourceVersion: '10' });
  expect((await putRoute(a.api, doomed)).body.sync.acked).toBe(3);
  for (let k = 0; k < 2 * all.length; k++) for (const node of all) await node.replica.reconciler.runRound();
  for (const x of [a, b]) {
    for (const y of [c, d]) {
      x.replica.faults.blockPeer(y.replica.addresses.peer);
      y.replica.faults.blockPeer(x.replica.addresses.peer);
    }
  }
  during(all);
  for (const node of [c, d]) {
    const answer = await fetch(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify({ ...doomed, resourceVersion: '11', state: 'dead' }) });
    expect(answer.status).toBe(204);
  }
  const deletedAt = Date.now();
  await roundsInContactUntil(all, () => Date.now() - deletedAt > ttlMs + 300, ttlMs + 10_000, 'the split to outlast the fence TTL');
  return { all, name: doomed.name as string, env };
}

async function healAndExpectDeleted(all: readonly Node[], name: string): Promise<void> {
  for (const node of all) node.replica.faults.heal();
  for (let k = 0; k < 6; k++) for (const node of all) await node.replica.reconciler.runRound();
  for (const node of all) expect(node.replica.table.get('split', name), 'the deleted route stays deleted').toBeUndefined();
}

describe('suspicion and the wall clock', () => {
  it('a replica cut off while its wall clock steps back an hour still turns suspect, and rebuilds at the heal', async () => {
    // Contact age is measured on a monotonic clock: on the wall clock the step made the cut
    // look negative, the replica never turned suspect, and at the heal it offered its table
    // (with routes deleted elsewhere whose fences had expired) instead of rebuilding.
    // The wall clock the replicas read, installed before they start (they keep a reference to Date.now).
    const real = Date.now.bind(Date);
    let offsetMs = 0;
    const clock = vi.spyOn(Date, 'now').mockImplementation(() => real() + offsetMs);
    try {
      const [a, b, c] = await cluster(3, { ROUTESYNC_TOMBSTONE_TTL_MS: '1000', ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ...NO_HOLD }, MANUAL_ROUNDS);
      expect((await putRoute(a!.api, makeRoute({ namespace: 'clock' }))).body.sync.acked).toBe(2);
      expect((await c!.replica.reconciler.runRound()).result).not.toBe('failed');
      c!.replica.faults.isolate();
      offsetMs = -3_600_000;
      // A and B keep their rounds with each other; C runs none.
      await roundsInContactUntil([a!, b!], () => c!.replica.reconciler.isSuspect(), 5000, 'c to turn suspect half a TTL into the cut');
      c!.replica.faults.heal();
      expect(await c!.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
      expect(c!.replica.reconciler.isSuspect()).toBe(false);
    } finally {
      clock.mockRestore();
    }
  });
});

describe('held fences: the ways a hold could end too early', () => {
  it('a wall clock stepped back during the split does not release the held fence', async () => {
    // Arrival times and the peers' reports are on a monotonic clock: on the wall clock, fences
    // arriving after a step back were dated before the peers' last reports, and released.
    const real = Date.now.bind(Date);
    let offsetMs = 0;
    vi.spyOn(Date, 'now').mockImplementation(() => real() + offsetMs);
    try {
      const { all, name } = await deletedOnOneSideOfASplit(1000, () => {
        offsetMs -= 60_000;
      });
      all[2]!.replica.table.sweepExpiredFences();
      expect(all[2]!.replica.table.getFence('split', name), 'held on C').toBeDefined();
      await healAndExpectDeleted(all, name);
    } finally {
      vi.restoreAllMocks();
    }
  });

  it('a split side that discovery drops and lists again is still owed the fence', async () => {
    const addressOf = (node: Node): string => node.replica.addresses.peer;
    const { all, name } = await deletedOnOneSideOfASplit(1000, ([, , c, d]) => {
      // A and B vanish from C's and D's peer set (their pods gone from the DNS answer) ...
      c!.replica.sync.setPeers([addressOf(d!)]);
      d!.replica.sync.setPeers([addressOf(c!)]);
    });
    const [a, b, c, d] = all as [Node, Node, Node, Node];
    expect(c.replica.table.getFence('split', name), 'held on C for the departed peers').toBeDefined();
    // ... and come back.
    c.replica.sync.setPeers([addressOf(a), addressOf(b), addressOf(d)]);
    d.replica.sync.setPeers([addressOf(a), addressOf(b), addressOf(c)]);
    await healAndExpectDeleted(all, name);
  });

  it('a rolling restart of the side that holds the fence keeps it: each restarted replica adopts it from the other', async () => {
    const { all, name, env } = await deletedOnOneSideOfASplit(1000);
    const [a, b] = all as [Node, Node];
    const addressOf = (node: Node): string => node.replica.addresses.peer;
    // D, then C, restart at their addresses, each bootstrapping from the other (still cut off from A and B).
    for (const [i, j] of [
      [3, 2],
      [2, 3],
    ] as const) {
      const old = all[i]!;
      const address = addressOf(old);
      await old.replica.close();
      nodes.splice(nodes.indexOf(old), 1);
      const fresh = await start({ ...env, ROUTESYNC_PEER_ADDR: address, ROUTESYNC_PEERS: addressOf(all[j]!) }, MANUAL_ROUNDS);
      expect(await fresh.replica.bootstrapped).toBe('pulled');
      expect(fresh.replica.table.getFence('split', name), 'adopted from its source, held').toBeDefined();
      fresh.replica.sync.setPeers([addressOf(a), addressOf(b), addressOf(all[j]!)]);
      for (const x of [a, b]) {
        fresh.replica.faults.blockPeer(addressOf(x));
        x.replica.faults.blockPeer(address);
      }
      all[i] = fresh;
      for (let k = 0; k < 2; k++) for (const node of all) await node.replica.reconciler.runRound();
    }
    await healAndExpectDeleted(all, name);
  });
});

describe('no resurrection of an identity deleted twice', () => {
  it('a route re-created, then deleted at 13 where it was live and at 14 where it was not, stays deleted', async () => {
    // C missed the re-creation, so its fence (11, then 14) keeps the first deletion's time; A
    // removed the live route at 13 and fenced it then. A must not take C's older time when it
    // advances to 14: every replica would expire the fence up to a TTL early, while B, cut off
    // holding 12, is not suspect yet. An openkruise manager's /refresh (source "peer") carries
    // each change to the replicas named, and nothing re-sends it.
    const ttlMs = 6000;
    const { all, first, name } = await reusedIdentityCluster(ttlMs);
    const [a, b, c] = all;
    const refresh = async (targets: readonly Node[], body: Record<string, unknown>) => {
      for (const node of targets) expect((await fetch(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify(body) })).status).toBe(204);
    };
    await refresh(all, first);
    await refresh(all, { ...first, resourceVersion: '11', state: 'dead' });
    const firstFenceAt = Date.now();
    await roundsInContactUntil(all, () => Date.now() - firstFenceAt > 0.9 * ttlMs, ttlMs, '0.9 of the TTL');
    await refresh([a!, b!], { ...first, resourceVersion: '12' });
    b!.replica.faults.isolate();
    await refresh([a!], { ...first, resourceVersion: '13', state: 'dead' });
    await refresh([c!], { ...first, resourceVersion: '14', state: 'dead' });
    await roundsInContactUntil([a!, c!], () => a!.replica.table.getFence('reused', name)?.resourceVersion === '14', 5000, "a to pull c's fence at 14");
    expect(a!.replica.table.getFence('reused', name)!.fencedAtMs, "a's fence keeps its own start").toBeGreaterThanOrEqual(firstFenceAt + 0.9 * ttlMs);
    await roundsInContactUntil([a!, c!], () => Date.now() - firstFenceAt > ttlMs + 100, 2 * ttlMs, 'the first fence to expire');
    expect(b!.replica.reconciler.isSuspect(), 'b is still trusted (else the test is too slow to show anything)').toBe(false);
    b!.replica.faults.heal();
    for (let k = 0; k < 4; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const node of all) expect(node.replica.table.get('reused', name), 'the deleted route stays deleted').toBeUndefined();
  });
});

describe('a peer that restarts during an exchange', () => {
  it('a rebuild from a peer that restarts midway (same address, a new instance, empty) drops nothing: the pull ends at the first answer of the new instance', async () => {
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: '2000', ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '300' };
    const bAddress = `127.0.0.1:${await unusedPort()}`;
    const a = await start(env, { ...MANUAL_ROUNDS, instanceId: 'zzz-a' });
    const bEnv = { ...env, ROUTESYNC_PEER_ADDR: bAddress, ROUTESYNC_SELF: bAddress, ROUTESYNC_PEERS: a.replica.addresses.peer };
    const b = await start(bEnv, { ...MANUAL_ROUNDS, instanceId: 'aaa-b' });
    a.replica.sync.setPeers([bAddress]);
    await Promise.all([a.replica.bootstrapped, b.replica.bootstrapped]);
    const routes = Array.from({ length: 400 }, (_, i) => makeRoute({ namespace: 'restart', resourceVersion: String(100 + i) }));
    expect((await postBatch(b.api, routes)).body.sync.acked).toBe(1);
    expect(a.replica.table.size).toBe(400);
    // Both out of contact past half the TTL: both suspect; B (the smaller instance ID) keeps its table.
    await waitUntil(() => a.replica.reconciler.isSuspect() && b.replica.reconciler.isSuspect(), 5000, 'both to turn suspect');
    expect((await b.replica.reconciler.runRound()).result).toBe('kept');

    // A rebuilds from B, whose process restarts empty on the same address before A's 5th pull.
    let pulls = 0;
    let successor: Node | undefined;
    const client = a.replica.client;
    const request = client.request.bind(client);
    client.request = async (...args: Parameters<typeof client.request>) => {
      if (args[2] === '/v1/peer/pull' && ++pulls === 5) {
        await b.replica.close();
        successor = await start(bEnv, { ...MANUAL_ROUNDS, instanceId: 'aaa-b2' });
      }
      return request(...args);
    };
    const report = await a.replica.reconciler.runRound();
    client.request = request;
    expect(pulls, 'the rebuild reached its 5th pull').toBeGreaterThanOrEqual(5);
    expect(report.result, 'the rebuild did not complete against another table').toBe('failed');
    expect(a.replica.table.size, 'no route that nobody deleted was dropped').toBe(400);
    expect(a.logs.lines.some((line) => line.includes('rebuilt from a peer'))).toBe(false);

    // The restarted B bootstraps; rounds bring both to the whole table.
    await successor!.replica.bootstrapped;
    for (let k = 0; k < 4; k++) {
      await a.replica.reconciler.runRound();
      await successor!.replica.reconciler.runRound();
    }
    expect(a.replica.table.size).toBe(400);
    expect(successor!.replica.table.size).toBe(400);
  });
});

describe('suspect tables and trust', () => {
  it('a rebuild keeps a route whose newer version the source holds in a form this version refuses, rather than counting it missing', async () => {
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: '1000', ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '50' };
    const [a, b, c] = await cluster(3, env, MANUAL_ROUNDS);
    const route = makeRoute({ namespace: 'mixed', resourceVersion: '10' });
    const name = route.name as string;
    expect((await putRoute(a!.api, route)).body.sync.acked).toBe(2);
    c!.replica.faults.isolate();
    // Meanwhile A and B come to hold a newer version stored under rules this version does not
    // accept (a peer of another version wrote it past validation).
    const unreadable = { ...route, resourceVersion: '12', ip: '999.0.0.1' } as unknown as Route;
    for (const node of [a!, b!]) node.replica.table.upsert(unreadable);
    await roundsInContactUntil([a!, b!], () => c!.replica.reconciler.isSuspect(), 5000, 'c to turn suspect');
    c!.replica.faults.heal();
    expect(await c!.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
    expect(await counter(c!.replica.metrics.reconcileRefused)).toBe(1);
    expect(c!.replica.table.get('mixed', name)?.resourceVersion, 'the readable version is kept').toBe('10');
    // Nor does C say it caught up on a table it could not read whole: a refused entry may be a
    // fence its holder must keep.
    const requestsBefore = c!.requests.length;
    for (let k = 0; k < 4; k++) await c!.replica.reconciler.runRound();
    const digestRequests = c!.requests.slice(requestsBefore).filter((request) => request.path.startsWith('/v1/peer/digest'));
    expect(digestRequests.length).toBeGreaterThan(0);
    for (const request of digestRequests) expect(request.path).not.toContain('caughtUpTo');
  });

  it('a lone survivor whose only peer restarts empty keeps its table and the peer gets it, rather than both losing it', async () => {
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: '2000', ROUTESYNC_RECONCILE_INTERVAL_MS: '200', ROUTESYNC_EJECT_PROBE_MS: '100' };
    const [a, b] = await cluster(2, env);
    const routes = Array.from({ length: 100 }, () => makeRoute({ namespace: 'survivor' }));
    expect((await postBatch(a!.api, routes)).body.sync.acked).toBe(1);

    const bPeerAddress = b!.replica.addresses.peer;
    await b!.replica.close();
    nodes.splice(nodes.indexOf(b!), 1);
    // Alone for longer than half the TTL: A cannot tell a dead peer from a partition, so it is suspect.
    await waitUntil(() => a!.replica.reconciler.isSuspect(), 5000, 'a to turn suspect');

    // B restarts empty. A is suspect and B is bootstrapping (or, once its bootstrap timed out,
    // not seeded): neither can be rebuilt from. A meets only such a peer, so A's table is the
    // reference; B then pulls all of it (in its bootstrap, or in its first rounds).
    const restarted = await start({ ...env, ROUTESYNC_PEER_ADDR: bPeerAddress, ROUTESYNC_PEERS: a!.replica.addresses.peer, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '500' });
    await restarted.replica.bootstrapped;
    await waitUntil(async () => (await counter(a!.replica.metrics.reconcileRounds, { result: 'kept' })) >= 1, 5000, 'a to keep its table');
    await waitUntil(() => same(a!.replica, restarted.replica), 5000, 'b to get the table from a');
    expect(a!.replica.table.size).toBe(100);
    expect(await counter(a!.replica.metrics.reconcileRounds, { result: 'rebuilt' })).toBe(0);
    expect(restarted.replica.reconciler.isSeeded()).toBe(true);
  });

  it('a survivor whose only peer restarted empty while cut off, both suspect, keeps its table whichever has the smaller instance ID', async () => {
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: '1000', ROUTESYNC_RECONCILE_INTERVAL_MS: '100', ROUTESYNC_EJECT_PROBE_MS: '100' };
    const [a, b] = await cluster(2, env, MANUAL_ROUNDS);
    const routes = Array.from({ length: 50 }, () => makeRoute({ namespace: 'survivor' }));
    expect((await postBatch(a!.api, routes)).body.sync.acked).toBe(1);
    // A round each after the routes: they are known to the fleet, no longer changes of A's manager since its last contact.
    for (const node of [a!, b!]) expect(await node.replica.reconciler.runRound()).toMatchObject({ result: 'in_sync' });

    // A is cut off; B restarts empty meanwhile, so its bootstrap times out and it is not seeded.
    // The bad case is the restarted replica holding the smaller instance ID: it is given the smallest there is.
    a!.replica.faults.isolate();
    const bPeerAddress = b!.replica.addresses.peer;
    await b!.replica.close();
    nodes.splice(nodes.indexOf(b!), 1);
    const restarted = await start(
      { ...env, ROUTESYNC_PEER_ADDR: bPeerAddress, ROUTESYNC_PEERS: a!.replica.addresses.peer, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '200' },
      { ...MANUAL_ROUNDS, instanceId: '00000000-0000-4000-8000-000000000000' },
    );
    expect(await restarted.replica.bootstrapped).toBe('timeout');
    expect(restarted.replica.instanceId < a!.replica.instanceId).toBe(true);
    const fresh = restarted.replica;
    expect(fresh.reconciler.isSeeded()).toBe(false);
    expect(fresh.table.size).toBe(0);
    // The cut lasts past half the TTL on both sides: both are suspect when it heals.
    await waitUntil(() => a!.replica.reconciler.isSuspect() && fresh.reconciler.isSuspect(), 5000, 'both to turn suspect');
    a!.replica.faults.heal();

    // The seeded table is the reference; the empty, unseeded one must not wipe it. Rounds until
    // neither is suspect (a round may first find its peer still ejected from the cut).
    await waitUntil(
      async () => {
        for (const replica of [fresh, a!.replica]) expect((await replica.reconciler.runRound()).result).not.toBe('failed');
        expect(a!.replica.table.size, 'the seeded survivor keeps its routes').toBe(50);
        return !a!.replica.reconciler.isSuspect() && !fresh.reconciler.isSuspect();
      },
      10_000,
      'both replicas to leave the suspect state',
    );
    expect(a!.replica.table.size, 'the seeded survivor keeps its routes').toBe(50);
    expect(same(a!.replica, fresh)).toBe(true);
    expect(await counter(a!.replica.metrics.reconcileRounds, { result: 'kept' })).toBeGreaterThanOrEqual(1);
    expect([a!.replica.reconciler.isSuspect(), fresh.reconciler.isSuspect()]).toEqual([false, false]);
  });

  it('a suspect replica is not held back by a suspect peer that has since left its peer set', async () => {
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: '1000', ROUTESYNC_RECONCILE_INTERVAL_MS: '100' };
    const three = await cluster(3, env, MANUAL_ROUNDS);
    const routes = Array.from({ length: 10 }, () => makeRoute({ namespace: 'left' }));
    expect((await postBatch(three[0]!.api, routes)).body.sync.acked).toBe(2);
    // By instance ID: `gone` ranks first, then `a`, then `c`.
    const [gone, a, c] = [...three].sort((x, y) => (x.replica.instanceId < y.replica.instanceId ? -1 : 1)) as [Node, Node, Node];
    // No rounds for longer than half the TTL: every replica is suspect.
    await waitUntil(() => three.every((node) => node.replica.reconciler.isSuspect()), 5000, 'every replica to turn suspect');

    // A meets `gone` (suspect, ranked first): A waits for it to keep its table.
    a.replica.sync.setPeers([gone.replica.addresses.peer]);
    expect(await a.replica.reconciler.runRound()).toMatchObject({ result: 'skipped' });
    // Then `gone` leaves the fleet (scaled down, dropped by discovery) before it kept anything.
    await gone.replica.close();
    nodes.splice(nodes.indexOf(gone), 1);
    a.replica.sync.setPeers([c.replica.addresses.peer]);
    c.replica.sync.setPeers([a.replica.addresses.peer]);

    // A now ranks first among the suspect replicas that remain: it keeps its table, C rebuilds from it.
    for (let k = 0; k < 3; k++) for (const node of [a, c]) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    expect([a.replica.reconciler.isSuspect(), c.replica.reconciler.isSuspect()], 'neither stays suspect').toEqual([false, false]);
    expect(same(a.replica, c.replica)).toBe(true);
    expect(c.replica.table.size).toBe(10);
  });
});

describe('a fleet that starts together', () => {
  it('seeds itself when every peer answered unseeded, so a replica restarted later bootstraps the whole table', async () => {
    const { started, env } = await coldCluster(3, { ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '1000' }, [], MANUAL_ROUNDS);
    // No peer can be bootstrapped from (each is bootstrapping), so each waits out the timeout.
    expect(await Promise.all(started.map((node) => node.replica.bootstrapped))).not.toContain('no_peers');
    expect(started.map((node) => node.replica.reconciler.isSeeded())).toEqual([true, true, true]);
    expect(started.map((node) => node.replica.reconciler.digest(false).seeded)).toEqual([true, true, true]);

    const routes = Array.from({ length: 20 }, () => makeRoute({ namespace: 'cold' }));
    expect((await postBatch(started[0]!.api, routes)).body.sync.acked).toBe(2);

    // An ordinary restart later (a rolling update): it bootstraps from a seeded peer.
    const victim = started[2]!;
    await victim.replica.close();
    nodes.splice(nodes.indexOf(victim), 1);
    const restarted = await start(env(2), MANUAL_ROUNDS);
    expect(await restarted.replica.bootstrapped).toBe('pulled');
    expect(restarted.replica.table.size).toBe(20);
    expect(restarted.replica.reconciler.isSeeded()).toBe(true);
  });

  it('seeds itself too when the peer list names each replica itself under another name (its own address is dropped at bootstrap)', async () => {
    // StatefulSet-style: every replica is given the whole list, and ROUTESYNC_SELF is a name
    // the list does not use, so a replica finds its own entry only when it answers as itself.
    const addresses = (await Promise.all([unusedPort(), unusedPort()])).map((port) => `127.0.0.1:${port}`);
    const started = await Promise.all(
      addresses.map((address, i) =>
        start(
          { ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '1000', ROUTESYNC_PEER_ADDR: address, ROUTESYNC_SELF: `rs-${i}.rs:7789`, ROUTESYNC_PEERS: addresses.join(',') },
          MANUAL_ROUNDS,
        ),
      ),
    );
    expect(await Promise.all(started.map((node) => node.replica.bootstrapped))).toEqual(['timeout', 'timeout']);
    expect(started.map((node) => node.replica.sync.peerAddresses())).toEqual([[addresses[1]], [addresses[0]]]);
    expect(started.map((node) => node.replica.reconciler.isSeeded())).toEqual([true, true]);
    // Dropping its own address is not a failed bootstrap or round.
    for (const node of started) expect((await node.replica.reconciler.runRound()).result).toBe('in_sync');
    expect(await counter(started[0]!.replica.metrics.reconcileRounds, { result: 'failed' })).toBe(0);
  });

  it('a replica whose peer list names only itself under another name is ready at once, seeded', async () => {
    const address = `127.0.0.1:${await unusedPort()}`;
    const node = await start(
      { ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '30000', ROUTESYNC_PEER_ADDR: address, ROUTESYNC_SELF: 'rs-0.rs:7789', ROUTESYNC_PEERS: address },
      MANUAL_ROUNDS,
    );
    expect(await node.replica.bootstrapped).toBe('no_peers');
    expect(node.replica.sync.peerAddresses()).toEqual([]);
    expect(node.replica.reconciler.isSeeded()).toBe(true);
    expect(node.logs.lines.some((line) => line.includes('bootstrap: no peer answered'))).toBe(false);
    // Its log lines name it by the address its peers know, not by its listen address.
    expect(node.logs.lines.map((line) => (JSON.parse(line) as { replica: string }).replica)).toSatisfy((names: string[]) => names.every((name) => name === 'rs-0.rs:7789'));
  });

  it('then cut off for longer than the fence TTL, a replica rebuilds from a seeded peer and a route deleted meanwhile stays deleted', async () => {
    const { started, addresses } = await coldCluster(
      3,
      {
        ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '500',
        ROUTESYNC_TOMBSTONE_TTL_MS: '1500', // suspect after 750 ms out of contact
        ROUTESYNC_RECONCILE_INTERVAL_MS: '100', // below TTL / 5, as config requires; no timer runs it
        ...NO_HOLD, // the fences end at their TTL: the rebuild alone keeps the deletion
      },
      [],
      MANUAL_ROUNDS,
    );
    await Promise.all(started.map((node) => node.replica.bootstrapped));
    const [a, b, c] = started.map((node) => node.replica) as [Replica, Replica, Replica];
    const route = makeRoute({ namespace: 'cold', resourceVersion: '7' });
    const name = route.name as string;
    await b.service.applyLocal(parseChange(route));
    await waitUntil(() => [a, b, c].every((replica) => replica.table.get('cold', name) !== undefined), 10_000, 'the route on every replica');

    // A is cut off (and B and C stop listing it meanwhile); the sandbox is deleted on B.
    a.faults.isolate();
    b.sync.setPeers([addresses[2]!]);
    c.sync.setPeers([addresses[1]!]);
    await b.service.deleteLocal('cold', name, '7');
    await waitUntil(() => c.table.get('cold', name) === undefined, 10_000, 'the delete on c');
    // The cut outlasts the fence; B and C stay in contact with each other.
    await waitUntil(
      async () => {
        await b.reconciler.runRound();
        await c.reconciler.runRound();
        return b.table.getFence('cold', name) === undefined && c.table.getFence('cold', name) === undefined && a.reconciler.isSuspect();
      },
      10_000,
      'the fences to expire and a to turn suspect',
    );
    expect(a.table.get('cold', name)).toBeDefined();

    a.faults.heal();
    b.sync.setPeers([addresses[0]!, addresses[2]!]);
    c.sync.setPeers([addresses[0]!, addresses[1]!]);
    expect(await a.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
    for (let k = 0; k < 2; k++) for (const replica of [a, b, c]) await replica.reconciler.runRound();
    for (const replica of [a, b, c]) expect(replica.table.get('cold', name), 'the deleted route stays deleted').toBeUndefined();
  });

  it('does not seed itself while any peer has not answered: that one may be seeded and cut off', async () => {
    // Both list a third peer that never answers.
    const dead = `127.0.0.1:${await unusedPort()}`;
    const { started } = await coldCluster(2, { ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '500' }, [dead], MANUAL_ROUNDS);
    expect(await Promise.all(started.map((node) => node.replica.bootstrapped))).toEqual(['timeout', 'timeout']);
    expect(started.map((node) => node.replica.reconciler.isSeeded())).toEqual([false, false]);
  });

  it('a replica joining a fleet that is not seeded merges every peer\'s table before it seeds itself', async () => {
    const joinerAddress = `127.0.0.1:${await unusedPort()}`;
    // B turned ready unseeded (its only peer did not answer) and took routes since.
    const b = await start({ ROUTESYNC_PEERS: `127.0.0.1:${await unusedPort()}`, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '300' }, MANUAL_ROUNDS);
    expect(await b.replica.bootstrapped).toBe('timeout');
    expect(b.replica.reconciler.isSeeded()).toBe(false);
    const routes = Array.from({ length: 10 }, () => makeRoute({ namespace: 'cold' }));
    expect((await postBatch(b.api, routes)).status).toBe(200);
    // The joiner appears now, with an empty outbox: it can get the routes only by pulling them.
    b.replica.sync.setPeers([joinerAddress]);

    const joiner = await start({ ROUTESYNC_PEER_ADDR: joinerAddress, ROUTESYNC_PEERS: b.replica.addresses.peer, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '500' }, MANUAL_ROUNDS);
    expect(await joiner.replica.bootstrapped).toBe('timeout');
    // Ready with B's table already, and seeded: it holds all there is.
    expect(joiner.replica.table.size).toBe(10);
    expect(same(joiner.replica, b.replica)).toBe(true);
    expect(joiner.replica.reconciler.isSeeded()).toBe(true);
    // B is seeded by its next round with the joiner.
    expect(await b.replica.reconciler.runRound()).toMatchObject({ result: 'in_sync' });
    expect(b.replica.reconciler.isSeeded()).toBe(true);
  });
});

describe('suspect rebuild', () => {
  it('never deletes a live route: one pushed to it while it rebuilds stays, one its source lacks is dropped here without a fence', async () => {
    const [a, b, c] = await cluster(3, { ROUTESYNC_TOMBSTONE_TTL_MS: '1000', ROUTESYNC_RECONCILE_INTERVAL_MS: '100' }, MANUAL_ROUNDS);
    c!.replica.faults.isolate();
    // A and B stay in contact (rounds only when the test runs them) while C turns suspect.
    await roundsInContactUntil([a!, b!], () => c!.replica.reconciler.isSuspect(), 5000, 'c to turn suspect');
    const all = [a!, b!, c!];
    const name = (route: Record<string, unknown>) => route.name as string;
    // A live route whose push reached B and C but not A yet (still in the pusher's outbox for A).
    const unsent = makeRoute({ namespace: 'rebuild', resourceVersion: '30' });
    for (const node of [b!, c!]) node.replica.service.applyRemote([parseChange(unsent)], 'peer');
    // A sandbox created elsewhere while C's rebuild runs, in the first chunk of buckets, which
    // the rebuild has pulled already: its push lands on every replica before the last chunk.
    let fresh: Record<string, unknown>;
    do fresh = makeRoute({ namespace: 'rebuild', resourceVersion: '20' });
    while (c!.replica.table.bucketOf(`rebuild/${name(fresh)}`) >= PULL_BUCKETS_PER_REQUEST);
    let pulls = 0;
    c!.onPeerRequest = (_peer, path) => {
      if (path !== '/v1/peer/pull' || ++pulls !== 1024 / PULL_BUCKETS_PER_REQUEST) return;
      for (const node of all) node.replica.service.applyRemote([parseChange(fresh)], 'peer');
    };

    c!.replica.faults.heal();
    c!.replica.sync.setPeers([a!.replica.addresses.peer]); // rebuild from A, which lacks `unsent`
    expect(await c!.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt', peer: a!.replica.addresses.peer });
    expect(pulls).toBe(1024 / PULL_BUCKETS_PER_REQUEST);
    expect(c!.replica.table.get('rebuild', name(fresh))?.resourceVersion, 'pushed during the rebuild: kept').toBe('20');
    expect(c!.replica.table.getFence('rebuild', name(fresh))).toBeUndefined();
    expect(c!.replica.table.getFence('rebuild', name(unsent)), 'dropped here, but no fence to travel').toBeUndefined();

    // Every replica pulls from every other: nothing the rebuild did deletes a live route anywhere,
    // and C gets `unsent` back from B.
    c!.replica.sync.setPeers([a!.replica.addresses.peer, b!.replica.addresses.peer]);
    for (let k = 0; k < 2; k++) for (const node of all) expect((await node.replica.reconciler.runRound()).result).not.toBe('failed');
    for (const node of all) {
      expect(node.replica.table.get('rebuild', name(fresh))?.resourceVersion, 'fresh everywhere').toBe('20');
      expect(node.replica.table.get('rebuild', name(unsent))?.resourceVersion, 'unsent everywhere').toBe('30');
    }
  });

  it('completes from a source too slow for the whole table to arrive within one round\'s budget', async () => {
    const ttlMs = 60_000;
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: String(ttlMs), ROUTESYNC_RECONCILE_INTERVAL_MS: '1000' };
    // The replicas' wall clock, which the test moves (they read it through Date.now).
    let clockOffsetMs = 0;
    const realNow = Date.now.bind(Date);
    const clock = vi.spyOn(Date, 'now').mockImplementation(() => realNow() + clockOffsetMs);
    // Contact age is on the replica's monotonic clock: moved on with the wall clock.
    const moved: ReplicaOptions = { ...MANUAL_ROUNDS, monotonicNow: () => monotonicClock() + clockOffsetMs };
    try {
      // A alone (never suspect, seeded); C reaches it through a link that can be made slow.
      const a = await start(env, moved);
      await a.replica.bootstrapped;
      const link = await delayingLink(a.replica.addresses.peer);
      const c = await start({ ...env, ROUTESYNC_PEERS: link.address }, moved);
      await c.replica.bootstrapped;
      const routes = Array.from({ length: 50 }, (_, i) => parseChange(makeRoute({ namespace: 'slow-rebuild', resourceVersion: String(100 + i) })));
      a.replica.service.applyRemote(routes, 'peer');
      c.replica.service.applyRemote(routes, 'peer');
      const stale = makeRoute({ namespace: 'slow-rebuild', resourceVersion: '7' });
      c.replica.service.applyRemote([parseChange(stale)], 'peer');
      // C out of contact for more than half the TTL: the clock moves on, nothing waits.
      clockOffsetMs = ttlMs;
      expect(c.replica.reconciler.isSuspect()).toBe(true);
      // Every answer now takes 100 ms: the digest and the 16 pulls of a rebuild need ~1.7 s, the
      // round's budget is 1 s. Each request fits in it; the rebuild as a whole has longer.
      link.delayMs = 100;
      expect(await c.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt' });
      expect(c.replica.table.get('slow-rebuild', stale.name as string), 'the route its source lacks: dropped').toBeUndefined();
      expect(same(a.replica, c.replica)).toBe(true);
      expect(c.replica.reconciler.isSuspect()).toBe(false);
    } finally {
      clock.mockRestore();
    }
  });
});

/** A TCP link to `target` whose answers (target to client) each arrive `delayMs` late, in order. */
async function delayingLink(target: string): Promise<{ address: string; delayMs: number }> {
  const colon = target.lastIndexOf(':');
  const link = { address: '', delayMs: 0 };
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.slice(colon + 1)), target.slice(0, colon));
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('error', () => {});
      socket.on('close', () => sockets.delete(socket));
    }
    client.pipe(upstream);
    let last = Promise.resolve();
    upstream.on('data', (chunk: Buffer) => {
      const delayMs = link.delayMs;
      last = last.then(() => new Promise<void>((resolve) => setTimeout(resolve, delayMs))).then(() => void client.write(chunk));
    });
    upstream.on('end', () => void last.then(() => client.end()));
    client.on('close', () => upstream.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  linkCleanups.push(
    () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  );
  link.address = `127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  return link;
}

describe('a replica that was alone', () => {
  it('keeps what its manager made since its last round without peers through a rebuild, when peers appear and a cut begins before any round with them', async () => {
    // C runs alone; its manager creates X, which no peer has. Discovery then adds B before C's
    // next round, and C is cut off before any round with B completes: C turns suspect and,
    // once healed, rebuilds from B, which lacks X. X, changed by C's manager since C's last
    // contact, must survive. (A change made before a round without peers counts as known to
    // the fleet: the limit in docs/reconcile.md.)
    const env = { ROUTESYNC_TOMBSTONE_TTL_MS: '1000', ROUTESYNC_RECONCILE_INTERVAL_MS: '100' };
    const c = await start(env, MANUAL_ROUNDS);
    const b = await start(env, MANUAL_ROUNDS);
    await Promise.all([b.replica.bootstrapped, c.replica.bootstrapped]);
    const x = makeRoute({ namespace: 'alone', resourceVersion: '7' });
    expect((await putRoute(c.api, x)).status).toBe(200);
    expect(c.replica.reconciler.rememberedLocalChanges()).toBe(1);

    c.replica.sync.setPeers([b.replica.addresses.peer]);
    c.replica.faults.isolate();
    await waitUntil(
      async () => {
        await c.replica.reconciler.runRound();
        return c.replica.reconciler.isSuspect();
      },
      5000,
      'c to turn suspect',
    );
    c.replica.faults.heal();
    expect(await c.replica.reconciler.runRound()).toMatchObject({ result: 'rebuilt', peer: b.replica.addresses.peer });
    expect(c.replica.table.get('alone', x.name as string)?.resourceVersion).toBe('7');
    // And B gets it from C.
    b.replica.sync.setPeers([c.replica.addresses.peer]);
    expect((await b.replica.reconciler.runRound()).result).not.toBe('failed');
    expect(b.replica.table.get('alone', x.name as string)?.resourceVersion).toBe('7');
  });
});

describe('wire contract', () => {
  it('serves the digest, its cheap variant and pulls, and refuses bad pulls with 400', async () => {
    const [a] = await cluster(1);
    const route = makeRoute({ namespace: 'wire', accessToken: 'secret-token-1' });
    await putRoute(a!.api, route);
    await fetch(`${a!.api}/v1/routes/wire/${route.name as string}?resourceVersion=5`, { method: 'DELETE' });
    await putRoute(a!.api, makeRoute({ namespace: 'wire' }));

    const digest = (await (await fetch(`${a!.peerUrl}/v1/peer/digest`)).json()) as any;
    expect(digest).toMatchObject({ instance: a!.replica.instanceId, buckets: 1024, routes: 1, fences: 1, suspect: false });
    expect(digest.root).toBe(a!.replica.table.rootDigest());
    expect(digest.digests).toHaveLength(1024);
    const cheap = (await (await fetch(`${a!.peerUrl}/v1/peer/digest?root=1`)).json()) as any;
    expect(cheap.root).toBe(digest.root);
    expect(cheap.digests).toBeUndefined();

    const nonEmpty = (digest.digests as string[]).flatMap((value, index) => (value === '0000000000000000' ? [] : [index]));
    const pull = await fetch(`${a!.peerUrl}/v1/peer/pull`, { method: 'POST', body: JSON.stringify({ buckets: nonEmpty }) });
    expect(pull.status).toBe(200);
    const { changes } = (await pull.json()) as { changes: unknown[] };
    const parsed = changes.map((change) => parseChange(change));
    expect(parsed.map((change) => change.op).sort()).toEqual(['delete', 'upsert']);
    const dead = changes.find((change: any) => change.state === 'dead') as any;
    expect(dead).toMatchObject({ namespace: 'wire', name: route.name, resourceVersion: '5' });
    expect(typeof dead.fencedAtMs).toBe('number');

    for (const body of ['{"buckets": [1024]}', '{"buckets": [-1]}', '{"buckets": [1.5]}', '{"buckets": "all"}', '{}', 'not json']) {
      const answer = await fetch(`${a!.peerUrl}/v1/peer/pull`, { method: 'POST', body });
      expect(answer.status, body).toBe(400);
      expect(((await answer.json()) as any).error.code).toMatch(/^invalid_/);
    }
    expect((await fetch(`${a!.peerUrl}/v1/peer/digest`, { method: 'POST' })).status).toBe(405);

    // A peer's report that it caught up on an earlier digest: a time in ms, with its instance header.
    expect(typeof digest.asOfMs).toBe('number');
    const instance = { 'x-routesync-instance': 'another-replica' };
    for (const digestOf of [a!.replica.instanceId, 'a-restarted-replica']) {
      // (A report of another instance's digest is taken without complaint, and ignored.)
      const report = await fetch(`${a!.peerUrl}/v1/peer/digest?root=1&caughtUpTo=${digest.asOfMs as number}&digestOf=${digestOf}`, { headers: instance });
      expect(report.status).toBe(200);
      expect(((await report.json()) as any).asOfMs).toBeGreaterThanOrEqual(digest.asOfMs as number);
    }
    for (const [query, headers] of [
      ['caughtUpTo=-1&digestOf=x', instance],
      ['caughtUpTo=1.5&digestOf=x', instance],
      ['caughtUpTo=0123&digestOf=x', instance],
      ['caughtUpTo=99999999999999999&digestOf=x', instance],
      ['caughtUpTo=1&caughtUpTo=2&digestOf=x', instance],
      ['caughtUpTo=1&digestOf=x', {}],
      ['caughtUpTo=1&digestOf=x', { 'x-routesync-instance': 'x'.repeat(129) }],
      ['caughtUpTo=1', instance],
      ['caughtUpTo=1&digestOf=x&digestOf=y', instance],
      ['root=1&digestOf=x', instance],
      ['digestOf=x&digestOf=y', instance],
    ] as const) {
      const answer = await fetch(`${a!.peerUrl}/v1/peer/digest?${query}`, { headers });
      expect(answer.status, query).toBe(400);
      expect(((await answer.json()) as any).error.code).toBe('invalid_query');
    }
  });

  it('puts digest and pull behind the peer token, and never logs the routes it serves', async () => {
    const token = 'peer-token-for-reconcile-test';
    const [a, b] = await cluster(2, { ROUTESYNC_PEER_TOKEN: token, ROUTESYNC_RECONCILE_INTERVAL_MS: '3600000', ROUTESYNC_TOMBSTONE_TTL_MS: '604800000' });
    expect((await fetch(`${a!.peerUrl}/v1/peer/digest`)).status).toBe(401);
    expect((await fetch(`${a!.peerUrl}/v1/peer/pull`, { method: 'POST', body: '{"buckets":[0]}' })).status).toBe(401);
    const ok = await fetch(`${a!.peerUrl}/v1/peer/digest?root=1`, { headers: { authorization: `Bearer ${token}` } });
    expect(ok.status).toBe(200);

    const secret = makeRoute({ namespace: 'wire', accessToken: 'route-secret-abc' }) as unknown as Route;
    a!.replica.service.applyRemote([{ op: 'upsert', route: secret }], 'peer');
    expect(await b!.replica.reconciler.runRound()).toMatchObject({ result: 'repaired', repaired: 1 });
    expect(b!.replica.table.get('wire', secret.name)?.accessToken).toBe('route-secret-abc');
    for (const line of [...a!.logs.lines, ...b!.logs.lines]) {
      expect(line).not.toContain(token);
      expect(line).not.toContain('route-secret-abc');
    }
  });
});
