// routesync as a process: start-up, bad configuration, SIGTERM.
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { flagName, SETTINGS } from '../../src/config.js';
import { DnsServer } from '../helpers/dns-server.js';
import { FakePeer } from '../helpers/fake-peer.js';
import { makeRoute, putRoute } from '../helpers/cluster.js';
import { spawnReplica, type ProcessReplica } from '../helpers/process.js';
import { waitUntil } from '../helpers/wait.js';

const running: ProcessReplica[] = [];
const peers: FakePeer[] = [];
afterEach(async () => {
  for (const replica of running.splice(0)) if (replica.child.exitCode === null) replica.child.kill('SIGKILL');
  await Promise.all(peers.splice(0).map((peer) => peer.close()));
});

const LOOPBACK = { ROUTESYNC_API_ADDR: '127.0.0.1:0', ROUTESYNC_PEER_ADDR: '127.0.0.1:0', ROUTESYNC_PROXY_ADDR: '127.0.0.1:0' };

describe('routesync process', () => {
  it('stops start-up with one clear line naming a bad variable, exit code 2', async () => {
    const replica = spawnReplica({ ...LOOPBACK, ROUTESYNC_SYNC_CONCURRENCY: 'lots' });
    running.push(replica);
    expect(await replica.exited).toBe(2);
    expect(replica.stderr).toEqual(['routesync: invalid ROUTESYNC_SYNC_CONCURRENCY: "lots" is not a non-negative integer']);
  });

  it('says its version (the package\'s) and lists every setting as a flag; a forgotten `ctl` is named', async () => {
    const { version } = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    const shown = spawnReplica(LOOPBACK, ['--version']);
    running.push(shown);
    expect(await shown.exited).toBe(0);
    expect(shown.lines).toEqual([`routesync ${version}`]);
    const help = spawnReplica(LOOPBACK, ['--help']);
    running.push(help);
    expect(await help.exited).toBe(0);
    for (const variable of Object.keys(SETTINGS)) expect(help.lines.some((line) => line.includes(`--${flagName(variable)}=VALUE`) && line.includes(variable)), variable).toBe(true);
    const forgot = spawnReplica(LOOPBACK, ['status']);
    running.push(forgot);
    expect(await forgot.exited).toBe(2);
    expect(forgot.stderr).toEqual(['routesync: "status" is a ctl command: run `routesync ctl status` (`routesync --help` lists the server\'s flags)']);
    // The running version is in the start-up line and in /metrics.
    const replica = spawnReplica(LOOPBACK);
    running.push(replica);
    const { peer } = await replica.addresses;
    expect(replica.lines.map((line) => JSON.parse(line) as { msg: string; version?: string }).find((entry) => entry.msg === 'routesync listening')?.version).toBe(version);
    expect(await (await fetch(`http://${peer}/metrics`)).text()).toContain(`routesync_build_info{version="${version}"} 1`);
  });

  it('warns, by name only, of a ROUTESYNC_ variable that is no setting, with the setting it is closest to, and starts', async () => {
    const replica = spawnReplica({ ...LOOPBACK, ROUTESYNC_SYNC_DEADLINE: '100', ROUTESYNC_WHATEVER_ELSE_ENTIRELY: 'value-never-logged' });
    running.push(replica);
    await replica.addresses;
    await waitUntil(() => replica.lines.filter((line) => line.includes('unknown ROUTESYNC_ variable')).length === 2, 10_000, 'two warnings');
    const warnings = replica.lines.filter((line) => line.includes('unknown ROUTESYNC_ variable')).map((line) => JSON.parse(line));
    expect(warnings.map(({ variable, didYouMean }) => ({ variable, didYouMean }))).toEqual([
      { variable: 'ROUTESYNC_SYNC_DEADLINE', didYouMean: 'ROUTESYNC_SYNC_DEADLINE_MS' },
      { variable: 'ROUTESYNC_WHATEVER_ELSE_ENTIRELY', didYouMean: undefined },
    ]);
    expect(warnings[0].level).toBe('warn');
    expect(replica.lines.join('\n')).not.toContain('value-never-logged');
  });

  it('names a bad flag the same way', async () => {
    const replica = spawnReplica(LOOPBACK, ['--sync-deadline-ms=-3']);
    running.push(replica);
    expect(await replica.exited).toBe(2);
    expect(replica.stderr).toHaveLength(1);
    expect(replica.stderr[0]).toMatch(/^routesync: invalid --sync-deadline-ms:/);
  });

  it('stops start-up with one line naming the variable when a listen address cannot be bound, exit code 2', async () => {
    // 192.0.2.1 (TEST-NET-1) is on no interface of this host: the address is valid but wrong here.
    const unavailable = spawnReplica({ ...LOOPBACK, ROUTESYNC_API_ADDR: '192.0.2.1:7788' });
    running.push(unavailable);
    expect(await unavailable.exited).toBe(2);
    expect(unavailable.stderr).toHaveLength(1);
    expect(unavailable.stderr[0]).toMatch(/^routesync: invalid ROUTESYNC_API_ADDR: cannot listen on 192\.0\.2\.1:7788 \(EADDRNOTAVAIL/);
    // Nothing on stdout reads as a clean stop.
    const messages = unavailable.lines.map((line) => (JSON.parse(line) as { msg: string }).msg);
    expect(messages).not.toContain('stopped');
    expect(messages).not.toContain('data plane closed');

    // Two listeners on one port: the one that cannot have it is named.
    const peer = await FakePeer.start();
    peers.push(peer);
    const taken = spawnReplica({ ...LOOPBACK, ROUTESYNC_PROXY_ADDR: peer.address });
    running.push(taken);
    expect(await taken.exited).toBe(2);
    expect(taken.stderr).toEqual([expect.stringMatching(/^routesync: invalid ROUTESYNC_PROXY_ADDR: cannot listen on 127\.0\.0\.1:\d+ \(EADDRINUSE/)]);
    const takenLog = taken.lines.map((line) => JSON.parse(line) as { msg: string; level: string });
    expect(takenLog.map((entry) => entry.msg)).not.toContain('stopped');
    // The one line is the whole report: no error entry (with its stack) for the same failure.
    expect(takenLog.filter((entry) => entry.level === 'error')).toEqual([]);
  });

  it('drains on SIGTERM: acknowledged changes are on the peer and the exit code is 0', async () => {
    const peer = await FakePeer.start();
    peers.push(peer);
    const replica = spawnReplica({ ...LOOPBACK, ROUTESYNC_PEERS: peer.address, ROUTESYNC_SHUTDOWN_GRACE_MS: '5000' });
    running.push(replica);
    const { api } = await replica.addresses;
    const route = makeRoute();
    const { body } = await putRoute(`http://${api}`, route);
    expect(body.sync.acked).toBe(1);
    replica.child.kill('SIGTERM');
    expect(await replica.exited).toBe(0);
    expect(peer.table.get('default', route.name as string)).toBeDefined();
    expect(replica.lines.some((line) => line.includes('"shutting down"'))).toBe(true);
  });

  it('a SIGTERM that arrives while start-up is still under way is not lost: the process stops and exits 0', async () => {
    // A DNS server that never answers holds start-up at the first peer resolution for seconds,
    // after the listeners are open: a pod deleted then gets its one SIGTERM in that window. As
    // a container's PID 1 a process without a handler ignores it and runs on until SIGKILL.
    const dns = await DnsServer.start();
    dns.mode = 'silent';
    try {
      const replica = spawnReplica({ ...LOOPBACK, ROUTESYNC_PEER_DNS: 'routesync-peers.test.svc', ROUTESYNC_PEER_DNS_SERVERS: dns.address });
      running.push(replica);
      await waitUntil(() => dns.queries > 0, 10_000, 'start-up to reach the first peer resolution');
      expect(replica.lines.some((line) => line.includes('"routesync listening"'))).toBe(false);
      replica.child.kill('SIGTERM');
      expect(await replica.exited).toBe(0);
      expect(replica.lines.some((line) => line.includes('"shutting down"'))).toBe(true);
    } finally {
      await dns.close();
    }
  });
});
