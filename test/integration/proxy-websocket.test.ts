// WebSockets through the data plane against a real `ws` echo sandbox: every mapping form,
// refusals before the handshake, long-lived connections past the HTTP timeout, big and many
// messages, and a clean close (1001) when the data plane shuts down.
import { createHash, randomBytes } from 'node:crypto';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import WebSocket, { type RawData } from 'ws';
import { proxyRequestCount, send, startDataPlane, type TestDataPlane } from '../helpers/data-plane.js';
import { PatternStream, startRawUpstream, startUpstream, unusedPort, type Upstream } from '../helpers/upstream.js';
import { waitUntil } from '../helpers/wait.js';

// The data plane's HTTP timeout here: short, so that tests can wait past it, but not so short
// that a handshake on a loaded machine misses it (300 ms did: a 504 on the first handshake of
// the file while three other suites ran).
const TIMEOUT_MS = 1000;

interface ErrorAnswer {
  error: { code: string; message: string; state?: string };
}

interface Refusal {
  status: number;
  code: string | undefined;
  body: ErrorAnswer;
}

let dp: TestDataPlane;
let upstream: Upstream;
/** The sandbox side of every WebSocket it accepted, in order. */
let sandboxSockets: WebSocket[];
const clients: WebSocket[] = [];

/**
 * The sandbox: echoes every message; `wait:<ms>` is answered with `waited:<ms>` after ms of
 * silence on both sides (how a test waits past a timer as an event, without sleeping itself).
 */
function sandboxBehaviour(ws: WebSocket): void {
  sandboxSockets.push(ws);
  ws.on('message', (data: RawData, isBinary: boolean) => {
    const text = isBinary ? '' : data.toString();
    const wait = /^wait:(\d+)$/.exec(text);
    if (!wait) {
      ws.send(data, { binary: isBinary });
      return;
    }
    const timer = setTimeout(() => ws.send(`waited:${wait[1]}`), Number(wait[1]));
    ws.once('close', () => clearTimeout(timer));
  });
}

beforeEach(async () => {
  sandboxSockets = [];
  upstream = await startUpstream({ name: 'ws-sandbox', onWebSocket: sandboxBehaviour });
  // The pooled-socket idle timeout is short too: an upgraded socket must not inherit it.
  dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: String(TIMEOUT_MS) }, { upstreamIdleSocketTimeoutMs: TIMEOUT_MS, webSocketCloseTimeoutMs: 2000 });
  dp.setRoute({ id: 'ws', ip: upstream.host });
});

afterEach(async () => {
  for (const client of clients.splice(0)) client.terminate();
  await dp.close(0);
  await upstream.close();
});

function url(address: AddressInfo, path: string): string {
  return `ws://${address.address}:${address.port}${path}`;
}

/** Open a WebSocket through the data plane; rejects if the handshake fails. */
function connect(path: string, headers: Record<string, string> = {}): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url(dp.address, path), { headers, maxPayload: 256 * 1024 * 1024 });
    clients.push(ws);
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => reject(new Error(`handshake answered ${res.statusCode}`)));
  });
}

/** A handshake the data plane must refuse: its status, error code and JSON body. */
function refusal(path: string, headers: Record<string, string> = {}): Promise<Refusal> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url(dp.address, path), { headers });
    ws.once('open', () => {
      ws.terminate();
      reject(new Error('the handshake was accepted'));
    });
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => {
        const code = res.headers['x-routesync-error'];
        resolve({ status: res.statusCode ?? 0, code: Array.isArray(code) ? code[0] : code, body: JSON.parse(Buffer.concat(chunks).toString()) as ErrorAnswer });
      });
    });
  });
}

/** The status of a handshake's answer that is not a 101 (rejects if it is one). */
function refusalStatus(path: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url(dp.address, path));
    ws.once('open', () => {
      ws.terminate();
      reject(new Error('the handshake was accepted'));
    });
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
  });
}

/** A WebSocket handshake request as a raw client writes it. */
function handshakeRequest(path: string): string {
  return `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`;
}

/** A raw client through the data plane that keeps what it receives, as text. */
function rawClient(): { socket: net.Socket; received: () => string; closed: () => boolean } {
  const socket = net.connect(dp.address.port, dp.address.address);
  socket.on('error', () => {});
  let text = '';
  let isClosed = false;
  socket.on('data', (chunk: Buffer) => (text += chunk.toString('latin1')));
  socket.once('close', () => (isClosed = true));
  return { socket, received: () => text, closed: () => isClosed };
}

function nextMessage(ws: WebSocket): Promise<{ data: Buffer; isBinary: boolean }> {
  return new Promise((resolve, reject) => {
    const onClose = (code: number): void => reject(new Error(`closed with ${code} before a message`));
    ws.once('close', onClose);
    ws.once('message', (data: RawData, isBinary: boolean) => {
      ws.off('close', onClose);
      resolve({ data: data as Buffer, isBinary });
    });
  });
}

async function echo(ws: WebSocket, text: string): Promise<string> {
  const reply = nextMessage(ws);
  ws.send(text);
  return (await reply).data.toString();
}

function closed(ws: WebSocket): Promise<{ code: number; at: number }> {
  return new Promise((resolve) => ws.once('close', (code: number) => resolve({ code, at: performance.now() })));
}

