// Request -> (sandbox id, port) -> admission decision. Pure: no I/O, no clock; the route
// lookup is passed in, so the data plane asks the table on every request and a route change
// takes effect on the next one.
//
// Invariants (tested in test/unit/proxy-target.test.ts):
//  1. The three mapping forms are tried in order: path `/kruise/<id>/<port>/<rest>`, headers
//     `e2b-sandbox-id` / `e2b-sandbox-port`, host `<port>-<id>.<domain>` (the host being an
//     absolute-form target's authority when there is one, else Host). The first form that
//     is present decides; a later form is never consulted to "rescue" a bad port.
//  2. An admitted request always carries an upstream target whose host is the route's IP,
//     checked again here to be a literal IPv4/IPv6 address: never a name, never anything the
//     client wrote.
//  3. Admission order: found -> token (when the route demands one) -> running -> has an IP.
//     The token comes before the state so an unauthenticated client learns nothing about a
//     protected sandbox but that it exists.
//  4. Token comparison is constant-time over SHA-256 digests (equal lengths whatever the
//     input), and a route that demands a token but has none admits nobody.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import { BlockList, isIP } from 'node:net';
import { canonicalIpv6 } from '../config.js';
import { isRunning, type Route } from '../routes/route.js';
import { LOCAL_RESOURCE_CODES } from '../system-errors.js';

/** Every way the data plane answers a request itself; stable, documented in docs/data-plane.md. */
export type DataPlaneErrorCode =
  | 'sandbox_not_specified'
  | 'sandbox_conflict'
  | 'invalid_port'
  | 'unsupported_upgrade'
  | 'unsupported_transfer_coding'
  | 'unsupported_method'
  | 'invalid_target'
  | 'invalid_host'
  | 'unsupported_expectation'
  | 'sandbox_not_found'
  | 'traffic_token_missing'
  | 'traffic_token_invalid'
  | 'sandbox_not_running'
  | 'sandbox_no_ip'
  | 'upstream_not_allowed'
  | 'upstream_unreachable'
  | 'upstream_protocol_error'
  | 'upstream_timeout'
  | 'sandbox_moved'
  | 'proxy_overloaded'
  | 'internal_error';

export const ERROR_STATUS: Readonly<Record<DataPlaneErrorCode, number>> = Object.freeze({
  sandbox_not_specified: 400,
  sandbox_conflict: 400,
  invalid_port: 400,
  unsupported_upgrade: 400,
  unsupported_transfer_coding: 501,
  unsupported_method: 501,
  invalid_target: 400,
  invalid_host: 400,
  unsupported_expectation: 417,
  sandbox_not_found: 404,
  traffic_token_missing: 401,
  traffic_token_invalid: 401,
  sandbox_not_running: 503,
  sandbox_no_ip: 503,
  upstream_not_allowed: 403,
  upstream_unreachable: 502,
  upstream_protocol_error: 502,
  upstream_timeout: 504,
  sandbox_moved: 503,
  proxy_overloaded: 503,
  internal_error: 500,
});

export interface DataPlaneError {
  readonly code: DataPlaneErrorCode;
  readonly status: number;
  readonly message: string;
  /** The route's state, for `sandbox_not_running`. */
  readonly state?: string;
}

export function dataPlaneError(code: DataPlaneErrorCode, message: string, extra: { state?: string } = {}): DataPlaneError {
  return { code, status: ERROR_STATUS[code], message, ...extra };
}

/** The JSON body of an error answer: `{"error":{"code","message"[,"state"]}}`. */
export function errorBody(error: DataPlaneError): string {
  const body: { code: string; message: string; state?: string } = { code: error.code, message: error.message };
  if (error.state !== undefined) body.state = error.state;
  return JSON.stringify({ error: body });
}

export type MappingForm = 'path' | 'header' | 'host';

/** What target.ts needs of a request: an `http.IncomingMessage` fits. */
export interface SandboxRequest {
  readonly url?: string | undefined;
  readonly headers: IncomingHttpHeaders;
  /** The header fields as they came (Node keeps only the first Host in `headers`). */
  readonly rawHeaders?: readonly string[];
}

