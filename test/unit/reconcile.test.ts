// The reconciler's pure parts: interval spread, suspicion on an injected clock; the DNS settings.
import { describe, expect, it, vi } from 'vitest';
import { ConfigError, configFromEnv } from '../../src/config.js';
import { createLogger } from '../../src/log.js';
import { Metrics } from '../../src/metrics.js';
import { PeerClient } from '../../src/peers/client.js';
import { parseDnsTarget } from '../../src/peers/discovery.js';
import { PeerSync } from '../../src/peers/fanout.js';
import { LARGE_FLEET_PEERS, Reconciler } from '../../src/peers/reconcile.js';
import { localChangeAt, parseChange } from '../../src/routes/route.js';
import { monotonicClock, RouteTable } from '../../src/routes/table.js';
import { RouteService } from '../../src/service.js';

function reconciler(clock: { ms: number }, env: Record<string, string> = {}) {
  const config = configFromEnv({ ROUTESYNC_RECONCILE_INTERVAL_MS: '1000', ROUTESYNC_TOMBSTONE_TTL_MS: '10000', ...env });
  const logger = createLogger({ level: 'silent' });
  const metrics = new Metrics({ processMetrics: false });
  const client = new PeerClient({ connections: 1, token: '', instanceId: 'self' });
  const sync = new PeerSync({ config, client, metrics, logger });
  const table = new RouteTable({ tombstoneTtlMs: config.tombstoneTtlMs, now: () => clock.ms });
  const service = new RouteService(table, sync, metrics, logger);
  const now = () => clock.ms;
  const r = new Reconciler({ config, table, service, sync, client, metrics, logger, instanceId: 'self', now, random: () => 0.5 });
  // As src/replica.ts wires it.
  service.onLocalApplied = (key) => r.noteLocalChange(key);
  return { sync, client, table, service, reconciler: r };
}

describe('Reconciler', () => {
  it('leaves fences past their TTL out of the digest it serves, as a pull leaves them out', async () => {
    const clock = { ms: 1_000_000 };
    const { reconciler: r, table, sync, client } = reconciler(clock);
    table.delete({ namespace: 'ns', name: 'gone', resourceVersion: '5' });
    const empty = new RouteTable({ tombstoneTtlMs: 10_000 }).rootDigest();
    expect(r.digest(false).fences).toBe(1);
    clock.ms += 10_001; // past the TTL, before the sweep timer; no peer to hold it for
    const served = r.digest(false);
    expect(served.fences).toBe(0);
    expect(served.root, 'the same digest as a table without the fence').toBe(empty);
    sync.close();
    r.close();
    await client.close();
  });


  it('keeps the interval up to 50 peers, then grows it with the peer count', async () => {
    const { reconciler: r, client } = reconciler({ ms: 0 }, { ROUTESYNC_TOMBSTONE_TTL_MS: '604800000' });
    expect(r.intervalMs(0)).toBe(1000);
    expect(r.intervalMs(LARGE_FLEET_PEERS)).toBe(1000);
    expect(r.intervalMs(500)).toBe(10_000);
    r.close();
    await client.close();
  });

  it('never grows the interval to TTL / 5, where healthy replicas of a large fleet could turn suspect between rounds', async () => {
    // TTL 10 s: suspect after 5 s without a round; the longest interval config allows is 1,999 ms.
    const { reconciler: r, client } = reconciler({ ms: 0 });
    expect(r.intervalMs(LARGE_FLEET_PEERS)).toBe(1000);
    expect(r.intervalMs(75)).toBe(1500);
    expect(r.intervalMs(500)).toBe(1999);
    expect(r.intervalMs(5000)).toBe(1999);
    r.close();
    await client.close();
  });

  it('turns suspect after half the fence TTL without contact, only while it has peers', async () => {
    const clock = { ms: 1_000_000 };
    const { reconciler: r, sync, client } = reconciler(clock, { ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '300' });
    clock.ms += 60_000;
    expect(r.isSuspect()).toBe(false); // alone: nothing to have missed
    sync.setPeers(['127.0.0.1:1']);
    clock.ms += 5000;
    expect(r.isSuspect()).toBe(false);
    clock.ms += 1;
    expect(r.isSuspect()).toBe(true);
    expect(r.digest(false)).toMatchObject({ suspect: true, seeded: false });
    expect(await r.bootstrap()).toBe('timeout'); // nothing listens on port 1
    expect(r.isSuspect()).toBe(false); // a fresh start of contact time after bootstrap
    sync.close();
    r.close();
    await client.close();
  });
});