describe('mapping forms', () => {
  it('path form: the sandbox sees /<rest> with the query; echo works', async () => {
    const ws = await connect(`/kruise/ws/${upstream.port}/chat/room?user=1`);
    expect(await echo(ws, 'hello')).toBe('hello');
    expect(upstream.requests).toHaveLength(1);
    expect(upstream.requests[0]!.url).toBe('/chat/room?user=1');
  });

  it('header form: e2b-sandbox-id and e2b-sandbox-port; the request path is kept', async () => {
    const ws = await connect('/events', { 'e2b-sandbox-id': 'ws', 'e2b-sandbox-port': String(upstream.port) });
    expect(await echo(ws, 'via headers')).toBe('via headers');
    expect(upstream.requests[0]!.url).toBe('/events');
    expect(upstream.requests[0]!.headers['e2b-sandbox-id']).toBeUndefined();
  });

  it('host form: <port>-<id>.<domain>', async () => {
    const ws = await connect('/terminal', { host: `${upstream.port}-ws.sandboxes.example.com` });
    expect(await echo(ws, 'via host')).toBe('via host');
    expect(upstream.requests[0]!.url).toBe('/terminal');
    expect(upstream.requests[0]!.headers['x-forwarded-host']).toBe(`${upstream.port}-ws.sandboxes.example.com`);
  });

  it('with traffic auth: the token admits the upgrade and is not forwarded', async () => {
    dp.setRoute({ id: 'ws', ip: upstream.host, requireTrafficAuth: true, accessToken: 'ws-secret' });
    const ws = await connect(`/kruise/ws/${upstream.port}/`, { 'x-access-token': 'ws-secret' });
    expect(await echo(ws, 'authed')).toBe('authed');
    const headers = upstream.requests[0]!.headers;
    expect(headers['x-access-token']).toBeUndefined();
    expect(headers['e2b-traffic-access-token']).toBeUndefined();
    expect(headers['x-forwarded-for']).toBe('127.0.0.1');
    expect(dp.rawLog()).not.toContain('ws-secret');
  });

  it('is counted, logged once with status 101, and tracked as an open WebSocket', async () => {
    const ws = await connect(`/kruise/ws/${upstream.port}/`);
    expect(await echo(ws, 'x')).toBe('x');
    expect((await dp.metrics.proxyWebsockets.get()).values[0]?.value).toBe(1);
    const line = dp.logs.find((entry) => entry.msg === 'proxy request');
    expect(line).toMatchObject({ kind: 'websocket', method: 'GET', sandboxId: 'ws', status: 101, outcome: 'proxied' });
    ws.close(1000);
    await upstream.waitForOpenSockets(0);
    await waitUntil(async () => (await dp.metrics.proxyWebsockets.get()).values[0]?.value === 0, 5000, 'the WebSocket gauge to drop to 0');
    expect(await proxyRequestCount(dp.metrics, 'proxied')).toBe(1);
    // Once: at the handshake, not again when the WebSocket closes.
    expect(dp.logs.filter((entry) => entry.msg === 'proxy request')).toHaveLength(1);
  });
});

