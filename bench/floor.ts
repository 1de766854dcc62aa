// The physical floor: the least any server can do to deliver a change to every peer.
//
//   node --import tsx bench/floor.ts --listen 127.0.0.3:PORT --peers 127.0.0.11:P,127.0.0.12:P,...
//
// A bare node:http server. For each PUT /v1/routes it sends the body, wrapped as a one-route
// batch, to every peer in parallel through one bare undici Agent (its defaults), waits for
// every answer, and answers 200. No validation, table, outbox, retries, timeouts or metrics:
// a hung peer hangs it. GET /noop answers at once (the HTTP stack alone).
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';
import { Agent } from 'undici';
import { exitOnSignal, listenAndAnnounce, splitHostPort } from './lib/serve.js';

const { values } = parseArgs({ options: { listen: { type: 'string', default: '127.0.0.3:0' }, peers: { type: 'string', default: '' } } });
const [host, port] = splitHostPort(values.listen ?? '127.0.0.3:0');
const origins = (values.peers ?? '')
  .split(',')
  .filter((peer) => peer !== '')
  .map((peer) => `http://${peer}`);
const agent = new Agent();
const headers = { 'content-type': 'application/json' };

const server = createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/noop') {
    res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
    return;
  }
  const chunks: Buffer[] = [];
  req.on('data', (chunk: Buffer) => chunks.push(chunk));
  req.on('end', () => {
    const body = `{"routes":[${Buffer.concat(chunks).toString('utf8')}]}`;
    const started = performance.now();
    // Every answer is waited for, a failed one too (Promise.all would answer at the first failure).
    void Promise.allSettled(
      origins.map(async (origin) => {
        const response = await agent.request({ origin, path: '/v1/peer/routes', method: 'POST', headers, body });
        await response.body.text();
        return response.statusCode;
      }),
    ).then((answers) => {
      const acked = answers.filter((answer) => answer.status === 'fulfilled' && answer.value === 200).length;
      // elapsedMs: the fan-out alone, as routesync reports its own (bench/tools/hot-path.ts).
      const elapsedMs = Math.round((performance.now() - started) * 1000) / 1000;
      res.writeHead(acked === origins.length ? 200 : 502, { 'content-type': 'application/json' }).end(`{"peers":${origins.length},"acked":${acked},"elapsedMs":${elapsedMs}}`);
    });
  });
});

void listenAndAnnounce(server, host, port, 'floor');
exitOnSignal(server, () => agent.destroy());
