import { once } from 'node:events';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PeerClient, pushBody } from '../../src/peers/client.js';
import { PEER_BATCH_BODY_LIMIT_BYTES } from '../../src/api/peer.js';
import { SETTINGS } from '../../src/config.js';
import {
  changeToWire,
  MAX_NAME_LENGTH,
  MAX_NAMESPACE_LENGTH,
  MAX_RESOURCE_VERSION_DIGITS,
  MAX_TOKEN_LENGTH,
  parseRoute,
  type RouteChange,
} from '../../src/routes/route.js';

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
    await new Promise<void>((resolve) => server.close(() => resolve()));
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

describe('push size', () => {
  it('a push of ROUTESYNC_BATCH_MAX_ROUTES routes of the largest kind validation admits fits the peer API body limit', () => {
    // With control characters and lone surrogates refused, a UTF-16 unit is written at most 3 bytes
    // long (U+0800 to U+FFFF in UTF-8; '"' and '\\' escape to 2, a surrogate pair is 4 for two):
    // every string field at its longest, of it, where validation allows any character.
    const widest = (length: number) => '\uffff'.repeat(length);
    const route = parseRoute({
      namespace: 'n'.repeat(MAX_NAMESPACE_LENGTH),
      name: 'n'.repeat(MAX_NAME_LENGTH),
      id: widest(MAX_NAME_LENGTH),
      uid: widest(MAX_NAME_LENGTH),
      resourceVersion: '9'.repeat(MAX_RESOURCE_VERSION_DIGITS),
      ip: 'ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255',
      state: widest(64),
      owner: widest(MAX_NAME_LENGTH),
      accessToken: widest(MAX_TOKEN_LENGTH),
      requireTrafficAuth: true,
    });
    const max = SETTINGS.ROUTESYNC_BATCH_MAX_ROUTES!.max!;
    // Byte for byte JSON.stringify({ routes }): each route after the first adds itself and a comma.
    const bytesOf = (count: number) => Buffer.byteLength(pushBody(Array.from({ length: count }, (): RouteChange => ({ op: 'upsert', route }))));
    const [one, two] = [bytesOf(1), bytesOf(2)];
    expect(two - one).toBeGreaterThan(14_000);
    expect(bytesOf(10)).toBe(one + 9 * (two - one));
    expect(one + (max - 1) * (two - one)).toBeLessThanOrEqual(PEER_BATCH_BODY_LIMIT_BYTES);
  });
});
