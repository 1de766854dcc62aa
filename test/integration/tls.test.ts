// TLS and mTLS on the peer API and the peer client, with a CA and certificates this test makes
// with the openssl CLI in a temporary directory (SANs for 127.0.0.1).
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { existsSync, mkdtempSync, readFileSync as readFile, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Agent, request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, configFromEnv, readPeerTls } from '../../src/config.js';
import { EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, runCtl } from '../../src/ctl.js';
import { makeRoute, putRoute, startCluster, stopAll, type TestReplica } from '../helpers/cluster.js';
import { spawnReplica } from '../helpers/process.js';
import { waitUntil } from '../helpers/wait.js';

const OPENSSL = existsSync('/usr/bin/openssl') ? '/usr/bin/openssl' : 'openssl';
const hasOpenssl = (() => {
  try {
    execFileSync(OPENSSL, ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();
if (!hasOpenssl) console.warn('tls.test.ts: SKIPPED, the openssl CLI is not installed (it makes the test certificates)');

interface Pki {
  dir: string;
  /** CA certificate, and a leaf (server + client usage, SAN 127.0.0.1) that CA signed. */
  ca: string;
  cert: string;
  key: string;
  /** A second CA and a leaf it signed: trusted by nobody in the cluster. */
  otherCa: string;
  otherCert: string;
  otherKey: string;
}

function openssl(dir: string, args: string[]): void {
  execFileSync(OPENSSL, args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

function makeCa(dir: string, name: string): void {
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(dir, ['req', '-x509', ...ec, '-keyout', `${name}-ca.key`, '-out', `${name}-ca.crt`, '-days', '2', '-subj', `/CN=${name} test CA`]);
}

function makeLeaf(dir: string, caName: string, leaf: string): void {
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(dir, ['req', ...ec, '-keyout', `${leaf}.key`, '-out', `${leaf}.csr`, '-subj', `/CN=${leaf}`]);
  writeFileSync(join(dir, `${leaf}.ext`), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n');
  openssl(dir, [
    'x509', '-req', '-in', `${leaf}.csr`, '-CA', `${caName}-ca.crt`, '-CAkey', `${caName}-ca.key`, '-CAcreateserial',
    '-out', `${leaf}.crt`, '-days', '2', '-extfile', `${leaf}.ext`,
  ]);
}

function makePki(): Pki {
  const dir = mkdtempSync(join(tmpdir(), 'routesync-tls-'));
  makeCa(dir, 'cluster');
  makeLeaf(dir, 'cluster', 'replica');
  makeCa(dir, 'other');
  makeLeaf(dir, 'other', 'intruder');
  return {
    dir,
    ca: join(dir, 'cluster-ca.crt'),
    cert: join(dir, 'replica.crt'),
    key: join(dir, 'replica.key'),
    otherCa: join(dir, 'other-ca.crt'),
    otherCert: join(dir, 'intruder.crt'),
    otherKey: join(dir, 'intruder.key'),
  };
}

describe.skipIf(!hasOpenssl)('peer TLS', () => {
  let pki: Pki;
  let cluster: TestReplica[] = [];
  const agents: Agent[] = [];

  beforeAll(async () => {
    pki = makePki();
    cluster = await startCluster(2, {
      ROUTESYNC_PEER_TLS_CERT: pki.cert,
      ROUTESYNC_PEER_TLS_KEY: pki.key,
      ROUTESYNC_PEER_TLS_CA: pki.ca,
    });
  });
  afterAll(async () => {
    await stopAll(cluster);
    await Promise.all(agents.map((agent) => agent.close()));
    if (pki) rmSync(pki.dir, { recursive: true, force: true });
  });

  function agent(connect: Agent.Options['connect']): Agent {
    const made = new Agent(connect ? { connect } : {});
    agents.push(made);
    return made;
  }

  it('two replicas sync over mutual TLS: the peer URL is https and a route put on one reaches the other', async () => {
    const [a, b] = cluster as [TestReplica, TestReplica];
    expect(b.peerUrl.startsWith('https://')).toBe(true);
    const route = makeRoute({ accessToken: 'tls-route-token' });
    const { status, body } = await putRoute(a.api, route);
    expect(status).toBe(200);
    expect(body.sync).toMatchObject({ acked: 1 });
    expect(b.replica.table.get('default', route.name as string)?.ip).toBe('10.0.0.1');
    // Reconciliation travels the same way: B's digest, asked over mTLS, matches A's table.
    const digest = (await a.replica.client.requestJson(b.replica.addresses.peer, 'GET', '/v1/peer/digest?root=1', undefined, AbortSignal.timeout(5000))) as { root: string };
    expect(digest.root).toBe(a.replica.table.rootDigest());
  });

  it('refuses a plain-HTTP client: no HTTP answer comes back from the TLS listener', async () => {
    const b = cluster[1]!;
    const before = b.replica.table.rootDigest();
    await expect(fetch(`http://${b.replica.addresses.peer}/v1/peer/routes`, { method: 'POST', body: JSON.stringify({ routes: [makeRoute()] }) })).rejects.toThrow();
    expect(b.replica.table.rootDigest()).toBe(before);
  });

  it('refuses a client whose certificate another CA signed, and one with no certificate, on everything but probes and metrics', async () => {
    const b = cluster[1]!;
    const before = b.replica.table.rootDigest();
    const push = JSON.stringify({ routes: [makeRoute()] });
    const intruder = agent({ ca: readFile(pki.ca), cert: readFile(pki.otherCert), key: readFile(pki.otherKey) });
    const anonymous = agent({ ca: readFile(pki.ca) });
    // Each 403 closes the connection (the body was not read), so the anonymous client's later
    // requests resume its TLS session: Node then reports `authorized` without a certificate,
    // which the listener must not trust.
    for (const dispatcher of [intruder, anonymous]) {
      for (const [method, path] of [['POST', '/v1/peer/routes'], ['POST', '/refresh'], ['GET', '/v1/peer/digest'], ['POST', '/v1/peer/pull']] as const) {
        const response = await request(`${b.peerUrl}${path}`, { method, body: method === 'POST' ? push : undefined, dispatcher });
        expect(response.statusCode, `${method} ${path}`).toBe(403);
        expect(((await response.body.json()) as { error: { code: string } }).error.code).toBe('client_certificate_required');
      }
      const health = await request(`${b.peerUrl}/healthz`, { dispatcher });
      expect(health.statusCode).toBe(200);
      await health.body.dump();
    }
    expect(b.replica.table.rootDigest()).toBe(before);
    // The cluster's own certificate is accepted by the same listener.
    const member = agent({ ca: readFile(pki.ca), cert: readFile(pki.cert), key: readFile(pki.key) });
    const ok = await request(`${b.peerUrl}/v1/peer/digest?root=1`, { dispatcher: member });
    expect(ok.statusCode).toBe(200);
    await ok.body.dump();
  });

  it('a replica refuses a peer whose server certificate its CA did not sign', async () => {
    const [a] = cluster as [TestReplica];
    const rogue = await startCluster(1, {
      ROUTESYNC_PEER_TLS_CERT: pki.otherCert,
      ROUTESYNC_PEER_TLS_KEY: pki.otherKey,
      ROUTESYNC_PEER_TLS_CA: pki.otherCa,
    });
    try {
      const rogueAddress = rogue[0]!.replica.addresses.peer;
      await expect(a.replica.client.requestJson(rogueAddress, 'GET', '/v1/peer/digest', undefined, AbortSignal.timeout(5000))).rejects.toMatchObject({
        errorClass: 'protocol',
      });
    } finally {
      await stopAll(rogue);
    }
  });

  it('keeps the changes for a peer whose certificate its CA did not sign, as for a 401: the fleet\'s configuration, fixed by a rollout', async () => {
    // A replica of its own (the file's cluster must keep identical tables), and a peer whose
    // certificate comes from another CA.
    const [a] = (await startCluster(1, { ROUTESYNC_PEER_TLS_CERT: pki.cert, ROUTESYNC_PEER_TLS_KEY: pki.key, ROUTESYNC_PEER_TLS_CA: pki.ca })) as [TestReplica];
    const rogue = await startCluster(1, { ROUTESYNC_PEER_TLS_CERT: pki.otherCert, ROUTESYNC_PEER_TLS_KEY: pki.otherKey, ROUTESYNC_PEER_TLS_CA: pki.otherCa });
    try {
      a.replica.sync.setPeers([rogue[0]!.replica.addresses.peer]);
      const put = await putRoute(a.api, makeRoute());
      expect([...put.body.sync.failed, ...put.body.sync.pending]).toHaveLength(1);
      await waitUntil(() => a.replica.sync.status()[0]?.lastFailure?.errorClass === 'protocol', 10_000, 'the failed handshake');
      // Still queued, not dropped like a garbled answer; and it counts toward ejecting the peer.
      expect(a.replica.sync.status()[0]).toMatchObject({ pendingRoutes: 1 });
      expect(a.replica.sync.status()[0]!.consecutiveFailures).toBeGreaterThanOrEqual(1);
    } finally {
      await stopAll([a, ...rogue]);
    }
  });

  it('a TLS failure that is not one of the few codes named is still a permanent protocol failure, not "unknown"', async () => {
    const [a] = cluster as [TestReplica];
    // A peer still on plain HTTP (a rollout that turns TLS on): the handshake reads an HTTP answer.
    const plain = createHttpServer((_req, res) => res.end('{}'));
    // A peer whose chain runs through an intermediate to a root this replica does not trust.
    makeCa(pki.dir, 'root2');
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
    openssl(pki.dir, ['req', ...ec, '-keyout', 'inter-ca.key', '-out', 'inter-ca.csr', '-subj', '/CN=root2 intermediate']);
    writeFileSync(join(pki.dir, 'inter-ca.ext'), 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n');
    openssl(pki.dir, ['x509', '-req', '-in', 'inter-ca.csr', '-CA', 'root2-ca.crt', '-CAkey', 'root2-ca.key', '-CAcreateserial', '-out', 'inter-ca.crt', '-days', '2', '-extfile', 'inter-ca.ext']);
    makeLeaf(pki.dir, 'inter', 'chained');
    const chained = createHttpsServer(
      { cert: Buffer.concat([readFile(join(pki.dir, 'chained.crt')), readFile(join(pki.dir, 'inter-ca.crt'))]), key: readFile(join(pki.dir, 'chained.key')) },
      (_req, res) => res.end('{}'),
    );
    try {
      for (const server of [plain, chained]) {
        server.listen(0, '127.0.0.1');
        await once(server, 'listening');
        const address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
        await expect(a.replica.client.requestJson(address, 'GET', '/v1/peer/digest', undefined, AbortSignal.timeout(5000))).rejects.toMatchObject({
          errorClass: 'protocol',
        });
      }
    } finally {
      for (const server of [plain, chained]) server.closeAllConnections?.();
      await Promise.all([plain, chained].map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
    }
  });

  it('routesync ctl diff talks to mTLS peers with the cluster CA and a client certificate, from flags or the replica\'s own variables', async () => {
    const [a, b] = cluster as [TestReplica, TestReplica];
    const ctl = async (args: string[], env: NodeJS.ProcessEnv = {}) => {
      let stdout = '';
      let stderr = '';
      const code = await runCtl(args, { stdout: (text) => (stdout += text), stderr: (text) => (stderr += text), env });
      return { code, stdout, stderr };
    };
    const diff = ['diff', a.peerUrl, b.peerUrl];
    const withFlags = await ctl([...diff, '--ca', pki.ca, '--cert', pki.cert, '--key', pki.key]);
    expect(withFlags.stderr).toBe('');
    expect(withFlags.code).toBe(EXIT_OK);
    expect(withFlags.stdout).toContain('The tables are identical in routes and versions');
    const replicaEnv = { ROUTESYNC_PEER_TLS_CA: pki.ca, ROUTESYNC_PEER_TLS_CERT: pki.cert, ROUTESYNC_PEER_TLS_KEY: pki.key };
    const fromEnv = await ctl(diff, replicaEnv);
    expect(fromEnv.code).toBe(EXIT_OK);
    // Beside a replica (kubectl exec, its variables at hand), an address without a scheme is https.
    const bare = (url: string) => url.replace(/^https:\/\//, '');
    const bareDiff = await ctl(['diff', bare(a.peerUrl), bare(b.peerUrl)], replicaEnv);
    expect(bareDiff.stderr).toBe('');
    expect(bareDiff.code).toBe(EXIT_OK);
    const status = await ctl(['status', '--api', a.api.replace(/^http:\/\//, ''), '--peer', bare(a.peerUrl)], replicaEnv);
    expect(status.stderr).toBe('');
    expect(status.code).toBe(EXIT_OK);
    // Without a client certificate the listener refuses, and ctl says why.
    const anonymous = await ctl([...diff, '--ca', pki.ca]);
    expect(anonymous.code).toBe(EXIT_UNREACHABLE);
    expect(anonymous.stderr).toContain('403 client_certificate_required');
    const halfPair = await ctl([...diff, '--ca', pki.ca, '--cert', pki.cert]);
    expect(halfPair.code).toBe(EXIT_USAGE);
    expect(halfPair.stderr).toContain('--cert and --key go together');
  });

  it('bad TLS files give a one-line configuration error naming the variable', () => {
    const garbage = join(pki.dir, 'garbage.pem');
    writeFileSync(garbage, 'not a certificate\n');
    const cases: [Record<string, string>, string][] = [
      [{ ROUTESYNC_PEER_TLS_CERT: join(pki.dir, 'missing.crt'), ROUTESYNC_PEER_TLS_KEY: pki.key }, 'ROUTESYNC_PEER_TLS_CERT'],
      [{ ROUTESYNC_PEER_TLS_CERT: garbage, ROUTESYNC_PEER_TLS_KEY: pki.key }, 'ROUTESYNC_PEER_TLS_CERT'],
      [{ ROUTESYNC_PEER_TLS_CERT: pki.cert, ROUTESYNC_PEER_TLS_KEY: garbage }, 'ROUTESYNC_PEER_TLS_KEY'],
      // A key that is valid but belongs to another certificate.
      [{ ROUTESYNC_PEER_TLS_CERT: pki.cert, ROUTESYNC_PEER_TLS_KEY: pki.otherKey }, 'ROUTESYNC_PEER_TLS_KEY'],
      [{ ROUTESYNC_PEER_TLS_CERT: pki.cert, ROUTESYNC_PEER_TLS_KEY: pki.key, ROUTESYNC_PEER_TLS_CA: garbage }, 'ROUTESYNC_PEER_TLS_CA'],
    ];
    for (const [env, variable] of cases) {
      let caught: unknown;
      try {
        readPeerTls(configFromEnv(env));
      } catch (error) {
        caught = error;
      }
      expect(caught, variable).toBeInstanceOf(ConfigError);
      const message = (caught as ConfigError).message;
      expect(message.startsWith(`invalid ${variable}:`), message).toBe(true);
      expect(message).not.toContain('\n');
    }
  });

  it('the process stops at start with exit 2 and that one line', async () => {
    const child = spawnReplica({
      ROUTESYNC_API_ADDR: '127.0.0.1:0',
      ROUTESYNC_PEER_ADDR: '127.0.0.1:0',
      ROUTESYNC_PROXY_ADDR: '127.0.0.1:0',
      ROUTESYNC_PEER_TLS_CERT: join(pki.dir, 'missing.crt'),
      ROUTESYNC_PEER_TLS_KEY: pki.key,
    });
    expect(await child.exited).toBe(2);
    await waitUntil(() => child.stderr.length > 0, 5000, 'the error line');
    expect(child.stderr).toHaveLength(1);
    expect(child.stderr[0]).toMatch(/^routesync: invalid ROUTESYNC_PEER_TLS_CERT: cannot read ".*missing\.crt" \(ENOENT\)$/);
  });
});

describe.skipIf(!hasOpenssl)('peer TLS rotation', () => {
  let pki: Pki;
  let cluster: TestReplica[] = [];
  const agents: Agent[] = [];
  afterAll(async () => {
    await stopAll(cluster);
    await Promise.all(agents.map((made) => made.close()));
    if (pki) rmSync(pki.dir, { recursive: true, force: true });
  });

  async function counter(node: TestReplica, outcome: string): Promise<number> {
    const { values } = await node.replica.metrics.peerTlsReloads.get();
    return values.find((value) => value.labels.outcome === outcome)?.value ?? 0;
  }

  async function digestStatus(node: TestReplica, tls: { ca: string; cert: string; key: string }): Promise<number | string> {
    const dispatcher = new Agent({ connect: { ca: readFile(tls.ca), cert: readFile(tls.cert), key: readFile(tls.key) } });
    agents.push(dispatcher);
    try {
      const response = await request(`${node.peerUrl}/v1/peer/digest?root=1`, { dispatcher, signal: AbortSignal.timeout(5000) });
      await response.body.dump();
      return response.statusCode;
    } catch (error) {
      return (error as { code?: string }).code ?? 'error';
    }
  }

  it('picks up a rotated certificate, key and CA from the same files without a restart; a half-written rotation keeps the material in use', async () => {
    pki = makePki();
    makeCa(pki.dir, 'next');
    makeLeaf(pki.dir, 'next', 'rotated');
    const next = { ca: join(pki.dir, 'next-ca.crt'), cert: join(pki.dir, 'rotated.crt'), key: join(pki.dir, 'rotated.key') };
    // The files the replicas read, as a mounted Secret: the cluster CA's material first.
    const live = { ca: join(pki.dir, 'live-ca.crt'), cert: join(pki.dir, 'live.crt'), key: join(pki.dir, 'live.key') };
    const install = (from: { ca?: string; cert?: string; key?: string }) => {
      for (const part of ['ca', 'cert', 'key'] as const) if (from[part]) writeFileSync(live[part], readFile(from[part]!));
    };
    install({ ca: pki.ca, cert: pki.cert, key: pki.key });
    cluster = await startCluster(2, {
      ROUTESYNC_PEER_TLS_CERT: live.cert,
      ROUTESYNC_PEER_TLS_KEY: live.key,
      ROUTESYNC_PEER_TLS_CA: live.ca,
      ROUTESYNC_PEER_TLS_RELOAD_MS: '50',
    });
    const [a, b] = cluster as [TestReplica, TestReplica];
    expect((await putRoute(a.api, makeRoute())).body.sync.acked).toBe(1);
    const expiryBefore = (await a.replica.metrics.peerTlsCertExpiry.get()).values[0]?.value;
    expect(expiryBefore).toBeGreaterThan(Date.now() / 1000);
    expect(await a.replica.metrics.registry.metrics()).toMatch(/^routesync_peer_tls_cert_expiry_timestamp_seconds \d+$/m);

    // Half a rotation: the new certificate has landed, its key not yet. Kept, and said once.
    install({ cert: next.cert });
    await waitUntil(async () => (await counter(a, 'failed')) >= 3 && (await counter(b, 'failed')) >= 3, 5000, 'failed re-reads on both');
    expect(a.logs.lines.filter((line) => line.includes('peer TLS files are not usable')).length).toBe(1);
    expect(await digestStatus(b, { ca: pki.ca, cert: pki.cert, key: pki.key }), 'b still serves the old certificate').toBe(200);
    expect((await putRoute(a.api, makeRoute())).body.sync.acked).toBe(1);

    // The whole rotation, to a new CA: both replicas serve, trust and present the new material.
    install(next);
    await waitUntil(async () => (await counter(a, 'applied')) === 1 && (await counter(b, 'applied')) === 1, 5000, 'the rotation applied on both');
    expect(a.logs.lines.some((line) => line.includes('peer TLS material reloaded'))).toBe(true);
    expect(await digestStatus(b, next), 'a client of the new CA').toBe(200);
    expect(await digestStatus(b, { ca: pki.ca, cert: pki.cert, key: pki.key }), 'a client of the old CA no longer trusts b').not.toBe(200);
    // A's connections opened from now on dial with the new material (B asks for a certificate
    // its new CA signed, and shows one only that CA verifies).
    b.replica.peerServer.closeAllConnections();
    expect((await putRoute(a.api, makeRoute())).body.sync).toMatchObject({ acked: 1, failed: [] });
    expect(await counter(a, 'applied'), 'applied once: unchanged files are not applied again').toBe(1);
  });
});
