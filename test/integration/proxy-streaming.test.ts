// Bodies stream through without buffering, and clients that go away release their upstream
// sockets.
import http from 'node:http';
import net from 'node:net';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { makeRoute, putRoute } from '../helpers/cluster.js';
import { proxyRequestCount, send, startDataPlane, type TestDataPlane } from '../helpers/data-plane.js';
import { peakRssGrowth, spawnReplica, type ProcessReplica } from '../helpers/process.js';
import { PatternStream, drain, startUpstream, type Upstream } from '../helpers/upstream.js';
import { waitUntil } from '../helpers/wait.js';

const MiB = 1024 * 1024;
/** The size the issue names: a proxy that buffered any sizeable part of it would show. */
const LARGE_BYTES = 1024 * MiB;
// A proxy that buffered a body would grow by the whole body (1 GiB). The bound is on the
// resident memory of a routesync process started as it ships (src/node-flags.ts), measured by
// the kernel's high-water mark, so neither this process's garbage nor the runtime's default
// young-generation size counts (Node 24 lets it grow to 128 MiB on a large machine; Node 20 to
// 32 MiB). Measured on a 2-core machine: ~40 MiB for the echo, with Node 20 and Node 24 alike.
// 128 MiB is an eighth of the body and well above that.
const MEMORY_BOUND_BYTES = 128 * MiB;
/** 1 GiB each way takes 5-10 s here, three parties sharing one event loop. */
const LARGE_TEST_TIMEOUT_MS = 60_000;

let upstream: Upstream;

describe.runIf(process.platform === 'linux')('streaming through a routesync process', () => {
  let replica: ProcessReplica;
  let proxy: { host: string; port: number };

  beforeAll(async () => {
    upstream = await startUpstream();
    replica = spawnReplica({
      ROUTESYNC_API_ADDR: '127.0.0.1:0',
      ROUTESYNC_PEER_ADDR: '127.0.0.1:0',
      ROUTESYNC_PROXY_ADDR: '127.0.0.1:0',
      ROUTESYNC_PROXY_TIMEOUT_MS: '10000',
      ROUTESYNC_ACCESS_LOG: 'false',
    });
    const addresses = await replica.addresses;
    const [host, port] = (addresses.proxy ?? '').split(':');
    proxy = { host: host!, port: Number(port) };
    expect((await putRoute(`http://${addresses.api}`, makeRoute({ id: 'big', ip: upstream.host }))).status).toBe(200);
  });

  afterAll(async () => {
    if (replica.child.exitCode === null) replica.child.kill('SIGKILL');
    await replica.exited;
    await upstream.close();
  });

  function streamingRequest(path: string, body: PatternStream | undefined): Promise<{ status: number; bytes: number; sha256: string }> {
    return new Promise((resolve, reject) => {
      const req = http.request({ host: proxy.host, port: proxy.port, method: body ? 'POST' : 'GET', path, agent: false });
      req.on('error', reject);
      req.on('response', (res) => {
        drain(res).then((result) => resolve({ status: res.statusCode ?? 0, ...result }), reject);
      });
      if (body) body.pipe(req);
      else req.end();
    });
  }

  const growth = (bytes: number): string => `${(bytes / MiB).toFixed(1)} MiB`;

  it(`${LARGE_BYTES / MiB} MiB up and the same back down in one request, with bounded memory`, async () => {
    const body = new PatternStream(LARGE_BYTES);
    const { result, bytes } = await peakRssGrowth(replica.child.pid!, () => streamingRequest(`/kruise/big/${upstream.port}/echo`, body));
    expect(result.status).toBe(200);
    expect(result.bytes).toBe(LARGE_BYTES);
    expect(result.sha256).toBe(body.digest());
    console.info(`echo ${LARGE_BYTES / MiB} MiB: routesync's peak RSS growth ${growth(bytes)}`);
    expect(bytes).toBeLessThan(MEMORY_BOUND_BYTES);
  }, LARGE_TEST_TIMEOUT_MS);

  it(`${LARGE_BYTES / MiB} MiB download and upload, each checked by digest`, async () => {
    const expected = new PatternStream(LARGE_BYTES);
    const expectedDigest = (await drain(expected)) && expected.digest();
    const pid = replica.child.pid!;
    const down = await peakRssGrowth(pid, () => streamingRequest(`/kruise/big/${upstream.port}/bytes/${LARGE_BYTES}`, undefined));
    expect(down.result).toEqual({ status: 200, bytes: LARGE_BYTES, sha256: expectedDigest });

    const address = { address: proxy.host, port: proxy.port, family: 'IPv4' };
    const up = await peakRssGrowth(pid, () => send(address, { method: 'PUT', path: `/kruise/big/${upstream.port}/sink`, body: new PatternStream(LARGE_BYTES) }));
    expect(up.result.status).toBe(200);
    expect(up.result.json()).toEqual({ bytes: LARGE_BYTES, sha256: expectedDigest });
    console.info(`routesync's peak RSS growth: download ${growth(down.bytes)}, upload ${growth(up.bytes)}`);
    for (const bytes of [down.bytes, up.bytes]) expect(bytes).toBeLessThan(MEMORY_BOUND_BYTES);
  }, LARGE_TEST_TIMEOUT_MS);
});

