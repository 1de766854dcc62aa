// A benchmark peer: a real HTTP server in a process of its own, standing in for a replica.
//
//   node --import tsx bench/peer-server.ts --host 127.0.0.11 [--port 0] [--hang]
//
// Speaks what the three contenders send: routesync's batched push (POST /v1/peer/routes,
// answered with one result per route), openkruise's single-route push (POST /refresh, 204),
// and the liveness probe (GET /healthz). It parses every body as JSON and does nothing else,
// so that the peers cost every contender the same. With --hang it accepts connections and
// requests and never answers any of them (the hung replica of benchmark 2).
//
// It counts accepted sockets and requests; the driver reads the counters over IPC
// ({type: 'stats'} -> {type: 'stats', stats}; {type: 'reset'}; {type: 'hang', hang}). Started
// without IPC it prints its address and serves GET /stats as JSON instead.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { parseArgs } from 'node:util';
import { exitOnSignal, listenAndAnnounce } from './lib/serve.js';

export interface PeerStats {
  readonly address: string;
  /** Sockets accepted since the last reset. */
  readonly connections: number;
  /** Sockets open right now, and the most open at once since the last reset. */
  readonly openSockets: number;
  readonly peakOpenSockets: number;
  readonly requests: number;
  readonly pushes: number;
  readonly refreshes: number;
  readonly probes: number;
  readonly routes: number;
  /** Requests accepted and never answered (hang mode). */
  readonly hung: number;
}

const { values } = parseArgs({
  options: { host: { type: 'string', default: '127.0.0.1' }, port: { type: 'string', default: '0' }, hang: { type: 'boolean', default: false } },
});

let hang = values.hang ?? false;
let connections = 0;
let peakOpenSockets = 0;
let requests = 0;
let pushes = 0;
let refreshes = 0;
let probes = 0;
let routes = 0;
let hung = 0;
const sockets = new Set<Socket>();

const server = createServer((req, res) => handle(req, res));
// As a routesync peer does: outlive the senders' pooled idle connections.
server.keepAliveTimeout = 65_000;
server.headersTimeout = 66_000;
// A hung peer never answers; nothing here may time the request out on its behalf.
server.requestTimeout = 0;
server.on('connection', (socket: Socket) => {
  connections++;
  sockets.add(socket);
  if (sockets.size > peakOpenSockets) peakOpenSockets = sockets.size;
  socket.on('close', () => sockets.delete(socket));
});

function handle(req: IncomingMessage, res: ServerResponse): void {
  requests++;
  const chunks: Buffer[] = [];
  req.on('data', (chunk: Buffer) => chunks.push(chunk));
  req.on('end', () => {
    if (req.url === '/stats' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(stats()));
      return;
    }
    if (hang) {
      hung++;
      return;
    }
    if (req.url === '/healthz') {
      probes++;
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"status":"ok"}');
      return;
    }
    if (req.method === 'POST' && req.url === '/v1/peer/routes') {
      pushes++;
      let body: { routes?: unknown };
      try {
        body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { routes?: unknown };
      } catch {
        res.writeHead(400).end();
        return;
      }
      const entries = Array.isArray(body.routes) ? body.routes : [];
      routes += entries.length;
      const results = entries.map(() => ({ outcome: 'applied', reason: 'updated' }));
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ results }));
      return;
    }
    if (req.method === 'POST' && req.url === '/refresh') {
      refreshes++;
      try {
        JSON.parse(Buffer.concat(chunks).toString('utf8'));
      } catch {
        res.writeHead(400).end();
        return;
      }
      routes++;
      res.writeHead(204).end();
      return;
    }
    res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":{"code":"not_found"}}');
  });
}

function stats(): PeerStats {
  const address = server.address() as AddressInfo;
  return {
    address: `${address.address}:${address.port}`,
    connections,
    openSockets: sockets.size,
    peakOpenSockets,
    requests,
    pushes,
    refreshes,
    probes,
    routes,
    hung,
  };
}

function reset(): void {
  connections = 0;
  peakOpenSockets = sockets.size;
  requests = 0;
  pushes = 0;
  refreshes = 0;
  probes = 0;
  routes = 0;
  hung = 0;
}

void listenAndAnnounce(server, values.host ?? '127.0.0.1', Number(values.port), 'peer', hang ? ' (hang)' : '');

process.on('message', (message: { type?: string; id?: number; hang?: boolean }) => {
  switch (message.type) {
    case 'stats':
      process.send?.({ type: 'stats', id: message.id, stats: stats() });
      break;
    case 'reset':
      reset();
      process.send?.({ type: 'reset', id: message.id });
      break;
    case 'hang':
      hang = message.hang === true;
      process.send?.({ type: 'hang', id: message.id });
      break;
  }
});

exitOnSignal(server, () => {
  for (const socket of sockets) socket.destroy();
});
