// The data plane against real upstream servers on loopback: mapping, admission, header
// hygiene, access log and metrics.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ERROR_STATUS } from '../../src/proxy/target.js';
import { proxyRequestCount, send, startDataPlane, type TestDataPlane } from '../helpers/data-plane.js';
import { startUpstream, unusedPort, type Upstream } from '../helpers/upstream.js';
import { waitUntil } from '../helpers/wait.js';

interface Echo {
  name: string;
  method: string;
  url: string;
  headers: Record<string, string>;
}

interface ErrorAnswer {
  error: { code: string; message: string; state?: string };
}

let dp: TestDataPlane;
let upstream: Upstream;

beforeEach(async () => {
  upstream = await startUpstream({ name: 'a' });
  dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '2000' });
});

afterEach(async () => {
  await dp.close(0);
  await upstream.close();
});

describe('mapping forms reach the route upstream', () => {
  it('path form: /kruise/<id>/<port>/<rest> is forwarded as /<rest> with the query kept', async () => {
    dp.setRoute({ id: 'sbx-path', ip: upstream.host });
    const reply = await send(dp.address, { path: `/kruise/sbx-path/${upstream.port}/api/v1/files?path=%2Ftmp&x=1` });
    expect(reply.status).toBe(200);
    const echo = reply.json<Echo>();
    expect(echo.name).toBe('a');
    expect(echo.url).toBe('/api/v1/files?path=%2Ftmp&x=1');
  });

  it('path form without a rest is forwarded as /', async () => {
    dp.setRoute({ id: 'sbx-root', ip: upstream.host });
    const bare = await send(dp.address, { path: `/kruise/sbx-root/${upstream.port}` });
    expect(bare.json<Echo>().url).toBe('/');
    const query = await send(dp.address, { path: `/kruise/sbx-root/${upstream.port}?a=b` });
    expect(query.json<Echo>().url).toBe('/?a=b');
  });

  it('header form: e2b-sandbox-id and e2b-sandbox-port', async () => {
    dp.setRoute({ id: 'sbx-header', ip: upstream.host });
    const reply = await send(dp.address, {
      path: '/health?deep=1',
      headers: { 'e2b-sandbox-id': 'sbx-header', 'e2b-sandbox-port': String(upstream.port) },
    });
    expect(reply.status).toBe(200);
    expect(reply.json<Echo>().url).toBe('/health?deep=1');
  });

  it('header form without a port uses the configured default sandbox port', async () => {
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_DEFAULT_SANDBOX_PORT: String(upstream.port) });
    dp.setRoute({ id: 'sbx-default', ip: upstream.host });
    const reply = await send(dp.address, { path: '/x', headers: { 'e2b-sandbox-id': 'sbx-default' } });
    expect(reply.status).toBe(200);
    expect(reply.json<Echo>().url).toBe('/x');
  });

  it('host form: <port>-<id>.<domain>, any domain when none is configured', async () => {
    dp.setRoute({ id: 'sbx-host', ip: upstream.host });
    const reply = await send(dp.address, { path: '/p', headers: { host: `${upstream.port}-sbx-host.sandboxes.example.com:8080` } });
    expect(reply.status).toBe(200);
    const echo = reply.json<Echo>();
    expect(echo.url).toBe('/p');
    // The sandbox sees the Host the client used.
    expect(echo.headers.host).toBe(`${upstream.port}-sbx-host.sandboxes.example.com:8080`);
  });

  it('host form with ROUTESYNC_PROXY_DOMAIN accepts only that domain', async () => {
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_DOMAIN: 'sbx.example.com' });
    dp.setRoute({ id: 'sbx-dom', ip: upstream.host });
    const ok = await send(dp.address, { headers: { host: `${upstream.port}-sbx-dom.SBX.example.com` } });
    expect(ok.status).toBe(200);
    const other = await send(dp.address, { headers: { host: `${upstream.port}-sbx-dom.evil.example.com` } });
    expect(other.status).toBe(400);
    expect(other.json<ErrorAnswer>().error.code).toBe('sandbox_not_specified');
  });

  it('forms are tried in order: the path wins over the headers, the headers over the host', async () => {
    const b = await startUpstream({ name: 'b', host: '127.0.0.2' });
    const c = await startUpstream({ name: 'c', host: '127.0.0.3' });
    try {
      dp.setRoute({ id: 'by-path', ip: upstream.host });
      dp.setRoute({ id: 'by-header', ip: b.host });
      dp.setRoute({ id: 'by-host', ip: c.host });
      const all = {
        'e2b-sandbox-id': 'by-header',
        'e2b-sandbox-port': String(b.port),
        host: `${c.port}-by-host.example.com`,
      };
      expect((await send(dp.address, { path: `/kruise/by-path/${upstream.port}/`, headers: all })).json<Echo>().name).toBe('a');
      expect((await send(dp.address, { path: '/', headers: all })).json<Echo>().name).toBe('b');
      expect((await send(dp.address, { path: '/', headers: { host: all.host } })).json<Echo>().name).toBe('c');
    } finally {
      await b.close();
      await c.close();
    }
  });

  it('an IPv6 route is reached at its bracketed address', async () => {
    const v6 = await startUpstream({ name: 'v6', host: '::1' });
    try {
      dp.setRoute({ id: 'sbx-v6', ip: '::1' });
      const reply = await send(dp.address, { path: `/kruise/sbx-v6/${v6.port}/six` });
      expect(reply.status).toBe(200);
      expect(reply.json<Echo>().name).toBe('v6');
      expect(v6.requests).toHaveLength(1);
    } finally {
      await v6.close();
    }
  });

  it('any method and body go through', async () => {
    dp.setRoute({ id: 'sbx-methods', ip: upstream.host });
    for (const method of ['POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']) {
      const reply = await send(dp.address, { method, path: `/kruise/sbx-methods/${upstream.port}/echo`, body: `body of ${method}` });
      expect(reply.status).toBe(200);
      expect(reply.body).toBe(`body of ${method}`);
    }
    const head = await send(dp.address, { method: 'HEAD', path: `/kruise/sbx-methods/${upstream.port}/` });
    expect(head.status).toBe(200);
    expect(head.body).toBe('');
  });

  it('a chunked DELETE or OPTIONS body reaches the sandbox as that request\'s body, never as a request of its own', async () => {
    dp.setRoute({ id: 'sbx-smuggle', ip: upstream.host });
    const smuggled = 'GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n';
    for (const method of ['DELETE', 'OPTIONS']) {
      // No Content-Length: the body is framed by chunks, and must stay framed upstream.
      const reply = await send(dp.address, {
        method,
        path: `/kruise/sbx-smuggle/${upstream.port}/echo`,
        headers: { 'transfer-encoding': 'chunked' },
        body: Readable.from([Buffer.from(smuggled)]),
      });
      expect(reply.body).toBe(smuggled);
      // The next request on the pooled upstream connection gets its own answer.
      const next = await send(dp.address, { path: `/kruise/sbx-smuggle/${upstream.port}/next` });
      expect(next.json<Echo>().url).toBe('/next');
    }
    const bodyless = await send(dp.address, { method: 'DELETE', path: `/kruise/sbx-smuggle/${upstream.port}/echo` });
    expect([bodyless.status, bodyless.body]).toEqual([200, '']);
    expect(upstream.requests.map((request) => `${request.method} ${request.url}`)).toEqual(['DELETE /echo', 'GET /next', 'OPTIONS /echo', 'GET /next', 'DELETE /echo']);
  });
});

