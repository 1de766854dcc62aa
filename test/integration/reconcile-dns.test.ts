// DNS discovery against a real DNS server on loopback UDP (test/helpers/dns-server.ts). The
// replicas listen on 127.0.0.2, .3 and .4 at one shared port, as pods behind a headless
// Service do, so the A records alone name them.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { configFromEnv } from '../../src/config.js';
import { Replica } from '../../src/replica.js';
import { DnsServer } from '../helpers/dns-server.js';
import { LogSink, TEST_ENV, makeRoute, putRoute } from '../helpers/cluster.js';
import { waitUntil } from '../helpers/wait.js';

interface Node {
  readonly replica: Replica;
  readonly logs: LogSink;
  readonly api: string;
  readonly requests: { peer: string; path: string }[];
}

const NAME = 'routesync-peers.test.svc';
let dns: DnsServer;
const nodes: Node[] = [];

beforeEach(async () => {
  dns = await DnsServer.start();
});

afterEach(async () => {
  await Promise.all(nodes.splice(0).map((node) => node.replica.close()));
  await dns.close();
});

async function start(host: string, port: number, env: Record<string, string> = {}): Promise<Node> {
  const logs = new LogSink();
  const requests: { peer: string; path: string }[] = [];
  const replica = await Replica.start(
    configFromEnv({
      ...TEST_ENV,
      ROUTESYNC_PEER_ADDR: `${host}:${port}`,
      ROUTESYNC_PEER_DNS: NAME,
      ROUTESYNC_PEER_DNS_SERVERS: dns.address,
      ROUTESYNC_PEER_DNS_INTERVAL_MS: '200',
      ROUTESYNC_RECONCILE_INTERVAL_MS: '200',
      ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '3000',
      ...env,
    }),
    { logDestination: logs, processMetrics: false, onPeerRequest: (peer, path) => requests.push({ peer, path }) },
  );
  const node = { replica, logs, api: `http://${replica.addresses.api}`, requests };
  nodes.push(node);
  return node;
}

/** A replica with no static peers whose DNS answers as the test set it, a 600 ms bootstrap timeout, on 127.0.0.2. */
async function startAlone(env: Record<string, string>): Promise<Node> {
  const logs = new LogSink();
  const replica = await Replica.start(
    configFromEnv({
      ...TEST_ENV,
      ROUTESYNC_PEER_ADDR: '127.0.0.2:0',
      ROUTESYNC_PEER_DNS: NAME,
      ROUTESYNC_PEER_DNS_SERVERS: dns.address,
      ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '600',
      ...env,
    }),
    { logDestination: logs, processMetrics: false },
  );
  const node = { replica, logs, api: `http://${replica.addresses.api}`, requests: [] };
  nodes.push(node);
  return node;
}

async function counter(metric: { get(): Promise<{ values: { value: number; labels: Record<string, unknown> }[] }> }, labels: Record<string, string> = {}): Promise<number> {
  const { values } = await metric.get();
  return values.filter((entry) => Object.entries(labels).every(([key, value]) => entry.labels[key] === value)).reduce((sum, entry) => sum + entry.value, 0);
}

