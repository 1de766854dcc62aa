// docs/openapi.yaml against the running server, in both directions: every documented operation
// is served by the listener its tag names (not the generic 404/405 of an unknown route), every
// route the Express apps register is documented, and the documented examples, sent for real,
// come back with a documented status and a body that fits the documented schema.
import { readFileSync } from 'node:fs';
import { METHODS as HTTP_METHODS } from 'node:http';
import type { Express } from 'express';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { parse } from 'yaml';
import { startCluster, stopAll, type TestReplica } from '../helpers/cluster.js';

// The Express apps each replica builds, captured as it builds them: the servers may wrap an app
// in a plain handler (the test fault switch does), so the app is not reachable from the server.
const builtApps = vi.hoisted(() => ({ local: [] as unknown[], peer: [] as unknown[] }));
vi.mock('../../src/api/local.js', async (importOriginal) => {
  const original = await importOriginal<typeof import('../../src/api/local.js')>();
  return { ...original, createLocalApp: (...args: Parameters<typeof original.createLocalApp>) => record(builtApps.local, original.createLocalApp(...args)) };
});
vi.mock('../../src/api/peer.js', async (importOriginal) => {
  const original = await importOriginal<typeof import('../../src/api/peer.js')>();
  return { ...original, createPeerApp: (...args: Parameters<typeof original.createPeerApp>) => record(builtApps.peer, original.createPeerApp(...args)) };
});
function record(list: unknown[], app: Express): Express {
  list.push(app);
  return app;
}

type Schema = Record<string, any>;
interface Operation {
  readonly path: string;
  readonly method: string;
  readonly op: Record<string, any>;
}

const DOC = parse(readFileSync(new URL('../../docs/openapi.yaml', import.meta.url), 'utf8')) as Record<string, any>;
const METHODS = ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'];
const OPERATIONS: Operation[] = Object.entries(DOC.paths as Record<string, Record<string, any>>).flatMap(([path, item]) =>
  METHODS.filter((method) => item[method]).map((method) => ({ path, method, op: item[method] })),
);
const TOKEN = 'openapi-test-peer-token';
/** The codes every app answers for a route it does not have. */
const GENERIC = new Set(['not_found', 'method_not_allowed']);