describe('the request target reaches the sandbox as the client sent it', () => {
  // SPEC §3: the path form goes upstream as /<rest>, query kept; the other forms keep the
  // request's own target. No normalisation: dot segments, backslashes, encoded dots and the
  // bytes of a (signed) query are the sandbox's to interpret.
  const targets = ["/static/../admin/a\\b", '/files/%2e%2e/secret', "/download?sig='a'&q=x|{}^`", '//double//slash/?a=b?c'];

  it('path form', async () => {
    dp.setRoute({ id: 'sbx-target', ip: upstream.host });
    for (const target of targets) {
      const reply = await send(dp.address, { path: `/kruise/sbx-target/${upstream.port}${target}` });
      expect(reply.json<Echo>().url).toBe(target);
    }
  });

  it('header and host forms', async () => {
    dp.setRoute({ id: 'sbx-target', ip: upstream.host });
    for (const target of targets) {
      const byHeader = await send(dp.address, { path: target, headers: { 'e2b-sandbox-id': 'sbx-target', 'e2b-sandbox-port': String(upstream.port) } });
      expect(byHeader.json<Echo>().url).toBe(target);
      const byHost = await send(dp.address, { path: target, headers: { host: `${upstream.port}-sbx-target.sandbox.test` } });
      expect(byHost.json<Echo>().url).toBe(target);
    }
  });

  it('an absolute-form target goes upstream in origin form, its path and query as sent', async () => {
    dp.setRoute({ id: 'sbx-target', ip: upstream.host });
    const headers = { 'e2b-sandbox-id': 'sbx-target', 'e2b-sandbox-port': String(upstream.port) };
    const reply = await send(dp.address, { path: "http://elsewhere.example/files/../a?q='1'", headers });
    expect(reply.json<Echo>().url).toBe("/files/../a?q='1'");
    const bare = await send(dp.address, { path: 'http://elsewhere.example', headers });
    expect(bare.json<Echo>().url).toBe('/');
    const path = await send(dp.address, { path: `http://elsewhere.example/kruise/sbx-target/${upstream.port}/x/../y?z` });
    expect(path.json<Echo>().url).toBe('/x/../y?z');
  });

  it('an absolute-form target is routed by its authority, which the sandbox sees as Host and X-Forwarded-Host; the Host header is ignored', async () => {
    dp.setRoute({ id: 'sbx-a', ip: upstream.host });
    const authority = `${upstream.port}-sbx-a.sandbox.test`;
    // Routed by Host, this would be sandbox_not_found: there is no sbx-b.
    const reply = await send(dp.address, { path: `http://${authority}/x?q=1`, headers: { host: `${upstream.port}-sbx-b.sandbox.test` } });
    expect(reply.status).toBe(200);
    const echo = reply.json<Echo>();
    expect(echo.url).toBe('/x?q=1');
    expect(echo.headers.host).toBe(authority);
    expect(echo.headers['x-forwarded-host']).toBe(authority);
  });
});

describe('a route change applies to the next request', () => {
  it('a new IP moves traffic; pausing refuses it; resuming restores it', async () => {
    const moved = await startUpstream({ name: 'moved', host: '127.0.0.2', port: upstream.port });
    try {
      const path = `/kruise/sbx-moving/${upstream.port}/`;
      dp.setRoute({ id: 'sbx-moving', ip: upstream.host });
      expect((await send(dp.address, { path })).json<Echo>().name).toBe('a');

      dp.setRoute({ id: 'sbx-moving', ip: moved.host });
      expect((await send(dp.address, { path })).json<Echo>().name).toBe('moved');

      dp.setRoute({ id: 'sbx-moving', ip: moved.host, state: 'paused' });
      const paused = await send(dp.address, { path });
      expect(paused.status).toBe(503);
      expect(paused.json<ErrorAnswer>().error).toMatchObject({ code: 'sandbox_not_running', state: 'paused' });

      dp.setRoute({ id: 'sbx-moving', ip: upstream.host, state: 'Running' });
      expect((await send(dp.address, { path })).json<Echo>().name).toBe('a');
      expect(moved.requests).toHaveLength(1);
      expect(upstream.requests).toHaveLength(2);
    } finally {
      await moved.close();
    }
  });

  it('a deleted route is not found on the next request', async () => {
    const route = dp.setRoute({ id: 'sbx-gone', ip: upstream.host });
    expect((await send(dp.address, { path: `/kruise/sbx-gone/${upstream.port}/` })).status).toBe(200);
    dp.table.delete({ namespace: route.namespace, name: route.name, resourceVersion: '999999' });
    const reply = await send(dp.address, { path: `/kruise/sbx-gone/${upstream.port}/` });
    expect(reply.status).toBe(404);
    expect(reply.json<ErrorAnswer>().error.code).toBe('sandbox_not_found');
  });
});

