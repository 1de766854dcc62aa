// routesync ctl against live replicas: what an operator sees, and the exit codes scripts branch on.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { EXIT_DIFFERENT, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, formatTable, runCtl } from '../../src/ctl.js';
import { parseChange } from '../../src/routes/route.js';
import { makeRoute, putRoute, startCluster, startReplica, stopAll, type TestReplica } from '../helpers/cluster.js';
import { waitUntil } from '../helpers/wait.js';

const MAIN = fileURLToPath(new URL('../../src/main.ts', import.meta.url));
const TOKEN = 'ctl-test-peer-token-d41d8cd9';
const SECRET = 'sandbox-access-token-never-printed';

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

async function ctl(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  let stdout = '';
  let stderr = '';
  const code = await runCtl(args, { stdout: (text) => (stdout += text), stderr: (text) => (stderr += text), env });
  return { code, stdout, stderr };
}

/** A loopback port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = createServer().listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  server.close();
  await once(server, 'close');
  return port;
}

function hostPort(url: string): string {
  return url.replace(/^http:\/\//, '');
}

const started: TestReplica[] = [];
afterEach(async () => {
  await stopAll(started.splice(0));
});

describe('routesync ctl status, routes, peers', () => {
  it('status: alive, ready, route count and peers; exit 0', async () => {
    const nodes = await startCluster(2);
    started.push(...nodes);
    const [a] = nodes as [TestReplica, TestReplica];
    await putRoute(a.api, makeRoute({ accessToken: SECRET }));
    await putRoute(a.api, makeRoute());
    const run = await ctl(['status', '--api', hostPort(a.api), '--peer', hostPort(a.peerUrl)]);
    expect(run.stderr).toBe('');
    expect(run.code).toBe(EXIT_OK);
    expect(run.stdout).toMatch(/^alive\s+yes$/m);
    expect(run.stdout).toMatch(/^ready\s+yes$/m);
    expect(run.stdout).toMatch(/^routes\s+2 \(0 deletion fences\)$/m);
    expect(run.stdout).toMatch(/^peers\s+1 \(1 reachable, 0 ejected/m);
    expect(run.stdout).toContain(a.replica.instanceId);

    const json = await ctl(['status', '--json', '--api', hostPort(a.api), '--peer', a.peerUrl]);
    expect(JSON.parse(json.stdout)).toMatchObject({ alive: true, ready: true, routes: 2, fences: 0, peers: { total: 1, reachable: 1, ejected: [] } });
  });

  it('status: a replica that is not ready exits 1 and says why', async () => {
    const node = await startReplica();
    started.push(node);
    // What a replica looks like before its table is bootstrapped (and while it shuts down);
    // set once bootstrap has ended, which would otherwise set it back.
    await node.replica.bootstrapped;
    (node.replica as unknown as { ready: boolean }).ready = false;
    const run = await ctl(['status', '--api', hostPort(node.api), '--peer', hostPort(node.peerUrl)]);
    expect(run.code).toBe(EXIT_DIFFERENT);
    expect(run.stdout).toMatch(/^ready\s+NO \(not_ready\)$/m);
  });

  it('status: a replica that is shutting down is not ready (exit 1, shutting_down), not unreachable, while its local API is closed', async () => {
    // A sandbox that never answers: the data plane's drain holds the shutdown for its grace.
    let reached = 0;
    const held = new Set<import('node:net').Socket>();
    const silent = createServer((socket) => {
      reached++;
      held.add(socket);
      socket.on('error', () => {});
    }).listen(0, '127.0.0.1');
    await once(silent, 'listening');
    try {
      const node = await startReplica({ ROUTESYNC_PROXY_TIMEOUT_MS: '30000' });
      started.push(node);
      node.replica.table.upsert({ namespace: 'default', name: 'slow', id: 'sb-slow', uid: 'u', resourceVersion: '1', ip: '127.0.0.1', state: 'running' });
      const port = (silent.address() as { port: number }).port;
      const pending = fetch(`http://${node.replica.addresses.proxy}/kruise/sb-slow/${port}/`).catch(() => undefined);
      await waitUntil(() => reached > 0, 5000, 'the request to reach the sandbox');
      const stopped = node.replica.shutdown(20_000);
      const readyz = async () => {
        const answer = await fetch(`${node.peerUrl}/readyz`);
        return { status: answer.status, body: (await answer.json()) as { error?: { code?: string } } };
      };
      await waitUntil(async () => (await readyz()).status === 503, 5000, 'readyz to turn 503');
      expect((await readyz()).body.error?.code).toBe('shutting_down');
      const run = await ctl(['status', '--api', hostPort(node.api), '--peer', hostPort(node.peerUrl)]);
      expect(run.stderr).toBe('');
      expect(run.code).toBe(EXIT_DIFFERENT);
      expect(run.stdout).toMatch(/^alive\s+yes$/m);
      expect(run.stdout).toMatch(/^ready\s+NO \(shutting_down\)$/m);
      const json = await ctl(['status', '--json', '--api', hostPort(node.api), '--peer', hostPort(node.peerUrl)]);
      expect(JSON.parse(json.stdout)).toMatchObject({ alive: true, ready: false, notReadyReason: 'shutting_down', routes: null, peers: null });
      await node.replica.close();
      await Promise.all([stopped, pending]);
    } finally {
      for (const socket of held) socket.destroy();
      await new Promise<void>((resolve) => silent.close(() => resolve()));
    }
  });

  it('routes: an aligned table, sorted, tokens never shown; --json is the API answer', async () => {
    const node = await startReplica();
    started.push(node);
    await putRoute(node.api, makeRoute({ namespace: 'team-b', name: 'zeta', id: 'sb-zeta', resourceVersion: '42', ip: '10.1.0.9', accessToken: SECRET, requireTrafficAuth: true }));
    await putRoute(node.api, makeRoute({ namespace: 'team-a', name: 'alpha', id: 'sb-alpha', resourceVersion: '7', ip: '', state: 'creating', owner: 'ops' }));
    const run = await ctl(['routes', '--api', hostPort(node.api)]);
    expect(run.code).toBe(EXIT_OK);
    const lines = run.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^NAMESPACE\s+NAME\s+ID\s+STATE\s+IP\s+VERSION\s+OWNER\s+AUTH$/);
    expect(lines[1]).toMatch(/^team-a\s+alpha\s+sb-alpha\s+creating\s+-\s+7\s+ops\s+-$/);
    expect(lines[2]).toMatch(/^team-b\s+zeta\s+sb-zeta\s+Running\s+10\.1\.0\.9\s+42\s+-\s+token$/);
    // Columns line up: each column starts at the same offset on every row.
    expect(lines[1]!.indexOf('sb-alpha')).toBe(lines[0]!.indexOf('ID'));
    expect(lines[2]!.indexOf('sb-zeta')).toBe(lines[0]!.indexOf('ID'));
    expect(lines.at(-1)).toBe('2 routes, 0 deletion fences');
    expect(run.stdout).not.toContain(SECRET);

    const filtered = await ctl(['routes', '--api', hostPort(node.api), '--namespace', 'team-b', '--json']);
    const body = JSON.parse(filtered.stdout);
    expect(body.count).toBe(1);
    expect(body.routes[0]).toMatchObject({ id: 'sb-zeta', hasAccessToken: true });
    expect(filtered.stdout).not.toContain(SECRET);
  });

  it('peers: health, ejection, outbox and last failure of each peer', async () => {
    const node = await startReplica({ ROUTESYNC_EJECT_AFTER_FAILURES: '1', ROUTESYNC_SYNC_RETRIES: '0', ROUTESYNC_SYNC_DEADLINE_MS: '1000' });
    const other = await startReplica();
    started.push(node, other);
    const dead = `127.0.0.1:${await closedPort()}`;
    node.replica.sync.setPeers([other.replica.addresses.peer, dead]);
    await putRoute(node.api, makeRoute());
    await waitUntil(() => node.replica.sync.status().some((p) => p.peer === dead && p.ejected), 10_000, 'the dead peer to be ejected');

    const run = await ctl(['peers', '--api', hostPort(node.api)]);
    expect(run.code).toBe(EXIT_OK);
    const lines = run.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(/^PEER\s+REACHABLE\s+EJECTED\s+FAILURES\s+OUTBOX\s+LAST SUCCESS\s+LAST FAILURE\s+LAST RECONCILE$/);
    const good = lines.find((line) => line.startsWith(other.replica.addresses.peer));
    const bad = lines.find((line) => line.startsWith(dead));
    expect(good).toMatch(/\s+yes\s+no\s+0\s+0\s+\d+(ms|s) ago\s+-\s+/);
    expect(bad).toMatch(/\s+no\s+yes, until (now|in \d+(ms|s))\s+[1-9]\d*\s+1\s+never\s+refused \d+(ms|s) ago\s+/);
    expect(lines.at(-1)).toBe('2 peers');

    const json = JSON.parse((await ctl(['peers', '--json', '--api', hostPort(node.api)])).stdout);
    expect(json.peers.find((p: any) => p.peer === dead)).toMatchObject({ ejected: true, reachable: false, pendingRoutes: 1 });
  });

  it('peers: a peer nothing was pushed to shows its failed reconcile rounds in LAST RECONCILE', async () => {
    const node = await startReplica({ ROUTESYNC_RECONCILE_INTERVAL_MS: '100' });
    started.push(node);
    const dead = `127.0.0.1:${await closedPort()}`;
    node.replica.sync.setPeers([dead]);
    await waitUntil(() => node.replica.sync.status()[0]?.lastReconcileFailure != null, 10_000, 'a failed round');
    const run = await ctl(['peers', '--api', hostPort(node.api)]);
    expect(run.stdout.split('\n').find((line) => line.startsWith(dead))).toMatch(/\s+no\s+no\s+0\s+0\s+never\s+-\s+failed: refused (now|\d+(ms|s) ago)$/);
  });

  it('exit 3 with one line when the replica is unreachable; exit 2 on a usage error', async () => {
    const port = await closedPort();
    const unreachable = await ctl(['routes', '--api', `127.0.0.1:${port}`]);
    expect(unreachable.code).toBe(EXIT_UNREACHABLE);
    expect(unreachable.stdout).toBe('');
    expect(unreachable.stderr).toMatch(new RegExp(`^routesync ctl: http://127\\.0\\.0\\.1:${port}/v1/routes: unreachable \\(ECONNREFUSED\\)\\n$`));

    const timeouts = ['0', '1.5', '3000000000', '99999999999999999999'].map((value) => ['status', '--timeout-ms', value]);
    for (const args of [[], ['bogus'], ['diff', '127.0.0.1:1'], ['routes', '--api', 'no-port'], ['routes', '--frobnicate'], ['status', 'extra'], ...timeouts]) {
      const run = await ctl(args);
      expect(run.code, args.join(' ')).toBe(EXIT_USAGE);
      expect(run.stderr, args.join(' ')).toContain('routesync ctl --help');
    }
    const help = await ctl(['--help']);
    expect(help.code).toBe(EXIT_OK);
    for (const command of ['status', 'routes', 'peers', 'diff']) expect(help.stdout).toContain(`  ${command}`);
  });

  it('an address with credentials is a usage error whose line never repeats them (a password alone included)', async () => {
    const port = await closedPort();
    for (const address of [`http://admin:s3cret@127.0.0.1:${port}`, `http://:s3cret@127.0.0.1:${port}`]) {
      for (const args of [['routes', '--api', address], ['diff', address, `127.0.0.1:${port}`]]) {
        const run = await ctl(args);
        expect(run.code, args.join(' ')).toBe(EXIT_USAGE);
        expect(run.stderr, args.join(' ')).toContain('without a path, query or credentials');
        expect(run.stderr, args.join(' ')).not.toContain('s3cret');
      }
    }
  });

  it('runs as `routesync ctl` in a real process, with its exit code', async () => {
    const node = await startReplica();
    started.push(node);
    await putRoute(node.api, makeRoute({ id: 'sb-subprocess' }));
    const child = spawn(process.execPath, ['--import', 'tsx', MAIN, 'ctl', 'routes', '--json', '--api', hostPort(node.api)], {
      env: { PATH: process.env.PATH ?? '' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    const [code] = (await once(child, 'exit')) as [number];
    expect(code).toBe(0);
    expect(JSON.parse(stdout).routes.map((r: any) => r.id)).toEqual(['sb-subprocess']);

    const port = await closedPort();
    const failing = spawn(process.execPath, ['--import', 'tsx', MAIN, 'ctl', 'status', '--api', `127.0.0.1:${port}`, '--peer', `127.0.0.1:${port}`], {
      env: { PATH: process.env.PATH ?? '' },
      stdio: 'ignore',
    });
    expect((await once(failing, 'exit'))[0]).toBe(EXIT_UNREACHABLE);
  });

  it('formatTable pads every column but the last to its widest cell', () => {
    expect(formatTable(['A', 'LONG HEADER', 'C'], [['xxxx', 'y', 'z'], ['', '', 'last']])).toBe('A     LONG HEADER  C\nxxxx  y            z\n                   last\n');
  });
});

describe('routesync ctl diff', () => {
  let a: TestReplica;
  let b: TestReplica;
  let tokenFile: string;

  beforeAll(async () => {
    // Reconciliation stays out of the way (one round an hour, which the 7-day fence TTL allows),
    // so the differences made below last.
    [a, b] = (await startCluster(2, { ROUTESYNC_PEER_TOKEN: TOKEN, ROUTESYNC_RECONCILE_INTERVAL_MS: '3600000', ROUTESYNC_TOMBSTONE_TTL_MS: '604800000' })) as [TestReplica, TestReplica];
    tokenFile = join(mkdtempSync(join(tmpdir(), 'routesync-ctl-')), 'token');
    writeFileSync(tokenFile, `${TOKEN}\n`);
  });
  afterAll(async () => {
    await stopAll([a, b]);
  });

  it('reports identical tables with exit 0, and every kind of difference with exit 1', async () => {
    for (let i = 0; i < 20; i++) {
      expect((await putRoute(a.api, makeRoute({ name: `shared-${i}`, id: `sb-shared-${i}`, resourceVersion: '5', accessToken: SECRET }))).body.sync.acked).toBe(1);
    }
    const same = await ctl(['diff', hostPort(a.peerUrl), hostPort(b.peerUrl), '--token-file', tokenFile]);
    expect(same.stderr).toBe('');
    expect(same.code).toBe(EXIT_OK);
    expect(same.stdout).toContain('The tables are identical in routes and versions');
    const full = await ctl(['diff', '--full', hostPort(a.peerUrl), hostPort(b.peerUrl), '--token-file', tokenFile]);
    expect(full.code).toBe(EXIT_OK);
    expect(full.stdout).toContain('The tables are identical.');
    expect(same.stdout).toMatch(/^A\s+http:\/\/127\.0\.0\.1:\d+\s+[0-9a-f-]{36}\s+20\s+0\s+no\s+\S+$/m);

    // Make each kind of difference on one side only, behind the fan-out's back.
    a.replica.table.apply(parseChange(makeRoute({ name: 'only-a', id: 'sb-only-a', resourceVersion: '3' })));
    b.replica.table.apply(parseChange(makeRoute({ name: 'only-b', id: 'sb-only-b', resourceVersion: '4', accessToken: SECRET })));
    b.replica.table.apply(parseChange(makeRoute({ name: 'shared-3', id: 'sb-shared-3', resourceVersion: '6', ip: '10.9.9.9' })));
    a.replica.table.apply(parseChange({ namespace: 'default', name: 'shared-7', resourceVersion: '5', state: 'dead' }));

    const run = await ctl(['diff', hostPort(a.peerUrl), b.peerUrl], { ROUTESYNC_PEER_TOKEN: TOKEN });
    expect(run.stderr).toBe('');
    expect(run.code).toBe(EXIT_DIFFERENT);
    const rows = run.stdout.split('\n');
    expect(rows.find((line) => line.includes('default/only-a'))).toMatch(/^only-in-a\s+default\/only-a\s+v3 Running 10\.0\.0\.1\s+-$/);
    expect(rows.find((line) => line.includes('default/only-b'))).toMatch(/^only-in-b\s+default\/only-b\s+-\s+v4 Running 10\.0\.0\.1$/);
    expect(rows.find((line) => line.includes('default/shared-3'))).toMatch(/^different-version\s+default\/shared-3\s+v5 Running 10\.0\.0\.1\s+v6 Running 10\.9\.9\.9$/);
    expect(rows.find((line) => line.includes('default/shared-7'))).toMatch(/^different-version\s+default\/shared-7\s+v5 deleted\s+v5 Running/);
    expect(run.stdout).toContain('4 routes differ');
    for (const text of [run.stdout, run.stderr]) {
      expect(text).not.toContain(TOKEN);
      expect(text).not.toContain(SECRET);
    }

    const json = JSON.parse((await ctl(['diff', '--json', '--peer', a.peerUrl, '--peer', b.peerUrl, '--token-file', tokenFile])).stdout);
    expect(json.same).toBe(false);
    expect(json.differences.map((d: any) => [d.kind, d.key])).toEqual([
      ['only_in_a', 'default/only-a'],
      ['only_in_b', 'default/only-b'],
      ['different_version', 'default/shared-3'],
      ['different_version', 'default/shared-7'],
    ]);
    // Only the buckets that differ were pulled: at most one per differing route.
    expect(json.differingBuckets.length).toBeGreaterThan(0);
    expect(json.differingBuckets.length).toBeLessThanOrEqual(4);
    expect(json.differingBuckets.length).toBeLessThan(json.a.buckets);
  });

  it('finds a route held at the same version with different content on each side (the digests, which hold versions only, match)', async () => {
    // Two writers at one resourceVersion (a manager bug, a split brain): each replica keeps the
    // first it saw, reconciliation cannot tell them apart, and diff is how an operator finds it.
    const [a, b] = (await startCluster(2, { ROUTESYNC_PEER_TOKEN: TOKEN, ROUTESYNC_RECONCILE_INTERVAL_MS: '3600000', ROUTESYNC_TOMBSTONE_TTL_MS: '604800000' })) as [TestReplica, TestReplica];
    started.push(a, b);
    a.replica.table.apply(parseChange(makeRoute({ name: 'split', id: 'sb-split', resourceVersion: '9', ip: '10.0.0.1' })));
    b.replica.table.apply(parseChange(makeRoute({ name: 'split', id: 'sb-split', resourceVersion: '9', ip: '10.0.0.2' })));
    expect(a.replica.table.rootDigest()).toBe(b.replica.table.rootDigest());
    // Without --full only the digests are compared, and the answer says what that covers.
    const quick = await ctl(['diff', hostPort(a.peerUrl), hostPort(b.peerUrl), '--token-file', tokenFile]);
    expect(quick.code).toBe(EXIT_OK);
    expect(quick.stdout).toContain('The tables are identical in routes and versions (--full compares their contents too).');
    const run = await ctl(['diff', '--full', '--json', hostPort(a.peerUrl), hostPort(b.peerUrl), '--token-file', tokenFile]);
    expect(run.stderr).toBe('');
    expect(run.code).toBe(EXIT_DIFFERENT);
    const json = JSON.parse(run.stdout);
    expect(json.same).toBe(false);
    expect(json.differences.find((d: any) => d.key === 'default/split')).toMatchObject({ kind: 'different_content', a: { ip: '10.0.0.1' }, b: { ip: '10.0.0.2' } });
    const text = await ctl(['diff', '--full', hostPort(a.peerUrl), hostPort(b.peerUrl), '--token-file', tokenFile]);
    expect(text.code).toBe(EXIT_DIFFERENT);
    expect(text.stdout.split('\n').find((line) => line.includes('default/split'))).toMatch(/^different-content\s+default\/split\s+v9 Running 10\.0\.0\.1\s+v9 Running 10\.0\.0\.2$/);
  });

  it('reads ROUTESYNC_PEER_TOKEN as the replica does: a Secret value ending in a newline authenticates', async () => {
    // Inside the sidecar (kubectl exec) ctl sees the replica's own variable, newline included.
    const run = await ctl(['diff', hostPort(a.peerUrl), hostPort(b.peerUrl)], { ROUTESYNC_PEER_TOKEN: ` ${TOKEN}\n` });
    expect(run.stderr).toBe('');
    expect([EXIT_OK, EXIT_DIFFERENT]).toContain(run.code);
  });

  it('a token that cannot be sent in a header is a usage error (exit 2) naming its source, not "unreachable"', async () => {
    const fromEnv = await ctl(['diff', hostPort(a.peerUrl), hostPort(b.peerUrl)], { ROUTESYNC_PEER_TOKEN: 'ctl-two\nlines-SECRET' });
    expect(fromEnv.code).toBe(EXIT_USAGE);
    expect(fromEnv.stderr).toMatch(/^routesync ctl: invalid ROUTESYNC_PEER_TOKEN: the token may hold only visible ASCII/);
    const badFile = join(mkdtempSync(join(tmpdir(), 'routesync-ctl-')), 'token');
    writeFileSync(badFile, 'ctl-pass\u20acphrase-SECRET\n');
    const fromFile = await ctl(['diff', hostPort(a.peerUrl), hostPort(b.peerUrl), '--token-file', badFile]);
    expect(fromFile.code).toBe(EXIT_USAGE);
    expect(fromFile.stderr).toMatch(/^routesync ctl: invalid --token-file: /);
    for (const text of [fromEnv.stderr, fromFile.stderr]) expect(text).not.toContain('SECRET');
  });

  it('without the peer token: exit 3 and a line that names the token, not its value', async () => {
    const run = await ctl(['diff', hostPort(a.peerUrl), hostPort(b.peerUrl)], {});
    expect(run.code).toBe(EXIT_UNREACHABLE);
    expect(run.stderr).toMatch(/401 unauthorized: no peer token set \(set ROUTESYNC_PEER_TOKEN or --token-file\)/);
    const wrong = await ctl(['diff', hostPort(a.peerUrl), hostPort(b.peerUrl)], { ROUTESYNC_PEER_TOKEN: 'not-the-fleet-token' });
    expect(wrong.code).toBe(EXIT_UNREACHABLE);
    expect(wrong.stderr).toMatch(/401 unauthorized: the peer token was refused/);
    expect(wrong.stderr).not.toContain('not-the-fleet-token');
    // A local-API command pointed at the peer port by mistake is told so, not to set a token.
    const misdirected = await ctl(['routes', '--api', hostPort(a.peerUrl)], {});
    expect(misdirected.code).toBe(EXIT_UNREACHABLE);
    expect(misdirected.stderr).toMatch(/401 unauthorized: the local API takes no token: this address is a peer listener/);
  });
});