export interface MappingOptions {
  /** Port used by the header form when `e2b-sandbox-port` is absent. */
  readonly defaultSandboxPort: number;
  /** When non-empty, the host form only accepts `<port>-<id>.<proxyDomain>`. */
  readonly proxyDomain: string;
  /** Routes on loopback addresses are proxied to (ROUTESYNC_PROXY_ALLOW_LOOPBACK; default no). */
  readonly proxyAllowLoopback?: boolean;
}

export interface SandboxAddress {
  readonly form: MappingForm;
  readonly sandboxId: string;
  readonly port: number;
  /**
   * Path and query to send upstream, in origin form and byte for byte as the client sent them:
   * the path form's `/<rest>` with the query, otherwise the request's own target (an
   * absolute-form target reduced to its path and query). Never normalised: dot segments,
   * backslashes and percent-encoding are the sandbox's to interpret.
   */
  readonly upstreamPath: string;
}

export type MappingResult =
  | { readonly ok: true; readonly address: SandboxAddress }
  | { readonly ok: false; readonly error: DataPlaneError; readonly sandboxId?: string };

export interface UpstreamTarget {
  /** The route's IP, bare (no brackets), as `http.request` wants it. */
  readonly host: string;
  readonly port: number;
  /** `http://<ip>:<port>`, IPv6 bracketed: for logs and documentation only. */
  readonly origin: string;
}

export type Admission = { readonly ok: true; readonly target: UpstreamTarget } | { readonly ok: false; readonly error: DataPlaneError };

export type Decision =
  | { readonly ok: true; readonly address: SandboxAddress; readonly route: Route; readonly target: UpstreamTarget }
  | { readonly ok: false; readonly error: DataPlaneError; readonly sandboxId?: string; readonly port?: number };

export const SANDBOX_ID_HEADER = 'e2b-sandbox-id';
export const SANDBOX_PORT_HEADER = 'e2b-sandbox-port';
/** Traffic token headers, in the order they are read; both are always stripped before upstream. */
export const TOKEN_HEADERS = ['e2b-traffic-access-token', 'x-access-token'] as const;

const PATH_PREFIX = '/kruise/';
// `/kruise/<id>/<port>` then the rest (which starts with `/`, or is empty).
const PATH_FORM = /^\/kruise\/([^/]+)\/([^/]*)(\/.*)?$/;
const PORT_TEXT = /^[1-9][0-9]{0,4}$/;
// First DNS label `<port>-<id>`: the port is the digits before the first dash.
const HOST_LABEL = /^([0-9]+)-(.+)$/;

/** A TCP port in canonical decimal (no sign, no leading zero), 1-65535; undefined otherwise. */
export function parsePort(text: string): number | undefined {
  const trimmed = text.trim();
  if (!PORT_TEXT.test(trimmed)) return undefined;
  const port = Number(trimmed);
  return port <= 65_535 ? port : undefined;
}

function headerText(value: string | string[] | undefined): string | undefined {
  if (value === undefined) return undefined;
  return Array.isArray(value) ? value.join(', ') : value;
}

// `scheme://authority` of an absolute-form target (the authority captured); what follows is its path and query.
const ABSOLUTE_FORM_PREFIX = /^[a-z][a-z0-9+.-]*:\/\/([^/?#]*)/i;

/**
 * The request target in origin form: as it is when it starts with `/`; an absolute-form
 * target (`http://h/p?q`) reduced to its path and query by cutting off `scheme://authority`,
 * the text untouched (a URL parser would resolve dot segments and re-encode the query).
 */
export function originForm(url: string): string {
  if (url.startsWith('/')) return url;
  const prefix = ABSOLUTE_FORM_PREFIX.exec(url);
  if (!prefix) return url; // `*` (OPTIONS) or garbage: nothing will match the path form
  const rest = url.slice(prefix[0].length);
  return rest.startsWith('/') ? rest : `/${rest}`;
}

/**
 * The host a request names: the authority of an absolute-form target, else the Host header.
 * RFC 9112 §3.2.2: with an absolute-form target the Host header must be ignored; otherwise a
 * request naming one sandbox in its target would be routed to the one its Host names. The
 * authority's userinfo (`user@`) is no part of the host.
 */
export function requestHost(url: string | undefined, headers: IncomingHttpHeaders): string | undefined {
  if (url !== undefined && !url.startsWith('/')) {
    const prefix = ABSOLUTE_FORM_PREFIX.exec(url);
    if (prefix) {
      const authority = prefix[1]!;
      return authority.slice(authority.lastIndexOf('@') + 1);
    }
  }
  return headerText(headers.host ?? headers[':authority']);
}

/** Split a request target into path and query (in origin form, see originForm). */
export function splitRequestTarget(url: string): { pathname: string; search: string } {
  const target = originForm(url);
  const q = target.indexOf('?');
  return q === -1 ? { pathname: target, search: '' } : { pathname: target.slice(0, q), search: target.slice(q) };
}

function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    // Malformed percent-encoding: look the raw text up; it will simply not be found.
    return segment;
  }
}

