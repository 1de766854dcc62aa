// Bad input (issue 6 §2): at least 10,000 generated bad requests against the local API
// (PUT /v1/routes, POST /v1/routes/batch, DELETE) and the peer API (/refresh, /v1/peer/routes,
// /v1/peer/pull). Each must get a 4xx, leave the table's digest unchanged, and leave the
// process serving. The generator is seeded (printed; FUZZ_SEED replays a run) and built on
// fast-check's arbitraries, sampled rather than shrunk: the point is volume and variety.
import fc from 'fast-check';
import { Agent, request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseChange } from '../../src/routes/route.js';
import { makeRoute, putRoute, startReplica, type TestReplica } from '../helpers/cluster.js';

const TOTAL = 10_000;
const SEED = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : Date.now() % 2_147_483_647;
/** Requests in flight at once: enough to keep one replica busy, few enough for a 2-core machine. */
const PARALLEL = 8;
const PEER_TOKEN = 'fuzz-peer-token-SECRET-MARKER-51e0';

type Target = 'put' | 'batch' | 'delete' | 'refresh' | 'peerBatch' | 'pull';

interface BadRequest {
  readonly kind: string;
  readonly target: Target;
  readonly method: 'PUT' | 'POST' | 'DELETE';
  readonly path: string;
  readonly contentType: string | undefined;
  readonly body: string | undefined;
}

/** A route already in the table: bad changes aimed at it must not move it. */
const EXISTING = { namespace: 'fuzz', name: 'existing', id: 'sb-existing', uid: 'uid-existing', resourceVersion: '5', ip: '10.1.2.3', state: 'Running' };

const NON_CANONICAL_RVS = ['01', '-1', '1e3', ' 1', '', '1 ', '+1', '0', '00', '1.0', '0x10', '١', '１', '9'.repeat(129), '7'.repeat(400), 'NaN', 'Infinity'];
const BAD_IPS = ['256.0.0.1', '10.0.0', '1.2.3.4.5', 'fe80::1%eth0', '::g', '10.0.0.1/24', ' 10.0.0.1', 'localhost', '10.0.0.1:80', '0x0a000001', ':::', '1::2::3', 'http://10.0.0.1'];
const WRONG_TYPES: unknown[] = [0, 1, -1, 3.5, true, false, [], ['x'], {}, { a: 1 }];
const REQUIRED = ['namespace', 'name', 'id', 'uid', 'resourceVersion'] as const;
const WRONG_CONTENT_TYPES = [undefined, 'text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/xml', 'text/json'];

