import { describe, expect, it } from 'vitest';
import {
  compareResourceVersions,
  isCanonicalResourceVersion,
  parseChange,
  parseRoute,
  redactRoute,
  RouteValidationError,
} from '../../src/routes/route.js';

const valid = { namespace: 'ns', name: 'a', id: 'sb-1', uid: 'u-1', resourceVersion: '7', ip: '10.1.2.3', state: 'Running' };

function reasonOf(input: unknown): string {
  try {
    parseRoute(input);
  } catch (error) {
    expect(error).toBeInstanceOf(RouteValidationError);
    return (error as RouteValidationError).reason;
  }
  throw new Error('expected a validation error');
}

describe('resourceVersion', () => {
  it('accepts only canonical positive decimal integers', () => {
    for (const good of ['1', '9', '10', '18446744073709551615', '9'.repeat(128)]) expect(isCanonicalResourceVersion(good)).toBe(true);
    for (const bad of ['', '0', '01', '-1', '+1', '1e3', ' 1', '1 ', '1.0', '0x10', '１', '9'.repeat(129)]) {
      expect(isCanonicalResourceVersion(bad), bad).toBe(false);
    }
  });

  it('compares numerically at any length, beyond 2^64', () => {
    expect(compareResourceVersions('9', '10')).toBe(-1);
    expect(compareResourceVersions('100', '99')).toBe(1);
    expect(compareResourceVersions('18446744073709551616', '18446744073709551615')).toBe(1);
    expect(compareResourceVersions('123456789012345678901234567890', '123456789012345678901234567890')).toBe(0);
  });
});