/** The host without its port (`h:8080`, `[v6]:8080`), lower-cased for the domain comparison. */
function hostWithoutPort(host: string): string {
  const text = host.trim();
  if (text.startsWith('[')) return text; // an IPv6 literal never names a sandbox
  const colon = text.lastIndexOf(':');
  return colon === -1 ? text : text.slice(0, colon);
}

function fromPath(pathname: string, search: string): MappingResult | undefined {
  if (!pathname.startsWith(PATH_PREFIX)) return undefined;
  const match = PATH_FORM.exec(pathname);
  // `/kruise/<id>` without a port segment is not the path form (openkruise's own API also
  // lives under /kruise/); the other forms get their chance.
  if (!match) return undefined;
  const sandboxId = decodeSegment(match[1]!);
  const port = parsePort(match[2]!);
  if (port === undefined) {
    return { ok: false, sandboxId, error: dataPlaneError('invalid_port', `port "${match[2]}" in the path is not a TCP port (1-65535)`) };
  }
  const rest = match[3] ?? '/';
  return { ok: true, address: { form: 'path', sandboxId, port, upstreamPath: rest + search } };
}

function fromHeaders(headers: IncomingHttpHeaders, target: string, options: MappingOptions): MappingResult | undefined {
  const sandboxId = headerText(headers[SANDBOX_ID_HEADER])?.trim();
  if (!sandboxId) return undefined;
  const portText = headerText(headers[SANDBOX_PORT_HEADER]);
  if (portText === undefined || portText.trim() === '') {
    return { ok: true, address: { form: 'header', sandboxId, port: options.defaultSandboxPort, upstreamPath: target } };
  }
  const port = parsePort(portText);
  if (port === undefined) {
    return { ok: false, sandboxId, error: dataPlaneError('invalid_port', `${SANDBOX_PORT_HEADER} "${portText}" is not a TCP port (1-65535)`) };
  }
  return { ok: true, address: { form: 'header', sandboxId, port, upstreamPath: target } };
}

function fromHost(request: SandboxRequest, target: string, options: MappingOptions): MappingResult | undefined {
  const host = requestHost(request.url, request.headers);
  if (!host) return undefined;
  const name = hostWithoutPort(host);
  const dot = name.indexOf('.');
  if (dot <= 0) return undefined;
  const label = name.slice(0, dot);
  // A fully qualified name's trailing dot (`8080-sb.example.com.`) names the same host.
  const domain = withoutTrailingDot(name.slice(dot + 1).toLowerCase());
  if (domain === '' || isIP(name) !== 0) return undefined;
  if (options.proxyDomain !== '' && domain !== options.proxyDomain.toLowerCase()) return undefined;
  const match = HOST_LABEL.exec(label);
  if (!match) return undefined;
  const sandboxId = match[2]!;
  const port = parsePort(match[1]!);
  if (port === undefined) {
    return { ok: false, sandboxId, error: dataPlaneError('invalid_port', `port "${match[1]}" in the host is not a TCP port (1-65535)`) };
  }
  return { ok: true, address: { form: 'host', sandboxId, port, upstreamPath: target } };
}

function hostFields(rawHeaders: readonly string[]): number {
  let count = 0;
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!;
    if (name.length === 4 && name.toLowerCase() === 'host') count++;
  }
  return count;
}

function withoutTrailingDot(name: string): string {
  return name.endsWith('.') ? name.slice(0, -1) : name;
}