/** Bodies that reach the route parser but are not valid changes, with the kind each exercises. */
function badEntry(random: () => number, pick: <T>(items: readonly T[]) => T): { kind: string; entry: unknown; raw?: string } {
  const base: Record<string, unknown> = { ...makeRoute({ namespace: 'fuzz' }) };
  const choice = Math.floor(random() * 9);
  switch (choice) {
    case 0: {
      const field = pick(REQUIRED);
      delete base[field];
      return { kind: 'missing field', entry: base };
    }
    case 1: {
      const field = pick([...REQUIRED, 'ip', 'state', 'owner', 'accessToken', 'requireTrafficAuth']);
      let value = pick(WRONG_TYPES);
      if (field === 'requireTrafficAuth') value = pick(['yes', 'true', 1, 0, [], {}]);
      if (!REQUIRED.includes(field as (typeof REQUIRED)[number]) && (value === null || value === undefined)) value = 7;
      base[field] = value;
      return { kind: 'wrong type', entry: base };
    }
    case 2: {
      // Aimed at the existing route too: a version that would win if it were read loosely.
      const target = random() < 0.5 ? { ...EXISTING } : base;
      target.resourceVersion = pick(NON_CANONICAL_RVS);
      if (random() < 0.3) target.state = 'dead';
      return { kind: 'non-canonical resourceVersion', entry: target };
    }
    case 3: {
      base.ip = pick(BAD_IPS);
      return { kind: 'invalid ip', entry: base };
    }
    case 4: {
      // A required field missing from the object but offered through __proto__ or constructor:
      // the parser must read own fields only.
      const field = pick(REQUIRED);
      const value = base[field];
      delete base[field];
      const carrier = random() < 0.5 ? `"__proto__":${JSON.stringify({ [field]: value })}` : `"constructor":${JSON.stringify({ prototype: { [field]: value }, [field]: value })}`;
      const raw = `{${carrier},${JSON.stringify(base).slice(1)}`;
      return { kind: 'prototype keys', entry: undefined, raw };
    }
    case 5: {
      const field = pick(['namespace', 'name', 'id', 'uid', 'owner']);
      const flaw = random();
      // A lone surrogate travels as JSON's \udXXX escape (JSON.stringify writes it so).
      if (flaw < 0.4) base[field] = 'x'.repeat(254 + Math.floor(random() * 100));
      else if (flaw < 0.8) base[field] = `bad${String.fromCharCode(Math.floor(random() * 32))}name`;
      else base[field] = `bad${String.fromCharCode(0xd800 + Math.floor(random() * 0x800))}name`;
      return { kind: 'too long, control character or lone surrogate', entry: base };
    }
    case 6: {
      // A deletion (state dead) that is still not valid.
      const dead: Record<string, unknown> = { namespace: 'fuzz', name: 'existing', resourceVersion: '9', state: pick(['dead', 'Dead', 'DEAD']) };
      const flaw = Math.floor(random() * 3);
      if (flaw === 0) delete dead[pick(['namespace', 'name', 'resourceVersion'])];
      else if (flaw === 1) dead.fencedAtMs = pick([-1, 1.5, '123', 2 ** 60, true, []]);
      else dead.resourceVersion = pick(NON_CANONICAL_RVS);
      return { kind: 'invalid deletion', entry: dead };
    }
    case 7:
      return { kind: 'not an object', entry: pick([null, 1, 'route', true, [], [base], 3.14]) };
    default: {
      // Arbitrary JSON from fast-check: never a valid route in practice, checked below anyway.
      const [value] = fc.sample(fc.jsonValue({ maxDepth: 3 }), { seed: Math.floor(random() * 2 ** 31), numRuns: 1 });
      return { kind: 'arbitrary JSON', entry: value };
    }
  }
}

/** Break valid JSON so that it no longer parses: a truncation or a corruption. */
function brokenJson(text: string, random: () => number): { kind: string; text: string } {
  if (random() < 0.5) {
    // Every proper prefix of a JSON object or array fails to parse (the closing bracket is missing).
    return { kind: 'truncated JSON', text: text.slice(0, Math.floor(random() * text.length)) };
  }
  for (;;) {
    const at = Math.floor(random() * text.length);
    const junk = ['{', '}', '"', ',', ':', '[', ']', '\\', "'", 'undefined', 'NaN', '\u0000', '//'][Math.floor(random() * 13)]!;
    const broken = random() < 0.5 ? text.slice(0, at) + junk + text.slice(at) : text.slice(0, at) + junk + text.slice(at + 1);
    try {
      JSON.parse(broken);
    } catch {
      return { kind: 'malformed JSON', text: broken };
    }
  }
}

function isLegacyIdOnly(entry: unknown): boolean {
  if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) return false;
  const { namespace, name, id } = entry as Record<string, unknown>;
  const absent = (value: unknown) => value === undefined || value === null || value === '';
  return absent(namespace) && absent(name) && typeof id === 'string' && id !== '';
}