describe('a streaming answer whose route changes', () => {
  interface Stream {
    /** The events received so far, as text. */
    text(): string;
    ended(): boolean;
    /** How the client saw it end: 'end' for a whole answer, 'aborted' for one cut off. */
    how(): 'end' | 'aborted' | undefined;
  }

  function openStream(path: string, headers: Record<string, string> = {}): Promise<Stream> {
    return new Promise((resolve, reject) => {
      const req = http.get({ host: dp.address.address, port: dp.address.port, path, headers, agent: false });
      req.on('error', reject);
      req.on('response', (res) => {
        let text = '';
        let how: 'end' | 'aborted' | undefined;
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => void (text += chunk));
        res.on('end', () => void (how ??= 'end'));
        res.on('aborted', () => void (how ??= 'aborted'));
        res.on('error', () => void (how ??= 'aborted'));
        resolve({ text: () => text, ended: () => how !== undefined, how: () => how });
      });
    });
  }

  it('is cut before its next event once its token is rotated, its sandbox paused, deleted or moved, and kept through a change that still admits it', async () => {
    // The sandbox writes an event when told to, to every stream it holds.
    const streams = new Set<http.ServerResponse>();
    const events = await startUpstream({
      name: 'events',
      handler: (_req, res) => {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write('data: open\n\n');
        streams.add(res);
        res.on('close', () => streams.delete(res));
      },
    });
    const emit = (data: string): void => {
      for (const res of streams) res.write(`data: ${data}\n\n`);
    };
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000' }, { webSocketRecheckMs: 50 });
    const rounds = (): number => (dp.plane as unknown as { recheckRounds: number }).recheckRounds;
    const afterTwoRounds = async (): Promise<void> => {
      const start = rounds();
      await waitUntil(() => rounds() >= start + 2, 5000, 'two rounds of checks');
    };
    try {
      const path = `/kruise/sse/${events.port}/events`;
      dp.setRoute({ id: 'sse', ip: events.host, requireTrafficAuth: true, accessToken: 'sse-tok-1' });
      const kept = await openStream(path, { 'e2b-traffic-access-token': 'sse-tok-1' });
      await waitUntil(() => kept.text().includes('data: open'), 5000, 'the stream to open');
      // A newer version with the same pod and token still admits it.
      dp.setRoute({ id: 'sse', ip: events.host, requireTrafficAuth: true, accessToken: 'sse-tok-1' });
      await afterTwoRounds();
      emit('still admitted');
      await waitUntil(() => kept.text().includes('data: still admitted'), 5000, 'the event after a change that still admits it');

      // The token rotated: the stream it opened gets no further event.
      dp.setRoute({ id: 'sse', ip: events.host, requireTrafficAuth: true, accessToken: 'sse-tok-2' });
      await afterTwoRounds();
      emit('secret after rotation');
      await waitUntil(() => kept.ended(), 5000, 'the stream to be cut');
      expect(kept.how()).toBe('aborted');
      expect(kept.text()).not.toContain('secret after rotation');

      const moved = await startUpstream({ name: 'moved', host: '127.0.0.2', port: events.port });
      try {
        const changes: [string, () => void][] = [
          ['sandbox_not_running', () => dp.setRoute({ id: 'sse', ip: events.host, state: 'paused' })],
          ['sandbox_not_found', () => dp.table.delete({ namespace: 'default', name: 'sse' })],
          ['sandbox_moved', () => dp.setRoute({ id: 'sse', ip: moved.host })],
        ];
        for (const [code, change] of changes) {
          dp.setRoute({ id: 'sse', ip: events.host });
          const stream = await openStream(path);
          await waitUntil(() => stream.text().includes('data: open'), 5000, 'the stream to open');
          change();
          await afterTwoRounds();
          emit(`after ${code}`);
          await waitUntil(() => stream.ended(), 5000, `the stream to be cut (${code})`);
          expect(stream.how()).toBe('aborted');
          expect(stream.text()).not.toContain(`after ${code}`);
          expect(dp.logs.filter((line) => line.msg === 'response cut: its route no longer admits it').map((line) => line.code)).toContain(code);
        }
      } finally {
        await moved.close();
      }
      await waitUntil(async () => (await proxyRequestCount(dp.metrics, 'route_changed')) === 4, 5000, 'four answers counted route_changed');
      // Each cut stream's upstream connection is closed, not left to the sandbox.
      await waitUntil(() => streams.size === 0, 5000, 'the sandbox to see every stream closed');
    } finally {
      await events.close();
    }
  });
});