/** Find the sandbox and port a request names (forms in SPEC order). */
export function mapRequest(request: SandboxRequest, options: MappingOptions): MappingResult {
  // RFC 9112 §3.2: a request with more than one Host field must be answered 400. Node keeps the
  // first; a front end that went by another would have applied that host's rules to a request
  // served as this one's.
  if (request.rawHeaders !== undefined && hostFields(request.rawHeaders) > 1) {
    return { ok: false, error: dataPlaneError('invalid_host', 'more than one Host header field (RFC 9112 §3.2)') };
  }
  // RFC 9110 §4.2.1: an http URI with an empty host is invalid and must be rejected (it names no
  // host for Host and X-Forwarded-Host, and the Host header must be ignored beside it).
  if (request.url !== undefined && !request.url.startsWith('/')) {
    const host = requestHost(request.url, request.headers);
    if (ABSOLUTE_FORM_PREFIX.test(request.url) && (host === undefined || hostWithoutPort(host) === '')) {
      return { ok: false, error: dataPlaneError('invalid_target', 'an absolute-form request target must name a host (RFC 9110 §4.2.1)') };
    }
  }
  const target = originForm(request.url ?? '/');
  const { pathname, search } = splitRequestTarget(target);
  const mapped = fromPath(pathname, search) ?? fromHeaders(request.headers, target, options);
  if (mapped) {
    // With ROUTESYNC_PROXY_DOMAIN, a host that names a sandbox (`<port>-<id>.<proxyDomain>`) is
    // that sandbox's own origin in a browser. A path or header form naming another sandbox
    // would serve the other's content under it: the first one's cookies sent to the other, the
    // other's scripts same-origin with the first. The forms keep their order; two that disagree
    // on the sandbox are refused. (Without a proxy domain any `<port>-<id>.<anything>` host
    // matches the host form, so nothing says such a host is a sandbox's origin: SPEC order alone.)
    if (mapped.ok && options.proxyDomain !== '') {
      const byHost = fromHost(request, target, options);
      if (byHost?.ok && byHost.address.sandboxId !== mapped.address.sandboxId) {
        return {
          ok: false,
          sandboxId: mapped.address.sandboxId,
          error: dataPlaneError('sandbox_conflict', `the host names one sandbox and the ${mapped.address.form === 'path' ? 'path' : 'headers'} another`),
        };
      }
    }
    return mapped;
  }
  const byHost = fromHost(request, target, options);
  if (byHost) return byHost;
  return {
    ok: false,
    error: dataPlaneError(
      'sandbox_not_specified',
      `name a sandbox with the path /kruise/<sandboxId>/<port>/..., the ${SANDBOX_ID_HEADER} header, or the host <port>-<sandboxId>.<domain>`,
    ),
  };
}

/** `http://<ip>:<port>`, IPv6 bracketed. */
export function upstreamOrigin(ip: string, port: number): string {
  return isIP(ip) === 6 ? `http://[${ip}]:${port}` : `http://${ip}:${port}`;
}

function digest(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}

/** Constant-time equality of two secrets of any lengths (compares their SHA-256 digests). */
export function tokenMatches(provided: string, expected: string): boolean {
  return timingSafeEqual(digest(provided), digest(expected));
}

/** The traffic token a request carries, if any (first header in TOKEN_HEADERS order that is present). */
export function presentedToken(headers: IncomingHttpHeaders): string | undefined {
  for (const name of TOKEN_HEADERS) {
    const value = headerText(headers[name]);
    if (value !== undefined && value !== '') return value;
  }
  return undefined;
}

/**
 * Addresses that are no sandbox's, whatever a route says: a route is data any peer (or a
 * `/refresh` from anything the NetworkPolicy admits) can write, and the data plane is open to
 * the internet. Proxied to, they would reach this pod's own listeners (the local API has no
 * token: a client could rewrite the fleet's routes through it), the node, or the cloud's
 * metadata service. Unspecified (0.0.0.0 connects to loopback on Linux, as :: does), link-local
 * (169.254.169.254, fe80::), the clouds' metadata addresses outside link-local, multicast,
 * broadcast, IPv4-compatible IPv6; IPv4 rules
 * cover IPv4-mapped IPv6 too (net.BlockList). Loopback has its own list: allowed only with
 * ROUTESYNC_PROXY_ALLOW_LOOPBACK, for a fleet on one machine.
 */
