// What one lifecycle call reports per peer when it carries several changes (a manager's batch):
// a peer counts as acknowledged only once every change is, a peer that refuses is reported as
// failed without holding up the others, an ejected peer is not waited for, and a peer still
// owing a change at the deadline is pending. Real peers on loopback (test/helpers/fake-peer.ts).
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import type { PeerSync } from '../../src/peers/fanout.js';
import { parseChange, type RouteChange } from '../../src/routes/route.js';
import { makeRoute } from '../helpers/cluster.js';
import { FakePeer } from '../helpers/fake-peer.js';
import { startPeerSync } from '../helpers/peer-sync.js';
import { waitUntil } from '../helpers/wait.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function peers(count: number): Promise<FakePeer[]> {
  const started = await Promise.all(Array.from({ length: count }, () => FakePeer.start()));
  for (const peer of started) cleanups.push(() => peer.close());
  return started;
}

function fanout(env: Record<string, string> = {}): PeerSync {
  return startPeerSync({ ROUTESYNC_SYNC_DEADLINE_MS: '2000', ROUTESYNC_SHUTDOWN_GRACE_MS: '60000', ROUTESYNC_RETRY_MIN_MS: '10', ROUTESYNC_RETRY_MAX_MS: '20', ...env }, (close) => cleanups.push(close), 2);
}

const changes = (count: number): RouteChange[] => Array.from({ length: count }, () => parseChange(makeRoute()));

describe('a call with several changes', () => {
  it('is acknowledged by a peer only once the peer holds every change', async () => {
    const [a, b] = await peers(2);
    const sync = fanout({ ROUTESYNC_BATCH_MAX_ROUTES: '2' });
    sync.setPeers([a!.address, b!.address]);
    // Five changes in batches of at most two: three pushes per peer before the call is acked.
    const batch = changes(5);
    const outcome = await sync.sync(batch);
    expect(outcome).toMatchObject({ peers: 2, acked: 2, failed: [], pending: [] });
    for (const peer of [a!, b!]) {
      expect(peer.routesReceived).toBe(5);
      expect(peer.pushes).toBeGreaterThanOrEqual(3);
    }
  });

  it('reports a refusing peer as failed and the others as acked, without waiting for the deadline', async () => {
    const [good, refusing] = await peers(2);
    refusing!.mode = { kind: 'status', status: 400 };
    const sync = fanout({ ROUTESYNC_SYNC_DEADLINE_MS: '5000' });
    sync.setPeers([good!.address, refusing!.address]);
    const outcome = await sync.sync(changes(3));
    expect(outcome.acked).toBe(1);
    expect(outcome.failed).toEqual([{ peer: refusing!.address, errorClass: 'http_4xx' }]);
    expect(outcome.pending).toEqual([]);
    // Well below the deadline: a call that waited it out ends 25 ms before it (the answer's reserve).
    expect(outcome.elapsedMs).toBeLessThan(2500);
  });

  it('reports a peer still owing a change at the deadline as pending, the others as acked', async () => {
    const [good, hung] = await peers(2);
    hung!.mode = { kind: 'hang' };
    const sync = fanout({ ROUTESYNC_SYNC_DEADLINE_MS: '1000', ROUTESYNC_ATTEMPT_TIMEOUT_MS: '3000', ROUTESYNC_EJECT_AFTER_FAILURES: '1000' });
    sync.setPeers([good!.address, hung!.address]);
    const outcome = await sync.sync(changes(2));
    expect(outcome.acked).toBe(1);
    expect(outcome.pending).toEqual([{ peer: hung!.address, reason: 'in_flight' }]);
    expect(good!.routesReceived).toBe(2);
  });

  it('does not wait for an ejected peer, and a later call that acks leaves no waiter behind', async () => {
    const [good, hung] = await peers(2);
    hung!.mode = { kind: 'hang' };
    // Attempts of 1 s: the good peer's must not time out on a slow machine (one failure ejects).
    const sync = fanout({ ROUTESYNC_SYNC_DEADLINE_MS: '3000', ROUTESYNC_ATTEMPT_TIMEOUT_MS: '1000', ROUTESYNC_EJECT_AFTER_FAILURES: '1', ROUTESYNC_SYNC_RETRIES: '0' });
    sync.setPeers([good!.address, hung!.address]);
    // The first call's attempt to the hung peer times out, which ejects it (one failure here).
    const first = await sync.sync(changes(1));
    expect(first.acked).toBe(1);
    expect(sync.status().find((peer) => peer.peer === hung!.address)?.ejected).toBe(true);
    const second = await sync.sync(changes(2));
    expect(second.acked).toBe(1);
    expect(second.pending).toEqual([{ peer: hung!.address, reason: 'ejected' }]);
    expect(second.elapsedMs).toBeLessThan(1000);
  });
});

