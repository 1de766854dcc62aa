// The sandbox stand-in of benchmark 6: a bare node:http server in a process of its own that
// answers every request with a small JSON body, hit directly and through the data plane.
//
//   node --import tsx bench/upstream.ts --listen 127.0.0.30:PORT
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';
import { exitOnSignal, listenAndAnnounce, splitHostPort } from './lib/serve.js';

const { values } = parseArgs({ options: { listen: { type: 'string', default: '127.0.0.30:0' } } });
const body = JSON.stringify({ ok: true, sandbox: 'bench', payload: 'x'.repeat(64) });

const server = createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body);
  });
});
server.keepAliveTimeout = 65_000;

const [host, port] = splitHostPort(values.listen ?? '127.0.0.30:0');
void listenAndAnnounce(server, host, port, 'upstream');
exitOnSignal(server);
