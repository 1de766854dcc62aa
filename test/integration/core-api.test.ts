// The local and peer APIs: status codes, validation, redaction, auth (SPEC §3).
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { PUSH_MAX_ROUTES } from '../../src/config.js';
import { parseRoute, type Route } from '../../src/routes/route.js';
import { makeRoute, putRoute, startCluster, startReplica, stopAll, type TestReplica } from '../helpers/cluster.js';
import { unusedPort } from '../helpers/upstream.js';
import { waitUntil } from '../helpers/wait.js';

const replicas: TestReplica[] = [];
const sockets: net.Socket[] = [];
async function replica(env: Record<string, string> = {}): Promise<TestReplica> {
  const node = await startReplica(env);
  replicas.push(node);
  return node;
}
afterEach(async () => {
  for (const socket of sockets.splice(0)) socket.destroy();
  await stopAll(replicas.splice(0));
});

async function send(url: string, init: RequestInit = {}): Promise<{ status: number; body: any; headers: Headers }> {
  const response = await fetch(url, init);
  const text = await response.text();
  let body: unknown = text;
  try {
    body = text === '' ? undefined : JSON.parse(text);
  } catch {
    // not JSON: keep the text
  }
  return { status: response.status, body, headers: response.headers };
}

const json = { 'content-type': 'application/json' };