describe('a peer whose last push failed, while its re-send waits out its back-off', () => {
  it('is not waited for: the call reports it pending (retrying), and its change stays queued for the re-send', async () => {
    const [good, failing] = await peers(2);
    failing!.mode = { kind: 'status', status: 503 };
    // A long back-off (up to the 30 s probe period) and a long deadline: waiting for the peer
    // would show as a call that takes the deadline, and pending in_flight.
    const sync = fanout({
      ROUTESYNC_SYNC_DEADLINE_MS: '20000',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '5000',
      ROUTESYNC_EJECT_PROBE_MS: '30000',
      ROUTESYNC_EJECT_AFTER_FAILURES: '1000',
    });
    sync.setPeers([good!.address, failing!.address]);
    const first = await sync.sync(changes(1));
    expect(first.failed).toEqual([{ peer: failing!.address, errorClass: 'http_5xx' }]);

    const [change] = changes(1);
    const second = await sync.sync([change!]);
    expect(second.acked).toBe(1);
    expect(second.pending).toEqual([{ peer: failing!.address, reason: 'retrying' }]);
    expect(second.elapsedMs).toBeLessThan(10_000);
    // Its change is owed, not lost: queued for the re-send.
    expect(sync.status().find((peer) => peer.peer === failing!.address)?.pendingRoutes).toBe(2);
  });
});

describe('a peer whose last push failed, while its re-send is under way', () => {
  it('is not waited for either: a call arriving during the re-send reports it pending (retrying) at once', async () => {
    const [good, hung] = await peers(2);
    hung!.mode = { kind: 'hang' };
    // Attempts of 1 s: a re-send to the hung peer takes three of them, and a call waiting for
    // it would take that long; one that does not wait answers in the time of the good peer's ack.
    const sync = fanout({
      ROUTESYNC_SYNC_DEADLINE_MS: '10000',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '1000',
      ROUTESYNC_EJECT_PROBE_MS: '200',
      ROUTESYNC_EJECT_AFTER_FAILURES: '1000',
    });
    sync.setPeers([good!.address, hung!.address]);
    expect((await sync.sync(changes(1))).failed).toEqual([{ peer: hung!.address, errorClass: 'timeout' }]);
    const firstSend = hung!.pushes;
    await waitUntil(() => hung!.pushes > firstSend, 10_000, 'the background re-send to start');
    const second = await sync.sync(changes(1));
    expect(second.acked).toBe(1);
    expect(second.pending).toEqual([{ peer: hung!.address, reason: 'retrying' }]);
    expect(second.elapsedMs, 'under one attempt of the re-send, which a call waiting for it would outlast three times').toBeLessThan(900);
    expect(sync.status().find((peer) => peer.peer === hung!.address)?.pendingRoutes).toBe(2);
  });
});

describe('a peer that answers a 4xx after failing', () => {
  it('has its failure streak ended by the answer: earlier failures no longer count toward ejecting it', async () => {
    const [peer] = await peers(1);
    peer!.mode = { kind: 'status', status: 503 };
    const sync = fanout({ ROUTESYNC_SYNC_RETRIES: '0', ROUTESYNC_EJECT_AFTER_FAILURES: '1000', ROUTESYNC_SYNC_DEADLINE_MS: '1000' });
    sync.setPeers([peer!.address]);
    expect((await sync.sync(changes(1))).failed).toEqual([{ peer: peer!.address, errorClass: 'http_5xx' }]);
    expect(sync.status()[0]!.consecutiveFailures).toBeGreaterThanOrEqual(1);
    // The peer answers again, refusing the batch: it is up.
    peer!.mode = { kind: 'status', status: 400 };
    await waitUntil(() => sync.status()[0]!.lastFailure?.errorClass === 'http_4xx', 10_000, 'the re-send to be refused');
    expect(sync.status()[0]).toMatchObject({ consecutiveFailures: 0, ejected: false });
  });
});