describe('admission on upgrade: documented status and code, sandbox untouched', () => {
  const cases: {
    name: string;
    route?: { state?: string; requireTrafficAuth?: boolean; accessToken?: string };
    path: (port: number) => string;
    headers?: Record<string, string>;
    status: number;
    code: string;
  }[] = [
    { name: 'unknown sandbox', path: (port) => `/kruise/unknown/${port}/`, status: 404, code: 'sandbox_not_found' },
    { name: 'paused sandbox', route: { state: 'paused' }, path: (port) => `/kruise/ws/${port}/`, status: 503, code: 'sandbox_not_running' },
    { name: 'invalid port', path: () => '/kruise/ws/70000/', status: 400, code: 'invalid_port' },
    { name: 'missing token', route: { requireTrafficAuth: true, accessToken: 't' }, path: (port) => `/kruise/ws/${port}/`, status: 401, code: 'traffic_token_missing' },
    {
      name: 'wrong token',
      route: { requireTrafficAuth: true, accessToken: 'right-token' },
      path: (port) => `/kruise/ws/${port}/`,
      headers: { 'e2b-traffic-access-token': 'wrong-token' },
      status: 401,
      code: 'traffic_token_invalid',
    },
  ];

  for (const testCase of cases) {
    it(`${testCase.name} -> ${testCase.status} ${testCase.code}`, async () => {
      if (testCase.route) dp.setRoute({ id: 'ws', ip: upstream.host, ...testCase.route });
      const answer = await refusal(testCase.path(upstream.port), testCase.headers);
      expect(answer.status).toBe(testCase.status);
      expect(answer.code).toBe(testCase.code);
      expect(answer.body.error.code).toBe(testCase.code);
      if (testCase.code === 'sandbox_not_running') expect(answer.body.error.state).toBe('paused');
      expect(upstream.requests).toHaveLength(0);
      expect(upstream.acceptedSockets()).toBe(0);
      expect(await proxyRequestCount(dp.metrics, testCase.code)).toBe(1);
    });
  }

  it("a sandbox that answers the handshake with plain HTTP has its answer relayed", async () => {
    const plain = await startUpstream({ name: 'plain' });
    try {
      // No WebSocket server on this path: the sandbox says 401 in plain HTTP.
      plain.server.removeAllListeners('upgrade');
      plain.server.on('upgrade', (_req, socket) => socket.end('HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain\r\ncontent-length: 7\r\nconnection: close\r\n\r\nsandbox'));
      dp.setRoute({ id: 'plain', ip: plain.host });
      const status = await new Promise<{ status: number; body: string; code: unknown }>((resolve, reject) => {
        const ws = new WebSocket(url(dp.address, `/kruise/plain/${plain.port}/`));
        ws.once('open', () => reject(new Error('the handshake was accepted')));
        ws.once('error', reject);
        ws.once('unexpected-response', (_req, res) => {
          let body = '';
          res.on('data', (chunk: Buffer) => (body += chunk.toString()));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body, code: res.headers['x-routesync-error'] }));
        });
      });
      expect(status).toEqual({ status: 401, body: 'sandbox', code: undefined });
      // Recorded once the answer has ended, which the client may see first.
      await waitUntil(async () => (await proxyRequestCount(dp.metrics, 'proxied')) === 1, 5000, 'the plain answer to be recorded as proxied');
      const line = dp.logs.find((entry) => entry.msg === 'proxy request');
      expect(line).toMatchObject({ kind: 'websocket', status: 401, outcome: 'proxied' });
    } finally {
      await plain.close();
    }
  });

  it('a handshake that claims a body is refused 400 unsupported_upgrade, the sandbox untouched; Content-Length: 0 is no body', async () => {
    const path = `/kruise/ws/${upstream.port}/`;
    const handshake = handshakeRequest(path);
    for (const framing of ['Content-Length: 97', 'Transfer-Encoding: chunked']) {
      const client = rawClient();
      // A GET handshake with a body header, and bytes after it that a sandbox would read as the body.
      client.socket.write(`${handshake.slice(0, -2)}${framing}\r\n\r\n${'0\r\n\r\n'}`);
      await waitUntil(() => client.closed(), 5000, `the refusal of a handshake with ${framing}`);
      expect(client.received(), framing).toMatch(/^HTTP\/1\.1 400 /);
      expect(client.received().toLowerCase()).toContain('x-routesync-error: unsupported_upgrade');
    }
    expect(upstream.acceptedSockets()).toBe(0);
    expect(await proxyRequestCount(dp.metrics, 'unsupported_upgrade')).toBe(2);
    const ws = await connect(path, { 'content-length': '0' });
    expect(await echo(ws, 'no body')).toBe('no body');
  });

  it("a sandbox's connection that answered a handshake plainly is not reused for the next request", async () => {
    // A sandbox without WebSockets (no 'upgrade' listener: Node serves the handshake as a plain
    // GET) that keeps its connections alive, and records which connection served which request.
    const served: { url: string; connection: number }[] = [];
    let connections = 0;
    const sandbox = http.createServer((req, res) => {
      served.push({ url: req.url ?? '', connection: (req.socket as net.Socket & { n?: number }).n! });
      res.writeHead(req.url === '/ws' ? 404 : 200, { 'content-length': '2' });
      res.end('ok');
    });
    sandbox.on('connection', (socket: net.Socket & { n?: number }) => (socket.n = ++connections));
    await new Promise<void>((resolve) => sandbox.listen(0, upstream.host, () => resolve()));
    try {
      const port = (sandbox.address() as AddressInfo).port;
      dp.setRoute({ id: 'plain', ip: upstream.host });
      const answer = await refusalStatus(`/kruise/plain/${port}/ws`);
      expect(answer).toBe(404);
      const next = await fetch(`http://${dp.address.address}:${dp.address.port}/kruise/plain/${port}/next`);
      expect(await next.text()).toBe('ok');
      expect(served).toEqual([
        { url: '/ws', connection: 1 },
        { url: '/next', connection: 2 },
      ]);
    } finally {
      sandbox.closeAllConnections();
      await new Promise<void>((resolve) => sandbox.close(() => resolve()));
    }
  });

  it('a client that leaves during a streaming plain answer releases the upstream connection', async () => {
    // The sandbox ignores the Upgrade and starts an event stream (SSE), then stays silent, as a
    // long poll does: no write of its own would reveal that the client is gone.
    const streaming = await startRawUpstream((socket) =>
      socket.once('data', () => socket.write('HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata:x\r\n')),
    );
    try {
      dp.setRoute({ id: 'sse', ip: streaming.host });
      const client = rawClient();
      client.socket.write(handshakeRequest(`/kruise/sse/${streaming.port}/events`));
      await waitUntil(() => client.received().includes('data:x'), 5000, 'the first event to reach the client');
      expect(client.received()).toMatch(/^HTTP\/1\.1 200 /);
      expect(streaming.openSockets()).toBe(1);
      // Not recorded while the answer streams: its end decides the outcome.
      expect(dp.logs.filter((entry) => entry.msg === 'proxy request')).toHaveLength(0);
      client.socket.destroy();
      await streaming.waitForOpenSockets(0, 5000);
      await waitUntil(async () => (await proxyRequestCount(dp.metrics, 'client_aborted')) === 1, 5000, 'the exchange to be recorded as client_aborted');
      expect(await proxyRequestCount(dp.metrics, 'proxied')).toBe(0);
    } finally {
      await streaming.close();
    }
  });

  it('a plain answer the sandbox cuts mid-body (reset) closes the client connection instead of hanging it', async () => {
    const cutting = await startRawUpstream((socket) =>
      socket.once('data', () => socket.write('HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\npartial', () => socket.resetAndDestroy())),
    );
    try {
      dp.setRoute({ id: 'cut', ip: cutting.host });
      const client = rawClient();
      client.socket.write(handshakeRequest(`/kruise/cut/${cutting.port}/`));
      await waitUntil(client.closed, 5000, 'the data plane to close the client connection');
      expect(client.received()).toMatch(/^HTTP\/1\.1 200 [^]*\r\n\r\npartial$/);
      // Counted as the HTTP path counts a cut answer, not as proxied.
      expect(await proxyRequestCount(dp.metrics, 'upstream_unreachable')).toBe(1);
      expect(await proxyRequestCount(dp.metrics, 'proxied')).toBe(0);
      expect(dp.logs.find((entry) => entry.msg === 'proxy request')).toMatchObject({ status: 200, outcome: 'upstream_unreachable' });
      // Nothing is left upgrading: shutdown does not wait for a grace it has no reason to.
      const started = performance.now();
      await dp.close(20_000);
      expect(performance.now() - started).toBeLessThan(5000);
    } finally {
      await cutting.close();
    }
  });

  it("a plain answer to the handshake loses the sandbox's hop-by-hop headers and says Connection: close", async () => {
    const plain = await startRawUpstream((socket) =>
      socket.once('data', () =>
        socket.end('HTTP/1.1 403 Forbidden\r\nConnection: keep-alive, x-internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=99\r\nContent-Length: 3\r\n\r\nno!'),
      ),
    );
    try {
      dp.setRoute({ id: 'plain', ip: plain.host });
      const client = rawClient();
      client.socket.write(handshakeRequest(`/kruise/plain/${plain.port}/`));
      await waitUntil(client.closed, 5000, 'the data plane to close the client connection after the answer');
      const [head = '', body] = client.received().split('\r\n\r\n');
      const lines = head.split('\r\n');
      expect(lines[0]).toBe('HTTP/1.1 403 Forbidden');
      const names = lines.slice(1).map((line) => line.slice(0, line.indexOf(':')).toLowerCase());
      expect(names).not.toContain('x-internal');
      expect(names).not.toContain('keep-alive');
      expect(lines.filter((line) => /^connection:/i.test(line))).toEqual(['connection: close']);
      expect(body).toBe('no!');
    } finally {
      await plain.close();
    }
  });

  const unrelayable = [
    { name: 'a status line Node cannot write (000)', answer: 'HTTP/1.1 000 Weird\r\nContent-Length: 2\r\n\r\nhi' },
    { name: 'a transfer coding other than chunked', answer: 'HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n' },
  ];
  for (const testCase of unrelayable) {
    it(`a plain answer to the handshake with ${testCase.name} -> 502 upstream_protocol_error`, async () => {
      const bad = await startRawUpstream((socket) => socket.once('data', () => socket.end(testCase.answer)));
      try {
        dp.setRoute({ id: 'bad', ip: bad.host });
        const answer = await refusal(`/kruise/bad/${bad.port}/`);
        expect(answer.status).toBe(502);
        expect(answer.code).toBe('upstream_protocol_error');
        expect(answer.body.error.code).toBe('upstream_protocol_error');
        expect(await proxyRequestCount(dp.metrics, 'upstream_protocol_error')).toBe(1);
        expect(await proxyRequestCount(dp.metrics, 'proxied')).toBe(0);
      } finally {
        await bad.close();
      }
    });
  }

  it('a sandbox that refuses the connection -> 502; one that never answers the handshake -> 504', async () => {
    const closedPort = await unusedPort();
    expect((await refusal(`/kruise/ws/${closedPort}/`)).code).toBe('upstream_unreachable');
    const silent = await startRawUpstream((socket) => socket.resume());
    try {
      const answer = await refusal(`/kruise/ws/${silent.port}/`);
      expect(answer.status).toBe(504);
      expect(answer.code).toBe('upstream_timeout');
      await silent.waitForOpenSockets(0);
    } finally {
      await silent.close();
    }
    // Still serving.
    expect(await echo(await connect(`/kruise/ws/${upstream.port}/`), 'after')).toBe('after');
  });
});

