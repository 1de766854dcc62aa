// The pure parts of the data plane: request mapping, admission, error classification, header
// hygiene.
import { describe, expect, it } from 'vitest';
import { cleanResponseHeaders, upstreamRequestHeaders } from '../../src/proxy/headers.js';
import { admit, classifyUpstreamError, decide, mapRequest, originForm, parsePort, readmit, tokenMatches, upstreamAllowed, type SandboxAddress } from '../../src/proxy/target.js';
import type { Route } from '../../src/routes/route.js';

const options = { defaultSandboxPort: 49983, proxyDomain: '' };

function route(overrides: Partial<Route> = {}): Route {
  return { namespace: 'ns', name: 'n', id: 'sb', uid: 'u', resourceVersion: '1', ip: '10.0.0.7', state: 'running', ...overrides };
}

const address: SandboxAddress = { form: 'path', sandboxId: 'sb', port: 8080, upstreamPath: '/' };

describe('parsePort', () => {
  it('accepts canonical 1-65535 only', () => {
    expect(['1', '80', '65535', ' 8080 '].map(parsePort)).toEqual([1, 80, 65535, 8080]);
    for (const bad of ['0', '65536', '080', '-1', '+80', '8e3', '', 'http', '99999999999']) expect(parsePort(bad), bad).toBeUndefined();
  });
});