const NEVER_UPSTREAM = new BlockList();
for (const [network, prefix, family] of [
  ['0.0.0.0', 8, 'ipv4'],
  ['169.254.0.0', 16, 'ipv4'],
  ['224.0.0.0', 4, 'ipv4'],
  // Broadcast only: the rest of 240.0.0.0/4 (class E) is pod address space in some clusters
  // (GKE allows it for pod ranges).
  ['255.255.255.255', 32, 'ipv4'],
  ['::', 96, 'ipv6'],
  ['fe80::', 10, 'ipv6'],
  ['ff00::', 8, 'ipv6'],
] as const) {
  NEVER_UPSTREAM.addSubnet(network, prefix, family);
}
// Cloud metadata and platform endpoints outside link-local, by exact address only: the ranges
// around them (fd00::/8, 100.64.0.0/10, 168.63.0.0/16) hold real pod addresses in some clusters.
for (const [ip, family] of [
  ['fd00:ec2::254', 'ipv6'], // AWS instance metadata over IPv6 (Nitro)
  ['fd20:ce::254', 'ipv6'], // Google Cloud metadata server over IPv6
  ['100.100.100.200', 'ipv4'], // Alibaba Cloud instance metadata
  ['168.63.129.16', 'ipv4'], // Azure WireServer (the platform's agent and DNS endpoint)
] as const) {
  NEVER_UPSTREAM.addAddress(ip, family);
}
const LOOPBACK = new BlockList();
LOOPBACK.addSubnet('127.0.0.0', 8, 'ipv4');
LOOPBACK.addAddress('::1', 'ipv6');

/** Whether the data plane may open a connection to `ip` (a literal IP) for a sandbox. */
export function upstreamAllowed(ip: string, allowLoopback: boolean): boolean {
  const family = isIP(ip) === 6 ? 'ipv6' : 'ipv4';
  if (LOOPBACK.check(ip, family)) return allowLoopback;
  return !NEVER_UPSTREAM.check(ip, family);
}

/**
 * upstreamAllowed for a route's IP, once per route object (routes are immutable: a change is a
 * new object), so a request pays a WeakMap lookup instead of two BlockList checks (~2 µs here).
 */
const ALLOWED_ROUTES: Record<'loopback' | 'strict', WeakMap<Route, boolean>> = { loopback: new WeakMap(), strict: new WeakMap() };

function routeAddressAllowed(route: Route, allowLoopback: boolean): boolean {
  const cache = ALLOWED_ROUTES[allowLoopback ? 'loopback' : 'strict'];
  let allowed = cache.get(route);
  if (allowed === undefined) {
    allowed = upstreamAllowed(route.ip, allowLoopback);
    cache.set(route, allowed);
  }
  return allowed;
}

/** Decide whether a request for `address` may go to `route`, and where. */
export function admit(address: SandboxAddress, route: Route | undefined, headers: IncomingHttpHeaders, options: Pick<MappingOptions, 'proxyAllowLoopback'> = {}): Admission {
  if (!route) return { ok: false, error: dataPlaneError('sandbox_not_found', `sandbox ${JSON.stringify(address.sandboxId)} is not known`) };
  if (route.requireTrafficAuth === true) {
    const token = presentedToken(headers);
    if (token === undefined) {
      return { ok: false, error: dataPlaneError('traffic_token_missing', `this sandbox requires the ${TOKEN_HEADERS[0]} header`) };
    }
    // Fail closed: a route that demands a token but has none stored admits nobody. The
    // comparison still runs so the timing does not tell the two cases apart.
    const expected = route.accessToken ?? '';
    const matches = tokenMatches(token, expected);
    if (!matches || expected === '') return { ok: false, error: dataPlaneError('traffic_token_invalid', 'the traffic access token is not valid for this sandbox') };
  }
  if (!isRunning(route)) {
    const state = route.state === '' ? '(empty)' : route.state;
    return {
      ok: false,
      error: dataPlaneError('sandbox_not_running', `sandbox is ${state}, not running`, { state: route.state }),
    };
  }
  // parseRoute already refuses anything but an IP; checked again because this is the one
  // place that decides where bytes go (and a zone ID would name a local interface).
  if (route.ip === '' || isIP(route.ip) === 0 || route.ip.includes('%')) {
    return { ok: false, error: dataPlaneError('sandbox_no_ip', 'sandbox is running but has no pod IP yet') };
  }
  if (!routeAddressAllowed(route, options.proxyAllowLoopback === true)) {
    return { ok: false, error: dataPlaneError('upstream_not_allowed', "the sandbox's address is not one the data plane proxies to (link-local, cloud metadata, multicast, unspecified, or loopback without ROUTESYNC_PROXY_ALLOW_LOOPBACK)") };
  }
  return { ok: true, target: { host: route.ip, port: address.port, origin: upstreamOrigin(route.ip, address.port) } };
}

