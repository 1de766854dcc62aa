// Shutdown during a burst (issue 6 §6): routesync as a real process with two real peer
// replicas; a burst of PUTs; SIGTERM in the middle of it. Every PUT the local API answered 200
// with all peers acknowledged is on both peers, calls after SIGTERM are refused (503 on a
// kept-alive connection, or the connection refused), and the process exits 0 within its grace period.
import { Agent, request } from 'undici';
import { afterEach, describe, expect, it } from 'vitest';
import { makeRoute, putRoute, startReplica, stopAll, type TestReplica } from '../helpers/cluster.js';
import { FakePeer } from '../helpers/fake-peer.js';
import { spawnReplica, type ProcessReplica } from '../helpers/process.js';
import { waitUntil } from '../helpers/wait.js';

const GRACE_MS = 5000;
const BURST = 600;
const PARALLEL = 16;
const TOKEN = 'shutdown-peer-token-SECRET-MARKER-0b2d';

const peers: TestReplica[] = [];
const children: ProcessReplica[] = [];
const fakes: FakePeer[] = [];
afterEach(async () => {
  for (const child of children.splice(0)) if (child.child.exitCode === null) child.child.kill('SIGKILL');
  await stopAll(peers.splice(0));
  for (const fake of fakes.splice(0)) await fake.close();
});

describe('SIGTERM during a burst of changes', () => {
  it('every change acknowledged by all peers is on the peers, and the process exits 0 within the grace period', async () => {
    peers.push(await startReplica({ ROUTESYNC_PEER_TOKEN: TOKEN }), await startReplica({ ROUTESYNC_PEER_TOKEN: TOKEN }));
    const child = spawnReplica({
      ROUTESYNC_API_ADDR: '127.0.0.1:0',
      ROUTESYNC_PEER_ADDR: '127.0.0.1:0',
      ROUTESYNC_PROXY_ADDR: '127.0.0.1:0',
      ROUTESYNC_PEERS: peers.map((peer) => peer.replica.addresses.peer).join(','),
      ROUTESYNC_PEER_TOKEN: TOKEN,
      ROUTESYNC_SHUTDOWN_GRACE_MS: String(GRACE_MS),
      ROUTESYNC_SYNC_DEADLINE_MS: '2000',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '1000',
      ROUTESYNC_LOG_LEVEL: 'info',
    });
    children.push(child);
    const { api } = await child.addresses;
    await waitUntil(() => child.lines.some((line) => line.includes('"msg":"ready"')), 10_000, 'the process to be ready');

    const dispatcher = new Agent({ connections: PARALLEL });
    const routes = Array.from({ length: BURST }, (_, i) => makeRoute({ namespace: 'burst', resourceVersion: String(100 + i), accessToken: `burst-${i}-SECRET-MARKER` }));
    const answers: { route: Record<string, unknown>; status: number; acked: number; peers: number }[] = [];
    let refused = 0;
    let sent = 0;
    let signalledAt = 0;
    let next = 0;
    const worker = async () => {
      while (next < routes.length) {
        const route = routes[next++]!;
        sent++;
        // SIGTERM mid-burst: a third of the way through.
        if (sent === Math.floor(BURST / 3)) {
          signalledAt = Date.now();
          child.child.kill('SIGTERM');
        }
        try {
          const response = await request(`http://${api}/v1/routes`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(route), dispatcher });
          const body = (await response.body.json()) as { sync?: { acked: number; peers: number } };
          answers.push({ route, status: response.statusCode, acked: body.sync?.acked ?? 0, peers: body.sync?.peers ?? 0 });
        } catch {
          // Refused or cut: the listener is closed after SIGTERM. Not acknowledged, so no promise was made.
          refused++;
        }
      }
    };
    await Promise.all(Array.from({ length: PARALLEL }, worker));
    await dispatcher.destroy();

    // The grace period bounds the drain; 2 s more covers the process's own exit on a slow machine.
    const code = await Promise.race([child.exited, new Promise<'late'>((resolve) => setTimeout(() => resolve('late'), GRACE_MS + 2000 - (Date.now() - signalledAt)))]);
    const exitMs = Date.now() - signalledAt;
    expect(code).toBe(0);

    const acknowledged = answers.filter((answer) => answer.status === 200 && answer.peers === 2 && answer.acked === 2);
    const answered200 = answers.filter((answer) => answer.status === 200);
    console.log(
      `shutdown: ${BURST} PUTs, SIGTERM after ${Math.floor(BURST / 3)}; ${answered200.length} answered 200 (${acknowledged.length} acknowledged by both peers), ` +
        `${answers.length - answered200.length} other answers, ${refused} refused; exit ${code} ${exitMs} ms after SIGTERM (grace ${GRACE_MS} ms)`,
    );
    expect(acknowledged.length).toBeGreaterThan(0);
    // Once shutdown starts, a call on a kept-alive connection is told so (503), not taken in.
    for (const answer of answers) if (answer.status !== 200) expect(answer.status).toBe(503);
    const missing: string[] = [];
    for (const { route } of acknowledged) {
      for (const peer of peers) {
        const stored = peer.replica.table.get('burst', route.name as string);
        if (stored?.resourceVersion !== route.resourceVersion) missing.push(`${route.name as string} on ${peer.replica.addresses.peer}`);
      }
    }
    expect(missing).toEqual([]);
    // The drain goes further: changes answered 200 but still owed to a peer were delivered in the grace period.
    for (const { route } of answered200) {
      for (const peer of peers) expect(peer.replica.table.get('burst', route.name as string)?.resourceVersion).toBe(route.resourceVersion);
    }
    expect(child.lines.some((line) => line.includes('"shutting down"'))).toBe(true);
    expect(child.lines.some((line) => line.includes('"stopped"'))).toBe(true);
  });
});

