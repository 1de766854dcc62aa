// A replica short of file descriptors (EMFILE) for a while, as under a burst of sandbox traffic
// with a low `ulimit -n`: what it is asked meanwhile is answered for what it is, and the changes
// it could not push are not lost. Real processes; the limit is lowered on the running replica
// with prlimit(1) (util-linux).
import { execFileSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { Pool } from 'undici';
import { afterEach, describe, expect, it } from 'vitest';
import { FakePeer } from '../helpers/fake-peer.js';
import { startUpstream } from '../helpers/upstream.js';
import { makeRoute } from '../helpers/cluster.js';
import { spawnReplica, type ProcessReplica } from '../helpers/process.js';
import { waitUntil } from '../helpers/wait.js';

const running: ProcessReplica[] = [];
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const replica of running.splice(0)) if (replica.child.exitCode === null) replica.child.kill('SIGKILL');
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A replica pushing to one fake peer, and a connection to its local API opened while it can still accept one. */
async function replicaWithPeer(): Promise<{ peer: FakePeer; pid: number; api: Pool; replica: ProcessReplica; proxy: string }> {
  const peer = await FakePeer.start();
  cleanups.push(() => peer.close());
  const replica = spawnReplica({
    ROUTESYNC_API_ADDR: '127.0.0.1:0',
    ROUTESYNC_PEER_ADDR: '127.0.0.1:0',
    ROUTESYNC_PROXY_ADDR: '127.0.0.1:0',
    ROUTESYNC_PEERS: peer.address,
    // Reconciliation out of the picture: only the outbox can deliver a change.
    ROUTESYNC_RECONCILE_INTERVAL_MS: '3600000',
    ROUTESYNC_TOMBSTONE_TTL_MS: '86400000',
  });
  running.push(replica);
  const { api, proxy } = await replica.addresses;
  const pool = new Pool(`http://${api}`, { connections: 1 });
  cleanups.push(() => pool.close());
  const peers = await pool.request({ method: 'GET', path: '/v1/peers' });
  await peers.body.dump();
  expect(peers.statusCode).toBe(200);
  return { peer, pid: replica.child.pid!, api: pool, replica, proxy: proxy! };
}

function openDescriptors(pid: number): Set<number> {
  return new Set(readdirSync(`/proc/${pid}/fd`).map(Number));
}

/**
 * Leave the replica no descriptor to open: its connections to the peer (bootstrap's) are closed
 * first and seen closed, so a push has to open one. A new descriptor takes the lowest free
 * number and fails with EMFILE when that number is at the limit.
 */
async function exhaustDescriptors(pid: number, peer: FakePeer): Promise<() => void> {
  const soft = execFileSync('prlimit', [`--pid=${pid}`, '--nofile', '--output=SOFT', '--noheadings']).toString().trim();
  const before = openDescriptors(pid).size;
  const dropped = peer.dropConnections();
  await waitUntil(() => openDescriptors(pid).size <= before - dropped, 10_000, 'the replica closed its peer connections');
  const open = openDescriptors(pid);
  let lowestFree = 0;
  while (open.has(lowestFree)) lowestFree++;
  setOpenFileLimit(pid, String(lowestFree));
  return () => setOpenFileLimit(pid, soft);
}

function setOpenFileLimit(pid: number, soft: string): void {
  execFileSync('prlimit', [`--pid=${pid}`, `--nofile=${soft}:`]);
}

async function putRoute(api: Pool, route: Record<string, unknown>): Promise<{ status: number; body: any }> {
  const answer = await api.request({ method: 'PUT', path: '/v1/routes', headers: { 'content-type': 'application/json' }, body: JSON.stringify(route) });
  return { status: answer.statusCode, body: await answer.body.json() };
}

describe('a replica out of file descriptors', () => {
  it('still reads a UTF-8 JSON body as UTF-8 JSON when it runs out before its first one', async () => {
    const { peer, pid, api } = await replicaWithPeer();
    await exhaustDescriptors(pid, peer);
    const put = await putRoute(api, makeRoute());
    // Not 415 unsupported_charset: that answer would tell the manager its request was wrong.
    expect(put.body.error?.code).toBeUndefined();
    expect(put.status).toBe(200);
    expect(put.body.result.outcome).toBe('applied');
  }, 30_000);

  it('keeps the changes it could not push and delivers them once descriptors are free again', async () => {
    const { peer, pid, api } = await replicaWithPeer();
    const restore = await exhaustDescriptors(pid, peer);
    const route = makeRoute();
    const put = await putRoute(api, route);
    expect(put.status).toBe(200);
    expect(put.body.sync.acked).toBe(0);
    // Not dropped as a permanent failure: the change stays queued, its class names the cause.
    expect([...put.body.sync.failed, ...put.body.sync.pending]).toEqual([expect.objectContaining({ peer: peer.address })]);
    expect(put.body.sync.failed.map((entry: { errorClass: string }) => entry.errorClass)).not.toContain('unknown');
    restore();
    await waitUntil(() => peer.table.get('default', route.name as string) !== undefined, 15_000, 'the peer has the route');
  }, 30_000);

  it('answers sandbox traffic it cannot open a connection for 503 proxy_overloaded with Retry-After, not 502, and serves it again once it can', async () => {
    const { peer, pid, api, replica, proxy } = await replicaWithPeer();
    const upstream = await startUpstream({ name: 'pod' });
    cleanups.push(() => upstream.close());
    const route = makeRoute({ id: 'sb-short', ip: upstream.host, state: 'Running' });
    expect((await putRoute(api, route)).status).toBe(200);
    // The client's connection to the data plane is open before the limit (a 404 opens no upstream one).
    const client = new Pool(`http://${proxy}`, { connections: 1 });
    cleanups.push(() => client.close());
    const unknown = await client.request({ method: 'GET', path: `/kruise/sb-unknown/${upstream.port}/` });
    await unknown.body.dump();
    expect(unknown.statusCode).toBe(404);
    const restore = await exhaustDescriptors(pid, peer);

    const refused = await client.request({ method: 'GET', path: `/kruise/sb-short/${upstream.port}/hello` });
    const body = (await refused.body.json()) as any;
    expect(refused.statusCode).toBe(503);
    expect(body.error.code).toBe('proxy_overloaded');
    expect(refused.headers['retry-after']).toBe('1');
    expect(upstream.requests).toHaveLength(0);
    await waitUntil(() => replica.lines.some((line) => line.includes('sandbox traffic refused with 503') && line.includes('"cause":"EMFILE"')), 10_000, 'the warn line');

    restore();
    const served = await client.request({ method: 'GET', path: `/kruise/sb-short/${upstream.port}/hello` });
    await served.body.dump();
    expect(served.statusCode).toBe(200);
    expect(upstream.requests).toHaveLength(1);
  }, 30_000);
});