describe('a handshake the sandbox has not answered yet', () => {
  beforeEach(async () => {
    // A handshake deadline far past every wait below: nothing here may end by timing out.
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '30000' });
  });

  it('a client that closes its connection (FIN) releases the upstream handshake and is counted client_aborted', async () => {
    let handshakeSeen!: () => void;
    const seen = new Promise<void>((resolve) => (handshakeSeen = resolve));
    // The sandbox reads the handshake and never answers it.
    const slow = await startRawUpstream((socket) => socket.once('data', () => handshakeSeen()));
    try {
      dp.setRoute({ id: 'slow', ip: slow.host });
      const client = rawClient();
      client.socket.write(handshakeRequest(`/kruise/slow/${slow.port}/`));
      await seen;
      expect(slow.openSockets()).toBe(1);
      client.socket.destroy(); // a closed browser tab
      await slow.waitForOpenSockets(0, 5000);
      expect(await proxyRequestCount(dp.metrics, 'client_aborted')).toBe(1);
    } finally {
      await slow.close();
    }
  });

  it('a 101 without an Upgrade header -> 502 upstream_protocol_error that says so', async () => {
    const sandbox = await startRawUpstream((socket) => socket.once('data', () => socket.write('HTTP/1.1 101 Switching Protocols\r\n\r\n')));
    try {
      dp.setRoute({ id: 'noupgrade', ip: sandbox.host });
      const client = rawClient();
      client.socket.write(handshakeRequest(`/kruise/noupgrade/${sandbox.port}/`));
      await waitUntil(() => client.closed(), 5000, 'the refusal to close the connection');
      expect(client.received()).toMatch(/^HTTP\/1\.1 502 /);
      const body = JSON.parse(client.received().slice(client.received().indexOf('\r\n\r\n') + 4)) as { error: { code: string; message: string } };
      expect(body.error.code).toBe('upstream_protocol_error');
      expect(body.error.message).toContain('no Upgrade header');
    } finally {
      await sandbox.close();
    }
  });

  it('what the client sends before the 101 reaches the sandbox after it, in order', async () => {
    // Two masked text frames ("hi", "yo"; all-zero mask key): the first in the same write as
    // the handshake (Node's upgrade head), the second while the handshake is pending upstream.
    const first = Buffer.from([0x81, 0x82, 0, 0, 0, 0, 0x68, 0x69]);
    const second = Buffer.from([0x81, 0x82, 0, 0, 0, 0, 0x79, 0x6f]);
    let sandbox!: net.Socket;
    let handshakeSeen!: () => void;
    const seen = new Promise<void>((resolve) => (handshakeSeen = resolve));
    const afterHandshake: Buffer[] = [];
    const held = await startRawUpstream((socket) => {
      sandbox = socket;
      socket.once('data', () => {
        socket.on('data', (chunk: Buffer) => afterHandshake.push(chunk));
        handshakeSeen();
      });
    });
    try {
      dp.setRoute({ id: 'held', ip: held.host });
      let clientSide!: net.Socket;
      dp.plane.server.once('upgrade', (_req, socket: net.Socket) => (clientSide = socket));
      const client = rawClient();
      const request = Buffer.from(handshakeRequest(`/kruise/held/${held.port}/`), 'latin1');
      client.socket.write(Buffer.concat([request, first]));
      await seen;
      client.socket.write(second);
      const sent = request.length + first.length + second.length;
      await waitUntil(() => clientSide.bytesRead === sent, 5000, 'the data plane to read what the client sent');

      sandbox.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n');
      const expected = Buffer.concat([first, second]);
      await waitUntil(() => Buffer.concat(afterHandshake).length >= expected.length, 5000, 'the early frames to reach the sandbox');
      expect(Buffer.concat(afterHandshake)).toEqual(expected);
      await waitUntil(() => client.received().startsWith('HTTP/1.1 101'), 5000, 'the 101 to reach the client');
      client.socket.destroy();
    } finally {
      await held.close();
    }
  });
});