describe('a long poll whose route changes while it waits for its answer', () => {
  it('gets what a new request would get (401 after a token rotation), not the answer meant for the old token', async () => {
    const waiting: http.ServerResponse[] = [];
    const poller = await startUpstream({ name: 'poll', handler: (_req, res) => void waiting.push(res) });
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000' }, { webSocketRecheckMs: 50 });
    const rounds = (): number => (dp.plane as unknown as { recheckRounds: number }).recheckRounds;
    try {
      dp.setRoute({ id: 'poll', ip: poller.host, requireTrafficAuth: true, accessToken: 'poll-tok-1' });
      const answer = send(dp.address, { path: `/kruise/poll/${poller.port}/wait`, headers: { 'e2b-traffic-access-token': 'poll-tok-1' } });
      await waitUntil(() => waiting.length === 1, 5000, 'the poll to reach the sandbox');
      dp.setRoute({ id: 'poll', ip: poller.host, requireTrafficAuth: true, accessToken: 'poll-tok-2' });
      const start = rounds();
      await waitUntil(() => rounds() >= start + 2, 5000, 'two rounds of checks');
      waiting[0]!.writeHead(200, { 'content-type': 'application/json', 'set-cookie': 'session=for-the-old-token' }).end('{"secret":"for the old token"}');
      const reply = await answer;
      expect(reply.status).toBe(401);
      expect(reply.json<ErrorAnswer>().error.code).toBe('traffic_token_invalid');
      expect(reply.body.toString()).not.toContain('for the old token');
      expect(reply.headers['set-cookie']).toBeUndefined();
    } finally {
      await poller.close();
    }
  });
});

