import { once } from 'node:events';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PeerClient, pushBody } from '../../src/peers/client.js';
import { changeToWire, type RouteChange } from '../../src/routes/route.js';

const upsert: RouteChange = {
  op: 'upsert',
  route: {
    namespace: 'sandbox-system',
    name: 'sbx-1',
    id: 'iabcdefghij0123456789',
    uid: 'uid-1',
    resourceVersion: '42',
    ip: '10.0.0.7',
    state: 'running',
    owner: 'team "a"',
    accessToken: 'tok\\en',
    requireTrafficAuth: true,
  },
};
const deletion: RouteChange = { op: 'delete', deletion: { namespace: 'sandbox-system', name: 'sbx-2', resourceVersion: '43', fencedAtMs: 1_700_000_000_000 } };

describe('push body', () => {
  const bodies: string[] = [];
  const server = createServer((req: IncomingMessage, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      bodies.push(text);
      const routes = (JSON.parse(text) as { routes: unknown[] }).routes;
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ results: routes.map(() => ({ outcome: 'applied' })) }));
    });
  });
  let address = '';
  const client = new PeerClient({ connections: 1, token: '', instanceId: 'test-instance' });

  beforeAll(async () => {
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    await client.close();
    server.close();
  });

  it('is the JSON of the wire form of every change, in order', () => {
    const changes = [upsert, deletion];
    expect(pushBody(changes)).toBe(JSON.stringify({ routes: changes.map(changeToWire) }));
    expect(JSON.parse(pushBody([deletion]))).toEqual({ routes: [{ ...deletion.deletion, state: 'dead' }] });
    expect(pushBody([])).toBe('{"routes":[]}');
  });

  it('sends every peer the same bytes for the same changes, however often they are pushed', async () => {
    const changes = [deletion, upsert];
    const expected = JSON.stringify({ routes: changes.map(changeToWire) });
    for (let i = 0; i < 3; i++) {
      const ack = await client.push(address, changes, AbortSignal.timeout(5_000));
      expect(ack).toEqual({ applied: 2, ignored: 0, rejectedAt: [] });
    }
    await client.push(address, [upsert], AbortSignal.timeout(5_000));
    expect(bodies).toEqual([expected, expected, expected, JSON.stringify({ routes: [changeToWire(upsert)] })]);
  });
});