describe('a peer that answers 401 (the peer token differs)', () => {
  it('keeps the change queued, also for the call whose failure ejects the peer, and sends it once the token is fixed', async () => {
    const [peer] = await peers(1);
    peer!.mode = { kind: 'status', status: 401 };
    const sync = fanout({ ROUTESYNC_EJECT_AFTER_FAILURES: '1', ROUTESYNC_EJECT_PROBE_MS: '200' });
    sync.setPeers([peer!.address]);
    const [first, second] = [parseChange(makeRoute()), parseChange(makeRoute())];
    // The 401 ejects the peer: the call is told its change is handed to the background path.
    expect((await sync.sync([first!])).pending).toEqual([{ peer: peer!.address, reason: 'ejected' }]);
    expect((await sync.sync([second!])).pending).toEqual([{ peer: peer!.address, reason: 'ejected' }]);
    expect(sync.status()[0]!.lastFailure?.errorClass).toBe('unauthorized');
    peer!.mode = { kind: 'ok' };
    await waitUntil(() => sync.status()[0]!.ejected === false, 5_000, 'the probe to readmit the peer');
    await sync.drain(5_000);
    for (const change of [first!, second!]) {
      expect(peer!.table.get('default', change.op === 'upsert' ? change.route.name : ''), 'sent once the token is fixed').toBeDefined();
    }
    expect(sync.status()[0]!.pendingRoutes).toBe(0);
  });
});

describe('a call whose change is queued behind a batch that then fails', () => {
  it('stops waiting once the batch has failed and the re-send waits out its back-off (pending: retrying)', async () => {
    const [hung] = await peers(1);
    hung!.mode = { kind: 'hang' };
    const sync = fanout({
      ROUTESYNC_SYNC_DEADLINE_MS: '20000',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '300',
      ROUTESYNC_SYNC_RETRIES: '0',
      ROUTESYNC_EJECT_PROBE_MS: '30000',
      ROUTESYNC_EJECT_AFTER_FAILURES: '1000',
    });
    sync.setPeers([hung!.address]);
    const first = sync.sync(changes(1));
    await hung!.waitFor(() => hung!.pushes === 1, 10_000, 'the first batch to reach the peer');
    // Queued behind the batch in flight, which will time out. Without the rule, this call
    // waited for the back-off and the re-send of its change, and was told that re-send's failure.
    const second = sync.sync(changes(1));
    expect((await first).failed).toEqual([{ peer: hung!.address, errorClass: 'timeout' }]);
    const queued = await second;
    expect(queued.pending).toEqual([{ peer: hung!.address, reason: 'retrying' }]);
    expect(queued.elapsedMs).toBeLessThan(10_000);
  });
});

describe('a delete at the version of an upsert still in flight', () => {
  it('is acknowledged only once the peer has the deletion, not by the upsert’s ack', async () => {
    const [peer] = await peers(1);
    // The upsert's push is answered after a while: the delete call comes while it is in flight.
    peer!.mode = { kind: 'ok', delayMs: 200 };
    const sync = fanout({ ROUTESYNC_SYNC_DEADLINE_MS: '30000', ROUTESYNC_ATTEMPT_TIMEOUT_MS: '10000', ROUTESYNC_EJECT_AFTER_FAILURES: '1000' });
    sync.setPeers([peer!.address]);
    const route = makeRoute({ resourceVersion: '5' });
    const upserted = sync.sync([parseChange(route)]);
    // The fake peer notifies as it writes the upsert's answer, before this replica has read it.
    await peer!.waitFor(() => peer!.pushes === 1, 10_000, 'the upsert push to be answered');
    peer!.mode = { kind: 'ok' };
    // A manager deletes at the sandbox's current version (SPEC §2), the version still in flight.
    const deleted = await sync.sync([parseChange({ ...route, state: 'dead' })]);
    expect(deleted).toMatchObject({ acked: 1, failed: [], pending: [] });
    // Acknowledged means the peer holds the deletion: it routes the sandbox no more.
    expect(peer!.pushes).toBe(2);
    expect(peer!.table.get('default', route.name as string)).toBeUndefined();
    await expect(upserted).resolves.toMatchObject({ acked: 1 });
  });
});

