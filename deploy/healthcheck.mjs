// Container health check (deploy/Dockerfile HEALTHCHECK): exit 0 when the peer listener's
// GET /healthz answers 2xx, 1 otherwise. Slim images have no curl, so node does it.
//
// The address comes from ROUTESYNC_PEER_ADDR exactly as the server reads it (default
// 0.0.0.0:7789; `host:port`, `[v6]:port` or `:port`); a wildcard host is asked on loopback.
// With ROUTESYNC_PEER_TLS_CERT set the listener speaks TLS; the check then skips certificate
// verification: it talks to its own process over loopback, where a certificate proves
// nothing. If you move the peer listener with the --peer-addr flag instead of the variable,
// set the variable too (or override HEALTHCHECK).
//
// Plain JavaScript with explicit imports so it runs in the runtime image without a build.
import http from 'node:http';
import https from 'node:https';
import process from 'node:process';

const TIMEOUT_MS = 2000;

function fail(reason) {
  process.stderr.write(`healthcheck: ${reason}\n`);
  process.exit(1);
}

const text = (process.env.ROUTESYNC_PEER_ADDR ?? '').trim() || '0.0.0.0:7789';
const match = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(text);
if (!match) fail(`ROUTESYNC_PEER_ADDR "${text}" is not host:port`);
let host = match[1] ?? match[2] ?? '';
if (host === '' || host === '0.0.0.0') host = '127.0.0.1';
if (host === '::') host = '::1';
const port = Number(match[3]);
const tls = (process.env.ROUTESYNC_PEER_TLS_CERT ?? '').trim() !== '';

const client = tls ? https : http;
const request = client.request(
  {
    host,
    port,
    path: '/healthz',
    method: 'GET',
    timeout: TIMEOUT_MS,
    rejectUnauthorized: false,
  },
  (response) => {
    response.resume();
    const status = response.statusCode ?? 0;
    if (status >= 200 && status < 300) process.exit(0);
    fail(`GET /healthz answered ${status}`);
  },
);
request.on('timeout', () => request.destroy(new Error(`no answer within ${TIMEOUT_MS} ms`)));
request.on('error', (error) => fail(error.message));
request.end();
