// Header hygiene between the client and the sandbox. Pure functions over header objects.
//
// Upstream requests lose: the traffic token headers, the client's routing headers (the
// sandbox must not see, nor be able to trust, what the client claimed), hop-by-hop headers
// (RFC 9110 §7.6.1) and any header the client listed in `Connection`, except the ones that
// frame the message: stripping `Content-Length` or `Transfer-Encoding` because a client
// named it in `Connection` would let the client smuggle a second request into the sandbox.
// `Expect` is answered by the data plane itself (it sends 100 Continue once the request is
// admitted), so it is not forwarded either.
//
// The client is described to the sandbox by X-Forwarded-For (appended), X-Forwarded-Proto and
// X-Forwarded-Host (set from what this hop saw), and by nothing else: every other forwarding
// header a client may write (`Forwarded`, `X-Real-IP`, `X-Forwarded-Port`, `-Prefix`, the
// HTTPS flags frameworks read) is dropped rather than rebuilt, so a client cannot claim
// HTTPS, another host or another address through a header the sandbox might trust instead.
import type { IncomingHttpHeaders, OutgoingHttpHeaders } from 'node:http';
import { SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, TOKEN_HEADERS, requestHost } from './target.js';

/** Never forwarded to a sandbox. */
export const STRIPPED_REQUEST_HEADERS: readonly string[] = [...TOKEN_HEADERS, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, 'expect'];

/**
 * Forwarding headers other than X-Forwarded-For/-Proto/-Host: a client-sent value would be a
 * claim (HTTPS, a host, a port, a path prefix, an address, the original URL) the data plane
 * never checked. The client-address headers are those that CDNs and load balancers set and
 * that frameworks' "real IP" helpers read before X-Forwarded-For (go-chi reads True-Client-IP
 * first, for one).
 */
export const CLIENT_FORWARDING_HEADERS: readonly string[] = [
  'forwarded',
  'x-real-ip',
  'true-client-ip',
  'x-client-ip',
  'x-cluster-client-ip',
  'cf-connecting-ip',
  'fastly-client-ip',
  'client-ip',
  'x-original-forwarded-for',
  'x-original-url',
  'x-rewrite-url',
  'x-forwarded-port',
  'x-forwarded-prefix',
  'x-forwarded-server',
  'x-forwarded-ssl',
  'x-forwarded-scheme',
  'x-forwarded-protocol',
  'front-end-https',
  'x-url-scheme',
];

/** Hop-by-hop headers (plus the non-standard ones that behave like them). */
export const HOP_BY_HOP_HEADERS: readonly string[] = [
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'upgrade',
];

/** Headers a `Connection` token can never remove: they frame the message or name its target. */
const PROTECTED_HEADERS = new Set(['host', 'content-length', 'transfer-encoding']);

/** Removed from every upstream request: hop-by-hop, the client's routing, token and forwarding claims. */
const DROPPED_REQUEST_HEADERS = new Set([...HOP_BY_HOP_HEADERS, ...STRIPPED_REQUEST_HEADERS, ...CLIENT_FORWARDING_HEADERS]);
const HOP_BY_HOP_SET = new Set(HOP_BY_HOP_HEADERS);
const NO_TOKENS: ReadonlySet<string> = new Set();

/** The header names a `Connection` value lists (lower case), or an empty set (the usual case: `keep-alive`). */
function connectionTokens(value: string | string[] | number | undefined): ReadonlySet<string> {
  if (value === undefined) return NO_TOKENS;
  const text = Array.isArray(value) ? value.join(',') : String(value);
  // The common value needs no split: it names only a hop-by-hop header, which goes anyway.
  if (text === 'keep-alive' || text === 'Keep-Alive') return NO_TOKENS;
  return headerTokens(text);
}

/** The tokens of a comma-separated header value (`Connection`, `Upgrade`), trimmed, lower case, empty ones left out. */
export function headerTokens(text: string): Set<string> {
  const tokens = new Set<string>();
  for (const part of text.split(',')) {
    const token = part.trim().toLowerCase();
    if (token !== '') tokens.add(token);
  }
  return tokens;
}