/**
 * A request admitted for `admitted` is about to be sent, and the route now serving its sandbox
 * ID is `current` (a request that waited for a pooled socket while the route changed: paused,
 * deleted, moved to another pod, its token rotated). Undefined when the request may go as it
 * is; otherwise the answer it gets instead: what a new request would get, or `sandbox_moved`
 * for a route that now points elsewhere (the request waited in the old address's queue).
 */
export function readmit(
  address: SandboxAddress,
  admitted: Route,
  current: Route | undefined,
  headers: IncomingHttpHeaders,
  options: Pick<MappingOptions, 'proxyAllowLoopback'> = {},
): DataPlaneError | undefined {
  if (current === admitted) return undefined;
  const admission = admit(address, current, headers, options);
  if (!admission.ok) return admission.error;
  if (!sameIp(admission.target.host, admitted.ip)) {
    return dataPlaneError('sandbox_moved', 'the sandbox moved to another address while the request waited for a connection; send it again');
  }
  return undefined;
}

/** One address however written (`fd00::1` is `fd00:0::1`); routes keep IPv6 as the manager wrote it. */
function sameIp(a: string, b: string): boolean {
  if (a === b) return true;
  if (isIP(a) !== 6 || isIP(b) !== 6) return false;
  return canonicalIpv6(a) === canonicalIpv6(b);
}

/** Map and admit in one step: what the data plane calls on every request. */
export function decide(request: SandboxRequest, lookup: (sandboxId: string) => Route | undefined, options: MappingOptions): Decision {
  const mapped = mapRequest(request, options);
  if (!mapped.ok) return mapped.sandboxId === undefined ? { ok: false, error: mapped.error } : { ok: false, error: mapped.error, sandboxId: mapped.sandboxId };
  const { address } = mapped;
  const route = lookup(address.sandboxId);
  const admission = admit(address, route, request.headers, options);
  if (!admission.ok || !route) {
    const error = admission.ok ? dataPlaneError('sandbox_not_found', 'sandbox is not known') : admission.error;
    return { ok: false, error, sandboxId: address.sandboxId, port: address.port };
  }
  return { ok: true, address, route, target: admission.target };
}

/** Socket-level failures: the sandbox refused, reset or cannot be reached. */
const UNREACHABLE_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ECONNABORTED',
  'EPIPE',
  'EHOSTUNREACH',
  'EHOSTDOWN',
  'ENETUNREACH',
  'ENETDOWN',
  'ETIMEDOUT',
  'EADDRNOTAVAIL',
  'ENOTCONN',
]);

/** One upstream error -> the answer. Timeouts are decided by the caller (it owns the timer). */
export function classifyUpstreamError(error: unknown): DataPlaneError {
  const code = typeof error === 'object' && error !== null && 'code' in error ? String((error as { code: unknown }).code) : '';
  if (code.startsWith('HPE_')) return dataPlaneError('upstream_protocol_error', 'the sandbox sent a response that is not valid HTTP');
  // This replica could not open the connection: not the sandbox's failure, so not a 502 but a
  // 503 with Retry-After, which an ingress retries on another replica.
  if (LOCAL_RESOURCE_CODES.has(code)) {
    return dataPlaneError('proxy_overloaded', 'this proxy replica is out of file descriptors or socket buffers; try again');
  }
  if (UNREACHABLE_CODES.has(code)) return dataPlaneError('upstream_unreachable', 'the sandbox refused or dropped the connection');
  return dataPlaneError('upstream_unreachable', 'the request to the sandbox failed');
}

export function upstreamTimeoutError(timeoutMs: number): DataPlaneError {
  return dataPlaneError('upstream_timeout', `the sandbox did not answer within ${timeoutMs} ms`);
}