describe('local API', () => {
  it('applies a route, ignores a replay or an older version, and says why', async () => {
    const node = await replica();
    const route = makeRoute({ resourceVersion: '10' });
    expect((await putRoute(node.api, route)).body.result).toMatchObject({ outcome: 'applied', reason: 'created', resourceVersion: '10' });
    expect((await putRoute(node.api, route)).body.result).toMatchObject({ outcome: 'ignored', reason: 'stale_resource_version' });
    expect((await putRoute(node.api, { ...route, resourceVersion: '9' })).body).toMatchObject({
      result: { outcome: 'ignored', reason: 'stale_resource_version' },
      sync: null,
    });
    expect((await putRoute(node.api, { ...route, resourceVersion: '11' })).body.result).toMatchObject({ outcome: 'applied', reason: 'updated' });
  });

  it('answers bad input with a clear 4xx and leaves the table unchanged', async () => {
    const node = await replica();
    const stored = makeRoute({ resourceVersion: '5' });
    await putRoute(node.api, stored);
    const before = node.replica.table.rootDigest();
    const cases: [RequestInit, number, string][] = [
      [{ method: 'PUT', headers: json, body: JSON.stringify(makeRoute({ resourceVersion: '007' })) }, 400, 'invalid_route'],
      [{ method: 'PUT', headers: json, body: JSON.stringify(makeRoute({ ip: 'not-an-ip' })) }, 400, 'invalid_route'],
      [{ method: 'PUT', headers: json, body: '{"namespace": "ns", ' }, 400, 'invalid_json'],
      [{ method: 'PUT', headers: json, body: '[1, 2]' }, 400, 'invalid_route'],
      [{ method: 'PUT', headers: json, body: '"just a string"' }, 400, 'invalid_json'],
      [{ method: 'PUT', body: JSON.stringify(makeRoute()) }, 415, 'unsupported_media_type'],
      [{ method: 'PUT', headers: { 'content-type': 'text/plain' }, body: JSON.stringify(makeRoute()) }, 415, 'unsupported_media_type'],
      [{ method: 'PUT', headers: json, body: JSON.stringify(makeRoute({ owner: 'x'.repeat(1_100_000) })) }, 413, 'body_too_large'],
      [{ method: 'POST', headers: json, body: JSON.stringify({ routes: [makeRoute(), makeRoute({ uid: 5 })] }) }, 400, 'invalid_route'],
      [{ method: 'POST', headers: json, body: JSON.stringify({ nope: [] }) }, 400, 'invalid_batch'],
      // No body, whatever the content type: 400, not a 415 telling the client to send the Content-Type it sent.
      [{ method: 'PUT', headers: json }, 400, 'invalid_json'],
      [{ method: 'POST', headers: json }, 400, 'invalid_json'],
      [{ method: 'PUT', headers: json, body: '' }, 400, 'invalid_json'],
    ];
    for (const [init, status, code] of cases) {
      const url = init.method === 'POST' ? `${node.api}/v1/routes/batch` : `${node.api}/v1/routes`;
      const response = await send(url, init);
      expect(response.status, `${init.method} ${String(init.body).slice(0, 60)}`).toBe(status);
      expect(response.body.error.code).toBe(code);
    }
    const badDelete = await send(`${node.api}/v1/routes/default/x?resourceVersion=-1`, { method: 'DELETE' });
    expect(badDelete.status).toBe(400);
    expect(badDelete.body.error).toMatchObject({ code: 'invalid_route', field: 'resourceVersion' });
    // A misspelt version is not "no version" (which deletes whatever version is stored): a delete
    // at 3 of the route stored at 5 would be ignored as stale.
    for (const query of ['resourceversion=3', 'resourceVersion[x]=3', 'resourceVersion=3&force=1']) {
      const misspelt = await send(`${node.api}/v1/routes/default/${stored.name as string}?${query}`, { method: 'DELETE' });
      expect(misspelt.status, query).toBe(400);
      expect(misspelt.body.error.code, query).toBe('invalid_query');
    }
    expect(node.replica.table.rootDigest()).toBe(before);
    expect(node.replica.table.size).toBe(1);
    const invalid = await send(`${node.api}/v1/routes`, { method: 'PUT', headers: json, body: JSON.stringify(makeRoute({ resourceVersion: '1e3' })) });
    expect(invalid.body.error).toMatchObject({ reason: 'invalid_resource_version', field: 'resourceVersion' });
  });

  it('answers a request the HTTP parser refuses (a path over 16 KiB, a malformed request line) in the APIs\' one error shape, on both listeners', async () => {
    const node = await replica();
    const raw = (base: string, request: string) =>
      new Promise<string>((resolve, reject) => {
        const { hostname, port } = new URL(base);
        const socket = net.connect(Number(port), hostname, () => socket.end(request));
        let text = '';
        socket.setEncoding('utf8').on('data', (chunk: string) => (text += chunk));
        socket.on('close', () => resolve(text)).on('error', reject);
      });
    for (const base of [node.api, node.peerUrl]) {
      const long = await raw(base, `GET /v1/routes/${'a'.repeat(20_000)} HTTP/1.1\r\nHost: x\r\n\r\n`);
      expect(long).toMatch(/^HTTP\/1\.1 431 /);
      expect(long).toMatch(/\r\ncontent-type: application\/json; charset=utf-8\r\n/);
      expect(JSON.parse(long.slice(long.indexOf('\r\n\r\n') + 4))).toMatchObject({ error: { code: 'headers_too_large' } });
      const garbled = await raw(base, 'GET / HTTP/1.1\r\nHost x\r\n\r\n');
      expect(garbled).toMatch(/^HTTP\/1\.1 400 /);
      expect(JSON.parse(garbled.slice(garbled.indexOf('\r\n\r\n') + 4))).toMatchObject({ error: { code: 'bad_request' } });
    }
  });

  it('closes a connection whose request the parser refused, so a client that keeps its side open holds no socket (which would hold a shutdown for its grace)', async () => {
    const node = await replica();
    const { hostname, port } = new URL(node.api);
    const socket = net.connect({ port: Number(port), host: hostname, allowHalfOpen: true }, () => socket.write('GET / HTTP/1.1\r\nHost x\r\n\r\n'));
    sockets.push(socket);
    socket.resume();
    await new Promise((resolve) => socket.once('end', resolve));
    const server = (node.replica as unknown as { apiServer: import('node:http').Server }).apiServer;
    const open = () => new Promise<number>((resolve, reject) => server.getConnections((error, count) => (error ? reject(error) : resolve(count))));
    await waitUntil(async () => (await open()) === 0, 10_000, 'the refused connection closed by the server');
  });

  it('refuses a body that is not valid UTF-8 instead of storing U+FFFD in place of its bytes', async () => {
    // Read leniently, two sandbox IDs that differ only in invalid bytes (0xfe, 0xff) were both
    // stored as "sb-\uFFFD": one identity then took the other's ID over, and its traffic.
    const node = await replica();
    const withByte = (route: Record<string, unknown>, byte: number): Buffer => {
      const bytes = Buffer.from(JSON.stringify(route), 'utf8');
      bytes[bytes.indexOf('@')] = byte;
      return bytes;
    };
    const cases: [string, string, Buffer][] = [
      [`${node.api}/v1/routes`, 'PUT', withByte(makeRoute({ id: 'sb-@', resourceVersion: '5' }), 0xfe)],
      [`${node.api}/v1/routes/batch`, 'POST', withByte({ routes: [makeRoute({ id: 'sb-@', resourceVersion: '6' })] }, 0xff)],
    ];
    for (const [url, method, body] of cases) {
      const response = await send(url, { method, headers: json, body });
      expect(response.status, `${method} ${url}`).toBe(400);
      expect(response.body.error.code).toBe('invalid_json');
    }
    expect(node.replica.table.size).toBe(0);
    // UTF-8 beyond ASCII is read as it is.
    const accented = makeRoute({ id: 'sb-é', resourceVersion: '7' });
    expect((await putRoute(node.api, accented)).status).toBe(200);
    expect(node.replica.table.getById('sb-é')?.name).toBe(accented.name);
  });

  it('refuses a body in another Unicode charset (UTF-16, UTF-7) with 415 instead of decoding it past the UTF-8 check', async () => {
    // body-parser decodes any utf-* charset: UTF-16 dodged the UTF-8 check, and UTF-7 read
    // "+AGEAYgBj-" as the ID "abc".
    const node = await replica();
    const utf16 = (value: unknown) => Buffer.from(JSON.stringify(value), 'utf16le');
    const cases: [string, string, string, Buffer | string][] = [
      [`${node.api}/v1/routes`, 'PUT', 'application/json; charset=utf-16le', utf16(makeRoute())],
      [`${node.api}/v1/routes`, 'PUT', 'application/json; charset=UTF-7', JSON.stringify(makeRoute({ id: '+AGEAYgBj-' }))],
      [`${node.api}/v1/routes/batch`, 'POST', 'application/json; charset=utf-16', utf16({ routes: [makeRoute()] })],
      [`${node.peerUrl}/v1/peer/routes`, 'POST', 'application/json; charset=utf-16le', utf16({ routes: [makeRoute()] })],
    ];
    for (const [url, method, type, body] of cases) {
      const response = await send(url, { method, headers: { 'content-type': type }, body });
      expect(response.status, `${method} ${url} ${type}`).toBe(415);
      expect(response.body.error.code).toBe('unsupported_charset');
    }
    expect(node.replica.table.size).toBe(0);
    // UTF-8 named in any case is UTF-8.
    expect((await send(`${node.api}/v1/routes`, { method: 'PUT', headers: { 'content-type': 'application/json; charset=UTF-8' }, body: JSON.stringify(makeRoute()) })).status).toBe(200);
    expect(node.replica.table.size).toBe(1);
  });

  it('lists every refused entry of a peer push by index, and refuses a push longer than any sender makes', async () => {
    const node = await replica();
    const push = (routes: unknown[]) => send(`${node.peerUrl}/v1/peer/routes`, { method: 'POST', headers: json, body: JSON.stringify({ routes }) });
    const good = makeRoute();
    const refused = await push([good, 0, makeRoute({ namespace: 'Bad' }), makeRoute()]);
    expect(refused.status).toBe(400);
    expect(refused.body.error).toMatchObject({ code: 'invalid_route', index: 1, reason: 'not_an_object' });
    expect(refused.body.error.invalid.map((entry: { index: number; reason: string }) => [entry.index, entry.reason])).toEqual([
      [1, 'not_an_object'],
      [2, 'invalid_kubernetes_name'],
    ]);
    // Bounded: without the cap, 2 MB of [0,0,...] was answered with 84 MB of refusals.
    const tooLong = await push(Array.from({ length: PUSH_MAX_ROUTES + 1 }, () => 0));
    expect(tooLong.status).toBe(413);
    expect(tooLong.body.error.code).toBe('batch_too_large');
    const longest = await push(Array.from({ length: PUSH_MAX_ROUTES }, () => 0));
    expect(longest.status).toBe(400);
    expect(longest.body.error.invalid).toHaveLength(PUSH_MAX_ROUTES);
    expect(node.replica.table.size).toBe(0);
  });

  it('deletes with and without a resourceVersion, fencing the identity', async () => {
    const node = await replica();
    const route = makeRoute({ resourceVersion: '5' });
    await putRoute(node.api, route);
    const stale = await send(`${node.api}/v1/routes/default/${route.name}?resourceVersion=4`, { method: 'DELETE' });
    expect(stale.body.result).toMatchObject({ outcome: 'ignored', reason: 'stale_resource_version' });
    const deleted = await send(`${node.api}/v1/routes/default/${route.name}`, { method: 'DELETE' });
    expect(deleted.body.result).toMatchObject({ outcome: 'applied', reason: 'deleted', resourceVersion: '5' });
    expect((await send(`${node.api}/v1/routes/${route.id}`)).status).toBe(404);
    // The fence stops a late upsert at the deleted version.
    expect((await putRoute(node.api, route)).body.result.outcome).toBe('ignored');
    const unknown = await send(`${node.api}/v1/routes/default/never-seen`, { method: 'DELETE' });
    expect(unknown.status).toBe(200);
    expect(unknown.body.result).toMatchObject({ outcome: 'ignored', reason: 'not_found' });
    const fenced = await send(`${node.api}/v1/routes/default/future?resourceVersion=9`, { method: 'DELETE' });
    expect(fenced.body.result).toMatchObject({ outcome: 'applied', reason: 'fenced' });
  });

  it('ignores fencedAtMs on a dead route (a peer-only field): the delete is fenced now and reaches the peers', async () => {
    const cluster = await startCluster(2);
    replicas.push(...cluster);
    const [a, b] = cluster as [TestReplica, TestReplica];
    const route = makeRoute({ resourceVersion: '5' });
    const other = makeRoute({ resourceVersion: '5' });
    for (const r of [route, other]) expect((await putRoute(a.api, r)).body.sync.acked).toBe(1);
    // fencedAtMs 0 read as given would make the fence already expired: removed here, no fence, nothing sent.
    const deleted = await putRoute(a.api, { ...route, state: 'dead', resourceVersion: '6', fencedAtMs: 0 });
    expect(deleted.status).toBe(200);
    expect(deleted.body).toMatchObject({ result: { outcome: 'applied', reason: 'deleted' }, sync: { peers: 1, acked: 1 } });
    for (const node of cluster) {
      expect(node.replica.table.get('default', route.name as string)).toBeUndefined();
      expect(node.replica.table.getFence('default', route.name as string)?.resourceVersion).toBe('6');
    }
    // A value a peer would be refused for does not turn a valid delete into a 400 (batch too).
    const batch = await send(`${a.api}/v1/routes/batch`, {
      method: 'POST',
      headers: json,
      body: JSON.stringify({ routes: [{ ...other, state: 'dead', resourceVersion: '6', fencedAtMs: 'yesterday' }] }),
    });
    expect(batch.status).toBe(200);
    expect(batch.body).toMatchObject({ results: [{ outcome: 'applied', reason: 'deleted' }], sync: { acked: 1 } });
    expect(b.replica.table.get('default', other.name as string)).toBeUndefined();
    expect(b.replica.table.getFence('default', other.name as string)).toBeDefined();
  });

  it('applies a batch with one result per route', async () => {
    const node = await replica();
    const routes = [makeRoute(), makeRoute(), makeRoute({ resourceVersion: '3' })];
    const stale = { ...routes[2], resourceVersion: '2' };
    const response = await send(`${node.api}/v1/routes/batch`, { method: 'POST', headers: json, body: JSON.stringify({ routes: [...routes, stale] }) });
    expect(response.status).toBe(200);
    expect(response.body.results.map((r: { reason: string }) => r.reason)).toEqual(['created', 'created', 'created', 'stale_resource_version']);
    expect(node.replica.table.size).toBe(3);
  });

  it('lists routes and looks one up by sandbox ID without ever showing its token', async () => {
    const node = await replica();
    const route = makeRoute({ accessToken: 'tok-super-secret', requireTrafficAuth: true });
    await putRoute(node.api, route);
    const list = await send(`${node.api}/v1/routes`);
    expect(list.body.count).toBe(1);
    expect(JSON.stringify(list.body)).not.toContain('tok-super-secret');
    const one = await send(`${node.api}/v1/routes/${route.id}`);
    expect(one.body).toMatchObject({ id: route.id, hasAccessToken: true, requireTrafficAuth: true });
    expect(JSON.stringify(one.body)).not.toContain('tok-super-secret');
    expect((await send(`${node.api}/v1/routes/unknown-id`)).body.error.code).toBe('route_not_found');
  });

  it('filters the list by namespace, and refuses a namespace filter given twice instead of dropping it', async () => {
    const node = await replica();
    await putRoute(node.api, makeRoute({ namespace: 'team-a', name: 'a', id: 'sbx-a' }));
    await putRoute(node.api, makeRoute({ namespace: 'team-b', name: 'b', id: 'sbx-b' }));
    const one = await send(`${node.api}/v1/routes?namespace=team-a`);
    expect(one.body.routes.map((route: { id: string }) => route.id)).toEqual(['sbx-a']);
    const twice = await send(`${node.api}/v1/routes?namespace=team-a&namespace=team-b`);
    expect(twice.status).toBe(400);
    expect(twice.body.error).toMatchObject({ code: 'invalid_query', field: 'namespace' });
    // A misspelt filter is refused too, not taken as "no filter" (which lists every namespace).
    const misspelt = await send(`${node.api}/v1/routes?ns=team-a`);
    expect(misspelt.status).toBe(400);
    expect(misspelt.body.error).toMatchObject({ code: 'invalid_query', field: 'ns' });
  });

  it('looks up a sandbox whose ID is "batch" like any other, and answers 405 for other methods on the batch path', async () => {
    const node = await replica();
    expect((await send(`${node.api}/v1/routes/batch`)).body.error.code).toBe('route_not_found');
    await putRoute(node.api, makeRoute({ id: 'batch' }));
    const one = await send(`${node.api}/v1/routes/batch`);
    expect(one.status).toBe(200);
    expect(one.body.id).toBe('batch');
    const put = await send(`${node.api}/v1/routes/batch`, { method: 'PUT', headers: json, body: '{}' });
    expect(put.status).toBe(405);
    expect(put.headers.get('allow')).toBe('GET, POST');
  });

  it('shows every peer with its health', async () => {
    const cluster = await startCluster(2);
    replicas.push(...cluster);
    await putRoute(cluster[0]!.api, makeRoute());
    const view = await send(`${cluster[0]!.api}/v1/peers`);
    expect(view.body.peers).toHaveLength(1);
    expect(view.body.peers[0]).toMatchObject({
      peer: cluster[1]!.replica.addresses.peer,
      reachable: true,
      consecutiveFailures: 0,
      ejected: false,
      pendingRoutes: 0,
    });
    expect(typeof view.body.peers[0].lastSuccess).toBe('string');
  });

  it('shows the health of peers nothing was pushed to by their reconcile rounds: a live idle peer is reachable, a dead one is not and says why', async () => {
    const cluster = await startCluster(2, { ROUTESYNC_RECONCILE_INTERVAL_MS: '100' });
    replicas.push(...cluster);
    const live = cluster[1]!.replica.addresses.peer;
    const dead = `127.0.0.1:${await unusedPort()}`;
    cluster[0]!.replica.sync.setPeers([live, dead]);
    const peersOf = async () => (await send(`${cluster[0]!.api}/v1/peers`)).body.peers as { peer: string; reachable: boolean; lastReconcile: string | null; lastReconcileFailure: { errorClass: string } | null }[];
    await waitUntil(async () => {
      const peers = await peersOf();
      return peers.find((p) => p.peer === live)?.lastReconcile != null && peers.find((p) => p.peer === dead)?.lastReconcileFailure != null;
    }, 10_000, 'a completed round with the live peer and a failed one with the dead peer');
    const peers = await peersOf();
    expect(peers.find((p) => p.peer === live)).toMatchObject({ reachable: true, lastSuccess: null, lastReconcileFailure: null });
    expect(peers.find((p) => p.peer === dead)).toMatchObject({ reachable: false, lastReconcile: null, lastReconcileFailure: { errorClass: 'refused' } });
  });
});

