// The fan-out on real loopback sockets: real replicas, real fake peers with fault switches.
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import pLimit from 'p-limit';
import { request as undiciRequest } from 'undici';
import { afterEach, describe, expect, it } from 'vitest';
import { FakePeer, InFlightGauge } from '../helpers/fake-peer.js';
import { makeRoute, putRoute, startCluster, startReplica, stopAll, type TestReplica } from '../helpers/cluster.js';
import { waitUntil } from '../helpers/wait.js';

const replicas: TestReplica[] = [];
const peers: FakePeer[] = [];

async function replica(env: Record<string, string> = {}): Promise<TestReplica> {
  const node = await startReplica(env);
  replicas.push(node);
  return node;
}

async function fakePeers(count: number, gauge?: InFlightGauge): Promise<FakePeer[]> {
  const started = await Promise.all(Array.from({ length: count }, () => FakePeer.start(gauge ? { gauge } : {})));
  peers.push(...started);
  return started;
}

afterEach(async () => {
  await stopAll(replicas.splice(0));
  await Promise.all(peers.splice(0).map((peer) => peer.close()));
});

describe('fan-out to peers', () => {
  it('puts a change on every other replica by the time the call returns', async () => {
    const cluster = await startCluster(3);
    replicas.push(...cluster);
    const route = makeRoute({ resourceVersion: '42', ip: '10.1.1.1' });
    const { status, body } = await putRoute(cluster[0]!.api, route);
    expect(status).toBe(200);
    expect(body.result).toMatchObject({ outcome: 'applied', reason: 'created' });
    expect(body.sync).toMatchObject({ peers: 2, acked: 2, failed: [], pending: [] });
    for (const node of cluster.slice(1)) {
      expect(node.replica.table.get('default', route.name as string)?.resourceVersion).toBe('42');
      expect(node.replica.table.getById(route.id as string)?.ip).toBe('10.1.1.1');
    }
  });

  it('waits no longer than the deadline for a peer that never answers, and the others still get the change', async () => {
    const [ok1, ok2, hung] = await fakePeers(3);
    hung!.mode = { kind: 'hang' };
    // Attempts long enough that the healthy peers never time out on a slow machine; the hung
    // one is still waiting when the deadline ends the call.
    const deadlineMs = 2000;
    const node = await replica({
      ROUTESYNC_PEERS: [ok1!, ok2!, hung!].map((peer) => peer.address).join(','),
      ROUTESYNC_SYNC_DEADLINE_MS: String(deadlineMs),
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '1500',
      ROUTESYNC_EJECT_AFTER_FAILURES: '1000',
    });
    const route = makeRoute();
    const started = performance.now();
    const { body } = await putRoute(node.api, route);
    const elapsed = performance.now() - started;
    expect(body.sync.acked).toBe(2);
    const hungOutcome = [...body.sync.failed, ...body.sync.pending].map((entry: { peer: string }) => entry.peer);
    expect(hungOutcome).toEqual([hung!.address]);
    // The deadline bounds the call; the slack covers timer lateness on a loaded machine.
    expect(body.sync.elapsedMs).toBeLessThanOrEqual(deadlineMs + 250);
    expect(elapsed).toBeLessThan(deadlineMs + 1000);
    expect(ok1!.table.get('default', route.name as string)).toBeDefined();
    expect(ok2!.table.get('default', route.name as string)).toBeDefined();
  });

  it('tries a peer answering 400 once and does not resend what it rejected', async () => {
    const [bad] = await fakePeers(1);
    bad!.mode = { kind: 'status', status: 400 };
    const node = await replica({ ROUTESYNC_PEERS: bad!.address });
    const { body } = await putRoute(node.api, makeRoute());
    expect(body.sync.failed).toEqual([{ peer: bad!.address, errorClass: 'http_4xx' }]);
    expect(bad!.pushes).toBe(1);
    // The next change travels alone: the rejected one was not queued again.
    bad!.mode = { kind: 'ok' };
    const next = makeRoute();
    const second = await putRoute(node.api, next);
    expect(second.body.sync.acked).toBe(1);
    expect(bad!.pushes).toBe(2);
    expect(bad!.routesReceived).toBe(1);
    // The sync latency histogram tells the two calls apart: a call with a failed peer is not `acked`.
    const metrics = await (await fetch(`${node.peerUrl}/metrics`)).text();
    expect(metrics).toMatch(/^routesync_sync_duration_seconds_count\{result="partial"\} 1$/m);
    expect(metrics).toMatch(/^routesync_sync_duration_seconds_count\{result="acked"\} 1$/m);
  });

  it('leaves a peer alone for as long as its 429 Retry-After asks: no retry within the call, calls meanwhile do not wait, the re-send comes after', async () => {
    const [busy] = await fakePeers(1);
    busy!.mode = { kind: 'status', status: 429, headers: { 'retry-after': '2' } };
    const node = await replica({ ROUTESYNC_PEERS: busy!.address, ROUTESYNC_EJECT_AFTER_FAILURES: '1000' });
    const started = performance.now();
    const first = await putRoute(node.api, makeRoute());
    expect(first.body.sync.failed).toEqual([{ peer: busy!.address, errorClass: 'http_429' }]);
    // One push: the peer said when to come back, so the call's own retries (10-25 ms apart) are not made.
    expect(busy!.pushes).toBe(1);
    busy!.mode = { kind: 'ok' };
    const second = await putRoute(node.api, makeRoute());
    expect(second.body.sync.pending).toEqual([{ peer: busy!.address, reason: 'retrying' }]);
    expect(busy!.pushes).toBe(1);
    // The re-send carries both changes, and comes no sooner than the peer asked.
    await busy!.waitFor(() => busy!.routesReceived === 2, 15_000, 'the re-send after Retry-After');
    expect(performance.now() - started).toBeGreaterThanOrEqual(2000);
    expect(busy!.pushes).toBe(2);
    const warned = node.logs.lines.map((line) => JSON.parse(line) as { msg: string; retryAfterMs?: number }).filter((entry) => entry.msg === 'push to peer failed');
    expect(warned).toEqual([expect.objectContaining({ retryAfterMs: 2000 })]);
  });

  it('keeps a peer that refuses our token ejected: its probe carries the token, so an open /healthz does not let it back in', async () => {
    const [strict] = await fakePeers(1);
    strict!.requireToken = 'the-fleet-token';
    const node = await replica({
      ROUTESYNC_PEERS: strict!.address,
      ROUTESYNC_PEER_TOKEN: 'a-stale-token',
      ROUTESYNC_EJECT_AFTER_FAILURES: '2',
      ROUTESYNC_EJECT_PROBE_MS: '100',
      ROUTESYNC_EJECT_MAX_MS: '200',
    });
    const route = makeRoute();
    expect((await putRoute(node.api, route)).body.sync.failed).toEqual([{ peer: strict!.address, errorClass: 'unauthorized' }]);
    await waitUntil(() => node.replica.sync.status()[0]!.ejected, 10_000, 'the peer ejected after its re-sends were refused');
    // Several probes later, all refused, it is still out.
    const probes = async () => Number(/^routesync_peer_request_duration_seconds_count\{kind="probe"\} (\d+)$/m.exec(await (await fetch(`${node.peerUrl}/metrics`)).text())?.[1] ?? 0);
    const refusals = async () => Number(/^routesync_peer_failures_total\{class="unauthorized"\} (\d+)$/m.exec(await (await fetch(`${node.peerUrl}/metrics`)).text())?.[1] ?? 0);
    const refusedAtEjection = await refusals();
    await waitUntil(async () => (await probes()) >= 3, 10_000, 'three probes');
    expect(strict!.probes).toBe(0);
    // The refusals go on being counted while it is out (the alert on permanent failures stays on), and warned about once.
    expect(await refusals()).toBeGreaterThanOrEqual(refusedAtEjection + 2);
    const probeRefusals = node.logs.lines.map((line) => JSON.parse(line) as { msg: string; level: string }).filter((entry) => entry.msg === 'probe of ejected peer refused: it stays ejected');
    expect(probeRefusals.length).toBeGreaterThanOrEqual(2);
    expect(probeRefusals.filter((entry) => entry.level === 'warn').length).toBeLessThanOrEqual(1);
    expect(node.replica.sync.status()[0]).toMatchObject({ ejected: true });
    const messages = () => node.logs.lines.map((line) => (JSON.parse(line) as { msg: string }).msg);
    expect(messages()).not.toContain('peer answered its probe: back in rotation');
    // The fleet's token fixed on the peer's side (a rotation finished): the next probe passes and the change is delivered.
    strict!.requireToken = 'a-stale-token';
    await strict!.waitFor(() => strict!.table.get('default', route.name as string) !== undefined, 10_000, 'the queued change');
    expect(messages()).toContain('peer answered its probe: back in rotation');
  });

  it('writes one warning, not one per call, for a peer that refuses every push the same way', async () => {
    const [bad] = await fakePeers(1);
    bad!.mode = { kind: 'status', status: 404 };
    const node = await replica({ ROUTESYNC_PEERS: bad!.address, ROUTESYNC_LOG_LEVEL: 'debug' });
    for (let i = 0; i < 5; i++) expect((await putRoute(node.api, makeRoute())).body.sync.failed).toEqual([{ peer: bad!.address, errorClass: 'http_4xx' }]);
    expect(bad!.pushes).toBe(5);
    const failures = node.logs.lines.map((line) => JSON.parse(line) as { msg: string; level: string }).filter((entry) => entry.msg === 'push to peer failed');
    expect(failures.map((entry) => entry.level)).toEqual(['warn', 'debug', 'debug', 'debug', 'debug']);
    // A different failure warns at once; so does the same one after a success.
    bad!.mode = { kind: 'status', status: 400 };
    await putRoute(node.api, makeRoute());
    bad!.mode = { kind: 'ok' };
    expect((await putRoute(node.api, makeRoute())).body.sync.acked).toBe(1);
    bad!.mode = { kind: 'status', status: 400 };
    await putRoute(node.api, makeRoute());
    const levels = node.logs.lines.map((line) => JSON.parse(line) as { msg: string; level: string }).filter((entry) => entry.msg === 'push to peer failed').map((entry) => entry.level);
    expect(levels.slice(5)).toEqual(['warn', 'warn']);
  });

  it('reports a peer that answers a route rejected as failed for it, not acked, and does not resend it', async () => {
    const [picky] = await fakePeers(1);
    const refused = makeRoute();
    picky!.rejectNames.add(refused.name as string);
    const node = await replica({ ROUTESYNC_PEERS: picky!.address });
    const first = await putRoute(node.api, refused);
    expect(first.body.sync).toMatchObject({ acked: 0, failed: [{ peer: picky!.address, errorClass: 'rejected' }], pending: [] });
    const second = await putRoute(node.api, makeRoute());
    expect(second.body.sync).toMatchObject({ acked: 1, failed: [], pending: [] });
    // Neither retried nor queued again: the second push carried only the second route.
    expect(picky!.pushes).toBe(2);
    expect(picky!.routesReceived).toBe(2);
    const metrics = await (await fetch(`${node.peerUrl}/metrics`)).text();
    expect(metrics).toMatch(/^routesync_routes_pushed_total 1$/m);
    expect(metrics).toMatch(/^routesync_peer_failures_total\{class="rejected"\} 1$/m);
    expect(node.replica.sync.status()[0]).toMatchObject({ ejected: false, consecutiveFailures: 0 });
  });

  it('sends the rest of a batch again when a real peer refuses it whole for routes its version does not accept', async () => {
    // A replica of another version: a real replica behind a proxy that makes the routes named in
    // `skewed` invalid on the way (as a rule added since would). Its peer API refuses the batch
    // whole (400 invalid_route, every refused entry listed); the rest must still reach it.
    const receiver = await replica();
    const skewed = new Set<string>();
    const forwarded: { path: string; routes: number }[] = [];
    const skew = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (chunk: Buffer) => chunks.push(chunk));
      req.on('end', () => {
        let body = Buffer.concat(chunks).toString('utf8');
        if (req.url === '/v1/peer/routes') {
          const batch = JSON.parse(body) as { routes: { name: string; namespace: string }[] };
          for (const route of batch.routes) if (skewed.has(route.name)) route.namespace = 'Not_A_Label';
          forwarded.push({ path: req.url, routes: batch.routes.length });
          body = JSON.stringify(batch);
        }
        const headers = { ...req.headers, 'content-length': String(Buffer.byteLength(body)) };
        delete headers.host;
        delete headers.connection;
        undiciRequest(`${receiver.peerUrl}${req.url}`, { method: req.method as 'POST', headers, body: req.method === 'GET' ? undefined : body }).then(
          async (answer) => {
            const text = await answer.body.text();
            res.writeHead(answer.statusCode, { 'content-type': String(answer.headers['content-type'] ?? 'application/json') });
            res.end(text);
          },
          () => res.destroy(),
        );
      });
    });
    await new Promise<void>((resolve) => skew.listen(0, '127.0.0.1', resolve));
    const skewAddress = `127.0.0.1:${(skew.address() as AddressInfo).port}`;
    try {
      const node = await replica({ ROUTESYNC_PEERS: skewAddress });
      const [refusedA, good1, refusedB, good2] = [makeRoute(), makeRoute(), makeRoute(), makeRoute()];
      skewed.add(refusedA.name as string).add(refusedB.name as string);
      const response = await fetch(`${node.api}/v1/routes/batch`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ routes: [refusedA, good1, refusedB, good2] }),
      });
      const body = (await response.json()) as { sync: { failed: { peer: string; errorClass: string }[]; acked: number } };
      expect(response.status).toBe(200);
      // The call's outcome for the peer is settled by the refusal; the rest follows at once.
      expect(body.sync.failed).toEqual([{ peer: skewAddress, errorClass: 'rejected' }]);
      await waitUntil(() => forwarded.length === 2 && node.replica.sync.status()[0]?.pendingRoutes === 0, 10_000, 'the re-sent push');
      expect(receiver.replica.table.get('default', good1.name as string)?.resourceVersion).toBe('1');
      expect(receiver.replica.table.get('default', good2.name as string)?.resourceVersion).toBe('1');
      expect(receiver.replica.table.get('default', refusedA.name as string)).toBeUndefined();
      // One push of four refused, one of the two others; the refused two never sent again.
      expect(forwarded).toEqual([
        { path: '/v1/peer/routes', routes: 4 },
        { path: '/v1/peer/routes', routes: 2 },
      ]);
      const metrics = await (await fetch(`${node.peerUrl}/metrics`)).text();
      expect(metrics).toMatch(/^routesync_routes_pushed_total 2$/m);
      // Seen where permanent failures are (the alert on them), though the peer is healthy.
      expect(metrics).toMatch(/^routesync_peer_failures_total\{class="rejected"\} 1$/m);
      expect(metrics).toMatch(/^routesync_peer_attempts_total\{result="rejected"\} 1$/m);
      expect(metrics).toMatch(/^routesync_peer_attempts_total\{result="ok"\} 1$/m);
      expect(node.replica.sync.status()[0]).toMatchObject({ ejected: false, consecutiveFailures: 0, reachable: true, lastFailure: { errorClass: 'rejected' } });
      expect(node.logs.lines.some((line) => line.includes('peer rejected routes this replica accepted') && line.includes('"rejected":2'))).toBe(true);
    } finally {
      skew.closeAllConnections();
      await new Promise<void>((resolve) => skew.close(() => resolve()));
    }
  });

  it.each([
    ['answering 503', 503 as const],
    // A proxy in front of the peer that timed the request out: RFC 9110 lets it be repeated.
    ['answering 408', 408 as const],
    ['resetting the connection', 'reset' as const],
  ])('retries a peer %s and succeeds when it recovers', async (_label, failure) => {
    const [flaky] = await fakePeers(1);
    flaky!.failNext = 2;
    flaky!.failWith = failure;
    const node = await replica({ ROUTESYNC_PEERS: flaky!.address });
    const route = makeRoute({ resourceVersion: '3' });
    const { body } = await putRoute(node.api, route);
    expect(body.sync).toMatchObject({ acked: 1, failed: [], pending: [] });
    expect(flaky!.pushes).toBe(3);
    expect(flaky!.table.get('default', route.name as string)?.resourceVersion).toBe('3');
    const metrics = await (await fetch(`${node.peerUrl}/metrics`)).text();
    expect(metrics).toMatch(/^routesync_peer_retries_total 2$/m);
  });

  it('opens no more connections than the pool allows for 1,000 changes to 3 peers', async () => {
    const three = await fakePeers(3);
    const node = await replica({ ROUTESYNC_PEERS: three.map((peer) => peer.address).join(','), ROUTESYNC_PEER_CONNECTIONS: '2' });
    const limit = pLimit(32);
    const routes = Array.from({ length: 1000 }, () => makeRoute());
    await Promise.all(routes.map((route) => limit(async () => void (await putRoute(node.api, route)))));
    // An attempt that times out (a loaded machine can stall one past 100 ms) closes its socket and
    // the retry opens another: a replacement, not a bigger pool. So: never more than the pool
    // open at once, and sockets ever opened bounded by the pool plus the failed attempts.
    const attempts = (await node.replica.metrics.peerAttempts.get()).values;
    const failedAttempts = attempts.filter((value) => value.labels.result !== 'ok').reduce((sum, value) => sum + value.value, 0);
    for (const peer of three) {
      expect(peer.table.size).toBe(1000);
      expect(peer.peakOpen).toBeGreaterThanOrEqual(1);
      expect(peer.peakOpen).toBeLessThanOrEqual(2);
      expect(peer.connections).toBeLessThanOrEqual(2 + failedAttempts);
    }
  });

  it('never has more requests in flight than the cap, with 200 peers', async () => {
    const gauge = new InFlightGauge();
    const many = await fakePeers(200, gauge);
    for (const peer of many) peer.mode = { kind: 'ok', delayMs: 5 };
    const cap = 16;
    const node = await replica({ ROUTESYNC_PEERS: many.map((peer) => peer.address).join(','), ROUTESYNC_SYNC_CONCURRENCY: String(cap) });
    const routes = Array.from({ length: 5 }, () => makeRoute());
    const results = await Promise.all(routes.map((route) => putRoute(node.api, route)));
    for (const { body } of results) expect(body.sync).toMatchObject({ peers: 200, acked: 200 });
    expect(gauge.peak).toBeLessThanOrEqual(cap);
    // The gauge really measures concurrency, and the cap's slots were used: over 200 pushes of
    // at least 5 ms each, at least half of them at once (the peers' side sees arrivals a little
    // apart from the sender's slots, so not always all 16).
    expect(gauge.peak).toBeGreaterThanOrEqual(cap / 2);
    for (const peer of many) expect(peer.table.size).toBe(5);
  });

  it('sends a burst of 1,000 changes in far fewer requests, and the peer ends with the newest versions', async () => {
    const [peer] = await fakePeers(1);
    peer!.mode = { kind: 'ok', delayMs: 2 };
    const node = await replica({ ROUTESYNC_PEERS: peer!.address });
    const base = Array.from({ length: 100 }, () => makeRoute());
    // 10 versions of each of 100 routes, all in flight together, in shuffled order.
    const changes = base.flatMap((route) => Array.from({ length: 10 }, (_, v) => ({ ...route, resourceVersion: String(v + 1), ip: `10.0.${v}.1` })));
    changes.sort(() => Math.random() - 0.5);
    const limit = pLimit(100);
    await Promise.all(changes.map((change) => limit(() => putRoute(node.api, change))));
    await waitUntil(() => node.replica.sync.outboxSize() === 0, 10_000, 'the outbox to drain');
    for (const route of base) {
      expect(node.replica.table.get('default', route.name as string)?.resourceVersion).toBe('10');
      expect(peer!.table.get('default', route.name as string)?.resourceVersion).toBe('10');
      expect(peer!.table.get('default', route.name as string)?.ip).toBe('10.0.9.1');
    }
    expect(peer!.pushes).toBeLessThan(250);
  });

  it('ejects a hung peer so calls stop waiting, and a probe brings it back with what it missed', async () => {
    const [ok, hung] = await fakePeers(2);
    hung!.mode = { kind: 'hang' };
    const node = await replica({
      ROUTESYNC_PEERS: `${ok!.address},${hung!.address}`,
      ROUTESYNC_SYNC_DEADLINE_MS: '5000',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '1000',
      ROUTESYNC_EJECT_AFTER_FAILURES: '3',
      ROUTESYNC_EJECT_PROBE_MS: '200',
    });
    const missed = makeRoute();
    await putRoute(node.api, missed);
    await waitUntil(() => node.replica.sync.status().some((status) => status.ejected), 10_000, 'the hung peer to be ejected');
    const peersView = (await (await fetch(`${node.api}/v1/peers`)).json()) as any;
    expect(peersView.peers.find((p: { peer: string }) => p.peer === hung!.address)).toMatchObject({ ejected: true, reachable: false });

    const { body } = await putRoute(node.api, makeRoute());
    expect(body.sync.acked).toBe(1);
    expect(body.sync.pending).toEqual([{ peer: hung!.address, reason: 'ejected' }]);
    // Not waited for: well below the 5,000 ms deadline a call waiting for it would take.
    expect(body.sync.elapsedMs).toBeLessThan(2500);

    // The peer recovers: the probe readmits it and its queued changes are delivered.
    hung!.mode = { kind: 'ok' };
    hung!.releaseHung();
    await waitUntil(() => hung!.table.get('default', missed.name as string) !== undefined, 10_000, 'queued changes to reach the recovered peer');
    await waitUntil(() => node.replica.sync.status().every((status) => !status.ejected), 10_000, 'the peer to be readmitted');
    const metrics = await (await fetch(`${node.peerUrl}/metrics`)).text();
    expect(metrics).toMatch(/^routesync_peer_ejections_total 1$/m);
  });

  it('keeps a peer ejected while its probe answers are cut off mid-body, and says when the next probe is due', async () => {
    const [hung] = await fakePeers(1);
    hung!.mode = { kind: 'hang' };
    hung!.cutProbeAnswers = true;
    const node = await replica({
      ROUTESYNC_PEERS: hung!.address,
      ROUTESYNC_SYNC_DEADLINE_MS: '1000',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '100',
      ROUTESYNC_EJECT_AFTER_FAILURES: '3',
      ROUTESYNC_EJECT_PROBE_MS: '100',
      ROUTESYNC_EJECT_MAX_MS: '100',
    });
    await putRoute(node.api, makeRoute());
    await waitUntil(() => node.replica.sync.status()[0]?.ejected === true, 10_000, 'the hung peer to be ejected');
    const pushesWhenEjected = hung!.pushes;
    const firstProbeAt = Date.parse(node.replica.sync.status()[0]!.ejectedUntil!);
    await waitUntil(() => hung!.probes >= 3, 10_000, 'three probes');
    // GET /v1/peers tells when the next probe is due, not when the first one was.
    await waitUntil(() => Date.parse(node.replica.sync.status()[0]!.ejectedUntil!) >= firstProbeAt + 100, 5000, 'ejectedUntil to move on with each failed probe');
    // A 200 whose body never arrives whole is no answer: no probe readmitted the peer, so no new push was sent.
    expect(hung!.pushes).toBe(pushesWhenEjected);
    expect(node.replica.sync.status()[0]).toMatchObject({ ejected: true, lastFailure: { errorClass: 'reset' } });
  });
});