describe('DNS discovery', () => {
  it('a peer added to the DNS answer gets the whole table; one removed is no longer contacted', async () => {
    dns.set(NAME, ['127.0.0.2']);
    const a = await start('127.0.0.2', 0);
    const port = Number(a.replica.addresses.peer.split(':')[1]);
    expect(await a.replica.bootstrapped).toBe('no_peers');
    expect(a.replica.sync.peerAddresses()).toEqual([]);

    // B appears in DNS and starts: both find each other.
    dns.set(NAME, ['127.0.0.2', '127.0.0.3']);
    const b = await start('127.0.0.3', port);
    await waitUntil(() => a.replica.sync.peerAddresses().includes(`127.0.0.3:${port}`), 5000, 'a to discover b');
    expect(b.replica.sync.peerAddresses()).toEqual([`127.0.0.2:${port}`]);
    const routes = Array.from({ length: 200 }, () => makeRoute({ namespace: 'dns' }));
    const batch = await fetch(`${a.api}/v1/routes/batch`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ routes }) });
    expect(((await batch.json()) as any).sync.acked).toBe(1);

    // C appears: it bootstraps the whole table from a peer before it is ready.
    dns.set(NAME, ['127.0.0.2', '127.0.0.3', '127.0.0.4']);
    const c = await start('127.0.0.4', port);
    expect(await c.replica.bootstrapped).toBe('pulled');
    expect(c.replica.table.size).toBe(200);
    expect(c.replica.table.rootDigest()).toBe(a.replica.table.rootDigest());
    await waitUntil(() => a.replica.sync.peerAddresses().length === 2 && b.replica.sync.peerAddresses().length === 2, 5000, 'a and b to discover c');

    // B vanishes from DNS: A and C drop it and stop contacting it.
    dns.set(NAME, ['127.0.0.2', '127.0.0.4']);
    await waitUntil(() => !a.replica.sync.peerAddresses().includes(`127.0.0.3:${port}`), 5000, 'a to drop b');
    await waitUntil(() => !c.replica.sync.peerAddresses().includes(`127.0.0.3:${port}`), 5000, 'c to drop b');
    const toB = () => [...a.requests, ...c.requests].filter((request) => request.peer === `127.0.0.3:${port}`).length;
    const before = toB();
    const roundsA = await counter(a.replica.metrics.reconcileRounds);
    const { body } = await putRoute(a.api, makeRoute({ namespace: 'dns' }));
    expect(body.sync).toMatchObject({ peers: 1, acked: 1 });
    await waitUntil(async () => (await counter(a.replica.metrics.reconcileRounds)) >= roundsA + 5, 10_000, 'five more rounds on a');
    expect(toB()).toBe(before);
    expect(a.logs.lines.some((line) => line.includes('peer removed'))).toBe(true);
  });

  it('a replica whose first peer resolution fails waits for DNS within the bootstrap timeout instead of turning ready empty', async () => {
    dns.set(NAME, ['127.0.0.2']);
    const a = await start('127.0.0.2', 0);
    const port = Number(a.replica.addresses.peer.split(':')[1]);
    await a.replica.bootstrapped;
    const routes = Array.from({ length: 50 }, () => makeRoute({ namespace: 'dns' }));
    const batch = await fetch(`${a.api}/v1/routes/batch`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ routes }) });
    expect(batch.status).toBe(200);

    // B starts while the resolver fails (a CoreDNS restart, a dropped UDP answer): it does not
    // know its peers yet, so it has not learnt that it has none.
    dns.set(NAME, ['127.0.0.2', '127.0.0.3']);
    dns.mode = 'servfail';
    const b = await start('127.0.0.3', port);
    let settled: string | undefined;
    void b.replica.bootstrapped.then((outcome) => (settled = outcome));
    await waitUntil(async () => (await counter(b.replica.metrics.dnsResolutions, { result: 'ESERVFAIL' })) >= 2 || settled !== undefined, 5000, 'b to retry the resolution');
    expect(settled).toBeUndefined();
    expect(b.replica.isReady()).toBe(false);

    dns.mode = 'answer';
    expect(await b.replica.bootstrapped).toBe('pulled');
    expect(b.replica.table.size).toBe(50);
  });

  it('a replica whose peer resolution fails for the whole bootstrap timeout turns ready unseeded, not as a replica alone', async () => {
    dns.mode = 'servfail';
    const { replica, logs } = await startAlone({ ROUTESYNC_PEER_DNS_INTERVAL_MS: '200', ROUTESYNC_RECONCILE_INTERVAL_MS: '200' });
    expect(await replica.bootstrapped).toBe('timeout');
    expect(replica.isReady()).toBe(true);
    // Not seeded: a suspect peer must not rebuild from this table, nor a new one bootstrap from it.
    expect(replica.reconciler.isSeeded()).toBe(false);
    // Retried every 200 ms, counted every time, warned about once (the same failure again).
    expect(await counter(replica.metrics.dnsResolutions, { result: 'ESERVFAIL' })).toBeGreaterThan(1);
    const warnings = logs.lines.map((line) => JSON.parse(line) as { level: string; msg: string }).filter((line) => line.msg.startsWith('peer DNS resolution failed'));
    expect(warnings.filter((line) => line.level === 'warn').map((line) => line.msg)).toEqual(['peer DNS resolution failed; no peer set yet, retrying']);
  });

  it('a replica closed while it waits for DNS at start-up does not log that it is ready', async () => {
    // Refused at once, so start-up returns and the first resolution is retried within the
    // (long) bootstrap timeout, until the close.
    dns.mode = 'servfail';
    const { replica, logs } = await startAlone({ ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '30000' });
    await waitUntil(() => dns.queries > 2, 10_000, 'the resolution retried');
    await replica.close();
    expect(await replica.bootstrapped).toBe('timeout');
    expect(replica.isReady()).toBe(false);
    const messages = logs.lines.map((line) => (JSON.parse(line) as { msg: string }).msg);
    expect(messages).toContain('stopped');
    expect(messages.filter((message) => message.includes('ready with the table as it is'))).toEqual([]);
  });

  it('a DNS server that never answers costs a starting replica its bootstrap timeout, not the resolver\'s own retries', async () => {
    // c-ares against a silent server: two tries of up to 2 s (half the 5 s period), doubled for
    // the retry, ~6-7 s before the first resolution fails. The replica is ready within its
    // 600 ms bootstrap timeout all the same.
    dns.mode = 'silent';
    const began = performance.now();
    const { replica } = await startAlone({ ROUTESYNC_PEER_DNS_INTERVAL_MS: '5000' });
    expect(await replica.bootstrapped).toBe('timeout');
    const readyAfterMs = performance.now() - began;
    expect(replica.isReady()).toBe(true);
    expect(replica.reconciler.isSeeded()).toBe(false);
    // Well under the resolver's ~6 s: the budget, plus a slow machine's start-up.
    expect(readyAfterMs).toBeLessThan(4000);
    expect(dns.queries).toBeGreaterThan(0);
  });

  it('takes one address family when the name has A and AAAA records for the same pods (dual stack): each replica is one peer', async () => {
    // The AAAA records stand for the same two replicas' IPv6 addresses (unreachable here).
    dns.set(NAME, ['127.0.0.2', '127.0.0.3', 'fd00::2', 'fd00::3']);
    const a = await start('127.0.0.2', 0);
    const port = Number(a.replica.addresses.peer.split(':')[1]);
    const b = await start('127.0.0.3', port);
    await waitUntil(() => a.replica.sync.peerAddresses().length > 0, 5000, 'a to discover b');
    expect(a.replica.sync.peerAddresses()).toEqual([`127.0.0.3:${port}`]);
    expect(b.replica.sync.peerAddresses()).toEqual([`127.0.0.2:${port}`]);
    const { body } = await putRoute(a.api, makeRoute({ namespace: 'dual-stack' }));
    expect(body.sync).toMatchObject({ peers: 1, acked: 1 });
    // A replica listening on IPv6 takes the IPv6 records.
    const v6 = await start('[::1]', port, { ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '100' });
    expect(v6.replica.sync.peerAddresses()).toEqual([`[fd00::2]:${port}`, `[fd00::3]:${port}`]);
  });

  it('keeps the last good peer set when resolution fails, and says why', async () => {
    dns.set(NAME, ['127.0.0.2', '127.0.0.3']);
    const a = await start('127.0.0.2', 0);
    const port = Number(a.replica.addresses.peer.split(':')[1]);
    await a.replica.bootstrapped;
    expect(a.replica.sync.peerAddresses()).toEqual([`127.0.0.3:${port}`]);

    dns.mode = 'servfail';
    await waitUntil(async () => (await counter(a.replica.metrics.dnsResolutions, { result: 'ESERVFAIL' })) >= 2, 5000, 'failed resolutions');
    expect(a.replica.sync.peerAddresses()).toEqual([`127.0.0.3:${port}`]);
    const warning = a.logs.lines.map((line) => JSON.parse(line)).find((line) => line.msg?.startsWith('peer DNS resolution failed'));
    expect(warning).toMatchObject({ level: 'warn', code: 'ESERVFAIL', name: NAME });

    // An answer without addresses (the name is gone) is not taken as "no peers" either.
    dns.mode = 'answer';
    dns.records.delete(NAME);
    await waitUntil(async () => (await counter(a.replica.metrics.dnsResolutions, { result: 'ENOTFOUND' })) >= 1, 5000, 'NXDOMAIN');
    expect(a.replica.sync.peerAddresses()).toEqual([`127.0.0.3:${port}`]);

    // DNS answers again, without this peer: now it goes.
    dns.set(NAME, ['127.0.0.2']);
    await waitUntil(() => a.replica.sync.peerAddresses().length === 0, 5000, 'the peer set to follow DNS again');
  });
});
