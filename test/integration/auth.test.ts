// Peer authentication end to end (issue 6 §1): with ROUTESYNC_PEER_TOKEN every peer endpoint
// but the probes and /metrics answers 401 without the right bearer token, replicas still push
// and reconcile with each other, and the local API warns loudly off loopback.
import { afterEach, describe, expect, it } from 'vitest';
import { parseChange } from '../../src/routes/route.js';
import { makeRoute, putRoute, startCluster, startReplica, stopAll, type TestReplica } from '../helpers/cluster.js';
import { waitUntil } from '../helpers/wait.js';

// Distinctive, so the suite-wide secrets scan (test/helpers/secrets.ts) finds it if it is ever logged.
const TOKEN = 'peer-token-SECRET-MARKER-auth-7f3a9c';

const nodes: TestReplica[] = [];
afterEach(async () => {
  await stopAll(nodes.splice(0));
});

async function cluster(count: number, env: Record<string, string> = {}): Promise<TestReplica[]> {
  const started = await startCluster(count, { ROUTESYNC_PEER_TOKEN: TOKEN, ...env });
  nodes.push(...started);
  return started;
}

/** Every peer endpoint that needs the token, with a body it would otherwise accept. */
function guardedRequests(): { method: string; path: string; body?: string }[] {
  const route = makeRoute();
  return [
    { method: 'POST', path: '/refresh', body: JSON.stringify(route) },
    { method: 'POST', path: '/v1/peer/routes', body: JSON.stringify({ routes: [route] }) },
    { method: 'GET', path: '/v1/peer/digest' },
    { method: 'GET', path: '/v1/peer/digest?root=1' },
    { method: 'POST', path: '/v1/peer/pull', body: JSON.stringify({ buckets: [0, 1, 2] }) },
    // Wrong methods and unknown paths are behind the token too: no probing without it.
    { method: 'GET', path: '/refresh' },
    { method: 'GET', path: '/v1/peer/routes' },
    { method: 'GET', path: '/v1/no-such-endpoint' },
  ];
}

const WRONG: (string | undefined)[] = [
  undefined,
  '',
  'Bearer',
  'Bearer ',
  'Bearer wrong',
  `Bearer ${TOKEN}x`,
  `Bearer ${TOKEN.slice(0, -1)}`,
  `bearer ${TOKEN.toUpperCase()}`,
  `Basic ${Buffer.from(`routesync:${TOKEN}`).toString('base64')}`,
  TOKEN,
  `Bearer  ${TOKEN}`,
];