describe('clients that go away', () => {
  let dp: TestDataPlane;

  beforeEach(async () => {
    upstream = await startUpstream();
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000', ROUTESYNC_ACCESS_LOG: 'false' });
    dp.setRoute({ id: 'big', ip: upstream.host });
  });

  afterEach(async () => {
    await dp.close(0);
    await upstream.close();
  });

  const CLIENTS = 1000;
  const CONCURRENCY = 200;

  /** GET a response that never ends; hang up as soon as its first bytes arrive. */
  function abortAfterFirstChunk(path: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const req = http.get({ host: dp.address.address, port: dp.address.port, path, agent: false });
      req.on('response', (res) => {
        res.once('data', () => {
          req.destroy();
          resolve();
        });
      });
      req.on('error', (error) => (req.destroyed ? resolve() : reject(error)));
    });
  }

  it(`${CLIENTS} clients aborting mid-response leave no open upstream socket`, async () => {
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < CLIENTS) {
        next += 1;
        await abortAfterFirstChunk(`/kruise/big/${upstream.port}/stall`);
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    expect(upstream.requests).toHaveLength(CLIENTS);
    const openRightAfter = upstream.openSockets();
    await upstream.waitForOpenSockets(0, 10_000);
    console.info(`${CLIENTS} aborts: ${upstream.acceptedSockets()} upstream sockets opened, ${openRightAfter} still open as the last client left, 0 after`);
    await expect.poll(() => proxyRequestCount(dp.metrics, 'client_aborted'), { timeout: 10_000 }).toBe(CLIENTS);
    // And the data plane still serves.
    expect((await send(dp.address, { path: `/kruise/big/${upstream.port}/` })).status).toBe(200);
  });

  it('a client that leaves before the answer starts releases the upstream socket', async () => {
    const aborted = new Promise<void>((resolve) => {
      const req = http.get({ host: dp.address.address, port: dp.address.port, path: `/kruise/big/${upstream.port}/hang`, agent: false });
      req.on('error', () => resolve());
      upstream.server.once('request', () => req.destroy());
    });
    await aborted;
    await upstream.waitForOpenSockets(0);
    await expect.poll(() => proxyRequestCount(dp.metrics, 'client_aborted')).toBe(1);
  });

  it('a client that aborts an upload releases the upstream socket', async () => {
    const sinkSeen = new Promise<void>((resolve) => upstream.server.once('request', () => resolve()));
    const req = http.request({ host: dp.address.address, port: dp.address.port, method: 'POST', path: `/kruise/big/${upstream.port}/sink`, agent: false });
    req.on('error', () => {});
    req.write(Buffer.alloc(64 * 1024));
    await sinkSeen;
    req.destroy();
    await upstream.waitForOpenSockets(0);
    await expect.poll(() => proxyRequestCount(dp.metrics, 'client_aborted')).toBe(1);
  });
});