/** Headers this hop sets itself; a client's value is replaced. */
const SET_REQUEST_HEADERS = new Set(['host', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host']);

/**
 * `X_Forwarded_Proto` for `X-Forwarded-Proto`: CGI, WSGI and Rack turn both into
 * `HTTP_X_FORWARDED_PROTO`, so a client's underscore spelling of a header this hop drops or sets
 * would reach the application as that header (nginx drops underscore headers for this reason).
 */
function isUnderscoreTwin(name: string): boolean {
  const dashed = name.replaceAll('_', '-');
  return DROPPED_REQUEST_HEADERS.has(dashed) || SET_REQUEST_HEADERS.has(dashed);
}

export interface ForwardingContext {
  /**
   * The request target as the client sent it (`req.url`, before it is rewritten): an
   * absolute-form target names the host, for X-Forwarded-Host as for routing (requestHost).
   */
  readonly requestTarget: string | undefined;
  /** The client's address as the data plane saw it. */
  readonly remoteAddress: string | undefined;
  /** `http` (the data plane does not terminate TLS). */
  readonly protocol: 'http' | 'https';
  /**
   * The X-Forwarded-Proto the request carries is the ingress's, which terminated TLS
   * (ROUTESYNC_PROXY_TRUST_FORWARDED_PROTO): a value of `http` or `https` is passed on.
   */
  readonly trustForwardedProto?: boolean;
  /** A WebSocket handshake keeps `Connection: Upgrade` and `Upgrade`. */
  readonly upgrade: boolean;
}

/**
 * The headers to send upstream, as a new object (the input is not modified).
 *
 * X-Forwarded-For appends the client's address to any chain already present (the usual
 * convention; the sandbox treats it as a hint). X-Forwarded-Proto and X-Forwarded-Host are
 * set to what this hop saw, replacing client-sent values, so a client cannot claim HTTPS or
 * another host (unless the ingress's X-Forwarded-Proto is trusted: trustForwardedProto); the host is the one the request was routed by (requestHost), which is also
 * the Host sent upstream. The other forwarding headers (CLIENT_FORWARDING_HEADERS) are dropped.
 */
export function upstreamRequestHeaders(headers: IncomingHttpHeaders, context: ForwardingContext): IncomingHttpHeaders {
  // Built by copying what is kept rather than deleting from a copy: `delete` turns the object
  // V8 keeps for it into a slow dictionary, on every request (bench/, docs/benchmarks.md).
  const listed = connectionTokens(headers.connection);
  const out: IncomingHttpHeaders = {};
  for (const name in headers) {
    if (DROPPED_REQUEST_HEADERS.has(name)) continue;
    if (listed.has(name) && !PROTECTED_HEADERS.has(name)) continue;
    if (name.includes('_') && isUnderscoreTwin(name)) continue;
    out[name] = headers[name];
  }
  if (context.upgrade) {
    out.connection = 'Upgrade';
    if (headers.upgrade !== undefined) out.upgrade = headers.upgrade;
  }

  const chain = headers['x-forwarded-for'];
  const previous = Array.isArray(chain) ? chain.join(', ') : chain;
  const remote = context.remoteAddress ?? '';
  out['x-forwarded-for'] = previous && previous.trim() !== '' ? `${previous}, ${remote}` : remote;
  out['x-forwarded-proto'] = (context.trustForwardedProto && forwardedProto(headers['x-forwarded-proto'])) || context.protocol;
  const host = requestHost(context.requestTarget, headers);
  if (host !== undefined) {
    // RFC 9110 §7.2: a proxy forwarding an absolute-form target replaces Host with the
    // target's authority; otherwise this is the Host header's own value, unchanged.
    out.host = host;
    out['x-forwarded-host'] = host;
  } else if (out['x-forwarded-host'] !== undefined) delete out['x-forwarded-host'];
  return out;
}

/** `http` or `https` when that is the header's one value (an ingress sets one), else undefined. */
function forwardedProto(value: string | string[] | undefined): 'http' | 'https' | undefined {
  if (typeof value !== 'string') return undefined;
  const proto = value.trim().toLowerCase();
  return proto === 'http' || proto === 'https' ? proto : undefined;
}

/**
 * Remove hop-by-hop headers from an upstream response, in place (http-proxy-3 copies the
 * object to the client right after). `Transfer-Encoding` is left to the library, which drops
 * it and lets Node frame the client response itself.
 */
export function cleanResponseHeaders(headers: IncomingHttpHeaders | OutgoingHttpHeaders): void {
  for (const name of connectionTokens(headers.connection)) {
    if (!PROTECTED_HEADERS.has(name) && name in headers) delete headers[name];
  }
  // Only names that are there: a `delete` of any key, present or not, can cost the object its fast shape.
  for (const name in headers) {
    if (HOP_BY_HOP_SET.has(name)) delete headers[name];
  }
}