describe('mapRequest', () => {
  it('path form forwards the rest with the query, and / when there is none', () => {
    expect(mapRequest({ url: '/kruise/sb/3000/a/b?q=1', headers: {} }, options)).toEqual({
      ok: true,
      address: { form: 'path', sandboxId: 'sb', port: 3000, upstreamPath: '/a/b?q=1' },
    });
    expect(mapRequest({ url: '/kruise/sb/3000?q=1', headers: {} }, options)).toMatchObject({ ok: true, address: { upstreamPath: '/?q=1' } });
  });

  it('with a proxy domain, refuses a path or header form naming another sandbox than the host (that host is the other sandbox\'s browser origin)', () => {
    const withDomain = { ...options, proxyDomain: 'sb.example.com' };
    const victimHost = { host: '8080-victim.sb.example.com', cookie: 'session=victim' };
    expect(mapRequest({ url: '/kruise/attacker/8080/evil.html', headers: victimHost }, withDomain)).toMatchObject({
      ok: false,
      error: { code: 'sandbox_conflict', status: 400 },
    });
    expect(mapRequest({ url: '/', headers: { ...victimHost, 'e2b-sandbox-id': 'attacker' } }, withDomain)).toMatchObject({ ok: false, error: { code: 'sandbox_conflict' } });
    // The same sandbox through both, or a host that names none: the forms keep their order.
    expect(mapRequest({ url: '/kruise/victim/3000/x', headers: victimHost }, withDomain)).toMatchObject({ ok: true, address: { form: 'path', sandboxId: 'victim', port: 3000 } });
    expect(mapRequest({ url: '/kruise/attacker/8080/x', headers: { host: 'proxy.example.com' } }, withDomain)).toMatchObject({ ok: true, address: { form: 'path', sandboxId: 'attacker' } });
    // Without one, the SPEC's order alone: the path wins.
    expect(mapRequest({ url: '/kruise/attacker/8080/x', headers: victimHost }, options)).toMatchObject({ ok: true, address: { form: 'path', sandboxId: 'attacker' } });
  });

  it('every form carries the target to send upstream, as sent: never normalised', () => {
    const target = "/a/../b\\c/%2e%2e?sig='x'&q=1";
    expect(mapRequest({ url: `/kruise/sb/3000${target}`, headers: {} }, options)).toMatchObject({ ok: true, address: { upstreamPath: target } });
    expect(mapRequest({ url: target, headers: { 'e2b-sandbox-id': 'sb' } }, options)).toMatchObject({ ok: true, address: { upstreamPath: target } });
    expect(mapRequest({ url: target, headers: { host: '80-sb.example.com' } }, options)).toMatchObject({ ok: true, address: { upstreamPath: target } });
  });

  it('an absolute-form target is reduced to its path and query, text untouched', () => {
    expect(originForm("http://h.example:80/a/../b?q='1'")).toBe("/a/../b?q='1'");
    expect(originForm('HTTP://h.example?q')).toBe('/?q');
    expect(originForm('http://h.example')).toBe('/');
    expect(originForm('/plain')).toBe('/plain');
    expect(originForm('*')).toBe('*');
    expect(mapRequest({ url: 'http://h/kruise/sb/3000/x/../y', headers: {} }, options)).toMatchObject({ ok: true, address: { form: 'path', upstreamPath: '/x/../y' } });
  });

  it('path form decodes the sandbox ID segment', () => {
    expect(mapRequest({ url: '/kruise/sb%2Done/80/', headers: {} }, options)).toMatchObject({ ok: true, address: { sandboxId: 'sb-one' } });
  });

  it('/kruise/<id> without a port segment is not the path form', () => {
    expect(mapRequest({ url: '/kruise/sb', headers: {} }, options)).toMatchObject({ ok: false, error: { code: 'sandbox_not_specified' } });
  });

  it('header form, with the default port when none is given', () => {
    expect(mapRequest({ url: '/x', headers: { 'e2b-sandbox-id': 'sb' } }, options)).toMatchObject({ ok: true, address: { form: 'header', port: 49983, upstreamPath: '/x' } });
    expect(mapRequest({ url: '/x', headers: { 'e2b-sandbox-id': 'sb', 'e2b-sandbox-port': '7' } }, options)).toMatchObject({ ok: true, address: { port: 7 } });
  });

  it('host form, restricted to the configured domain when one is set', () => {
    expect(mapRequest({ headers: { host: '8080-sb-1.example.com:80' } }, options)).toMatchObject({ ok: true, address: { form: 'host', sandboxId: 'sb-1', port: 8080 } });
    const restricted = { ...options, proxyDomain: 'Sandbox.Example' };
    expect(mapRequest({ headers: { host: '8080-sb.sandbox.example' } }, restricted)).toMatchObject({ ok: true });
    expect(mapRequest({ headers: { host: '8080-sb.other.example' } }, restricted)).toMatchObject({ ok: false, error: { code: 'sandbox_not_specified' } });
    // A fully qualified host (trailing dot) is the same host (ROUTESYNC_PROXY_DOMAIN itself has none).
    expect(mapRequest({ headers: { host: '8080-sb.sandbox.example.:443' } }, restricted)).toMatchObject({ ok: true, address: { sandboxId: 'sb', port: 8080 } });
    expect(mapRequest({ headers: { host: '8080-sb.' } }, options)).toMatchObject({ ok: false, error: { code: 'sandbox_not_specified' } });
    expect(mapRequest({ headers: { host: '127.0.0.1:8080' } }, options)).toMatchObject({ ok: false, error: { code: 'sandbox_not_specified' } });
  });

  it("an absolute-form target's authority is the host: the Host header is ignored (RFC 9112 §3.2.2)", () => {
    const domain = { ...options, proxyDomain: 'sandbox.example.com' };
    const headers = { host: '8080-b.sandbox.example.com' };
    expect(mapRequest({ url: 'http://8080-a.sandbox.example.com/x?q=1', headers }, domain)).toEqual({
      ok: true,
      address: { form: 'host', sandboxId: 'a', port: 8080, upstreamPath: '/x?q=1' },
    });
    expect(mapRequest({ url: 'http://user:pw@8080-a.sandbox.example.com:80', headers }, domain)).toMatchObject({ ok: true, address: { sandboxId: 'a' } });
    // An authority that names no sandbox is not rescued by the Host header.
    expect(mapRequest({ url: 'http://elsewhere.example/x', headers }, domain)).toMatchObject({ ok: false, error: { code: 'sandbox_not_specified' } });
    expect(mapRequest({ url: '/x', headers }, domain)).toMatchObject({ ok: true, address: { sandboxId: 'b' } });
  });

  it('the first form present decides: a bad port is never rescued by a later form', () => {
    const result = mapRequest({ url: '/kruise/sb/0/', headers: { 'e2b-sandbox-id': 'other', 'e2b-sandbox-port': '80' } }, options);
    expect(result).toMatchObject({ ok: false, sandboxId: 'sb', error: { code: 'invalid_port', status: 400 } });
  });
});

