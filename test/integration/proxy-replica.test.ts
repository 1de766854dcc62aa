// The data plane inside real replicas: a route a manager PUTs on replica A is served by
// replica B's data plane, a pause through A refuses on B at the next request, and B's graceful
// shutdown closes an open WebSocket with 1001 and completes.
import type { AddressInfo } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { makeRoute, putRoute, startCluster, stopAll, type TestReplica } from '../helpers/cluster.js';
import { send } from '../helpers/data-plane.js';
import { startUpstream, type Upstream } from '../helpers/upstream.js';

let nodes: TestReplica[];
let upstream: Upstream;

beforeEach(async () => {
  upstream = await startUpstream({ name: 'pod' });
  nodes = await startCluster(2, { ROUTESYNC_PROXY_TIMEOUT_MS: '2000', ROUTESYNC_LOG_LEVEL: 'info' });
});

afterEach(async () => {
  await stopAll(nodes);
  await upstream.close();
});

/** A replica's data-plane address ("127.0.0.1:port") as send() wants it. */
function proxyAddress(node: TestReplica): AddressInfo {
  const text = node.replica.addresses.proxy;
  const colon = text.lastIndexOf(':');
  return { address: text.slice(0, colon), port: Number(text.slice(colon + 1)), family: 'IPv4' };
}

/** PUT on the local API; the answer comes once the one peer has acked (or the test fails). */
async function putSynced(node: TestReplica, route: Record<string, unknown>): Promise<void> {
  const answer = await putRoute(node.api, route);
  expect(answer.status).toBe(200);
  expect(answer.body.result.outcome).toBe('applied');
  expect(answer.body.sync).toMatchObject({ peers: 1, acked: 1 });
}

describe('data plane in a replica', () => {
  it("a route PUT on A is proxied by B's data plane; a pause through A refuses on B's next request", async () => {
    const [a, b] = nodes as [TestReplica, TestReplica];
    const route = makeRoute({ id: 'sb-replica', ip: upstream.host, resourceVersion: '10', state: 'Running', accessToken: 'tok-r', requireTrafficAuth: true });
    await putSynced(a, route);

    const path = `/kruise/sb-replica/${upstream.port}/hello?x=1`;
    const proxied = await send(proxyAddress(b), { path, headers: { 'e2b-traffic-access-token': 'tok-r' } });
    expect(proxied.status).toBe(200);
    expect(proxied.json()).toMatchObject({ name: 'pod', url: '/hello?x=1' });
    expect(upstream.requests).toHaveLength(1);

    await putSynced(a, { ...route, resourceVersion: '11', state: 'Paused' });
    const refused = await send(proxyAddress(b), { path, headers: { 'e2b-traffic-access-token': 'tok-r' } });
    expect(refused.status).toBe(503);
    expect(refused.json()).toMatchObject({ error: { code: 'sandbox_not_running', state: 'Paused' } });
    expect(upstream.requests).toHaveLength(1);

    // The token reached neither replica's log.
    for (const node of nodes) expect(node.logs.lines.join('\n')).not.toContain('tok-r');
    // B counted both outcomes on its own metrics endpoint.
    const metrics = await (await fetch(`${b.peerUrl}/metrics`)).text();
    expect(metrics).toContain('routesync_proxy_requests_total{outcome="proxied"} 1');
    expect(metrics).toContain('routesync_proxy_requests_total{outcome="sandbox_not_running"} 1');
  });

  it('shutdown(grace) closes an open WebSocket with 1001 and resolves', async () => {
    const [a, b] = nodes as [TestReplica, TestReplica];
    await putSynced(a, makeRoute({ id: 'sb-ws', ip: upstream.host, resourceVersion: '5' }));

    const ws = new WebSocket(`ws://${b.replica.addresses.proxy}/kruise/sb-ws/${upstream.port}/`);
    ws.on('error', () => {});
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('unexpected-response', (_req, res) => reject(new Error(`handshake answered ${res.statusCode}`)));
    });
    const echoed = new Promise<string>((resolve) => ws.once('message', (data: Buffer) => resolve(data.toString())));
    ws.send('ping');
    expect(await echoed).toBe('ping');

    const closed = new Promise<number>((resolve) => ws.once('close', (code: number) => resolve(code)));
    const shutdown = b.replica.shutdown(300);
    expect(await closed).toBe(1001);
    await expect(shutdown).resolves.toBe(true);
    await upstream.waitForOpenSockets(0);
    // A is still serving traffic for the same sandbox.
    expect((await send(proxyAddress(a), { path: `/kruise/sb-ws/${upstream.port}/` })).status).toBe(200);
  });
});