describe('a call with more changes than the outbox bound', () => {
  it('is told at once that its overflowed changes were dropped: the peer failed with outbox_full, nothing left pending', async () => {
    const [a, b] = await peers(2);
    // A deadline that a wait for the dropped changes would run into, long past this test's own bound.
    const sync = fanout({ ROUTESYNC_SYNC_DEADLINE_MS: '30000', ROUTESYNC_OUTBOX_MAX_ROUTES: '2' });
    sync.setPeers([a!.address, b!.address]);
    // A manager's informer resync larger than ROUTESYNC_OUTBOX_MAX_ROUTES: the oldest three go.
    const outcome = await sync.sync(changes(5));
    expect(outcome).toMatchObject({
      peers: 2,
      acked: 0,
      failed: [
        { peer: a!.address, errorClass: 'outbox_full' },
        { peer: b!.address, errorClass: 'outbox_full' },
      ],
      pending: [],
    });
    expect(outcome.elapsedMs).toBeLessThan(15_000);
    // The two that fit are still delivered in the background; the others are left to reconciliation.
    expect(await sync.drain(10_000)).toBe(true);
    for (const peer of [a!, b!]) expect(peer.routesReceived).toBe(2);
  });
});

describe('a call with more changes than the outbox bound, to an ejected peer', () => {
  it('reports the peer failed with outbox_full, not pending: the dropped changes are not owed any more', async () => {
    const [good, hung] = await peers(2);
    hung!.mode = { kind: 'hang' };
    const sync = fanout({
      ROUTESYNC_SYNC_DEADLINE_MS: '5000',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '1000',
      ROUTESYNC_EJECT_AFTER_FAILURES: '1',
      ROUTESYNC_SYNC_RETRIES: '0',
      ROUTESYNC_OUTBOX_MAX_ROUTES: '2',
    });
    sync.setPeers([good!.address, hung!.address]);
    await sync.sync(changes(1));
    expect(sync.status().find((peer) => peer.peer === hung!.address)?.ejected).toBe(true);
    // Three changes, a bound of two: the ejected peer's outbox keeps two and drops the first,
    // as the healthy peer's does.
    const outcome = await sync.sync(changes(3));
    expect(outcome.failed).toEqual([
      { peer: good!.address, errorClass: 'outbox_full' },
      { peer: hung!.address, errorClass: 'outbox_full' },
    ]);
    expect(outcome.pending).toEqual([]);
    expect(outcome.elapsedMs).toBeLessThan(2500);
  });
});

describe('a call whose change is in flight when a later change of the same identity is dropped at the outbox bound', () => {
  it('is acknowledged by the peer’s answer, not told outbox_full', async () => {
    const [peer] = await peers(1);
    // The first push is held until the second call has been made: it comes while that push is in flight.
    peer!.mode = { kind: 'ok', gated: true };
    const sync = fanout({ ROUTESYNC_SYNC_DEADLINE_MS: '30000', ROUTESYNC_ATTEMPT_TIMEOUT_MS: '10000', ROUTESYNC_OUTBOX_MAX_ROUTES: '2' });
    sync.setPeers([peer!.address]);
    const route = makeRoute({ resourceVersion: '5' });
    const first = sync.sync([parseChange(route)]);
    await waitUntil(() => peer!.pushes === 1, 5_000, 'the first push to reach the peer');
    // A resync larger than the bound: its newer version of the route is the oldest queued, so it goes.
    const second = await sync.sync([parseChange({ ...route, resourceVersion: '6' }), ...changes(2)]);
    expect(second.failed).toEqual([{ peer: peer!.address, errorClass: 'outbox_full' }]);
    expect(peer!.gatedPushes, 'the first push was still in flight').toBe(1);
    peer!.mode = { kind: 'ok' };
    peer!.openGate();
    // The first call's own change was in flight, not dropped, and the peer holds it.
    await expect(first).resolves.toMatchObject({ acked: 1, failed: [], pending: [] });
    expect(peer!.table.get('default', route.name as string)?.resourceVersion).toBe('5');
  });
});

