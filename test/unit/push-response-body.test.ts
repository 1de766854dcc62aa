// A push's response body is part of the attempt: a peer that sends its headers and then stalls
// or drops the connection mid-body has failed the attempt the way a peer that never answered
// has (our attempt timeout, a reset), so the push is retried, its changes stay queued and the
// failure counts toward ejection. Only a body that arrives whole and is not the answer a push
// expects is `protocol` (permanent). Whatever happens, the body is consumed or destroyed, so the
// client's one connection is free for the next push. Real peers on loopback.
import diagnosticsChannel from 'node:diagnostics_channel';
import { createServer, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { AttemptTimeoutError, PeerClient, type PeerRequestError } from '../../src/peers/client.js';
import { parseChange, type RouteChange } from '../../src/routes/route.js';
import { makeRoute } from '../helpers/cluster.js';
import { startPeerSync } from '../helpers/peer-sync.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/**
 * Run `fn` each time an undici request of this process has its response headers, once the
 * caller holds the response and reads its body (a macrotask later: after the awaits between
 * undici handing over the response and the push reading it). That makes "mid-body" certain,
 * where a timer would only make it likely.
 */
function onceEachResponseHeaders(fn: () => void): void {
  const listener = (): void => void setImmediate(fn);
  diagnosticsChannel.subscribe('undici:request:headers', listener);
  cleanups.push(() => void diagnosticsChannel.unsubscribe('undici:request:headers', listener));
}

/** How the peer answers a push: well, or with a 200 whose body goes wrong in one way. */
type BodyFault = 'ok' | 'stall' | 'reset' | 'reset_chunked' | 'not_json' | 'wrong_shape';

interface BodyPeer {
  readonly address: string;
  fault: BodyFault;
  /** Push requests received. */
  readonly pushes: number;
  /** Sockets accepted, ever. */
  readonly connections: number;
  /** Drop the connections of the responses stalled so far (a peer whose pod is killed mid-answer). */
  dropStalled(): void;
}

async function bodyPeer(): Promise<BodyPeer> {
  const sockets = new Set<Socket>();
  const stalled = new Set<ServerResponse>();
  const state = {
    address: '',
    fault: 'ok' as BodyFault,
    pushes: 0,
    connections: 0,
    dropStalled: () => {
      for (const res of stalled) res.socket?.destroy();
      stalled.clear();
    },
  };
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      state.pushes++;
      const routes = (JSON.parse(Buffer.concat(chunks).toString('utf8')) as { routes: unknown[] }).routes;
      const answer = JSON.stringify({ results: routes.map(() => ({ outcome: 'applied' })) });
      switch (state.fault) {
        case 'ok':
          res.writeHead(200, { 'content-type': 'application/json' }).end(answer);
          return;
        case 'not_json':
          res.writeHead(200, { 'content-type': 'application/json' }).end('<html>not json</html>');
          return;
        case 'wrong_shape':
          res.writeHead(200, { 'content-type': 'application/json' }).end('{"results":[]}');
          return;
        case 'stall':
        case 'reset':
          // The headers and the first bytes of a body announced longer, then nothing more (or,
          // for `reset`, the connection dropped once the client has the headers).
          res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(answer.length + 100) });
          res.write(answer.slice(0, 5));
          stalled.add(res);
          return;
        case 'reset_chunked':
          // The same with a chunked body on a connection that ends after it (what a peer behind
          // a proxy that re-frames answers may send): undici's parser, not its socket, sees it
          // cut short, and says the answer "does not match the HTTP/1.1 protocol".
          res.writeHead(200, { 'content-type': 'application/json', connection: 'close' });
          res.write(answer.slice(0, 5));
          stalled.add(res);
      }
    });
  });
  server.on('connection', (socket) => {
    state.connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  onceEachResponseHeaders(() => {
    if (state.fault === 'reset' || state.fault === 'reset_chunked') state.dropStalled();
  });
  cleanups.push(async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  state.address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  return state;
}

function client(): PeerClient {
  // One connection: a body left unconsumed would pin it, and the next push would never leave.
  const peerClient = new PeerClient({ connections: 1, token: '', instanceId: 'self' });
  cleanups.push(() => peerClient.destroy());
  return peerClient;
}

const change = (): RouteChange => parseChange(makeRoute());

async function pushError(peerClient: PeerClient, peer: BodyPeer, signal: AbortSignal): Promise<PeerRequestError> {
  return peerClient.push(peer.address, [change()], signal).then(
    () => {
      throw new Error('the push succeeded');
    },
    (error: PeerRequestError) => error,
  );
}

describe('PeerClient.push, when the response body goes wrong', () => {
  it('classifies our attempt timeout firing mid-body as a transient timeout, and frees the connection', async () => {
    const peer = await bodyPeer();
    const peerClient = client();
    peer.fault = 'stall';
    const controller = new AbortController();
    // What the fan-out's AttemptDeadline does when the attempt's time is up, here once the body is being read.
    onceEachResponseHeaders(() => controller.abort(new AttemptTimeoutError(100)));
    const error = await pushError(peerClient, peer, controller.signal);
    expect(error).toMatchObject({ errorClass: 'timeout', transient: true });
    peer.fault = 'ok';
    await expect(peerClient.push(peer.address, [change()], AbortSignal.timeout(5_000))).resolves.toEqual({ applied: 1, ignored: 0, rejectedAt: [] });
  });

  it('classifies a connection dropped mid-body as a transient reset, and frees the connection', async () => {
    const peer = await bodyPeer();
    const peerClient = client();
    for (const fault of ['reset', 'reset_chunked'] as const) {
      peer.fault = fault;
      const error = await pushError(peerClient, peer, AbortSignal.timeout(5_000));
      expect(error, fault).toMatchObject({ errorClass: 'reset', transient: true });
    }
    peer.fault = 'ok';
    await expect(peerClient.push(peer.address, [change()], AbortSignal.timeout(5_000))).resolves.toEqual({ applied: 1, ignored: 0, rejectedAt: [] });
  });

  it('classifies a whole body that is not JSON, or not one result per route, as protocol, and reuses the connection', async () => {
    const peer = await bodyPeer();
    const peerClient = client();
    for (const fault of ['not_json', 'wrong_shape'] as const) {
      peer.fault = fault;
      const error = await pushError(peerClient, peer, AbortSignal.timeout(5_000));
      expect(error, fault).toMatchObject({ errorClass: 'protocol', transient: false });
    }
    peer.fault = 'ok';
    await expect(peerClient.push(peer.address, [change()], AbortSignal.timeout(5_000))).resolves.toEqual({ applied: 1, ignored: 0, rejectedAt: [] });
    // The bodies were read to their end: the one connection served all three pushes.
    expect(peer.connections).toBe(1);
  });
});

describe('the fan-out, when a peer stalls or drops the connection mid-body', () => {
  for (const fault of ['stall', 'reset', 'reset_chunked'] as const) {
    it(`(${fault}) retries the push, keeps the change queued and counts the failures toward ejection`, async () => {
      const peer = await bodyPeer();
      peer.fault = fault;
      const sync = startPeerSync(
        {
          ROUTESYNC_SYNC_DEADLINE_MS: '5000',
          ROUTESYNC_ATTEMPT_TIMEOUT_MS: '200',
          ROUTESYNC_SYNC_RETRIES: '2',
          ROUTESYNC_RETRY_MIN_MS: '10',
          ROUTESYNC_RETRY_MAX_MS: '20',
          ROUTESYNC_EJECT_AFTER_FAILURES: '1000',
        },
        (close) => cleanups.push(close),
      );
      sync.setPeers([peer.address]);
      const outcome = await sync.sync([change()]);
      // Three attempts (the first and two retries), each failed in its body, then the call is
      // told; the background retry that follows may have started by the time this looks.
      expect(outcome.failed).toEqual([{ peer: peer.address, errorClass: fault === 'stall' ? 'timeout' : 'reset' }]);
      expect(peer.pushes).toBeGreaterThanOrEqual(3);
      const [status] = sync.status();
      expect(status?.pendingRoutes).toBe(1);
      expect(status?.consecutiveFailures).toBeGreaterThanOrEqual(3);
    });
  }
});