describe('a route whose address is this machine', () => {
  it('is refused 403 upstream_not_allowed, HTTP and WebSocket alike, unless ROUTESYNC_PROXY_ALLOW_LOOPBACK: nothing behind it is reached', async () => {
    // The replica's own listeners live on loopback: a route naming them (from a peer, or a
    // /refresh from anything the NetworkPolicy admits) would hand the internet the local API.
    const strict = await startDataPlane({ ROUTESYNC_PROXY_ALLOW_LOOPBACK: 'false' });
    try {
      strict.setRoute({ id: 'self', ip: upstream.host });
      const refused = await send(strict.address, { path: `/kruise/self/${upstream.port}/v1/routes` });
      expect({ status: refused.status, code: refused.json<{ error: { code: string } }>().error.code }).toEqual({ status: 403, code: 'upstream_not_allowed' });
      const handshake = await send(strict.address, {
        path: `/kruise/self/${upstream.port}/ws`,
        headers: { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==' },
      });
      expect(handshake.status).toBe(403);
      expect(upstream.requests).toHaveLength(0);
      expect(upstream.acceptedSockets()).toBe(0);
    } finally {
      await strict.close(0);
    }
  });
});

describe('admission errors: documented status and code, upstream untouched', () => {
  const cases: {
    name: string;
    route?: { id: string; state?: string; ip?: string; requireTrafficAuth?: boolean; accessToken?: string };
    request: (port: number) => { path?: string; headers?: Record<string, string> };
    status: number;
    code: string;
    state?: string;
  }[] = [
    { name: 'no sandbox named', request: () => ({ path: '/' }), status: 400, code: 'sandbox_not_specified' },
    { name: 'unknown sandbox', request: (port) => ({ path: `/kruise/nope/${port}/` }), status: 404, code: 'sandbox_not_found' },
    {
      name: 'sandbox paused',
      route: { id: 's1', state: 'paused' },
      request: (port) => ({ path: `/kruise/s1/${port}/` }),
      status: 503,
      code: 'sandbox_not_running',
      state: 'paused',
    },
    {
      name: 'sandbox creating',
      route: { id: 's2', state: 'creating', ip: '' },
      request: (port) => ({ headers: { 'e2b-sandbox-id': 's2', 'e2b-sandbox-port': String(port) } }),
      status: 503,
      code: 'sandbox_not_running',
      state: 'creating',
    },
    {
      name: 'running without an IP',
      route: { id: 's3', ip: '' },
      request: (port) => ({ path: `/kruise/s3/${port}/` }),
      status: 503,
      code: 'sandbox_no_ip',
    },
    { name: 'port 0 in the path', route: { id: 's4' }, request: () => ({ path: '/kruise/s4/0/' }), status: 400, code: 'invalid_port' },
    { name: 'port 65536 in the header', route: { id: 's5' }, request: () => ({ headers: { 'e2b-sandbox-id': 's5', 'e2b-sandbox-port': '65536' } }), status: 400, code: 'invalid_port' },
    { name: 'non-numeric port in the path', route: { id: 's6' }, request: () => ({ path: '/kruise/s6/http/' }), status: 400, code: 'invalid_port' },
    { name: 'port 99999 in the host', route: { id: 's7' }, request: () => ({ headers: { host: '99999-s7.example.com' } }), status: 400, code: 'invalid_port' },
    {
      name: 'token missing',
      route: { id: 's8', requireTrafficAuth: true, accessToken: 'secret-token-8' },
      request: (port) => ({ path: `/kruise/s8/${port}/` }),
      status: 401,
      code: 'traffic_token_missing',
    },
    {
      name: 'token wrong',
      route: { id: 's9', requireTrafficAuth: true, accessToken: 'secret-token-9' },
      request: (port) => ({ path: `/kruise/s9/${port}/`, headers: { 'e2b-traffic-access-token': 'secret-token-8' } }),
      status: 401,
      code: 'traffic_token_invalid',
    },
    {
      name: 'token wrong in x-access-token, and a paused state not revealed',
      route: { id: 's10', requireTrafficAuth: true, accessToken: 'secret-token-10', state: 'paused' },
      request: (port) => ({ path: `/kruise/s10/${port}/`, headers: { 'x-access-token': 'nope' } }),
      status: 401,
      code: 'traffic_token_invalid',
    },
    {
      name: 'token demanded but the route has none',
      route: { id: 's11', requireTrafficAuth: true },
      request: (port) => ({ path: `/kruise/s11/${port}/`, headers: { 'e2b-traffic-access-token': 'anything' } }),
      status: 401,
      code: 'traffic_token_invalid',
    },
    {
      name: 'an upgrade to anything but WebSocket or h2c',
      route: { id: 's12' },
      request: (port) => ({ path: `/kruise/s12/${port}/`, headers: { connection: 'Upgrade', upgrade: 'SPDY/3.1' } }),
      status: 400,
      code: 'unsupported_upgrade',
    },
    {
      name: 'an absolute-form target with an empty host',
      route: { id: 's13' },
      request: (port) => ({ path: 'http:///p', headers: { 'e2b-sandbox-id': 's13', 'e2b-sandbox-port': String(port), host: 'real.example' } }),
      status: 400,
      code: 'invalid_target',
    },
    {
      name: 'an absolute-form target with a port but no host',
      route: { id: 's14' },
      request: (port) => ({ path: `http://:${port}/p`, headers: { 'e2b-sandbox-id': 's14', 'e2b-sandbox-port': String(port) } }),
      status: 400,
      code: 'invalid_target',
    },
  ];

  for (const testCase of cases) {
    it(`${testCase.name} -> ${testCase.status} ${testCase.code}`, async () => {
      if (testCase.route) dp.setRoute({ ip: upstream.host, ...testCase.route });
      const reply = await send(dp.address, testCase.request(upstream.port));
      expect(reply.status).toBe(testCase.status);
      expect(reply.headers['content-type']).toBe('application/json; charset=utf-8');
      expect(reply.headers['x-routesync-error']).toBe(testCase.code);
      const body = reply.json<ErrorAnswer>();
      expect(body.error.code).toBe(testCase.code);
      expect(typeof body.error.message).toBe('string');
      if (testCase.state !== undefined) expect(body.error.state).toBe(testCase.state);
      else expect(body.error.state).toBeUndefined();
      expect(upstream.requests).toHaveLength(0);
      expect(upstream.acceptedSockets()).toBe(0);
      expect(await proxyRequestCount(dp.metrics, testCase.code)).toBe(1);
    });
  }

  it('CONNECT (a forward-proxy tunnel) -> 501 unsupported_method, answered, counted and logged, not dropped silently', async () => {
    dp.setRoute({ id: 's15', ip: upstream.host });
    const socket = net.connect(dp.address.port, dp.address.address);
    let received = '';
    socket.on('data', (chunk: Buffer) => void (received += chunk.toString('latin1')));
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    socket.write(`CONNECT ${upstream.port}-s15.example.com:443 HTTP/1.1\r\nHost: ${upstream.port}-s15.example.com:443\r\n\r\n`);
    await closed;
    expect(received).toMatch(/^HTTP\/1\.1 501 /);
    expect(received.toLowerCase()).toContain('x-routesync-error: unsupported_method');
    expect(JSON.parse(received.slice(received.indexOf('\r\n\r\n') + 4))).toMatchObject({ error: { code: 'unsupported_method' } });
    expect(upstream.acceptedSockets()).toBe(0);
    expect(await proxyRequestCount(dp.metrics, 'unsupported_method')).toBe(1);
    expect(dp.logs.find((line) => line.msg === 'proxy request')).toMatchObject({ method: 'CONNECT', status: 501, outcome: 'unsupported_method' });
  });

  it('two Host header fields -> 400 invalid_host, the sandbox untouched (each host alone names a sandbox)', async () => {
    for (const id of ['h1', 'h2']) dp.setRoute({ id, ip: upstream.host });
    const socket = net.connect(dp.address.port, dp.address.address);
    let received = '';
    socket.on('data', (chunk: Buffer) => void (received += chunk.toString('latin1')));
    socket.write(`GET / HTTP/1.1\r\nHost: ${upstream.port}-h1.example.com\r\nHost: ${upstream.port}-h2.example.com\r\nConnection: close\r\n\r\n`);
    await new Promise<void>((resolve) => socket.once('close', () => resolve()));
    expect(received).toMatch(/^HTTP\/1\.1 400 /);
    expect(received.toLowerCase()).toContain('x-routesync-error: invalid_host');
    expect(upstream.requests).toHaveLength(0);
    expect(await proxyRequestCount(dp.metrics, 'invalid_host')).toBe(1);
  });

  it('an Expect other than 100-continue -> 417 unsupported_expectation, answered, counted and logged', async () => {
    dp.setRoute({ id: 'exp', ip: upstream.host });
    const reply = await send(dp.address, { path: `/kruise/exp/${upstream.port}/`, headers: { expect: 'something-else' } });
    expect(reply.status).toBe(417);
    expect(reply.headers['x-routesync-error']).toBe('unsupported_expectation');
    expect(upstream.requests).toHaveLength(0);
    expect(await proxyRequestCount(dp.metrics, 'unsupported_expectation')).toBe(1);
    expect(dp.logs.find((line) => line.msg === 'proxy request')).toMatchObject({ status: 417, outcome: 'unsupported_expectation' });
  });

  it("README's data-plane error table lists every code with its status", () => {
    const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
    for (const [code, status] of Object.entries(ERROR_STATUS)) {
      const row = readme.split('\n').find((line) => line.startsWith(`| ${status} | \`${code}\` |`));
      expect(row, `README row "| ${status} | \`${code}\` | ..."`).toBeDefined();
    }
  });

  it('the right token in either header is admitted', async () => {
    dp.setRoute({ id: 'tok', ip: upstream.host, requireTrafficAuth: true, accessToken: 'the-token' });
    const a = await send(dp.address, { path: `/kruise/tok/${upstream.port}/`, headers: { 'e2b-traffic-access-token': 'the-token' } });
    const b = await send(dp.address, { path: `/kruise/tok/${upstream.port}/`, headers: { 'x-access-token': 'the-token' } });
    expect([a.status, b.status]).toEqual([200, 200]);
  });

  it('a refused request with Expect: 100-continue never gets to send its body', async () => {
    const reply = await new Promise<{ status: number; continued: boolean }>((resolve, reject) => {
      let continued = false;
      const req = http.request({
        host: dp.address.address,
        port: dp.address.port,
        method: 'PUT',
        path: '/kruise/unknown/80/upload',
        headers: { expect: '100-continue', 'content-length': '5' },
        agent: false,
      });
      req.on('continue', () => {
        continued = true;
        req.end('hello');
      });
      req.on('response', (res) => {
        res.resume();
        res.on('end', () => resolve({ status: res.statusCode ?? 0, continued }));
      });
      req.on('error', reject);
      req.flushHeaders();
    });
    expect(reply).toEqual({ status: 404, continued: false });
  });

  it('an admitted request with Expect: 100-continue is continued and proxied', async () => {
    dp.setRoute({ id: 'cont', ip: upstream.host });
    const body = await new Promise<string>((resolve, reject) => {
      const req = http.request({
        host: dp.address.address,
        port: dp.address.port,
        method: 'PUT',
        path: `/kruise/cont/${upstream.port}/echo`,
        headers: { expect: '100-continue', 'content-length': '5' },
        agent: false,
      });
      req.on('continue', () => req.end('hello'));
      req.on('response', (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (text += chunk));
        res.on('end', () => resolve(text));
      });
      req.on('error', reject);
      req.flushHeaders();
    });
    expect(body).toBe('hello');
    expect(upstream.requests[0]?.headers.expect).toBeUndefined();
  });
});