describe('admit', () => {
  it('order: found, token, running, IP', () => {
    expect(admit(address, undefined, {})).toMatchObject({ ok: false, error: { code: 'sandbox_not_found', status: 404 } });
    const paused = route({ state: 'Paused', requireTrafficAuth: true, accessToken: 't' });
    expect(admit(address, paused, {})).toMatchObject({ ok: false, error: { code: 'traffic_token_missing' } });
    expect(admit(address, paused, { 'x-access-token': 't' })).toMatchObject({ ok: false, error: { code: 'sandbox_not_running', state: 'Paused', status: 503 } });
    expect(admit(address, route({ ip: '' }), {})).toMatchObject({ ok: false, error: { code: 'sandbox_no_ip' } });
  });

  it('a route demanding a token but storing none admits nobody', () => {
    expect(admit(address, route({ requireTrafficAuth: true }), { 'e2b-traffic-access-token': '' })).toMatchObject({ ok: false, error: { code: 'traffic_token_missing' } });
    expect(admit(address, route({ requireTrafficAuth: true }), { 'e2b-traffic-access-token': 'x' })).toMatchObject({ ok: false, error: { code: 'traffic_token_invalid' } });
  });

  it('targets the route IP and the requested port, IPv6 bracketed only in the origin', () => {
    expect(admit(address, route(), {})).toEqual({ ok: true, target: { host: '10.0.0.7', port: 8080, origin: 'http://10.0.0.7:8080' } });
    expect(admit(address, route({ ip: 'fd00::7' }), {})).toEqual({ ok: true, target: { host: 'fd00::7', port: 8080, origin: 'http://[fd00::7]:8080' } });
  });

  it('never targets something that is not a literal IP', () => {
    for (const ip of ['sandbox.internal', 'fe80::1%eth0', '10.0.0.7:80']) expect(admit(address, route({ ip }), {}), ip).toMatchObject({ ok: false, error: { code: 'sandbox_no_ip' } });
  });

  it('decide maps, looks up by the mapped ID and admits', () => {
    const seen: string[] = [];
    const lookup = (id: string): Route | undefined => {
      seen.push(id);
      return id === 'sb' ? route() : undefined;
    };
    expect(decide({ url: '/kruise/sb/81/', headers: {} }, lookup, options)).toMatchObject({ ok: true, target: { host: '10.0.0.7', port: 81 } });
    expect(decide({ url: '/kruise/nope/81/', headers: {} }, lookup, options)).toMatchObject({ ok: false, sandboxId: 'nope', port: 81, error: { code: 'sandbox_not_found' } });
    expect(seen).toEqual(['sb', 'nope']);
  });
});