describe('readiness during shutdown', () => {
  it('stays not-ready once shutdown has started, even when bootstrap ends during the drain', async () => {
    const fake = await FakePeer.start();
    fakes.push(fake);
    // Pushes hang, so the drain lasts its whole grace period; the fake serves no digest, so
    // bootstrap keeps trying until its timeout, which falls inside the drain.
    fake.mode = { kind: 'hang' };
    // A bootstrap timeout of 1.5 s, well past start-up and the PUT, and well inside the 4 s grace.
    const node = await startReplica({ ROUTESYNC_PEERS: fake.address, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '1500', ROUTESYNC_SYNC_DEADLINE_MS: '100' });
    peers.push(node);
    let settled: string | undefined;
    void node.replica.bootstrapped.then((outcome) => void (settled = outcome));
    expect(node.replica.isReady()).toBe(false);
    await putRoute(node.api, makeRoute({ resourceVersion: '3' })); // queued for the hung peer: the drain has work
    const shutdown = node.replica.shutdown(4000);
    expect(settled, 'bootstrap still running when shutdown began (else this tests nothing)').toBeUndefined();
    expect(await node.replica.bootstrapped).toBe('timeout');
    expect(node.replica.isReady(), 'isReady() after bootstrap ended during the drain').toBe(false);
    const readyz = await request(`${node.peerUrl}/readyz`).then(
      async (response) => {
        await response.body.dump();
        return response.statusCode;
      },
      () => 'refused', // the peer listener already closed: not ready either
    );
    expect(readyz).not.toBe(200);
    expect(await shutdown).toBe(false);
    expect(node.logs.lines.some((line) => line.includes('"msg":"ready"')), 'a "ready" log line during shutdown').toBe(false);
  });
});

describe('the outbox at shutdown', () => {
  it('changes queued for an ejected peer are not reported delivered: shutdown returns false and logs how many it dropped', async () => {
    const fake = await FakePeer.start();
    fakes.push(fake);
    fake.mode = { kind: 'hang' };
    const node = await startReplica({
      ROUTESYNC_PEERS: fake.address,
      ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '0',
      ROUTESYNC_SYNC_DEADLINE_MS: '100',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '50',
      ROUTESYNC_SYNC_RETRIES: '0',
      ROUTESYNC_EJECT_AFTER_FAILURES: '1',
    });
    peers.push(node);
    await putRoute(node.api, makeRoute({ resourceVersion: '3' }));
    await waitUntil(() => node.replica.sync.status()[0]?.ejected === true, 5000, 'the hung peer to be ejected');
    expect(node.replica.sync.outboxSize()).toBe(1);
    expect(await node.replica.shutdown(3000)).toBe(false);
    const line = node.logs.lines.find((entry) => entry.includes('changes queued for ejected peers dropped at shutdown'));
    expect(line, 'a warning naming the dropped changes').toBeDefined();
    expect(JSON.parse(line!)).toMatchObject({ level: 'warn', queued: 1, ejectedPeers: 1 });
  });
});