describe('parseRoute', () => {
  it('keeps the known fields and drops unknown ones', () => {
    const route = parseRoute({ ...valid, owner: 'me', accessToken: 't', requireTrafficAuth: true, extra: 1 });
    expect(route).toEqual({ ...valid, owner: 'me', accessToken: 't', requireTrafficAuth: true });
  });

  it('never copies __proto__ or constructor keys', () => {
    const input = JSON.parse(`{"namespace":"ns","name":"a","id":"x","uid":"u","resourceVersion":"1","__proto__":{"polluted":true},"constructor":{"prototype":{"bad":1}}}`);
    const route = parseRoute(input) as unknown as Record<string, unknown>;
    expect(Object.hasOwn(route, '__proto__')).toBe(false);
    expect(route.polluted).toBeUndefined();
    expect((route.constructor as { prototype?: Record<string, unknown> }).prototype?.bad).toBeUndefined();
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
    expect(Object.keys(route).sort()).toEqual(['id', 'ip', 'name', 'namespace', 'resourceVersion', 'state', 'uid']);
  });

  it('gives a reason for each rejection', () => {
    expect(reasonOf(null)).toBe('not_an_object');
    expect(reasonOf([valid])).toBe('not_an_object');
    expect(reasonOf({ ...valid, namespace: undefined })).toBe('missing_field');
    expect(reasonOf({ ...valid, name: 3 })).toBe('wrong_type');
    expect(reasonOf({ ...valid, id: '' })).toBe('empty_field');
    expect(reasonOf({ ...valid, uid: 'x'.repeat(300) })).toBe('too_long');
    expect(reasonOf({ ...valid, state: 's'.repeat(65) })).toBe('too_long');
    expect(parseRoute({ ...valid, state: 's'.repeat(64) }).state, 'a state of 64 characters is stored').toBe('s'.repeat(64));
    expect(reasonOf({ ...valid, name: 'a\nb' })).toBe('control_character');
    expect(reasonOf({ ...valid, id: 'sb-\ud800' })).toBe('invalid_unicode');
    expect(reasonOf({ ...valid, accessToken: '\udfff-token' })).toBe('invalid_unicode');
    expect(reasonOf({ ...valid, resourceVersion: '01' })).toBe('invalid_resource_version');
    expect(reasonOf({ ...valid, resourceVersion: 7 })).toBe('wrong_type');
    expect(reasonOf({ ...valid, ip: '10.0.0.256' })).toBe('invalid_ip');
    expect(reasonOf({ ...valid, ip: 'fe80::1%eth0' })).toBe('invalid_ip');
    expect(reasonOf({ ...valid, requireTrafficAuth: 'yes' })).toBe('wrong_type');
  });

  it('refuses a lone UTF-16 surrogate in any string field but keeps a character outside the BMP (a surrogate pair)', () => {
    // From JSON text, as a manager's body arrives: "\ud800" and "\ufffd" would otherwise be two
    // tokens with one UTF-8 form.
    const fromJson = (field: string, escaped: string) => parseRoute(JSON.parse(`{"namespace":"ns","name":"a","id":"x","uid":"u","resourceVersion":"1","${field}":"${escaped}"}`));
    for (const field of ['id', 'uid', 'state', 'owner', 'accessToken']) {
      for (const lone of ['\\ud800', 'a\\udc00', '\\ude00\\ud83d']) {
        expect(() => fromJson(field, lone)).toThrow(expect.objectContaining({ reason: 'invalid_unicode', field }));
      }
    }
    expect(fromJson('owner', '\\ud83d\\ude00 team').owner).toBe('\u{1F600} team');
    expect(fromJson('accessToken', 'caf\\u00e9\\u4e2d').accessToken).toBe('café中');
  });

  it('takes the identity as Kubernetes does: namespace a DNS-1123 label, name a DNS-1123 subdomain, never a "/"', () => {
    // With a '/' allowed, {team/x, sb} and {team, x/sb} would share the identity key "team/x/sb".
    const rejected = (input: Record<string, unknown>): { reason: string; field: string | undefined } => {
      try {
        parseRoute(input);
      } catch (error) {
        return { reason: (error as RouteValidationError).reason, field: (error as RouteValidationError).field };
      }
      throw new Error(`accepted ${JSON.stringify(input)}`);
    };
    for (const namespace of ['team/x', 'Team', 'team_x', '-team', 'team-', 'team.x', ' team', 'tëam']) {
      expect(rejected({ ...valid, namespace }), namespace).toEqual({ reason: 'invalid_kubernetes_name', field: 'namespace' });
    }
    for (const name of ['x/sb', 'Sandbox', 'sb_1', '-sb', 'sb-', '.sb', 'sb.', 'a..b', 'sb 1', '..']) {
      expect(rejected({ ...valid, name }), name).toEqual({ reason: 'invalid_kubernetes_name', field: 'name' });
    }
    expect(rejected({ ...valid, namespace: 'n'.repeat(64) })).toEqual({ reason: 'too_long', field: 'namespace' });
    expect(rejected({ ...valid, name: 'n'.repeat(254) })).toEqual({ reason: 'too_long', field: 'name' });
    for (const [namespace, name] of [['a', 'b'], ['kube-system', 'sandbox-7'], ['n'.repeat(63), 'n'.repeat(253)], ['0ns', 'sb.v2.team-a'], ['ns', '7']]) {
      expect(parseRoute({ ...valid, namespace, name })).toMatchObject({ namespace, name });
    }
    // Deletions (a dead route, DELETE's identity) get the same checks.
    expect(() => parseChange({ namespace: 'team', name: 'x/sb', resourceVersion: '3', state: 'dead' })).toThrow(RouteValidationError);
    expect(() => parseChange({ namespace: 'team/x', name: 'sb', resourceVersion: '3', state: 'dead' })).toThrow(/namespace must be a Kubernetes namespace name/);
  });

  it('accepts an empty ip, IPv6 and states of any case', () => {
    expect(parseRoute({ ...valid, ip: '' }).ip).toBe('');
    expect(parseRoute({ ...valid, ip: '2001:db8::1' }).ip).toBe('2001:db8::1');
    expect(parseRoute({ ...valid, state: 'PAUSED' }).state).toBe('PAUSED');
    expect(parseRoute({ ...valid, state: 'something-new' }).state).toBe('something-new');
  });

  it('stores optional fields only when given: the route reads back as the JSON it came from', () => {
    const bare = parseRoute({ ...valid, owner: '', accessToken: '', requireTrafficAuth: false });
    expect(Object.keys(bare).sort()).toEqual(['id', 'ip', 'name', 'namespace', 'resourceVersion', 'state', 'uid']);
    expect('owner' in bare || 'accessToken' in bare || 'requireTrafficAuth' in bare).toBe(false);
    expect(JSON.parse(JSON.stringify(bare))).toEqual(valid);
    const full = { ...valid, owner: 'me', accessToken: 't', requireTrafficAuth: true };
    expect(JSON.parse(JSON.stringify(parseRoute(full)))).toEqual(full);
  });

  it('keeps every route its own namespace, owner and state however many distinct values it has seen', () => {
    // The values routes repeat are shared through a bounded pool; past its bound each value is
    // kept as it came. 5,000 distinct namespaces and owners cross the bound (4,096).
    const routes = Array.from({ length: 5000 }, (_, i) => parseRoute({ ...valid, namespace: `ns-${i}`, owner: `team-${i}`, state: `state-${i}` }));
    routes.forEach((route, i) => {
      expect([route.namespace, route.owner, route.state]).toEqual([`ns-${i}`, `team-${i}`, `state-${i}`]);
    });
    const again = parseRoute(JSON.parse(JSON.stringify({ ...valid, namespace: 'ns-7', owner: 'team-4999' })));
    expect([again.namespace, again.owner]).toEqual(['ns-7', 'team-4999']);
  });

  it('never lists the access token', () => {
    const shown = redactRoute(parseRoute({ ...valid, accessToken: 'secret-token' }));
    expect(JSON.stringify(shown)).not.toContain('secret-token');
    expect(shown.hasAccessToken).toBe(true);
  });
});

describe('parseChange', () => {
  it('treats a dead route as a deletion needing only identity and version', () => {
    expect(parseChange({ namespace: 'ns', name: 'a', resourceVersion: '9', state: 'DEAD' })).toEqual({
      op: 'delete',
      deletion: { namespace: 'ns', name: 'a', resourceVersion: '9' },
    });
    expect(() => parseChange({ namespace: 'ns', name: 'a', state: 'dead' })).toThrow(/resourceVersion is required/);
  });

  it('reads fencedAtMs for replicas (peer API, pulls) and ignores it for the local manager', () => {
    const dead = { namespace: 'ns', name: 'a', resourceVersion: '9', state: 'dead' };
    expect(parseChange({ ...dead, fencedAtMs: 1_700_000_000_000 })).toEqual({
      op: 'delete',
      deletion: { namespace: 'ns', name: 'a', resourceVersion: '9', fencedAtMs: 1_700_000_000_000 },
    });
    expect(() => parseChange({ ...dead, fencedAtMs: 'yesterday' })).toThrow(/fencedAtMs/);
    // Not a Route field (SPEC §2): from the local manager it is an unknown field, dropped whatever its value.
    for (const fencedAtMs of [0, 1_700_000_000_000, 'yesterday', -1, null]) {
      expect(parseChange({ ...dead, fencedAtMs }, { fencedAt: false }), String(fencedAtMs)).toEqual({
        op: 'delete',
        deletion: { namespace: 'ns', name: 'a', resourceVersion: '9' },
      });
    }
  });
});