describe('peer token', () => {
  it('every peer endpoint but /healthz, /readyz and /metrics answers 401 without the token or with a wrong one, and changes nothing', async () => {
    const [, b] = (await cluster(2)) as [TestReplica, TestReplica];
    await b.replica.bootstrapped;
    const before = b.replica.table.rootDigest();
    let refused = 0;
    for (const { method, path, body } of guardedRequests()) {
      for (const authorization of WRONG) {
        const response = await fetch(`${b.peerUrl}${path}`, {
          method,
          headers: { 'content-type': 'application/json', ...(authorization === undefined ? {} : { authorization }) },
          ...(body === undefined ? {} : { body }),
        });
        expect(response.status, `${method} ${path} with ${JSON.stringify(authorization)}`).toBe(401);
        expect(response.headers.get('www-authenticate')).toMatch(/^Bearer /);
        expect(((await response.json()) as { error: { code: string } }).error.code).toBe('unauthorized');
        refused++;
      }
    }
    expect(refused).toBe(guardedRequests().length * WRONG.length);
    expect(b.replica.table.rootDigest()).toBe(before);
    expect(b.replica.table.size).toBe(0);

    for (const open of ['/healthz', '/readyz', '/metrics']) {
      expect((await fetch(`${b.peerUrl}${open}`)).status, open).toBe(200);
    }
    // The right token opens every endpoint.
    const authorization = `Bearer ${TOKEN}`;
    expect((await fetch(`${b.peerUrl}/v1/peer/digest?root=1`, { headers: { authorization } })).status).toBe(200);
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is not (see WRONG).
    for (const scheme of ['bearer', 'BEARER', 'bEaReR']) {
      expect((await fetch(`${b.peerUrl}/v1/peer/digest?root=1`, { headers: { authorization: `${scheme} ${TOKEN}` } })).status, scheme).toBe(200);
    }
    const pulled = await fetch(`${b.peerUrl}/v1/peer/pull`, { method: 'POST', headers: { authorization }, body: '{"buckets":[0]}' });
    expect(pulled.status).toBe(200);
  });

  it('replicas holding the token push to each other and reconcile (digest and pull) with each other', async () => {
    const [a, b] = (await cluster(2, { ROUTESYNC_RECONCILE_INTERVAL_MS: '100' })) as [TestReplica, TestReplica];
    await Promise.all([a.replica.bootstrapped, b.replica.bootstrapped]);
    const pushed = await putRoute(a.api, makeRoute({ accessToken: 'access-token-SECRET-MARKER-auth' }));
    expect(pushed.status).toBe(200);
    expect(pushed.body.sync).toMatchObject({ acked: 1 });

    // A change only A has (no push): B can only learn it by a reconcile round, digest then pull.
    const quiet = makeRoute({ name: 'reconciled-only', id: 'sb-reconciled-only', resourceVersion: '7' });
    a.replica.table.apply(parseChange(quiet));
    await waitUntil(() => b.replica.table.get('default', 'reconciled-only')?.resourceVersion === '7', 10_000, 'B to pull the route A has alone');
    expect(b.replica.table.rootDigest()).toBe(a.replica.table.rootDigest());
  });

  it('a replica with another token is refused: its pushes are not acknowledged and change nothing', async () => {
    const [a] = (await cluster(1)) as [TestReplica];
    const stranger = await startReplica({ ROUTESYNC_PEER_TOKEN: 'another-token-SECRET-MARKER', ROUTESYNC_SYNC_DEADLINE_MS: '1000' });
    nodes.push(stranger);
    stranger.replica.sync.setPeers([a.replica.addresses.peer]);
    const before = a.replica.table.rootDigest();
    const { status, body } = await putRoute(stranger.api, makeRoute());
    expect(status).toBe(200);
    expect(body.sync.acked).toBe(0);
    expect(a.replica.table.rootDigest()).toBe(before);
  });
});

describe('peer API without a token', () => {
  const WARNING = 'PEER API HAS NO TOKEN';
  const warningOf = (node: TestReplica) =>
    node.logs.lines.map((line) => JSON.parse(line) as { level: string; msg: string; peerAddr?: string }).find((line) => line.msg.includes(WARNING));

  it('logs a loud warning when the peer API listens off loopback with neither a token nor mutual TLS', async () => {
    const node = await startReplica({ ROUTESYNC_PEER_ADDR: '0.0.0.0:0' });
    nodes.push(node);
    expect(warningOf(node)).toMatchObject({ level: 'warn', peerAddr: expect.stringMatching(/^0\.0\.0\.0:\d+$/) });
  });

  it('says nothing of the kind with a token, or on loopback', async () => {
    const guarded = await startReplica({ ROUTESYNC_PEER_ADDR: '0.0.0.0:0', ROUTESYNC_PEER_TOKEN: 'peer-token-SECRET-MARKER' });
    const local = await startReplica();
    nodes.push(guarded, local);
    expect(warningOf(guarded)).toBeUndefined();
    expect(warningOf(local)).toBeUndefined();
  });
});

describe('local API address', () => {
  const WARNING = 'LOCAL API IS NOT ON LOOPBACK';

  it('logs a loud warning when the local API listens off loopback', async () => {
    const node = await startReplica({ ROUTESYNC_API_ADDR: '0.0.0.0:0' });
    nodes.push(node);
    const warning = node.logs.lines.map((line) => JSON.parse(line) as { level: string; msg: string; apiAddr?: string }).find((line) => line.msg.includes(WARNING));
    expect(warning).toBeDefined();
    expect(warning!.level).toBe('warn');
    expect(warning!.apiAddr).toMatch(/^0\.0\.0\.0:\d+$/);
  });

  it('says nothing of the kind on loopback (the default)', async () => {
    const node = await startReplica();
    nodes.push(node);
    expect(node.logs.lines.some((line) => line.includes(WARNING))).toBe(false);
  });
});