describe('a handshake pipelined behind a request still being answered', () => {
  it('is answered after that request, and the WebSocket then works', async () => {
    // The sandbox answers /first once it has accepted the WebSocket, which a data plane that
    // forwarded the handshake at once would have it do first; otherwise after 500 ms, a slow
    // answer (the handshake is forwarded only then), within a proxy timeout longer than this
    // file's.
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000' });
    let answerFirst: (() => void) | undefined;
    const slow = await startUpstream({
      name: 'slow-then-ws',
      handler: (_req, res) => {
        const timer = setTimeout(() => answerFirst?.(), 500);
        answerFirst = () => {
          clearTimeout(timer);
          answerFirst = undefined;
          res.end('A');
        };
      },
      onWebSocket: (ws) => {
        sandboxBehaviour(ws);
        answerFirst?.();
      },
    });
    try {
      dp.setRoute({ id: 'pipe', ip: slow.host });
      const client = rawClient();
      client.socket.write(`GET /kruise/pipe/${slow.port}/first HTTP/1.1\r\nHost: x\r\n\r\n${handshakeRequest(`/kruise/pipe/${slow.port}/ws`)}`);
      await waitUntil(() => client.received().includes('HTTP/1.1 101'), 5000, 'the 101');
      const received = client.received();
      // In request order: the first request's whole answer, then the 101.
      expect(received).toMatch(/^HTTP\/1\.1 200 /);
      expect(received.indexOf('\r\n\r\nA')).toBeGreaterThan(0);
      expect(received.indexOf('\r\n\r\nA')).toBeLessThan(received.indexOf('HTTP/1.1 101'));
      expect(received.slice(received.indexOf('HTTP/1.1 101'))).not.toContain('HTTP/1.1 200');
      // A masked text frame "hi"; the sandbox echoes it unmasked.
      const mask = [1, 2, 3, 4];
      client.socket.write(Buffer.from([0x81, 0x82, ...mask, 'h'.charCodeAt(0) ^ mask[0]!, 'i'.charCodeAt(0) ^ mask[1]!]));
      await waitUntil(() => client.received().endsWith('\x81\x02hi'), 5000, 'the echo');
      client.socket.destroy();
    } finally {
      await slow.close();
    }
  });

  it('is answered after every answer before it, when two are pending', async () => {
    // /a is answered once /b has reached the sandbox; /b once the sandbox has accepted the
    // WebSocket (which a data plane that waited only for /a would let happen first), or after
    // 500 ms; the proxy timeout is longer than this file's.
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000' });
    const held = new Map<string, () => void>();
    const answer = (name: string): void => {
      held.get(name)?.();
      held.delete(name);
    };
    const twoSlow = await startUpstream({
      name: 'two-slow',
      handler: (req, res) => {
        const name = req.url!.slice(1);
        held.set(name, () => res.end(`BODY-${name}`));
        if (name !== 'b') return;
        answer('a');
        setTimeout(() => answer('b'), 500).unref();
      },
      onWebSocket: (ws) => {
        sandboxBehaviour(ws);
        answer('b');
      },
    });

    try {
      dp.setRoute({ id: 'pipe', ip: twoSlow.host });
      const client = rawClient();
      const base = `/kruise/pipe/${twoSlow.port}`;
      client.socket.write(`GET ${base}/a HTTP/1.1\r\nHost: x\r\n\r\nGET ${base}/b HTTP/1.1\r\nHost: x\r\n\r\n${handshakeRequest(`${base}/ws`)}`);
      await waitUntil(() => client.received().includes('HTTP/1.1 101'), 5000, 'the 101');
      const received = client.received();
      const [a, b, switched] = [received.indexOf('BODY-a'), received.indexOf('BODY-b'), received.indexOf('HTTP/1.1 101')];
      expect(a).toBeGreaterThan(0);
      expect(b).toBeGreaterThan(a);
      expect(switched).toBeGreaterThan(b);
      client.socket.destroy();
    } finally {
      await twoSlow.close();
    }
  });

  it('a client that resets its connection while the handshake waits takes nothing down, and the data plane goes on serving', async () => {
    let release: (() => void) | undefined;
    const slow = await startUpstream({ name: 'slow', handler: (_req, res) => (release = () => res.end('late')), onWebSocket: sandboxBehaviour });
    const uncaught: unknown[] = [];
    const onUncaught = (error: unknown): void => void uncaught.push(error);
    process.prependListener('uncaughtException', onUncaught);
    try {
      dp.setRoute({ id: 'pipe', ip: slow.host });
      const upgradeSeen = new Promise<void>((resolve) => dp.plane.server.once('upgrade', () => setImmediate(resolve)));
      const client = rawClient();
      client.socket.write(`GET /kruise/pipe/${slow.port}/first HTTP/1.1\r\nHost: x\r\n\r\n${handshakeRequest(`/kruise/pipe/${slow.port}/ws`)}`);
      await upgradeSeen;
      client.socket.resetAndDestroy();
      await waitUntil(async () => (await proxyRequestCount(dp.metrics, 'client_aborted')) >= 1, 5000, 'the pending request to end with its client');
      release?.();
      // Nothing of it is left waiting: a socket still counted as upgrading would hold every
      // later shutdown for its whole grace.
      const upgrading = (): number => (dp.plane as unknown as { upgrading: Set<unknown> }).upgrading.size;
      await waitUntil(() => upgrading() === 0, 5000, 'nothing left upgrading');
      expect(uncaught).toEqual([]);
      const ws = await connect(`/kruise/ws/${upstream.port}/`);
      expect(await echo(ws, 'still serving')).toBe('still serving');
    } finally {
      process.off('uncaughtException', onUncaught);
      await slow.close();
    }
  });

  it('does not hold shutdown past its grace when the answer before it never ends', async () => {
    const endless = await startUpstream({
      name: 'endless',
      handler: (_req, res) => {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write('data: 1\n\n');
      },
      onWebSocket: sandboxBehaviour,
    });
    try {
      dp.setRoute({ id: 'pipe', ip: endless.host });
      const client = rawClient();
      client.socket.write(`GET /kruise/pipe/${endless.port}/sse HTTP/1.1\r\nHost: x\r\n\r\n${handshakeRequest(`/kruise/pipe/${endless.port}/ws`)}`);
      await waitUntil(() => client.received().includes('data: 1'), 5000, 'the stream to start');
      let closed = false;
      const closing = dp.close(200).then(() => void (closed = true));
      // The grace (200 ms), then at most the 1 s close timeout: seconds to spare, but a close
      // that waited out anything more (the stream, a longer timer) would not make it.
      await waitUntil(() => closed, 2500, 'the data plane to close after its 200 ms grace');
      await closing;
      await waitUntil(() => client.closed(), 5000, 'the client connection to be closed');
    } finally {
      await endless.close();
    }
  });

  it('is dropped with the connection when that answer closes it', async () => {
    // A refusal of a request whose body the data plane does not read closes the connection
    // after it (Connection: close); the handshake behind it goes with it.
    const client = rawClient();
    client.socket.write(`POST /kruise/nobody/${upstream.port}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello${handshakeRequest(`/kruise/ws/${upstream.port}/`)}`);
    await waitUntil(() => client.closed(), 5000, 'the connection closed');
    expect(client.received()).toMatch(/^HTTP\/1\.1 404 /);
    expect(client.received().toLowerCase()).toContain('connection: close');
    expect(client.received()).not.toContain('HTTP/1.1 101');
    expect(upstream.acceptedSockets()).toBe(0);
  });
});

