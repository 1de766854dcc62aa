// The data plane's floor: the least a Node.js reverse proxy can do. A bare node:http server
// that forwards every request to one fixed upstream through a keep-alive http.Agent and pipes
// the answer back; no route lookup, header rules, admission, timeouts, metrics or logging.
// Benchmark 6 drives it exactly as it drives routesync's data plane, to show how much of the
// distance to "direct" is the cost of any Node.js proxy on this machine.
//
//   node --import tsx bench/bare-proxy.ts --listen 127.0.0.7:PORT --upstream 127.0.0.30:PORT
import { Agent, createServer, request } from 'node:http';
import { parseArgs } from 'node:util';
import { exitOnSignal, listenAndAnnounce, splitHostPort } from './lib/serve.js';

const { values } = parseArgs({ options: { listen: { type: 'string', default: '127.0.0.7:0' }, upstream: { type: 'string', default: '' } } });
const [host, port] = splitHostPort(values.listen ?? '127.0.0.7:0');
const [upstreamHost, upstreamPort] = splitHostPort(values.upstream ?? '');
// As routesync's data plane: keep-alive, bounded (ROUTESYNC_PROXY_MAX_SOCKETS' default), LIFO.
const agent = new Agent({ keepAlive: true, maxSockets: 256, maxFreeSockets: 256, scheduling: 'lifo' });

const server = createServer((req, res) => {
  const upstream = request({ agent, host: upstreamHost, port: upstreamPort, method: req.method, path: req.url, headers: req.headers }, (answer) => {
    res.writeHead(answer.statusCode ?? 502, answer.headers);
    answer.pipe(res);
  });
  upstream.on('error', () => {
    if (!res.headersSent) res.writeHead(502);
    res.end();
  });
  req.pipe(upstream);
});
server.keepAliveTimeout = 65_000;

void listenAndAnnounce(server, host, port, 'bare proxy', ` -> ${upstreamHost}:${upstreamPort}`);
exitOnSignal(server, () => agent.destroy());