describe('upstreamAllowed', () => {
  it('never connects to an address that is no sandbox: unspecified, link-local (cloud metadata), multicast, broadcast, reserved', () => {
    for (const ip of ['0.0.0.0', '0.1.2.3', '::', '169.254.169.254', '169.254.0.1', 'fe80::1', '224.0.0.1', '239.255.255.250', 'ff02::1', '255.255.255.255', '::127.0.0.1', '::ffff:169.254.169.254', '::ffff:0.0.0.0',
      // Cloud metadata outside link-local: AWS and Google Cloud over IPv6, Alibaba Cloud, Azure's WireServer.
      'fd00:ec2::254', 'fd00:ec2:0::254', 'fd20:ce::254', '100.100.100.200', '::ffff:100.100.100.200', '168.63.129.16']) {
      expect(upstreamAllowed(ip, true), ip).toBe(false);
      expect(admit(address, route({ ip }), {}, { proxyAllowLoopback: true }), ip).toMatchObject({ ok: false, error: { code: 'upstream_not_allowed', status: 403 } });
    }
  });

  it('connects to loopback only when allowed (a fleet on one machine), in every spelling', () => {
    for (const ip of ['127.0.0.1', '127.8.9.10', '::1', '::ffff:127.0.0.1', '::ffff:7f00:1']) {
      expect(upstreamAllowed(ip, false), ip).toBe(false);
      expect(upstreamAllowed(ip, true), ip).toBe(true);
    }
    expect(admit(address, route({ ip: '127.0.0.1' }), {})).toMatchObject({ ok: false, error: { code: 'upstream_not_allowed' } });
  });

  it('connects to pod addresses', () => {
    // 240.0.0.0/4 (class E) is pod address space in some clusters (GKE).
    for (const ip of ['10.0.0.7', '172.16.3.4', '192.168.1.1', '100.64.0.1', '8.8.8.8', '240.1.2.3', 'fd00::1', 'fd00:ec2::253', '100.100.100.201', '168.63.129.17', '2001:db8::1', '::ffff:10.0.0.7']) {
      expect(upstreamAllowed(ip, false), ip).toBe(true);
    }
  });
});

describe('readmit', () => {
  it('lets a request go on through a change that respells its IPv6 address, and not through a move', () => {
    const admitted = route({ ip: 'fd00::1' });
    expect(readmit(address, admitted, route({ ip: 'fd00:0::1', resourceVersion: '2' }), {})).toBeUndefined();
    expect(readmit(address, admitted, route({ ip: 'fd00::2', resourceVersion: '3' }), {})).toMatchObject({ code: 'sandbox_moved', status: 503 });
    expect(readmit(address, admitted, route({ state: 'paused', resourceVersion: '4' }), {})).toMatchObject({ code: 'sandbox_not_running' });
  });
});

describe('tokenMatches', () => {
  it('compares secrets of any lengths', () => {
    expect(tokenMatches('abc', 'abc')).toBe(true);
    expect(tokenMatches('abc', 'abd')).toBe(false);
    expect(tokenMatches('abc', 'abcd')).toBe(false);
    expect(tokenMatches('', '')).toBe(true);
  });
});

describe('classifyUpstreamError', () => {
  it('classifies by err.code', () => {
    expect(classifyUpstreamError(Object.assign(new Error('x'), { code: 'ECONNREFUSED' })).code).toBe('upstream_unreachable');
    expect(classifyUpstreamError(Object.assign(new Error('x'), { code: 'HPE_INVALID_CONSTANT' })).code).toBe('upstream_protocol_error');
    expect(classifyUpstreamError('not even an error')).toMatchObject({ code: 'upstream_unreachable', status: 502 });
  });
});