describe('an answer that starts before its body', () => {
  let dp: TestDataPlane;
  let releaseBody: (() => void) | undefined;

  beforeEach(async () => {
    // An event stream: headers at once, the first event only when the test says so.
    upstream = await startUpstream({
      handler: (_req, res) => {
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
        res.flushHeaders();
        releaseBody = () => res.end('data: first\n\n');
      },
    });
    dp = await startDataPlane({ ROUTESYNC_PROXY_TIMEOUT_MS: '10000' });
    dp.setRoute({ id: 'sse', ip: upstream.host });
  });

  afterEach(async () => {
    await dp.close(0);
    await upstream.close();
  });

  it('has its status and headers relayed at once, before the first event, which then follows', async () => {
    const response = await new Promise<http.IncomingMessage>((resolve, reject) => {
      const req = http.get({ host: dp.address.address, port: dp.address.port, path: `/kruise/sse/${upstream.port}/events`, agent: false }, resolve);
      req.on('error', reject);
      // Bounded: without its headers the client would wait for the first event, which never comes.
      setTimeout(() => {
        req.destroy();
        reject(new Error('no response headers within 5 s of a stream the sandbox had started'));
      }, 5000).unref();
    });
    // The client holds the response while the sandbox has sent no event yet.
    expect(response.statusCode).toBe(200);
    expect(response.headers['content-type']).toBe('text/event-stream');
    expect(releaseBody).toBeDefined();
    releaseBody!();
    let body = '';
    for await (const chunk of response) body += String(chunk);
    expect(body).toBe('data: first\n\n');
  });
});

describe('an upload the sandbox answered early, then abandoned by its client', () => {
  let dp: TestDataPlane;

  beforeEach(async () => {
    // The sandbox refuses the upload without reading it and keeps its connection (Node's way for a 401).
    upstream = await startUpstream({
      handler: (req, res) => {
        if (req.url === '/upload') {
          res.writeHead(401, { 'content-length': '0' });
          res.end();
          return;
        }
        req.resume();
        res.end('next');
      },
    });
    // Node would close the connection 5 s after its answer (its keep-alive timeout), hiding a
    // leak that lasts for ever against a server without one (Go's, by default).
    upstream.server.keepAliveTimeout = 120_000;
    // One socket to the sandbox: a leaked one would leave the next request nothing.
    dp = await startDataPlane({ ROUTESYNC_PROXY_MAX_SOCKETS: '1', ROUTESYNC_PROXY_TIMEOUT_MS: '10000' });
    dp.setRoute({ id: 'up', ip: upstream.host });
  });

  afterEach(async () => {
    await dp.close(0);
    await upstream.close();
  });

  it('releases the upstream connection and its pool slot once the answer has ended', async () => {
    // A raw client, uploading chunk after chunk until it has the answer, then gone, as curl
    // does. (Node's own client may fail its upload with EPIPE before it reads an answer that
    // came early, depending on the Node version: not what this test is about.)
    const client = net.connect(dp.address.port, dp.address.address);
    client.on('error', () => {});
    let received = '';
    client.on('data', (chunk: Buffer) => (received += chunk.toString('latin1')));
    client.write(`PUT /kruise/up/${upstream.port}/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n`);
    const chunk = Buffer.concat([Buffer.from('10000\r\n'), Buffer.alloc(0x10000, 0x61), Buffer.from('\r\n')]);
    let sending = true;
    const pump = (): void => {
      while (sending && !client.destroyed && client.write(chunk));
      if (sending && !client.destroyed) client.once('drain', pump);
    };
    pump();
    await waitUntil(() => received.includes('\r\n\r\n'), 10_000, 'the early answer');
    sending = false;
    client.destroy();
    const status = Number(received.slice(9, 12));
    expect(status).toBe(401);
    await upstream.waitForOpenSockets(0);
    const next = await send(dp.address, { path: `/kruise/up/${upstream.port}/next` });
    expect(next.status).toBe(200);
    expect(next.body).toBe('next');
  });
});