describe('route identity', () => {
  // Identity is "namespace/name": with a '/' allowed in either, {team/x, sb} and {team, x/sb}
  // share one key, so one is ignored as stale or overwrites the other, and a DELETE of one
  // deletes both. Every path a change arrives by refuses such an identity and changes nothing.
  it('refuses a namespace or name Kubernetes would refuse, with a 400 naming the field, on every path', async () => {
    const node = await replica();
    await putRoute(node.api, makeRoute({ namespace: 'team', name: 'x', resourceVersion: '3' }));
    const before = node.replica.table.rootDigest();
    const slashInNamespace = makeRoute({ namespace: 'team/x', name: 'sb', resourceVersion: '9' });
    const slashInName = makeRoute({ namespace: 'team', name: 'x/sb', resourceVersion: '9' });
    const cases: [string, string, RequestInit, string][] = [
      ['PUT', `${node.api}/v1/routes`, { method: 'PUT', headers: json, body: JSON.stringify(slashInNamespace) }, 'namespace'],
      ['PUT', `${node.api}/v1/routes`, { method: 'PUT', headers: json, body: JSON.stringify(slashInName) }, 'name'],
      ['PUT dead', `${node.api}/v1/routes`, { method: 'PUT', headers: json, body: JSON.stringify({ ...slashInName, state: 'dead' }) }, 'name'],
      ['PUT', `${node.api}/v1/routes`, { method: 'PUT', headers: json, body: JSON.stringify(makeRoute({ namespace: 'Team' })) }, 'namespace'],
      ['batch', `${node.api}/v1/routes/batch`, { method: 'POST', headers: json, body: JSON.stringify({ routes: [makeRoute(), slashInName] }) }, 'name'],
      ['DELETE', `${node.api}/v1/routes/team/${encodeURIComponent('x/sb')}?resourceVersion=9`, { method: 'DELETE' }, 'name'],
      ['DELETE', `${node.api}/v1/routes/${encodeURIComponent('team/x')}/sb`, { method: 'DELETE' }, 'namespace'],
      ['/refresh', `${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify(slashInNamespace) }, 'namespace'],
      ['/refresh dead', `${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify({ ...slashInNamespace, state: 'dead' }) }, 'namespace'],
      ['peer batch', `${node.peerUrl}/v1/peer/routes`, { method: 'POST', body: JSON.stringify({ routes: [makeRoute(), slashInName] }) }, 'name'],
    ];
    for (const [what, url, init, field] of cases) {
      const response = await send(url, init);
      expect(response.status, what).toBe(400);
      expect(response.body.error.code, what).toBe('invalid_route');
      // The local batch names the reason and field per entry; the other endpoints at the top.
      const detail = response.body.error.invalid?.[0] ?? response.body.error;
      expect(detail, what).toMatchObject({ reason: 'invalid_kubernetes_name', field });
    }
    expect(node.replica.table.rootDigest()).toBe(before);
    expect(node.replica.table.get('team', 'x')?.resourceVersion).toBe('3');
  });

  it('does not take such an identity in through a pull from a peer that holds one, and takes the rest', async () => {
    const cluster = await startCluster(2);
    replicas.push(...cluster);
    const [a, b] = cluster as [TestReplica, TestReplica];
    // A peer of an older version could hold one: put it in its table past validation, beside
    // valid routes (some of them in the same pulled buckets).
    const stray = { ...makeRoute({ namespace: 'team/x', name: 'sb', resourceVersion: '9' }) } as unknown as Route;
    b.replica.table.upsert(stray);
    const valid = Array.from({ length: 50 }, () => parseRoute(makeRoute({ namespace: 'team' })));
    for (const route of valid) b.replica.table.upsert(route);
    const report = await a.replica.reconciler.runRound();
    expect(report.result).toBe('repaired');
    expect(a.replica.table.get('team/x', 'sb')).toBeUndefined();
    expect(a.replica.table.size).toBe(50);
    expect(await a.replica.metrics.reconcileRefused.get()).toMatchObject({ values: [{ value: 1 }] });
    expect(a.logs.lines.some((line) => line.includes('skipped changes this replica refuses') && line.includes('invalid_kubernetes_name'))).toBe(true);
    // The stray's bucket stays different, so the next round pulls it again (and skips it again).
    expect((await a.replica.reconciler.runRound()).result).toBe('unchanged');
    expect(await a.replica.metrics.reconcileRefused.get()).toMatchObject({ values: [{ value: 2 }] });
  });
});

