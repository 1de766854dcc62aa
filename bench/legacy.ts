// RE-ENACTMENT of the legacy fan-out described in openkruise/agents issue 413 — not
// openkruise's code, and not routesync: a model of its behaviour, driven through the same
// harness and the same peers, so the old way and the new way are measured side by side.
//
//   node --import tsx bench/legacy.ts --listen 127.0.0.4:PORT --peers 127.0.0.11:P,... [--fresh]
//
// What it re-enacts, per route change (PUT /v1/routes, as routesync's local API takes it):
//  - one concurrent task per peer ("one goroutine per peer per change"), no cap;
//  - each task POSTs the route JSON to the peer's openkruise endpoint, /refresh;
//  - Go's default transport: keep-alive, at most 2 idle connections kept per peer
//    (MaxIdleConnsPerHost = 2), no cap on the connections opened (MaxConnsPerHost = 0), idle
//    connections kept 90 s. node:http's Agent has exactly these knobs: keepAlive, maxFreeSockets
//    (per host) and maxSockets. With --fresh: a fresh connection per attempt (keep-alive off);
//  - a 100 ms timeout per attempt, covering the whole exchange (Go's http.Client.Timeout);
//  - up to 10 attempts, 10 ms apart, on every error whatever it is (the original's
//    retry.OnError(..., func(error) bool { return true }, ...) with Steps 10, Duration 10 ms,
//    Factor 1). The original also has Jitter 1.2, which stretches each sleep to 10–22 ms; the
//    re-enactment sleeps a flat 10 ms, which can only flatter it;
//  - the caller waits for every peer (wg.Wait) before answering.
import { Agent, createServer, request as httpRequest } from 'node:http';
import { parseArgs } from 'node:util';
import { exitOnSignal, listenAndAnnounce, splitHostPort } from './lib/serve.js';

const LEGACY_LABEL = 'legacy fan-out (re-enactment of openkruise/agents#413)';
const ATTEMPT_TIMEOUT_MS = 100;
const MAX_ATTEMPTS = 10;
const RETRY_SLEEP_MS = 10;

const { values } = parseArgs({
  options: { listen: { type: 'string', default: '127.0.0.4:0' }, peers: { type: 'string', default: '' }, fresh: { type: 'boolean', default: false } },
});
const fresh = values.fresh ?? false;
const [host, port] = splitHostPort(values.listen ?? '127.0.0.4:0');
const peers = (values.peers ?? '')
  .split(',')
  .filter((peer) => peer !== '')
  .map((peer) => splitHostPort(peer));

const agent = fresh
  ? new Agent({ keepAlive: false, maxSockets: Infinity })
  : new Agent({ keepAlive: true, maxFreeSockets: 2, maxSockets: Infinity, timeout: 90_000 });

let attempts = 0;
let failedAttempts = 0;

class AttemptError extends Error {}

/** One attempt: POST /refresh, the whole exchange within ATTEMPT_TIMEOUT_MS; non-2xx is an error. */
function attempt(peerHost: string, peerPort: number, body: string): Promise<void> {
  attempts++;
  return new Promise<void>((resolve, reject) => {
    let done = false;
    const finish = (error?: Error) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (error) {
        failedAttempts++;
        reject(error);
      } else resolve();
    };
    const req = httpRequest(
      { agent, host: peerHost, port: peerPort, method: 'POST', path: '/refresh', headers: { 'content-length': Buffer.byteLength(body) } },
      (res) => {
        res.on('data', () => undefined);
        res.on('end', () => {
          const status = res.statusCode ?? 0;
          finish(status >= 200 && status < 300 ? undefined : new AttemptError(`status ${status}`));
        });
        res.on('error', (error) => finish(error));
      },
    );
    // Go's Client.Timeout: the attempt is cancelled and its connection closed.
    const timer = setTimeout(() => {
      const error = new AttemptError('timeout');
      req.destroy(error);
      finish(error);
    }, ATTEMPT_TIMEOUT_MS);
    req.on('error', (error) => finish(error));
    req.end(body);
  });
}

/** Retry every error, up to MAX_ATTEMPTS, RETRY_SLEEP_MS apart. */
async function syncPeer(peerHost: string, peerPort: number, body: string): Promise<boolean> {
  for (let n = 1; ; n++) {
    try {
      await attempt(peerHost, peerPort, body);
      return true;
    } catch {
      if (n >= MAX_ATTEMPTS) return false;
      await new Promise((resolve) => setTimeout(resolve, RETRY_SLEEP_MS));
    }
  }
}

const server = createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/noop') {
    res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    return;
  }
  if (req.method === 'GET' && req.url === '/stats') {
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ attempts, failedAttempts, fresh }));
    return;
  }
  const chunks: Buffer[] = [];
  req.on('data', (chunk: Buffer) => chunks.push(chunk));
  req.on('end', () => {
    let body: string;
    try {
      // The manager holds the route as an object and marshals it for each sync.
      body = JSON.stringify(JSON.parse(Buffer.concat(chunks).toString('utf8')));
    } catch {
      res.writeHead(400).end();
      return;
    }
    const started = performance.now();
    void Promise.all(peers.map(([peerHost, peerPort]) => syncPeer(peerHost, peerPort, body))).then((outcomes) => {
      const acked = outcomes.filter(Boolean).length;
      const elapsedMs = Math.round((performance.now() - started) * 100) / 100;
      res
        .writeHead(200, { 'content-type': 'application/json' })
        .end(JSON.stringify({ reenactment: true, sync: { peers: peers.length, acked, failed: peers.length - acked, elapsedMs } }));
    });
  });
});

void listenAndAnnounce(server, host, port, LEGACY_LABEL, fresh ? ' (fresh connection per attempt)' : '');
exitOnSignal(server, () => agent.destroy());
