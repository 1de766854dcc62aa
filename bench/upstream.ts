// The sandbox stand-in of benchmark 6: a bare node:http server in a process of its own that
// answers every request with a small JSON body, hit directly and through the data plane.
//
//   node --import tsx bench/upstream.ts --listen 127.0.0.30:PORT
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { parseArgs } from 'node:util';

const { values } = parseArgs({ options: { listen: { type: 'string', default: '127.0.0.30:0' } } });
const text = values.listen ?? '127.0.0.30:0';
const colon = text.lastIndexOf(':');
const body = JSON.stringify({ ok: true, sandbox: 'bench', payload: 'x'.repeat(64) });

const server = createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body);
  });
});
server.keepAliveTimeout = 65_000;

server.listen(Number(text.slice(colon + 1)), text.slice(0, colon), () => {
  const address = server.address() as AddressInfo;
  if (process.send) process.send({ type: 'listening', address: `${address.address}:${address.port}` });
  else process.stdout.write(`upstream listening on ${address.address}:${address.port}\n`);
});

const shutdown = () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1_000).unref();
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