describe('an h2c upgrade (curl --http2 to an http:// URL)', () => {
  /** Write raw bytes to the data plane and collect everything until `done` says the answers are complete. */
  function rawExchange(address: AddressInfo, bytes: string, done: (received: string) => boolean): Promise<string> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(address.port, address.address, () => socket.write(bytes));
      let received = '';
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`no complete answer within 5 s; got ${JSON.stringify(received)}`));
      }, 5000);
      socket.on('data', (chunk: Buffer) => {
        received += chunk.toString('latin1');
        if (done(received)) {
          clearTimeout(timer);
          socket.destroy();
          resolve(received);
        }
      });
      socket.on('error', reject);
    });
  }

  it('is served as the HTTP/1.1 request it also is: the upgrade dropped, the body and the next request on the connection kept', async () => {
    dp.setRoute({ id: 'h2c', ip: upstream.host });
    const path = `/kruise/h2c/${upstream.port}`;
    const body = 'hello over http/1.1';
    const request =
      `POST ${path}/echo HTTP/1.1\r\nHost: client.example.com\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n` +
      `HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: ${body.length}\r\n\r\n${body}` +
      `GET ${path}/inspect HTTP/1.1\r\nHost: client.example.com\r\nX-App: second\r\n\r\n`;
    // Both answers are chunked: complete at the second last-chunk.
    const received = await rawExchange(dp.address, request, (text) => (text.match(/\r\n0\r\n\r\n/g) ?? []).length >= 2);
    const answers = received.split(/(?=HTTP\/1\.1 )/);
    expect(answers).toHaveLength(2);
    expect(answers[0]).toMatch(/^HTTP\/1\.1 200 /);
    expect(answers[0]).not.toMatch(/^HTTP\/1\.1 101/);
    expect(answers[0]).toContain(`\r\n\r\n${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`);
    expect(answers[1]).toMatch(/^HTTP\/1\.1 200 /);
    const [first, second] = upstream.requests.slice(-2);
    expect(first).toMatchObject({ method: 'POST', url: '/echo' });
    for (const seen of [first!, second!]) {
      expect(seen.headers.upgrade).toBeUndefined();
      expect(seen.headers['http2-settings']).toBeUndefined();
      expect(seen.headers.connection).toBe('keep-alive');
    }
    expect(second).toMatchObject({ method: 'GET', url: '/inspect', headers: { 'x-app': 'second' } });
  });

  it('is answered in turn when pipelined behind a request still being answered, and the connection then serves the next one', async () => {
    // The sandbox answers the first request only once the data plane has seen the h2c one's
    // 'upgrade', which so comes while the first answer is pending on the same connection.
    let answerFirst: (() => void) | undefined;
    let upgradeSeen = false;
    const sandbox = http.createServer((req, res) => {
      if (req.url === '/first') {
        answerFirst = () => res.end('A');
        if (upgradeSeen) answerFirst();
        return;
      }
      res.end(req.url === '/second' ? 'B' : 'C');
    });
    dp.plane.server.once('upgrade', () => {
      upgradeSeen = true;
      setImmediate(() => answerFirst?.());
    });
    await new Promise<void>((resolve) => sandbox.listen(0, '127.0.0.1', () => resolve()));
    try {
      const port = (sandbox.address() as AddressInfo).port;
      dp.setRoute({ id: 'pipelined', ip: '127.0.0.1' });
      const request =
        `GET /kruise/pipelined/${port}/first HTTP/1.1\r\nHost: x\r\n\r\n` +
        `GET /kruise/pipelined/${port}/second HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n` +
        `GET /kruise/pipelined/${port}/third HTTP/1.1\r\nHost: x\r\n\r\n`;
      // Each answer is `...content-length: 1\r\n\r\n<body>`: complete once the third body is in.
      const received = await rawExchange(dp.address, request, (text) => text.endsWith('\r\n\r\nC'));
      expect(received.split(/(?=HTTP\/1\.1 )/).map((answer) => `${answer.slice(0, 12)} ${answer.slice(answer.indexOf('\r\n\r\n') + 4)}`)).toEqual([
        'HTTP/1.1 200 A',
        'HTTP/1.1 200 B',
        'HTTP/1.1 200 C',
      ]);
    } finally {
      sandbox.closeAllConnections();
      await new Promise<void>((resolve) => sandbox.close(() => resolve()));
    }
  });

  it('is refused with the same errors as any request when the sandbox is unknown', async () => {
    const request = `GET /kruise/nobody/${upstream.port}/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n`;
    const received = await rawExchange(dp.address, request, (text) => text.includes('\r\n\r\n') && text.trimEnd().endsWith('}'));
    expect(received).toMatch(/^HTTP\/1\.1 404 /);
    expect(received.toLowerCase()).toContain('x-routesync-error: sandbox_not_found');
  });
});