describe('Reconciler: the elapsed-time clock', () => {
  it('monotonicClock never steps back with the wall clock, and counts a suspend the wall clock saw', () => {
    const realNow = Date.now.bind(Date);
    let offsetMs = 0;
    const wall = vi.spyOn(Date, 'now').mockImplementation(() => realNow() + offsetMs);
    try {
      const start = monotonicClock();
      offsetMs = -3_600_000; // stepped back an hour
      const afterStepBack = monotonicClock();
      expect(afterStepBack).toBeGreaterThanOrEqual(start);
      expect(afterStepBack - start).toBeLessThan(1000);
      offsetMs += 3_600_000; // stepped forward again, to where it was: no time away
      const afterStepForward = monotonicClock();
      expect(afterStepForward - afterStepBack).toBeLessThan(1000);
      offsetMs += 600_000; // ten minutes the monotonic clock did not see (a paused VM)
      const afterSuspend = monotonicClock();
      expect(afterSuspend - afterStepForward).toBeGreaterThanOrEqual(599_000);
      expect(afterSuspend - afterStepForward).toBeLessThan(601_000);
    } finally {
      wall.mockRestore();
    }
  });

  it('stamps a local change with whole milliseconds (a small integer kept in the route, not a heap number)', async () => {
    const mono = { ms: 1_000_000.25 };
    const { reconciler: r, service, table, sync, client } = reconciler(mono);
    mono.ms += 12.625;
    await service.applyLocal(parseChange({ namespace: 'ns', name: 'stamped', id: 'sb-stamped', uid: 'u', resourceVersion: '1', ip: '10.0.0.1', state: 'running' }));
    expect(r.rememberedLocalChanges()).toBe(1);
    const stamp = localChangeAt(table.get('ns', 'stamped')!);
    expect(Number.isInteger(stamp)).toBe(true);
    sync.close();
    r.close();
    await client.close();
  });
});