describe('an open WebSocket whose route changes', () => {
  /** Resolves with the close code, or fails after 5 s. */
  function closedWithin(ws: WebSocket): Promise<number> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('the WebSocket was not closed within 5 s')), 5000);
      ws.once('close', (code: number) => {
        clearTimeout(timer);
        resolve(code);
      });
    });
  }

  it('is closed (1001) once its token is rotated or its sandbox paused or deleted, and kept through a change that still admits it', async () => {
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000' }, { webSocketRecheckMs: 50, webSocketCloseTimeoutMs: 2000 });
    const rounds = (): number => (dp.plane as unknown as { recheckRounds: number }).recheckRounds;
    const path = `/kruise/ws/${upstream.port}/`;
    dp.setRoute({ id: 'ws', ip: upstream.host, requireTrafficAuth: true, accessToken: 'tok-1' });
    const first = await connect(path, { 'e2b-traffic-access-token': 'tok-1' });
    // A newer version with the same pod and token: kept open, checks after it included.
    dp.setRoute({ id: 'ws', ip: upstream.host, requireTrafficAuth: true, accessToken: 'tok-1' });
    const start = rounds();
    await waitUntil(() => rounds() >= start + 2, 5000, 'two rounds of checks');
    expect(await echo(first, 'still admitted')).toBe('still admitted');
    // The token rotated: the session it opened is revoked.
    const revoked = closedWithin(first);
    dp.setRoute({ id: 'ws', ip: upstream.host, requireTrafficAuth: true, accessToken: 'tok-2' });
    expect(await revoked).toBe(1001);

    for (const change of [() => dp.setRoute({ id: 'ws', ip: upstream.host, state: 'paused' }), () => dp.table.delete({ namespace: 'default', name: 'ws' })]) {
      dp.setRoute({ id: 'ws', ip: upstream.host });
      const ws = await connect(path);
      const ended = closedWithin(ws);
      change();
      expect(await ended).toBe(1001);
    }
  });

  it('is closed once its token is rotated during the shutdown grace, not at the end of the grace', async () => {
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000' }, { webSocketRecheckMs: 50, webSocketCloseTimeoutMs: 2000 });
    dp.setRoute({ id: 'ws', ip: upstream.host, requireTrafficAuth: true, accessToken: 'grace-tok-1' });
    const ws = await connect(`/kruise/ws/${upstream.port}/`, { 'e2b-traffic-access-token': 'grace-tok-1' });
    // SIGTERM with a minute's grace: the WebSocket keeps working through it...
    const closing = dp.plane.close(60_000);
    expect(await echo(ws, 'during the grace')).toBe('during the grace');
    // ...until the manager revokes it (a rolling restart rotating tokens); closedWithin bounds
    // the wait at 5 s, far inside the grace.
    const revoked = closedWithin(ws);
    dp.setRoute({ id: 'ws', ip: upstream.host, requireTrafficAuth: true, accessToken: 'grace-tok-2' });
    expect(await revoked).toBe(1001);
    // Nothing else is open: the drain ends with it.
    await closing;
  });
});

describe('a streaming plain answer to a WebSocket handshake', () => {
  // A sandbox server without WebSocket support answers a handshake as an ordinary request (Node's
  // http server without an 'upgrade' listener does, as Go's net/http and Python's do): an event
  // stream or a download asked for with Upgrade headers gets the same checks as over plain HTTP.
  const handshakeHeaders = 'Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n';

  it('is cut before its next event once its token is rotated', async () => {
    const streams = new Set<http.ServerResponse>();
    const sandbox = await startUpstream({
      host: '127.0.0.2',
      handler: (_req, res) => {
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        res.write('data: open\n\n');
        streams.add(res);
        res.on('close', () => streams.delete(res));
      },
    });
    sandbox.server.removeAllListeners('upgrade');
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000' }, { webSocketRecheckMs: 50 });
    const rounds = (): number => (dp.plane as unknown as { recheckRounds: number }).recheckRounds;
    try {
      dp.setRoute({ id: 'plain-sse', ip: sandbox.host, requireTrafficAuth: true, accessToken: 'plain-tok-1' });
      const client = rawClient();
      client.socket.write(`GET /kruise/plain-sse/${sandbox.port}/events HTTP/1.1\r\nHost: x\r\ne2b-traffic-access-token: plain-tok-1\r\n${handshakeHeaders}\r\n`);
      await waitUntil(() => client.received().includes('data: open'), 5000, 'the stream to open');
      dp.setRoute({ id: 'plain-sse', ip: sandbox.host, requireTrafficAuth: true, accessToken: 'plain-tok-2' });
      const start = rounds();
      await waitUntil(() => rounds() >= start + 2, 5000, 'two rounds of checks');
      for (const res of streams) res.write('data: secret after rotation\n\n');
      await waitUntil(() => client.closed(), 5000, 'the stream to be cut');
      expect(client.received()).not.toContain('secret after rotation');
      await waitUntil(async () => (await proxyRequestCount(dp.metrics, 'route_changed')) === 1, 5000, 'one answer counted route_changed');
      await waitUntil(() => streams.size === 0, 5000, 'the sandbox to see the stream closed');
    } finally {
      await sandbox.close();
    }
  });

  it('is cut when its client takes none of it for the send timeout, freeing the pool', async () => {
    const sandbox = await startUpstream({
      host: '127.0.0.2',
      handler: (req, res) => {
        if (req.url !== '/big') return void res.end('ok');
        res.writeHead(200, { 'content-type': 'application/octet-stream' });
        new PatternStream(64 * 1024 * 1024).pipe(res);
      },
    });
    sandbox.server.removeAllListeners('upgrade');
    await dp.close(0);
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '30000', ROUTESYNC_PROXY_MAX_SOCKETS: '1', ROUTESYNC_PROXY_SEND_TIMEOUT_MS: '300' });
    try {
      dp.setRoute({ id: 'plain-big', ip: sandbox.host });
      const stalled = net.connect(dp.address.port, dp.address.address);
      stalled.on('error', () => {});
      stalled.pause();
      stalled.write(`GET /kruise/plain-big/${sandbox.port}/big HTTP/1.1\r\nHost: x\r\n${handshakeHeaders}\r\n`);
      await waitUntil(async () => (await proxyRequestCount(dp.metrics, 'client_stalled')) === 1, 10_000, 'one answer counted client_stalled');
      stalled.destroy();
      // The pool's only socket is free again.
      const next = await send(dp.address, { path: `/kruise/plain-big/${sandbox.port}/` });
      expect(next.status).toBe(200);
    } finally {
      await sandbox.close();
    }
  });
});

describe('an open WebSocket', () => {
  it(`stays open and working well past the ${TIMEOUT_MS} ms HTTP timeout`, async () => {
    const ws = await connect(`/kruise/ws/${upstream.port}/`);
    const quietMs = TIMEOUT_MS * 4;
    // Both directions silent for 4x the timeout (and 4x the pooled-socket idle timeout); the
    // sandbox says when that time has passed.
    expect(await echo(ws, `wait:${quietMs}`)).toBe(`waited:${quietMs}`);
    expect(await echo(ws, 'still here')).toBe('still here');
    expect(ws.readyState).toBe(WebSocket.OPEN);
    expect(await proxyRequestCount(dp.metrics, 'upstream_timeout')).toBe(0);
  });

  it('passes a 32 MiB binary message intact both ways', async () => {
    const ws = await connect(`/kruise/ws/${upstream.port}/`);
    const payload = randomBytes(32 * 1024 * 1024);
    const reply = nextMessage(ws);
    ws.send(payload, { binary: true });
    const { data, isBinary } = await reply;
    expect(isBinary).toBe(true);
    expect(data.length).toBe(payload.length);
    expect(createHash('sha256').update(data).digest('hex')).toBe(createHash('sha256').update(payload).digest('hex'));
  });

  it('passes 5,000 messages in order, text and binary interleaved', async () => {
    const ws = await connect(`/kruise/ws/${upstream.port}/`);
    const COUNT = 5000;
    const received: string[] = [];
    const all = new Promise<void>((resolve) => {
      ws.on('message', (data: RawData, isBinary: boolean) => {
        received.push(`${isBinary ? 'b' : 't'}:${(data as Buffer).toString()}`);
        if (received.length === COUNT) resolve();
      });
    });
    const sent: string[] = [];
    for (let i = 0; i < COUNT; i++) {
      const binary = i % 3 === 0;
      const text = `message-${i}-${'x'.repeat(i % 200)}`;
      sent.push(`${binary ? 'b' : 't'}:${text}`);
      ws.send(binary ? Buffer.from(text) : text, { binary });
    }
    await all;
    expect(received).toEqual(sent);
  });

  it('a client close reaches the sandbox with its code, and no upstream socket is left', async () => {
    const ws = await connect(`/kruise/ws/${upstream.port}/`);
    expect(await echo(ws, 'x')).toBe('x');
    const sandboxClosed = closed(sandboxSockets[0]!);
    ws.close(4000, 'done');
    expect((await sandboxClosed).code).toBe(4000);
    await upstream.waitForOpenSockets(0);
  });
});