describe('peer API', () => {
  it('speaks openkruise /refresh: 204 applied or stale, 400 invalid, any content type', async () => {
    const node = await replica();
    const route = makeRoute({ resourceVersion: '4', unknownField: { nested: true } });
    expect((await send(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify(route) })).status).toBe(204);
    expect(node.replica.table.get('default', route.name as string)?.resourceVersion).toBe('4');
    expect((await send(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify(route) })).status).toBe(204);
    expect((await send(`${node.peerUrl}/refresh`, { method: 'POST', headers: { 'content-type': 'text/plain' }, body: JSON.stringify({ ...route, resourceVersion: '5' }) })).status).toBe(204);
    expect(node.replica.table.get('default', route.name as string)?.resourceVersion).toBe('5');
    const badJson = await send(`${node.peerUrl}/refresh`, { method: 'POST', body: '{oops' });
    expect(badJson.status).toBe(400);
    expect(badJson.body.error.code).toBe('invalid_json');
    const badRoute = await send(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify({ ...route, resourceVersion: '-5' }) });
    expect(badRoute.status).toBe(400);
    expect(badRoute.body.error.code).toBe('invalid_route');
  });

  it('reads /refresh as UTF-8 JSON whatever charset its content type names, as openkruise does', async () => {
    const node = await replica();
    const route = makeRoute({ resourceVersion: '4' });
    // Java's StringEntity, for one, labels a body text/plain; charset=ISO-8859-1 unless told otherwise.
    for (const [contentType, resourceVersion] of [
      ['text/plain; charset=ISO-8859-1', '5'],
      ['application/json; charset=us-ascii', '6'],
      ['application/json; charset=utf-16', '7'],
    ] as const) {
      const response = await send(`${node.peerUrl}/refresh`, {
        method: 'POST',
        headers: { 'content-type': contentType },
        body: JSON.stringify({ ...route, resourceVersion }),
      });
      expect(response.status, contentType).toBe(204);
      expect(node.replica.table.get('default', route.name as string)?.resourceVersion).toBe(resourceVersion);
    }
  });

  it('refuses a /refresh or peer push whose body is not valid UTF-8, as the local API does', async () => {
    const node = await replica();
    const bytes = Buffer.from(JSON.stringify(makeRoute({ id: 'sb-@', resourceVersion: '5' })), 'utf8');
    bytes[bytes.indexOf('@')] = 0xfe;
    const refresh = await send(`${node.peerUrl}/refresh`, { method: 'POST', body: bytes });
    expect(refresh.status).toBe(400);
    const pushBytes = Buffer.from(JSON.stringify({ routes: [makeRoute({ id: 'sb-@', resourceVersion: '6' })] }), 'utf8');
    pushBytes[pushBytes.indexOf('@')] = 0xff;
    const push = await send(`${node.peerUrl}/v1/peer/routes`, { method: 'POST', headers: json, body: pushBytes });
    expect(push.status).toBe(400);
    expect(push.body.error.code).toBe('invalid_json');
    expect(node.replica.table.size).toBe(0);
  });

  it('deletes on a dead route, needs its resourceVersion, and ignores an ID-only legacy push', async () => {
    const node = await replica();
    const route = makeRoute({ resourceVersion: '4' });
    await send(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify(route) });
    const noVersion = await send(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify({ namespace: 'default', name: route.name, state: 'dead' }) });
    expect(noVersion.status).toBe(400);
    expect(node.replica.table.size).toBe(1);
    const dead = await send(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify({ ...route, state: 'Dead' }) });
    expect(dead.status).toBe(204);
    expect(node.replica.table.size).toBe(0);
    const legacy = await send(`${node.peerUrl}/refresh`, { method: 'POST', body: JSON.stringify({ id: 'sb-legacy', ip: '10.0.0.9' }) });
    expect(legacy.status).toBe(204);
    expect(node.replica.table.getById('sb-legacy')).toBeUndefined();
  });

  it('accepts exactly 1 MiB on /refresh and answers 413 one byte over', async () => {
    const node = await replica();
    const base = JSON.stringify(makeRoute({ owner: '' }));
    const body = (size: number) => base.replace('"owner":""', `"owner":"","pad":"${'x'.repeat(size - base.length - 9)}"`);
    const exact = body(1_048_576);
    expect(Buffer.byteLength(exact)).toBe(1_048_576);
    expect((await send(`${node.peerUrl}/refresh`, { method: 'POST', body: exact })).status).toBe(204);
    const over = body(1_048_577);
    expect(Buffer.byteLength(over)).toBe(1_048_577);
    const response = await send(`${node.peerUrl}/refresh`, { method: 'POST', body: over });
    expect(response.status).toBe(413);
    expect(response.body.error.code).toBe('body_too_large');
  });

  it('answers 405 with Allow: POST for another method on /refresh', async () => {
    const node = await replica();
    for (const method of ['GET', 'PUT', 'DELETE']) {
      const response = await send(`${node.peerUrl}/refresh`, { method });
      expect(response.status).toBe(405);
      expect(response.headers.get('allow')).toBe('POST');
    }
  });

  it('demands the peer token on the push endpoints but not on probes and metrics, and replicas send it (auth.test.ts: every endpoint)', async () => {
    const cluster = await startCluster(2, { ROUTESYNC_PEER_TOKEN: 'peer-secret-123' });
    replicas.push(...cluster);
    const target = cluster[1]!.peerUrl;
    const route = JSON.stringify(makeRoute());
    expect((await send(`${target}/refresh`, { method: 'POST', body: route })).status).toBe(401);
    expect((await send(`${target}/refresh`, { method: 'POST', body: route, headers: { authorization: 'Bearer wrong' } })).status).toBe(401);
    expect((await send(`${target}/v1/peer/routes`, { method: 'POST', body: '{"routes":[]}' })).status).toBe(401);
    expect((await send(`${target}/refresh`, { method: 'POST', body: route, headers: { authorization: 'Bearer peer-secret-123' } })).status).toBe(204);
    for (const open of ['/healthz', '/readyz', '/metrics']) expect((await send(`${target}${open}`)).status).toBe(200);
    const { body } = await putRoute(cluster[0]!.api, makeRoute());
    expect(body.sync.acked).toBe(1);
    for (const node of cluster) expect(node.logs.lines.join('\n')).not.toContain('peer-secret-123');
  });

  it('serves probes and Prometheus metrics', async () => {
    const node = await replica();
    await putRoute(node.api, makeRoute());
    expect((await send(`${node.peerUrl}/healthz`)).body).toEqual({ status: 'ok' });
    expect((await send(`${node.peerUrl}/readyz`)).status).toBe(200);
    const metrics = await fetch(`${node.peerUrl}/metrics`);
    expect(metrics.headers.get('content-type')).toContain('text/plain');
    const text = await metrics.text();
    expect(text).toMatch(/^routesync_routes 1$/m);
    expect(text).toMatch(/^routesync_changes_total\{source="local",outcome="applied",reason="created"\} 1$/m);
    expect(text).toContain('routesync_sync_duration_seconds_bucket');
    // Without TLS there is no certificate: no expiry series (at 0 it would fire an expiry alert).
    expect(text).not.toContain('routesync_peer_tls_cert_expiry_timestamp_seconds');
  });
});