describe('calls that arrive together', () => {
  it('share one push per peer: what is queued in one event-loop turn leaves in one batch', async () => {
    const [a, b] = await peers(2);
    const sync = fanout();
    sync.setPeers([a!.address, b!.address]);
    // Twenty lifecycle calls started in the same turn, as when a manager's requests are read
    // from several connections at once: one push each peer, not one for the first call and a
    // second for the rest.
    const outcomes = await Promise.all(changes(20).map((change) => sync.sync([change])));
    for (const outcome of outcomes) expect(outcome).toMatchObject({ peers: 2, acked: 2, failed: [], pending: [] });
    for (const peer of [a!, b!]) {
      expect(peer.routesReceived).toBe(20);
      expect(peer.pushes).toBe(1);
    }
  });
});

describe('a peer removed by discovery', () => {
  it('has its hanging push aborted at once, not left open until the attempt times out', async () => {
    const [hung] = await peers(1);
    hung!.mode = { kind: 'hang' };
    const sync = fanout({ ROUTESYNC_SYNC_DEADLINE_MS: '300', ROUTESYNC_ATTEMPT_TIMEOUT_MS: '60000', ROUTESYNC_EJECT_AFTER_FAILURES: '1000' });
    sync.setPeers([hung!.address]);
    const outcome = await sync.sync(changes(1));
    expect(outcome.pending).toEqual([{ peer: hung!.address, reason: 'in_flight' }]);
    expect(hung!.openSockets).toBe(1);
    sync.setPeers([]);
    await waitUntil(() => hung!.openSockets === 0, 5_000, "the removed peer's request to be aborted");
    expect(sync.status()).toEqual([]);
  });

  it('is sent nothing by a push still queued behind the concurrency cap when it was removed', async () => {
    const [hung, queued] = await peers(2);
    hung!.mode = { kind: 'hang' };
    // A cap of one: the hung peer's push holds it, the other peer's waits behind it.
    const sync = fanout({
      ROUTESYNC_SYNC_CONCURRENCY: '1',
      ROUTESYNC_SYNC_DEADLINE_MS: '300',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '60000',
      ROUTESYNC_EJECT_AFTER_FAILURES: '1000',
    });
    sync.setPeers([hung!.address, queued!.address]);
    const outcome = await sync.sync(changes(1));
    expect(outcome.pending).toEqual([
      { peer: hung!.address, reason: 'in_flight' },
      { peer: queued!.address, reason: 'in_flight' },
    ]);
    expect(sync.limiter).toMatchObject({ active: 1, pending: 1 });
    // Discovery drops the waiting peer, then the hung one, whose aborted push frees the cap.
    sync.setPeers([hung!.address]);
    sync.setPeers([]);
    await waitUntil(() => sync.limiter.active === 0 && sync.limiter.pending === 0, 5_000, 'the queued push to leave the cap');
    expect(queued!.pushes).toBe(0);
    expect(queued!.openSockets).toBe(0);
  });
});

describe('a peer address that turns out to be this replica', () => {
  it('is left out of the call that finds it, not reported as a peer that failed', async () => {
    const [good] = await peers(1);
    // Answers with this replica's own instance ID: the pod IP of a replica listening on 0.0.0.0.
    const itself = createServer((req, res) => {
      req.resume();
      req.on('end', () => res.writeHead(200, { 'x-routesync-instance': 'self', 'content-type': 'application/json' }).end('{"results":[]}'));
    });
    await new Promise<void>((resolve) => itself.listen(0, '127.0.0.1', resolve));
    cleanups.push(
      () =>
        new Promise<void>((resolve) => {
          itself.closeAllConnections();
          itself.close(() => resolve());
        }),
    );
    const sync = fanout();
    sync.setPeers([good!.address, `127.0.0.1:${(itself.address() as AddressInfo).port}`]);
    const first = await sync.sync(changes(1));
    expect(first).toMatchObject({ peers: 1, acked: 1, failed: [], pending: [] });
    expect((await sync.sync(changes(1))).peers).toBe(1);
  });
});