describe('a plain answer to a handshake, to a client that reads nothing', () => {
  it('is relayed with backpressure: the sandbox is held back, not read into the data plane, and the client gets it all once it reads', async () => {
    // A sandbox without WebSockets answers the handshake as a plain GET, here with 64 MiB. The
    // sandbox writes as fast as its socket takes it and says when its writes have been held
    // back for a second: buffering in the data plane would read it all, never holding it back.
    const BYTES = 64 * 1024 * 1024;
    const CHUNK = Buffer.alloc(64 * 1024, 0x61);
    let sent = 0;
    let heldBackSince: number | undefined;
    const sandbox = http.createServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(BYTES) });
      const write = (): void => {
        while (sent < BYTES) {
          sent += CHUNK.length;
          if (!res.write(CHUNK)) {
            heldBackSince = Date.now();
            res.once('drain', () => {
              heldBackSince = undefined;
              write();
            });
            return;
          }
        }
        res.end();
      };
      write();
    });
    await new Promise<void>((resolve) => sandbox.listen(0, '127.0.0.1', () => resolve()));
    const port = (sandbox.address() as AddressInfo).port;
    dp.setRoute({ id: 'plain-download', ip: '127.0.0.1' });
    let dataPlaneSide: net.Socket | undefined;
    dp.plane.server.on('upgrade', (_req: unknown, socket: net.Socket) => (dataPlaneSide = socket));
    const client = net.connect({ port: dp.address.port, host: dp.address.address });
    client.on('error', () => {});
    try {
      client.pause();
      client.write(
        `GET /kruise/plain-download/${port}/file HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n` +
          'Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n',
      );
      await waitUntil(() => sent >= BYTES || (heldBackSince !== undefined && Date.now() - heldBackSince > 1000), 30_000, 'the sandbox to finish or be held back');
      expect(sent, 'the sandbox was held back before the end of its answer').toBeLessThan(BYTES);
      expect(dataPlaneSide!.writableLength, 'bytes queued in the data plane for the client').toBeLessThan(4 * 1024 * 1024);
      let received = 0;
      client.on('data', (chunk: Buffer) => (received += chunk.length));
      const closed = new Promise<void>((resolve) => client.once('close', () => resolve()));
      client.resume();
      await closed;
      expect(received, 'the whole answer, headers and body').toBeGreaterThan(BYTES);
    } finally {
      client.destroy();
      sandbox.closeAllConnections();
      await new Promise<void>((resolve) => sandbox.close(() => resolve()));
    }
  }, 60_000);
});

describe('a client that goes away from an open WebSocket, in front of a sandbox that ignores TCP half-close', () => {
  // A sandbox that finishes the handshake and then ignores everything, a FIN included
  // (allowHalfOpen): a frozen process, or a server that never reacts to half-close.
  let frozen: net.Server;
  let frozenSockets: net.Socket[];

  beforeEach(async () => {
    frozenSockets = [];
    frozen = net.createServer({ allowHalfOpen: true }, (socket) => {
      frozenSockets.push(socket);
      socket.on('error', () => {});
      socket.once('data', () => {
        socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n');
        socket.resume();
      });
    });
    await new Promise<void>((resolve) => frozen.listen(0, '127.0.0.1', () => resolve()));
  });

  afterEach(async () => {
    for (const socket of frozenSockets) socket.destroy();
    await new Promise<void>((resolve) => frozen.close(() => resolve()));
  });

  /** A raw client through the data plane to the frozen sandbox; resolves after the 101. */
  async function openToFrozen(): Promise<{ client: net.Socket; sandbox: net.Socket }> {
    const port = (frozen.address() as AddressInfo).port;
    const client = net.connect({ port: dp.address.port, host: dp.address.address, allowHalfOpen: true });
    client.on('error', () => {});
    await new Promise<void>((resolve, reject) => {
      let got = '';
      client.on('data', (chunk: Buffer) => {
        got += chunk.toString('latin1');
        if (!got.includes('\r\n\r\n')) return;
        if (got.startsWith('HTTP/1.1 101')) resolve();
        else reject(new Error(got));
      });
      client.write(handshakeRequest(`/kruise/ws/${port}/`));
    });
    await waitUntil(() => frozenSockets.length === 1, 5000, 'the sandbox connection');
    return { client, sandbox: frozenSockets[0]! };
  }

  /**
   * The sandbox's connection is released once the data plane has closed its end completely:
   * a half-closed end (FIN sent, still reading) accepts what the sandbox writes; a closed one
   * answers with a reset. So the sandbox keeps writing a frame until it is reset.
   */
  async function sandboxConnectionReleased(sandbox: net.Socket): Promise<void> {
    let gone = false;
    sandbox.once('close', () => (gone = true));
    const textFrame = Buffer.from([0x81, 0x01, 0x78]);
    await waitUntil(
      () => {
        if (!gone && sandbox.writable) sandbox.write(textFrame);
        return gone;
      },
      5000,
      "the data plane to release the sandbox's connection",
    );
  }

  function sawFin(sandbox: net.Socket): Promise<void> {
    return new Promise((resolve) => sandbox.once('end', () => resolve()));
  }

  it('a client reset releases the upstream connection', async () => {
    const { client, sandbox } = await openToFrozen();
    const fin = sawFin(sandbox);
    client.resetAndDestroy();
    await fin;
    await sandboxConnectionReleased(sandbox);
  });

  it('a client that closes its connection (FIN) releases the upstream connection', async () => {
    const { client, sandbox } = await openToFrozen();
    const fin = sawFin(sandbox);
    client.destroy();
    await fin;
    await sandboxConnectionReleased(sandbox);
  });

  it('a client half-close the sandbox never answers: both connections are closed after the close timeout', async () => {
    const { client, sandbox } = await openToFrozen();
    const fin = sawFin(sandbox);
    let clientClosed = false;
    client.once('close', () => (clientClosed = true));
    const halfClosedAt = performance.now();
    client.end();
    await fin;
    // The data plane gives the sandbox webSocketCloseTimeoutMs (2 s here) to finish, then closes both.
    await waitUntil(() => clientClosed, 8000, 'the data plane to close the half-closed client connection');
    // Not before that time (a lower bound, which a slow machine only lengthens).
    expect(performance.now() - halfClosedAt).toBeGreaterThanOrEqual(1900);
    await sandboxConnectionReleased(sandbox);
  });
});