/** The seeded stream of bad requests. */
function* badRequests(seed: number, count: number): Generator<BadRequest> {
  // mulberry32: a tiny seeded PRNG, so a printed seed replays the run exactly.
  let state = seed >>> 0;
  const random = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4_294_967_296;
  };
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)]!;
  const targets: Target[] = ['put', 'batch', 'delete', 'refresh', 'peerBatch', 'pull'];

  for (let i = 0; i < count; i++) {
    const target = targets[i % targets.length]!;
    const json = 'application/json';
    if (target === 'delete') {
      const roll = random();
      const name = roll < 0.3 ? `bad${String.fromCharCode(1 + Math.floor(random() * 31))}` : roll < 0.45 ? 'x'.repeat(254) : 'existing';
      const rv = roll < 0.45 && random() < 0.5 ? '9' : pick(NON_CANONICAL_RVS.filter((v) => v !== ''));
      const query = random() < 0.1 ? `resourceVersion=9&resourceVersion=10` : `resourceVersion=${encodeURIComponent(rv)}`;
      yield {
        kind: roll < 0.45 ? 'invalid identity' : 'non-canonical resourceVersion',
        target,
        method: 'DELETE',
        path: `/v1/routes/fuzz/${encodeURIComponent(name)}?${query}`,
        contentType: undefined,
        body: undefined,
      };
      continue;
    }
    if (target === 'pull') {
      const buckets = pick<unknown>([-1, 1.5, 1_000_000, '3', null, [[0]], { a: 1 }, 2 ** 53]);
      const body = pick([JSON.stringify({ buckets: [0, buckets] }), JSON.stringify({ buckets }), JSON.stringify({ bucket: [0] }), '[0,1]', 'null', '{"buckets":[0,1']);
      yield { kind: 'invalid pull', target, method: 'POST', path: '/v1/peer/pull', contentType: json, body };
      continue;
    }

    const single = target === 'put' || target === 'refresh';
    const path = { put: '/v1/routes', batch: '/v1/routes/batch', refresh: '/refresh', peerBatch: '/v1/peer/routes' }[target];
    const method = target === 'put' ? 'PUT' : 'POST';
    const roll = random();
    if (roll < 0.02) {
      // Oversized: past the 1 MiB limit of a single route (the 64 MiB batch limits get a few).
      const limit = single ? 1_048_576 : 64 * 1_048_576;
      if (!single && random() < 0.9) {
        i--;
        continue;
      }
      const padding = 'p'.repeat(limit + 1024);
      const body = single ? JSON.stringify({ ...makeRoute(), owner: padding }) : JSON.stringify({ routes: [{ ...makeRoute(), owner: padding }] });
      yield { kind: 'oversized body', target, method, path, contentType: json, body };
      continue;
    }
    const { kind: entryKind, entry, raw } = badEntry(random, pick);
    if ((target === 'refresh' && isLegacyIdOnly(entry)) || (raw === undefined && isValidChange(entry, target))) {
      i--;
      continue;
    }
    const entryText = raw ?? JSON.stringify(entry) ?? 'null';
    let kind = entryKind;
    let body: string;
    if (single) body = entryText;
    else {
      // A batch of valid routes with one bad entry: all or nothing, so nothing may apply.
      const good = Array.from({ length: Math.floor(random() * 4) }, () => JSON.stringify(makeRoute({ namespace: 'fuzz' })));
      good.splice(Math.floor(random() * (good.length + 1)), 0, entryText);
      body = target === 'batch' && random() < 0.3 ? `[${good.join(',')}]` : `{"routes":[${good.join(',')}]}`;
      if (random() < 0.1) {
        body = JSON.stringify(pick<unknown>([{ routes: 'x' }, { routes: {} }, { route: [] }, {}, null, 5]));
        kind = 'not a batch';
      }
    }
    let contentType: string | undefined = json;
    const breakRoll = random();
    if (breakRoll < 0.2) {
      const broken = brokenJson(single ? entryText : body, random);
      kind = broken.kind;
      body = broken.text;
    } else if (breakRoll < 0.3 && (target === 'put' || target === 'batch')) {
      // The local API is strict about the media type. A valid route is enough to prove it.
      contentType = pick(WRONG_CONTENT_TYPES);
      body = target === 'put' ? JSON.stringify(makeRoute({ namespace: 'fuzz' })) : JSON.stringify({ routes: [makeRoute({ namespace: 'fuzz' })] });
      kind = 'wrong content type';
    } else if (breakRoll < 0.35) {
      // The peer API parses any media type; the body is still bad.
      contentType = pick(WRONG_CONTENT_TYPES);
      kind = `${kind}, odd content type`;
    }
    yield { kind, target, method, path, contentType, body };
  }
}

/**
 * The generator must never send a valid change by accident (a mutation can land on a harmless
 * field). The local API ignores fencedAtMs, so a bad one is harmless there.
 */