describe('headers', () => {
  it('strips tokens, routing and hop-by-hop headers; sets X-Forwarded-*', async () => {
    dp.setRoute({ id: 'hdr', ip: upstream.host, requireTrafficAuth: true, accessToken: 'tok-123' });
    const reply = await send(dp.address, {
      path: '/inspect',
      headers: {
        host: 'client.example.com',
        'e2b-sandbox-id': 'hdr',
        'e2b-sandbox-port': String(upstream.port),
        'e2b-traffic-access-token': 'tok-123',
        'x-access-token': 'tok-123',
        authorization: 'Bearer user-credential',
        'x-forwarded-for': '203.0.113.9',
        'x-forwarded-proto': 'https',
        'x-forwarded-host': 'spoofed.example.com',
        connection: 'keep-alive, x-hop, content-length',
        'x-hop': 'must go',
        'keep-alive': 'timeout=5',
        'proxy-authorization': 'Basic xyz',
        te: 'trailers',
        'x-app': 'kept',
      },
    });
    expect(reply.status).toBe(200);
    const seen = reply.json<Echo>().headers;
    for (const name of ['e2b-sandbox-id', 'e2b-sandbox-port', 'e2b-traffic-access-token', 'x-access-token', 'x-hop', 'keep-alive', 'proxy-authorization', 'te']) {
      expect(seen[name], name).toBeUndefined();
    }
    expect(JSON.stringify(seen)).not.toContain('tok-123');
    expect(seen['x-app']).toBe('kept');
    // The sandbox's own credentials are the sandbox's business: Authorization passes.
    expect(seen.authorization).toBe('Bearer user-credential');
    expect(seen['x-forwarded-for']).toBe('203.0.113.9, 127.0.0.1');
    expect(seen['x-forwarded-proto']).toBe('http');
    expect(seen['x-forwarded-host']).toBe('client.example.com');
    expect(seen.host).toBe('client.example.com');
    // A keep-alive agent to the sandbox, whatever the client asked for.
    expect(seen.connection).toBe('keep-alive');
  });

  it('a client cannot claim HTTPS, another host, port, prefix, address or URL through the other forwarding headers', async () => {
    dp.setRoute({ id: 'hdr-fwd', ip: upstream.host });
    const claims = {
      forwarded: 'for=198.51.100.66;proto=https;host=bank.example',
      'x-real-ip': '198.51.100.66',
      'x-forwarded-port': '443',
      'x-forwarded-prefix': '/admin',
      'x-forwarded-ssl': 'on',
      'x-forwarded-scheme': 'https',
      'x-forwarded-protocol': 'https',
      'front-end-https': 'on',
      'x-url-scheme': 'https',
      'x-forwarded-server': 'bank.example',
      'true-client-ip': '198.51.100.66',
      'x-client-ip': '198.51.100.66',
      'x-cluster-client-ip': '198.51.100.66',
      'cf-connecting-ip': '198.51.100.66',
      'fastly-client-ip': '198.51.100.66',
      'client-ip': '198.51.100.66',
      'x-original-forwarded-for': '198.51.100.66',
      'x-original-url': '/admin',
      'x-rewrite-url': '/admin',
    };
    const reply = await send(dp.address, { path: `/kruise/hdr-fwd/${upstream.port}/`, headers: { ...claims, 'x-forwarded-proto': 'https' } });
    const seen = reply.json<Echo>().headers;
    for (const name of Object.keys(claims)) expect(seen[name], name).toBeUndefined();
    expect(seen['x-forwarded-proto']).toBe('http');
    expect(seen['x-forwarded-for']).toBe('127.0.0.1');
  });

  it('passes on the ingress\'s X-Forwarded-Proto only when told to trust it (ROUTESYNC_PROXY_TRUST_FORWARDED_PROTO), and only http or https', async () => {
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TRUST_FORWARDED_PROTO: 'true' });
    dp.setRoute({ id: 'hdr-proto', ip: upstream.host });
    const proto = async (value: string | undefined) =>
      (await send(dp.address, { path: `/kruise/hdr-proto/${upstream.port}/`, headers: value === undefined ? {} : { 'x-forwarded-proto': value } })).json<Echo>().headers['x-forwarded-proto'];
    expect(await proto('https')).toBe('https');
    expect(await proto('HTTPS')).toBe('https');
    expect(await proto(undefined)).toBe('http');
    for (const odd of ['javascript', 'https, http', 'ftp']) expect(await proto(odd), odd).toBe('http');
  });

  it('drops the underscore spellings of the headers it drops or sets, which CGI-style servers read as the same header', async () => {
    dp.setRoute({ id: 'hdr-underscore', ip: upstream.host });
    const twins = {
      x_forwarded_proto: 'https',
      x_forwarded_host: 'bank.example',
      x_forwarded_for: '198.51.100.66',
      x_real_ip: '198.51.100.66',
      x_access_token: 'forged',
      e2b_sandbox_id: 'other',
      'x-custom_header': 'kept',
    };
    const reply = await send(dp.address, { path: `/kruise/hdr-underscore/${upstream.port}/`, headers: twins });
    const seen = reply.json<Echo>().headers;
    for (const name of Object.keys(twins).filter((name) => name !== 'x-custom_header')) expect(seen[name], name).toBeUndefined();
    expect(seen['x-custom_header'], 'an underscore header that is no twin passes').toBe('kept');
    expect(seen['x-forwarded-proto']).toBe('http');
  });

  it('refuses a transfer coding other than chunked alone (501), which the sandbox could frame otherwise than Node did', async () => {
    dp.setRoute({ id: 'te', ip: upstream.host });
    const post = (codings: string): Promise<string> =>
      new Promise<string>((resolve, reject) => {
        const socket = net.connect(dp.address.port, dp.address.address, () =>
          socket.write(`POST /kruise/te/${upstream.port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: ${codings}\r\n\r\n3\r\nabc\r\n0\r\n\r\n`),
        );
        let received = '';
        socket.on('data', (chunk: Buffer) => (received += chunk.toString('latin1')));
        socket.on('close', () => resolve(received));
        socket.on('error', reject);
      });
    for (const codings of ['identity, chunked', 'gzip, chunked']) {
      const answer = await post(codings);
      expect(answer, codings).toMatch(/^HTTP\/1\.1 501 /);
      expect(answer.toLowerCase()).toContain('x-routesync-error: unsupported_transfer_coding');
    }
    expect(upstream.requests).toHaveLength(0);
    expect(await post('Chunked')).toMatch(/^HTTP\/1\.1 200 /);
    expect(upstream.requests).toHaveLength(1);
  });

  it('answers carry no hop-by-hop headers from the sandbox', async () => {
    const custom = await startUpstream({
      host: '127.0.0.2',
      handler: (_req, res) => {
        res.writeHead(200, { 'keep-alive': 'timeout=99', connection: 'keep-alive, x-internal', 'x-internal': 'secret', 'x-visible': 'yes' });
        res.end('ok');
      },
    });
    try {
      dp.setRoute({ id: 'resp', ip: custom.host });
      const reply = await send(dp.address, { path: `/kruise/resp/${custom.port}/` });
      expect(reply.body).toBe('ok');
      expect(reply.headers['x-visible']).toBe('yes');
      expect(reply.headers['x-internal']).toBeUndefined();
      expect(reply.headers['keep-alive']).not.toBe('timeout=99');
    } finally {
      await custom.close();
    }
  });
});