describe('data-plane shutdown', () => {
  it('close(grace): WebSockets keep working during the grace, then both ends get close 1001', async () => {
    const GRACE_MS = 500;
    const first = await connect(`/kruise/ws/${upstream.port}/a`);
    const second = await connect(`/kruise/ws/${upstream.port}/b`);
    expect(await echo(first, 'before')).toBe('before');
    const clientClosed = [closed(first), closed(second)];
    const sandboxClosed = sandboxSockets.map((ws) => closed(ws));

    const started = performance.now();
    const closing = dp.close(GRACE_MS);
    // Draining: an open WebSocket still carries messages.
    expect(await echo(second, 'during grace')).toBe('during grace');
    const results = await Promise.all(clientClosed);
    await closing;

    expect(results.map((result) => result.code)).toEqual([1001, 1001]);
    for (const result of results) expect(result.at - started).toBeGreaterThanOrEqual(GRACE_MS - 20);
    expect((await Promise.all(sandboxClosed)).map((result) => result.code)).toEqual([1001, 1001]);
    await upstream.waitForOpenSockets(0);
  });

  it('close(grace) mid-frame towards a client that reads nothing: the rest of the frame is relayed at the pace the client takes it, not read into memory', async () => {
    const FRAME_BYTES = 256 * 1024 * 1024;
    const BOUND_BYTES = 64 * 1024 * 1024; // kernel socket buffers on the way take a few MiB
    // A sandbox in the middle of sending one large message: it goes on sending the frame after
    // the data plane's close (as a ws server finishes the message it is sending), at the pace
    // its connection takes it.
    const sandboxes: net.Socket[] = [];
    let blocked = false;
    const sender = net.createServer({ allowHalfOpen: true }, (socket) => {
      sandboxes.push(socket);
      socket.on('error', () => {});
      socket.once('data', () => {
        socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n`);
        const length = Buffer.alloc(8);
        length.writeBigUInt64BE(BigInt(FRAME_BYTES));
        socket.write(Buffer.concat([Buffer.from([0x82, 127]), length]));
        const chunk = Buffer.alloc(64 * 1024, 0x61);
        let left = FRAME_BYTES;
        const pump = (): void => {
          blocked = false;
          while (left > 0) {
            left -= chunk.length;
            if (!socket.write(chunk)) {
              blocked = true;
              socket.once('drain', pump);
              return;
            }
          }
        };
        pump();
        socket.resume();
      });
    });
    await new Promise<void>((resolve) => sender.listen(0, '127.0.0.1', () => resolve()));
    try {
      const client = net.connect(dp.address.port, dp.address.address);
      client.on('error', () => {});
      const answered = new Promise<void>((resolve) => client.once('data', () => resolve()));
      client.write(handshakeRequest(`/kruise/ws/${(sender.address() as AddressInfo).port}/`));
      await answered;
      client.pause();
      await waitUntil(() => blocked, 5000, 'the sandbox to be held back by the client that reads nothing');
      const sandbox = sandboxes[0]!;
      const accepted = (): number => sandbox.bytesWritten - sandbox.writableLength;
      const before = accepted();

      // The frame cannot end (the client reads nothing): the sockets are destroyed after the
      // close timeout, and until then the data plane must not take more than the client does.
      await dp.close(0);
      expect(accepted() - before).toBeLessThan(BOUND_BYTES);
      client.destroy();
    } finally {
      for (const socket of sandboxes) socket.destroy();
      await new Promise<void>((resolve) => sender.close(() => resolve()));
    }
  });

  it('close(grace) in the middle of a message sent in several frames: the client gets 1001 between frames (valid, not 1002) and drops the unfinished message', async () => {
    let sandbox: net.Socket | undefined;
    const sender = await startRawUpstream((socket) => {
      sandbox = socket;
      socket.once('data', (request: Buffer) => {
        const key = /sec-websocket-key: *(\S+)/i.exec(request.toString('latin1'))?.[1] ?? '';
        const accept = createHash('sha1').update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
        socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
        // Once the client speaks: a text message's first frame (FIN clear), a ping inside the
        // message, then a continuation frame whose header is cut after its first byte.
        socket.once('data', () => socket.write(Buffer.from([0x01, 3, 0x61, 0x62, 0x63, 0x89, 1, 0x70, 0x00])));
      });
    });
    try {
      dp.setRoute({ id: 'frames', ip: sender.host });
      const ws = await connect(`/kruise/frames/${sender.port}/`);
      const seen: string[] = [];
      ws.on('ping', () => seen.push('ping'));
      ws.on('message', () => seen.push('message'));
      const gone = closed(ws);
      ws.send('go');
      await waitUntil(() => seen.length === 1, 5000, 'the ping inside the message');
      const closing = dp.close(0);
      // The rest of the continuation frame (FIN still clear): relayed, then the close.
      sandbox?.write(Buffer.from([2, 0x64, 0x65]));
      expect((await gone).code).toBe(1001);
      await closing;
      expect(seen).toEqual(['ping']);
    } finally {
      await sender.close();
    }
  });

  it('close(grace) resolves at once when no WebSocket is open', async () => {
    const ws = await connect(`/kruise/ws/${upstream.port}/`);
    const gone = closed(ws);
    ws.close(1000);
    await gone;
    await upstream.waitForOpenSockets(0);
    await waitUntil(async () => (await dp.metrics.proxyWebsockets.get()).values[0]?.value === 0, 5000, 'the WebSocket gauge to drop to 0');
    // With nothing open, a 60 s grace is not waited for: closed within seconds.
    let done = false;
    const closing = dp.close(60_000).then(() => void (done = true));
    await waitUntil(() => done, 3000, 'close(60 s) to resolve with nothing open');
    await closing;
  });
});