function isValidChange(entry: unknown, target: Target): boolean {
  try {
    parseChange(entry, { fencedAt: target !== 'put' && target !== 'batch' });
    return true;
  } catch {
    return false;
  }
}

describe('fuzz: bad input against the local and peer APIs', () => {
  let node: TestReplica;
  let dispatcher: Agent;

  beforeAll(async () => {
    node = await startReplica({ ROUTESYNC_PEER_TOKEN: PEER_TOKEN, ROUTESYNC_LOG_LEVEL: 'info' });
    dispatcher = new Agent({ connections: PARALLEL, keepAliveTimeout: 30_000 });
    expect((await putRoute(node.api, EXISTING)).status).toBe(200);
    for (let i = 0; i < 20; i++) expect((await putRoute(node.api, makeRoute({ namespace: 'fuzz', accessToken: `access-SECRET-MARKER-${i}` }))).status).toBe(200);
  });
  afterAll(async () => {
    await dispatcher?.close();
    await node?.replica.close();
  });

  it(`answers ${TOTAL} generated bad requests with a 4xx and changes nothing`, async () => {
    console.log(`fuzz seed ${SEED} (replay with FUZZ_SEED=${SEED})`);
    const digest = node.replica.table.rootDigest();
    // Moved when a change is seen, so each culprit is reported once rather than every request after it.
    let expected = digest;
    const size = node.replica.table.size;
    const misbehaved: string[] = [];
    const byKind = new Map<string, number>();
    const statuses = new Map<number, number>();
    let tried = 0;
    const requests = badRequests(SEED, TOTAL);

    const worker = async () => {
      for (let next = requests.next(); !next.done; next = requests.next()) {
        const bad = next.value;
        tried++;
        byKind.set(bad.kind, (byKind.get(bad.kind) ?? 0) + 1);
        const base = bad.target === 'refresh' || bad.target === 'peerBatch' || bad.target === 'pull' ? node.peerUrl : node.api;
        const headers: Record<string, string> = {};
        if (bad.contentType !== undefined) headers['content-type'] = bad.contentType;
        if (base === node.peerUrl) headers.authorization = `Bearer ${PEER_TOKEN}`;
        let status: number;
        try {
          const response = await request(`${base}${bad.path}`, { method: bad.method, headers, body: bad.body, dispatcher });
          status = response.statusCode;
          await response.body.dump();
        } catch (error) {
          misbehaved.push(`${bad.kind} ${bad.method} ${bad.path}: request failed (${(error as Error).message})`);
          continue;
        }
        statuses.set(status, (statuses.get(status) ?? 0) + 1);
        if (status < 400 || status > 499) misbehaved.push(`${bad.kind} ${bad.method} ${bad.path}: ${status} for ${String(bad.body).slice(0, 200)}`);
        else if (node.replica.table.rootDigest() !== expected) {
          expected = node.replica.table.rootDigest();
          misbehaved.push(`${bad.kind} ${bad.method} ${bad.path}: ${status} but the table changed: ${String(bad.body).slice(0, 200)}`);
        }
      }
    };
    await Promise.all(Array.from({ length: PARALLEL }, worker));

    // Still serving: a probe answers, and a good change still applies (the check above could fail).
    expect((await fetch(`${node.peerUrl}/healthz`)).status).toBe(200);
    console.log(`fuzz: ${tried} bad inputs tried, ${misbehaved.length} misbehaved`);
    console.log(`fuzz: by kind ${JSON.stringify(Object.fromEntries([...byKind].sort((a, b) => b[1] - a[1])))}`);
    console.log(`fuzz: statuses ${JSON.stringify(Object.fromEntries(statuses))}`);
    if (misbehaved.length > 0) console.log(misbehaved.slice(0, 20).join('\n'));
    expect(tried).toBeGreaterThanOrEqual(TOTAL);
    expect(misbehaved).toEqual([]);
    expect(node.replica.table.rootDigest()).toBe(digest);
    expect(node.replica.table.size).toBe(size);
    expect((await putRoute(node.api, makeRoute({ namespace: 'fuzz' }))).status).toBe(200);
    expect(node.replica.table.rootDigest()).not.toBe(digest);
  });
});