function resolve(schema: Schema): Schema {
  let current = schema;
  while (typeof current.$ref === 'string') {
    current = (current.$ref as string)
      .replace(/^#\//, '')
      .split('/')
      .reduce((node: any, key: string) => node?.[key], DOC) as Schema;
    if (!current) throw new Error(`unresolved $ref ${schema.$ref}`);
  }
  return current;
}

function typeOf(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  if (typeof value === 'number') return Number.isInteger(value) ? 'integer' : 'number';
  return typeof value;
}

/**
 * The subset of JSON Schema this document uses: $ref, type, required, properties, items,
 * enum, const, oneOf (checked as "at least one": Route and DeadRoute overlap on purpose),
 * minimum, minLength, pattern. Returns the problems found, empty when the value fits.
 */
function check(value: unknown, raw: Schema, at = '$'): string[] {
  const schema = resolve(raw);
  if (schema.oneOf) {
    const fits = (schema.oneOf as Schema[]).some((option) => check(value, option, at).length === 0);
    return fits ? [] : [`${at}: fits none of the oneOf schemas`];
  }
  const problems: string[] = [];
  if (schema.type) {
    const allowed = ([] as string[]).concat(schema.type as string | string[]);
    const actual = typeOf(value);
    if (!allowed.includes(actual) && !(actual === 'integer' && allowed.includes('number'))) return [`${at}: ${actual} is not ${allowed.join('|')}`];
  }
  if (schema.const !== undefined && value !== schema.const) problems.push(`${at}: ${JSON.stringify(value)} is not ${JSON.stringify(schema.const)}`);
  if (schema.enum && !(schema.enum as unknown[]).includes(value)) problems.push(`${at}: ${JSON.stringify(value)} not in enum`);
  if (typeof value === 'number' && typeof schema.minimum === 'number' && value < schema.minimum) problems.push(`${at}: below minimum`);
  if (typeof value === 'string' && typeof schema.pattern === 'string' && !new RegExp(schema.pattern as string).test(value)) problems.push(`${at}: does not match ${schema.pattern}`);
  if (typeof value === 'string' && typeof schema.minLength === 'number' && value.length < schema.minLength) problems.push(`${at}: too short`);
  if (typeOf(value) === 'object') {
    const object = value as Record<string, unknown>;
    for (const key of (schema.required as string[] | undefined) ?? []) if (!(key in object)) problems.push(`${at}: missing required ${key}`);
    for (const [key, sub] of Object.entries((schema.properties as Record<string, Schema> | undefined) ?? {})) {
      if (key in object) problems.push(...check(object[key], sub, `${at}.${key}`));
    }
  }
  if (Array.isArray(value) && schema.items) value.forEach((item, index) => problems.push(...check(item, schema.items as Schema, `${at}[${index}]`)));
  return problems;
}

/** Express 5: the app's router stack, nested routers included -> [OpenAPI path, methods]. */
function registeredRoutes(app: any): Map<string, Set<string>> {
  const routes = new Map<string, Set<string>>();
  const walk = (stack: any[]) => {
    for (const layer of stack) {
      if (layer.route) {
        const path = String(layer.route.path).replace(/:(\w+)/g, '{$1}');
        const methods = routes.get(path) ?? new Set<string>();
        // A catch-all (router.all sets `_all`; Express's app.all registers every method) is the
        // 405 answer with Allow, not an operation of its own.
        const own = Object.keys(layer.route.methods as Record<string, boolean>);
        const catchAll = own.includes('_all') || HTTP_METHODS.every((method) => own.includes(method.toLowerCase()));
        if (!catchAll) for (const method of own) methods.add(method);
        routes.set(path, methods);
      } else if (Array.isArray(layer.handle?.stack)) {
        walk(layer.handle.stack as any[]);
      }
    }
  };
  walk(app.router.stack as any[]);
  return routes;
}


/** The concrete URL path of an operation: path parameters from their examples. */
function concretePath(operation: Operation): string {
  const params = (operation.op.parameters as Schema[] | undefined) ?? [];
  let path = operation.path.replace(/\{(\w+)\}/g, (_match, name: string) => {
    const param = params.find((p) => p.in === 'path' && p.name === name);
    return encodeURIComponent(String(param?.example ?? 'x'));
  });
  const query = params.filter((p) => p.in === 'query' && p.example !== undefined);
  if (query.length > 0) path += `?${new URLSearchParams(query.map((p): [string, string] => [p.name as string, String(p.example)])).toString()}`;
  return path;
}

let nodes: TestReplica[] = [];
let node: TestReplica;

function baseUrl(operation: Operation): string {
  return (operation.op.tags as string[]).includes('local') ? node.api : node.peerUrl;
}

async function send(
  operation: Operation,
  body?: unknown,
  path = concretePath(operation),
): Promise<{ status: number; body: any; contentType: string; allow: string | null }> {
  const headers: Record<string, string> = { authorization: `Bearer ${TOKEN}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const response = await fetch(`${baseUrl(operation)}${path}`, {
    method: operation.method.toUpperCase(),
    headers,
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await response.text();
  const contentType = response.headers.get('content-type') ?? '';
  return { status: response.status, body: contentType.includes('json') && text !== '' ? JSON.parse(text) : text, contentType, allow: response.headers.get('allow') };
}

beforeAll(async () => {
  nodes = await startCluster(2, { ROUTESYNC_PEER_TOKEN: TOKEN });
  node = nodes[0]!;
});
afterAll(async () => {
  await stopAll(nodes);
});

describe('docs/openapi.yaml', () => {
  it('is an OpenAPI 3.1 document whose every $ref resolves', () => {
    expect(DOC.openapi).toMatch(/^3\.1\./);
    const refs = JSON.stringify(DOC).match(/"\$ref":"[^"]+"/g) ?? [];
    expect(refs.length).toBeGreaterThan(10);
    for (const ref of refs) expect(() => resolve({ $ref: ref.slice(8, -1) })).not.toThrow();
    for (const { op } of OPERATIONS) expect(op.tags, `${op.operationId} has a listener tag`).toHaveLength(1);
  });

  it('documents every route the local and peer apps register, and nothing they do not', () => {
    const served = new Map<string, Set<string>>();
    // startCluster built node 0 first: its apps are the first captured.
    expect(builtApps.local.length).toBe(nodes.length);
    expect(builtApps.peer.length).toBe(nodes.length);
    for (const [tags, app] of [
      [['local'], builtApps.local[0]],
      [['peer', 'probes'], builtApps.peer[0]],
    ] as const) {
      for (const [path, methods] of registeredRoutes(app)) {
        const item = (DOC.paths as Record<string, Record<string, any>>)[path];
        expect(item, `route ${path} is registered but not documented`).toBeDefined();
        for (const method of methods) {
          expect(item?.[method], `${method.toUpperCase()} ${path} is registered but not documented`).toBeDefined();
          expect(tags).toContain(item?.[method]?.tags?.[0]);
        }
        served.set(path, methods);
      }
    }
    for (const { path, method } of OPERATIONS) {
      expect(served.get(path)?.has(method), `${method.toUpperCase()} ${path} is documented but no app registers it`).toBe(true);
    }
  });

  for (const operation of OPERATIONS) {
    it(`${operation.method.toUpperCase()} ${operation.path} is served on its listener (not the generic 404/405)`, async () => {
      // Path parameters that name nothing: this must not touch the examples' routes.
      const response = await send(operation, undefined, operation.path.replace(/\{(\w+)\}/g, 'served-check-$1'));
      expect(response.status).toBeLessThan(500);
      if (response.status === 404 || response.status === 405) expect(GENERIC.has(response.body?.error?.code)).toBe(false);
    });
  }

  it('answers an undocumented path with the generic 404, so the check above can fail', async () => {
    const fake: Operation = { path: '/v1/not-a-route', method: 'get', op: { tags: ['local'] } };
    expect((await send(fake)).body.error.code).toBe('not_found');
    expect((await send({ ...fake, op: { tags: ['peer'] } })).body.error.code).toBe('not_found');
    expect((await send({ path: '/v1/routes', method: 'patch', op: { tags: ['local'] } })).body.error.code).toBe('method_not_allowed');
  });

  it('answers another method on every documented path with 405 and Allow naming the documented methods', async () => {
    for (const path of Object.keys(DOC.paths as Record<string, unknown>)) {
      const operation = OPERATIONS.find((o) => o.path === path)!;
      // Every documented path the URL matches: /v1/routes/batch is also /v1/routes/{id}.
      const url = concretePath(operation).split('?')[0]!;
      const matching = OPERATIONS.filter((o) => new RegExp(`^${o.path.replace(/\{\w+\}/g, '[^/]+')}$`).test(url));
      const documented = [...new Set(matching.map((o) => o.method))];
      for (const method of ['put', 'post', 'delete', 'patch'].filter((m) => !documented.includes(m))) {
        const response = await send({ ...operation, method });
        const name = `${method.toUpperCase()} ${path}`;
        expect(response.status, `${name}: ${JSON.stringify(response.body)}`).toBe(405);
        expect(response.body.error.code, name).toBe('method_not_allowed');
        expect(response.allow?.split(', ').sort(), name).toEqual(documented.map((m) => m.toUpperCase()).sort());
      }
    }
  });

  it('answers every documented example with a documented status and a body that fits its schema', async () => {
    // Deletions last, so the examples that read the example route still find it.
    const ordered = [...OPERATIONS.filter((o) => o.method !== 'delete'), ...OPERATIONS.filter((o) => o.method === 'delete')];
    let checked = 0;
    for (const operation of ordered) {
      const example = operation.op.requestBody?.content?.['application/json']?.example as unknown;
      const response = await send(operation, example);
      const name = `${operation.method.toUpperCase()} ${operation.path}`;
      expect(response.status, `${name}: ${JSON.stringify(response.body)}`).toBeLessThan(300);
      const documented = operation.op.responses[String(response.status)] as Schema | undefined;
      expect(documented, `${name} answered ${response.status}, which is not documented`).toBeDefined();
      const schema = resolve(documented!).content?.['application/json']?.schema as Schema | undefined;
      if (schema) {
        expect(response.contentType).toContain('application/json');
        expect(check(response.body, schema), name).toEqual([]);
        checked++;
      }
    }
    expect(checked).toBeGreaterThanOrEqual(8);
  });

  it('documents the error answers: a bad route, an unknown ID, a missing peer token', async () => {
    const op = (path: string, method: string) => OPERATIONS.find((o) => o.path === path && o.method === method)!;
    const cases: [Operation, unknown, string | undefined, number, string][] = [
      [op('/v1/routes', 'put'), { namespace: 'default', name: 'x', id: 'y', uid: 'z', resourceVersion: '007' }, undefined, 400, 'invalid_route'],
      [op('/v1/routes/{id}', 'get'), undefined, '/v1/routes/no-such-sandbox', 404, 'route_not_found'],
    ];
    for (const [operation, body, path, status, code] of cases) {
      const response = await send(operation, body, path);
      expect(response.status).toBe(status);
      expect(response.body.error.code).toBe(code);
      expect(check(response.body, resolve(operation.op.responses[String(status)] as Schema).content['application/json'].schema as Schema)).toEqual([]);
    }
    // Without the token, every documented peer operation that declares peerToken answers 401.
    const guarded = OPERATIONS.filter((o) => (o.op.security as Schema[] | undefined)?.some((s) => 'peerToken' in s));
    expect(guarded.length).toBeGreaterThanOrEqual(2);
    for (const operation of guarded) {
      const response = await fetch(`${node.peerUrl}${concretePath(operation)}`, { method: operation.method.toUpperCase() });
      expect(response.status, `${operation.path} without a token`).toBe(401);
      expect(operation.op.responses['401']).toBeDefined();
      expect(check(await response.json(), resolve(operation.op.responses['401'] as Schema).content['application/json'].schema as Schema)).toEqual([]);
    }
  });

  it('the schema check rejects a body that lacks a required field', () => {
    expect(check({ count: 1, routes: [] }, { $ref: '#/components/schemas/RouteList' })).toEqual(['$: missing required tombstones']);
    expect(check({ result: { outcome: 'maybe', reason: 'created', key: 'a/b' }, sync: null }, { $ref: '#/components/schemas/LocalChangeResult' })).not.toEqual([]);
  });
});