describe('upstreamRequestHeaders', () => {
  const context = { requestTarget: '/', remoteAddress: '192.0.2.9', protocol: 'http' as const, upgrade: false };

  it('strips tokens, routing, hop-by-hop and Connection-listed headers; keeps message framing', () => {
    const out = upstreamRequestHeaders(
      {
        host: '80-sb.example.com',
        'x-access-token': 't',
        'e2b-traffic-access-token': 't',
        'e2b-sandbox-id': 'sb',
        'e2b-sandbox-port': '80',
        connection: 'keep-alive, x-private, content-length, transfer-encoding',
        'x-private': 'p',
        'content-length': '5',
        te: 'trailers',
        'proxy-authorization': 'Basic x',
        expect: '100-continue',
        authorization: 'Bearer sandbox-own',
      },
      context,
    );
    expect(out).toEqual({
      host: '80-sb.example.com',
      'content-length': '5',
      authorization: 'Bearer sandbox-own',
      'x-forwarded-for': '192.0.2.9',
      'x-forwarded-proto': 'http',
      'x-forwarded-host': '80-sb.example.com',
    });
  });

  it('appends to X-Forwarded-For and replaces client-sent Proto and Host', () => {
    const out = upstreamRequestHeaders({ host: 'h', 'x-forwarded-for': '198.51.100.1', 'x-forwarded-proto': 'https', 'x-forwarded-host': 'evil' }, context);
    expect(out).toMatchObject({ 'x-forwarded-for': '198.51.100.1, 192.0.2.9', 'x-forwarded-proto': 'http', 'x-forwarded-host': 'h' });
  });

  it('drops the other forwarding headers a client may write (Forwarded, X-Real-IP, X-Forwarded-Port...)', () => {
    const out = upstreamRequestHeaders(
      { host: 'h', forwarded: 'proto=https', 'x-real-ip': '198.51.100.1', 'x-forwarded-port': '443', 'x-forwarded-prefix': '/p', 'x-forwarded-ssl': 'on', accept: '*/*' },
      context,
    );
    expect(out).toEqual({ host: 'h', accept: '*/*', 'x-forwarded-for': '192.0.2.9', 'x-forwarded-proto': 'http', 'x-forwarded-host': 'h' });
  });

  it('leaves the input untouched and keeps header order, with or without a Connection header', () => {
    const input = { host: 'h', accept: '*/*', 'e2b-sandbox-id': 'sb', 'user-agent': 'ua' };
    const copy = { ...input };
    const plain = upstreamRequestHeaders(input, context);
    expect(input).toEqual(copy);
    expect(Object.keys(plain)).toEqual(['host', 'accept', 'user-agent', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host']);
    expect(Object.keys(upstreamRequestHeaders({ ...input, connection: 'keep-alive', 'keep-alive': 'timeout=5' }, context))).toEqual(Object.keys(plain));
    // "close" is a connection option, but a field a client names in Connection goes all the same.
    expect(upstreamRequestHeaders({ host: 'h', connection: 'close', close: 'x' }, context)).not.toHaveProperty('close');
  });

  it("with an absolute-form target, Host and X-Forwarded-Host are the target's authority, not the Host header", () => {
    const out = upstreamRequestHeaders({ host: '8080-b.example.com', 'x-forwarded-host': 'evil' }, { ...context, requestTarget: 'http://u@8080-a.example.com:80/x' });
    expect(out.host).toBe('8080-a.example.com:80');
    expect(out['x-forwarded-host']).toBe('8080-a.example.com:80');
  });

  it('without a Host header, a client-sent X-Forwarded-Host is dropped', () => {
    expect(upstreamRequestHeaders({ 'x-forwarded-host': 'evil' }, context)).not.toHaveProperty('x-forwarded-host');
  });

  it('a WebSocket handshake keeps Connection: Upgrade and Upgrade', () => {
    const out = upstreamRequestHeaders({ host: 'h', connection: 'keep-alive, Upgrade', upgrade: 'websocket', 'sec-websocket-key': 'k' }, { ...context, upgrade: true });
    expect(out).toMatchObject({ connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-key': 'k' });
  });
});

describe('cleanResponseHeaders', () => {
  it('removes hop-by-hop and Connection-listed headers in place, never the framing ones', () => {
    const headers: Record<string, string> = {
      'content-type': 'text/plain',
      'content-length': '4',
      connection: 'keep-alive, x-hop, content-length',
      'keep-alive': 'timeout=5',
      'x-hop': '1',
      trailer: 'x-checksum',
      'x-app': 'kept',
    };
    cleanResponseHeaders(headers);
    expect(headers).toEqual({ 'content-type': 'text/plain', 'content-length': '4', 'x-app': 'kept' });
  });
});