describe('Reconciler: what it remembers of local changes', () => {
  function route(name: string, resourceVersion = '1') {
    return parseChange({ namespace: 'ns', name, id: `id-${name}`, uid: `uid-${name}`, resourceVersion, ip: '10.0.0.1', state: 'Running' });
  }

  it('forgets them while it has no peers (one replica, the default), however many routes its manager changed', async () => {
    const clock = { ms: 1_000_000 };
    const { reconciler: r, service, table, sync, client } = reconciler(clock);
    for (let i = 0; i < 2000; i++) {
      await service.applyLocal(route(`sb-${i}`));
      if (i % 2 === 0) await service.deleteLocal('ns', `sb-${i}`, '1');
    }
    expect(table.size).toBe(1000);
    // Only live routes count: a rebuild never looks at a deleted identity.
    expect(r.rememberedLocalChanges()).toBe(1000);
    clock.ms += 1;
    expect(await r.runRound()).toMatchObject({ result: 'no_peers' });
    expect(r.rememberedLocalChanges()).toBe(0);
    // Changed again, and a peer appears: remembered until the next good contact.
    await service.applyLocal(route('sb-1', '2'));
    sync.setPeers(['127.0.0.1:1']);
    clock.ms += 4000;
    expect(r.isSuspect()).toBe(false);
    expect(r.rememberedLocalChanges()).toBe(1);
    sync.close();
    r.close();
    await client.close();
  });

  it('stamps the stored route itself, so a listing or a push never shows the record', async () => {
    const clock = { ms: 1_000_000 };
    const { reconciler: r, service, table, sync, client } = reconciler(clock);
    sync.setPeers(['127.0.0.1:1']);
    await service.applyLocal(route('a'));
    expect(r.rememberedLocalChanges()).toBe(1);
    const stored = table.get('ns', 'a')!;
    expect(JSON.parse(JSON.stringify(stored))).toEqual({ namespace: 'ns', name: 'a', id: 'id-a', uid: 'uid-a', resourceVersion: '1', ip: '10.0.0.1', state: 'Running' });
    // A newer version from a peer replaces the route object, and with it the stamp.
    service.applyRemote([route('a', '2')], 'peer');
    expect(r.rememberedLocalChanges()).toBe(0);
    sync.close();
    r.close();
    await client.close();
  });

  it('while out of contact, remembers only identities that are still live routes', async () => {
    const clock = { ms: 1_000_000 };
    const { reconciler: r, service, sync, client } = reconciler(clock);
    sync.setPeers(['127.0.0.1:1']); // nothing listens: every round fails, no contact ever
    await service.applyLocal(route('kept'));
    await service.applyLocal(route('gone'));
    await service.deleteLocal('ns', 'gone', '1');
    clock.ms += 6000;
    expect(r.isSuspect()).toBe(true);
    expect(await r.runRound()).toMatchObject({ result: 'failed', errorClass: 'refused' });
    // 'gone' is a fence, not a route: a rebuild never looks at it.
    expect(r.rememberedLocalChanges()).toBe(1);
    sync.close();
    r.close();
    await client.close();
  });

  it('trusts a local change over the fleet for 3/4 of the TTL: a rebuild would spare it, and a suspect replica still pushes it', async () => {
    const clock = { ms: 1_000_000 };
    const { reconciler: r, service, table, sync, client } = reconciler(clock); // TTL 10 s
    sync.setPeers(['127.0.0.1:1']); // nothing listens: no contact
    await service.applyLocal(route('old'));
    clock.ms += 4000;
    await service.applyLocal(route('young'));
    clock.ms += 2000; // 'old' changed 6 s ago, 'young' 2 s ago; 6 s without contact: suspect
    expect(r.isSuspect()).toBe(true);
    const upsert = (name: string) => ({ op: 'upsert' as const, route: table.get('ns', name)! });
    expect(r.rememberedLocalChanges()).toBe(2);
    expect(r.stillOwed(upsert('old'), 'ns/old')).toBe(true);
    clock.ms += 1501; // 'old' is now 7.501 s old: past 3/4 of the TTL
    expect(r.rememberedLocalChanges()).toBe(1);
    expect(r.stillOwed(upsert('old'), 'ns/old'), 'an old change, from a suspect replica').toBe(false);
    expect(r.stillOwed(upsert('young'), 'ns/young')).toBe(true);
    // A queued upsert superseded since by a peer's newer version is not this replica's change to push while suspect.
    const queued = upsert('young');
    service.applyRemote([route('young', '2')], 'peer');
    expect(r.stillOwed(queued, 'ns/young')).toBe(false);
    // Deletions are always owed; an upsert of a deleted identity never, its fence alive or not.
    await service.deleteLocal('ns', 'old', '1');
    expect(r.stillOwed({ op: 'delete', deletion: { namespace: 'ns', name: 'old', resourceVersion: '1' } }, 'ns/old')).toBe(true);
    const gone = route('old'); // the upsert as it was queued
    expect(table.getFence('ns', 'old')).toBeDefined();
    expect(r.stillOwed(gone, 'ns/old')).toBe(false);
    clock.ms += 10_001;
    expect(table.getFence('ns', 'old')).toBeUndefined();
    expect(r.stillOwed(gone, 'ns/old')).toBe(false);
    sync.close();
    r.close();
    await client.close();
  });

  it('pushes an old local change again once it is no longer suspect (a replay, an outbox that waited on one peer)', async () => {
    const clock = { ms: 1_000_000 };
    const { reconciler: r, service, table, sync, client } = reconciler(clock);
    sync.setPeers(['127.0.0.1:1']);
    await service.applyLocal(route('a'));
    clock.ms += 8000;
    const change = { op: 'upsert' as const, route: table.get('ns', 'a')! };
    expect(r.stillOwed(change, 'ns/a')).toBe(false);
    sync.setPeers([]); // alone: counts as contact
    expect(r.isSuspect()).toBe(false);
    sync.setPeers(['127.0.0.1:1']);
    expect(r.stillOwed(change, 'ns/a')).toBe(true);
    sync.close();
    r.close();
    await client.close();
  });

  it('restarts the contact clock on every round while alone, so a peer that appears later does not find it suspect', async () => {
    const clock = { ms: 1_000_000 };
    const { reconciler: r, sync, client } = reconciler(clock);
    for (let i = 0; i < 60; i++) {
      clock.ms += 1000;
      await r.runRound();
    }
    sync.setPeers(['127.0.0.1:1']);
    expect(r.isSuspect()).toBe(false);
    expect(r.lagSeconds()).toBeLessThanOrEqual(1);
    sync.close();
    r.close();
    await client.close();
  });
});

describe('DNS settings', () => {
  it('parses name and name:port', () => {
    expect(parseDnsTarget('peers.ns.svc', 7789)).toEqual({ name: 'peers.ns.svc', port: 7789 });
    expect(parseDnsTarget('peers.ns.svc:9000', 7789)).toEqual({ name: 'peers.ns.svc', port: 9000 });
  });

  it('accepts IP servers with optional ports and refuses names and bad ports with one line', () => {
    expect(configFromEnv({ ROUTESYNC_PEER_DNS_SERVERS: '127.0.0.1:5353, 10.0.0.10,::1,[::1]:53' }).peerDnsServers).toContain('127.0.0.1:5353');
    for (const bad of ['dns.example', '127.0.0.1:0', '1.2.3:53', '127.0.0.1:99999']) {
      expect(() => configFromEnv({ ROUTESYNC_PEER_DNS_SERVERS: bad }), bad).toThrow(ConfigError);
      expect(() => configFromEnv({ ROUTESYNC_PEER_DNS_SERVERS: bad }), bad).toThrow(/ROUTESYNC_PEER_DNS_SERVERS/);
    }
  });
});