describe('access log and metrics', () => {
  it('one info line per request with the chosen fields and no secret', async () => {
    dp.setRoute({ id: 'logged', ip: upstream.host, requireTrafficAuth: true, accessToken: 'super-secret-token' });
    await send(dp.address, {
      path: `/kruise/logged/${upstream.port}/files?token=query-secret`,
      headers: { 'e2b-traffic-access-token': 'super-secret-token', authorization: 'Bearer auth-secret' },
    });
    await send(dp.address, { path: `/kruise/logged/${upstream.port}/files`, headers: { 'x-access-token': 'wrong-secret' } });
    const lines = dp.logs.filter((line) => line.msg === 'proxy request');
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatchObject({
      level: 'info',
      kind: 'http',
      method: 'GET',
      path: `/kruise/logged/${upstream.port}/files`,
      sandboxId: 'logged',
      port: upstream.port,
      status: 200,
      outcome: 'proxied',
    });
    expect(typeof lines[0]!.durationMs).toBe('number');
    expect(lines[1]).toMatchObject({ status: 401, outcome: 'traffic_token_invalid' });
    const raw = dp.rawLog();
    for (const secret of ['super-secret-token', 'auth-secret', 'query-secret', 'wrong-secret']) expect(raw).not.toContain(secret);
  });

  it('no token or Authorization value reaches the log even at trace level, on success and on failure', async () => {
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_LOG_LEVEL: 'trace' });
    const secrets = { token: 'trace-secret-token', auth: 'trace-auth-secret', wrong: 'trace-wrong-secret' };
    dp.setRoute({ id: 'traced', ip: upstream.host, requireTrafficAuth: true, accessToken: secrets.token });
    const headers = { 'e2b-traffic-access-token': secrets.token, 'x-access-token': secrets.token, authorization: `Bearer ${secrets.auth}` };
    expect((await send(dp.address, { path: `/kruise/traced/${upstream.port}/`, headers })).status).toBe(200);
    expect((await send(dp.address, { path: `/kruise/traced/${upstream.port}/`, headers: { 'x-access-token': secrets.wrong } })).status).toBe(401);
    // The sandbox port is closed: the upstream error path logs too.
    expect((await send(dp.address, { path: `/kruise/traced/${await unusedPort()}/`, headers })).status).toBe(502);
    expect(dp.logs.filter((line) => line.msg === 'proxy request')).toHaveLength(3);
    const raw = dp.rawLog();
    for (const secret of Object.values(secrets)) expect(raw).not.toContain(secret);
  });

  it('ROUTESYNC_ACCESS_LOG=false writes no line but still counts', async () => {
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_ACCESS_LOG: 'false' });
    dp.setRoute({ id: 'quiet', ip: upstream.host });
    await send(dp.address, { path: `/kruise/quiet/${upstream.port}/` });
    expect(dp.logs.filter((line) => line.msg === 'proxy request')).toHaveLength(0);
    expect(await proxyRequestCount(dp.metrics, 'proxied')).toBe(1);
  });

  it('counts and times requests by outcome', async () => {
    dp.setRoute({ id: 'm', ip: upstream.host });
    await send(dp.address, { path: `/kruise/m/${upstream.port}/` });
    await send(dp.address, { path: `/kruise/m/${upstream.port}/` });
    await send(dp.address, { path: '/kruise/missing/1/' });
    expect(await proxyRequestCount(dp.metrics, 'proxied')).toBe(2);
    expect(await proxyRequestCount(dp.metrics, 'sandbox_not_found')).toBe(1);
    const text = await dp.metrics.registry.metrics();
    expect(text).toContain('routesync_proxy_request_duration_seconds_count{outcome="proxied"} 2');
  });
});