describe('a peer that asked to wait at shutdown', () => {
  it('does not hold the drain for a peer whose Retry-After ends after the grace period', { timeout: 20_000 }, async () => {
    const fake = await FakePeer.start();
    fakes.push(fake);
    fake.mode = { kind: 'status', status: 429, headers: { 'retry-after': '120' } };
    const node = await startReplica({ ROUTESYNC_PEERS: fake.address, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '0', ROUTESYNC_EJECT_MAX_MS: '300000' });
    peers.push(node);
    expect((await putRoute(node.api, makeRoute())).body.sync.failed).toEqual([{ peer: fake.address, errorClass: 'http_429' }]);
    expect(node.replica.sync.outboxSize()).toBe(1);
    // A grace longer than the test's timeout: waiting for that peer would fail the test.
    expect(await node.replica.shutdown(60_000)).toBe(false);
    expect(fake.pushes).toBe(1);
    const line = node.logs.lines.find((entry) => entry.includes('changes queued for ejected peers dropped at shutdown'));
    expect(JSON.parse(line!)).toMatchObject({ level: 'warn', queued: 1, ejectedPeers: 0 });
  });
});

describe('kept-alive connections at shutdown', () => {
  it('answers a local call in flight at SIGTERM with Connection: close, so the drain does not wait for the client to hang up', { timeout: 30_000 }, async () => {
    const fake = await FakePeer.start();
    fakes.push(fake);
    fake.mode = { kind: 'ok', delayMs: 300 };
    const node = await startReplica({ ROUTESYNC_PEERS: fake.address, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '0' });
    peers.push(node);
    // Node's own 5 s idle timeout would end a wait for the idle connection by itself, a few
    // seconds late; lengthened, such a wait outlasts this test's timeout and fails it.
    node.replica.apiServer.keepAliveTimeout = 120_000;
    // A manager's HTTP client: keep-alive with a long idle timeout (Go's default is 90 s).
    const dispatcher = new Agent({ keepAliveTimeout: 60_000, keepAliveMaxTimeout: 60_000 });
    try {
      const put = request(`${node.api}/v1/routes`, {
        method: 'PUT',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(makeRoute({ resourceVersion: '5' })),
        dispatcher,
      }).then(async (response) => ({ status: response.statusCode, connection: response.headers.connection, body: await response.body.json() }));
      await fake.waitFor(() => fake.pushes > 0, 5000, 'the push to reach the peer');
      // Grace far beyond the test's timeout: shutdown resolves only if nothing waits for it.
      const shutdown = node.replica.shutdown(120_000);
      const answer = await put;
      expect(answer.status).toBe(200);
      expect(answer.body).toMatchObject({ sync: { acked: 1 } });
      expect(answer.connection).toBe('close');
      expect(await shutdown).toBe(true);
      // The client still holds its pool, yet the server has no connection left.
      const open = await new Promise<number>((resolve, reject) => node.replica.apiServer.getConnections((error, count) => (error ? reject(error) : resolve(count))));
      expect(open).toBe(0);
    } finally {
      await dispatcher.destroy();
    }
  });

  it('answers peer API requests during the drain with Connection: close', async () => {
    const fake = await FakePeer.start();
    fakes.push(fake);
    fake.mode = { kind: 'hang' }; // the drain lasts its whole grace period
    const node = await startReplica({ ROUTESYNC_PEERS: fake.address, ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '0', ROUTESYNC_SYNC_DEADLINE_MS: '100' });
    peers.push(node);
    await putRoute(node.api, makeRoute({ resourceVersion: '3' }));
    const before = await request(`${node.peerUrl}/healthz`);
    await before.body.dump();
    expect(before.headers.connection).toBe('keep-alive');
    const shutdown = node.replica.shutdown(3000);
    const during = await request(`${node.peerUrl}/healthz`);
    await during.body.dump();
    expect(during.statusCode).toBe(200);
    expect(during.headers.connection).toBe('close');
    await shutdown;
  });
});
