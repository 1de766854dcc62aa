// Benchmark 6's third reference: http-proxy-3 alone. The library routesync's data plane is
// built on, forwarding every request to one fixed upstream through an http.Agent configured as
// routesync's (keep-alive, bounded, LIFO, idle timeout), on a server configured as routesync's
// (no request timeout, a headers timeout). No route lookup, admission, header rules, timers or
// metrics. Between the bare node:http proxy and routesync, it shows how much of routesync's
// cost per request is the library's and how much routesync's own.
//
//   node --import tsx bench/library-proxy.ts --listen 127.0.0.8:PORT --upstream 127.0.0.30:PORT
import { Agent, createServer } from 'node:http';
import { parseArgs } from 'node:util';
import { ProxyServer } from 'http-proxy-3';
import { exitOnSignal, listenAndAnnounce, splitHostPort } from './lib/serve.js';

const { values } = parseArgs({ options: { listen: { type: 'string', default: '127.0.0.8:0' }, upstream: { type: 'string', default: '' } } });
const [host, port] = splitHostPort(values.listen ?? '127.0.0.8:0');
const [upstreamHost, upstreamPort] = splitHostPort(values.upstream ?? '');
// As src/proxy/server.ts with the defaults (ROUTESYNC_PROXY_MAX_SOCKETS 256, 4 s idle sockets).
const agent = new Agent({ keepAlive: true, maxSockets: 256, maxFreeSockets: 256, timeout: 4_000, scheduling: 'lifo' });
const proxy = new ProxyServer({ agent, xfwd: false, prependPath: false });
const target = { protocol: 'http:', host: upstreamHost, port: upstreamPort };

const server = createServer({ requestTimeout: 0, headersTimeout: 60_000, connectionsCheckingInterval: 30_000 }, (req, res) => {
  proxy.web(req, res, { target }, () => {
    if (!res.headersSent) res.writeHead(502);
    res.end();
  });
});
// The library throws on an 'error' event nobody listens to; the callback above handles web errors.
proxy.on('error', () => {});

void listenAndAnnounce(server, host, port, 'library proxy', ` -> ${upstreamHost}:${upstreamPort}`);
exitOnSignal(server, () => agent.destroy());
