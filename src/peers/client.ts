// The one undici Agent every peer request goes through, and the one place peer errors are
// classified (transient: retry; permanent: fail at once).
//
// Traps avoided here:
//  - every response body is consumed (json() or dump()), or the connection stays pinned and
//    the pool runs dry;
//  - sub-second budgets are enforced with an AbortSignal; undici's own timers are coarse;
//  - an aborted undici request rejects with the signal's reason, so the reason is one of our
//    own errors with a stable `code`;
//  - errors are classified by `code` (and HTTP status), never by `instanceof` (undici's error
//    classes are duplicated when two copies of undici are loaded).
import { Agent, buildConnector, type Dispatcher } from 'undici';
import { tlsOptions, type PeerTlsMaterial } from '../config.js';
import type { RouteChange } from '../routes/route.js';
import { changeToWire } from '../routes/route.js';
import { LOCAL_RESOURCE_CODES } from '../system-errors.js';

/** Stable error classes; they label metrics and appear in sync outcomes. */
export type PeerErrorClass =
  | 'refused'
  | 'reset'
  | 'timeout'
  | 'unreachable'
  | 'dns'
  | 'local_resources'
  | 'http_429'
  | 'http_5xx'
  | 'http_4xx'
  | 'unauthorized'
  | 'protocol'
  | 'aborted'
  | 'self'
  | 'unknown';

const TRANSIENT: ReadonlySet<PeerErrorClass> = new Set(['refused', 'reset', 'timeout', 'unreachable', 'dns', 'local_resources', 'http_429', 'http_5xx']);

export class PeerRequestError extends Error {
  readonly code: string;
  readonly errorClass: PeerErrorClass;
  readonly transient: boolean;
  /**
   * The fleet's configuration, not the request: a 401/403 (the peer token) or a TLS handshake
   * that failed (a CA rotated on some pods only, a certificate not valid yet, a peer still on
   * plain HTTP during a rollout that turns TLS on).
   * Not retried at once, but the changes stay queued and flow once it is fixed.
   */
  readonly configuration: boolean;
  readonly status: number | undefined;
  /**
   * How long a 429 or 503 asked for before the next request (its `Retry-After`, RFC 9110
   * §10.2.3), in ms; undefined without one or with one that is not a delay or a date.
   */
  readonly retryAfterMs: number | undefined;
  constructor(errorClass: PeerErrorClass, message: string, options: { cause?: unknown; status?: number; code?: string; retryAfterMs?: number } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'PeerRequestError';
    this.errorClass = errorClass;
    this.transient = TRANSIENT.has(errorClass);
    this.status = options.status;
    this.retryAfterMs = options.retryAfterMs;
    this.code = options.code ?? `ROUTESYNC_PEER_${errorClass.toUpperCase()}`;
    this.configuration = errorClass === 'unauthorized' || (errorClass === 'protocol' && isTlsFailure(options.code));
  }
}

/** The reason an attempt's own timer aborts it with. */
export class AttemptTimeoutError extends Error {
  readonly code = 'ROUTESYNC_ATTEMPT_TIMEOUT';
  constructor(readonly timeoutMs: number) {
    super(`peer did not answer within ${timeoutMs} ms`);
    this.name = 'AttemptTimeoutError';
  }
}

/** The reason shutdown (or a caller) aborts work with; never retried. */
export class SyncAbortedError extends Error {
  readonly code = 'ROUTESYNC_ABORTED';
  constructor(message = 'aborted') {
    super(message);
    this.name = 'SyncAbortedError';
  }
}

const CODE_CLASSES: Readonly<Record<string, PeerErrorClass>> = {
  ECONNREFUSED: 'refused',
  ECONNRESET: 'reset',
  EPIPE: 'reset',
  ECONNABORTED: 'reset',
  UND_ERR_SOCKET: 'reset',
  UND_ERR_CLOSED: 'reset',
  ROUTESYNC_ATTEMPT_TIMEOUT: 'timeout',
  ETIMEDOUT: 'timeout',
  UND_ERR_CONNECT_TIMEOUT: 'timeout',
  UND_ERR_HEADERS_TIMEOUT: 'timeout',
  ERR_TLS_HANDSHAKE_TIMEOUT: 'timeout',
  UND_ERR_BODY_TIMEOUT: 'timeout',
  EHOSTUNREACH: 'unreachable',
  ENETUNREACH: 'unreachable',
  EHOSTDOWN: 'unreachable',
  ENETDOWN: 'unreachable',
  EADDRNOTAVAIL: 'unreachable',
  EAI_AGAIN: 'dns',
  ENOTFOUND: 'dns',
  // This replica short of what a connection needs (LOCAL_RESOURCE_CODES): the changes must not
  // be dropped meanwhile.
  ...Object.fromEntries([...LOCAL_RESOURCE_CODES].map((code) => [code, 'local_resources' as const])),
  ROUTESYNC_ABORTED: 'aborted',
  UND_ERR_ABORTED: 'aborted',
  ABORT_ERR: 'aborted',
  UND_ERR_INVALID_ARG: 'protocol',
  UND_ERR_RES_CONTENT_LENGTH_MISMATCH: 'reset',
  UND_ERR_REQ_CONTENT_LENGTH_MISMATCH: 'protocol',
  UND_ERR_INFO: 'protocol',
};

/** Map an HTTP status that is not 2xx to its class. */
export function classifyStatus(status: number): PeerErrorClass {
  if (status === 429) return 'http_429';
  // Request Timeout: the peer (or a proxy in front of it) gave up waiting for the request, which
  // may be repeated (RFC 9110 §15.5.9); a timeout like our own.
  if (status === 408) return 'timeout';
  if (status === 401 || status === 403) return 'unauthorized';
  if (status >= 500) return 'http_5xx';
  return 'http_4xx';
}

/**
 * A `Retry-After` value in ms from now: delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a
 * date in the past is 0. Undefined for anything else (and for a repeated header), which is
 * then no request to wait.
 */
export function retryAfterMs(value: string | string[], nowMs = Date.now()): number | undefined {
  if (typeof value !== 'string') return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  // Every HTTP-date form begins with the day's name (Date.parse would take "-5" as a year).
  if (!/^[A-Za-z]{3}/.test(text)) return undefined;
  const at = Date.parse(text);
  return Number.isNaN(at) ? undefined : Math.max(0, at - nowMs);
}

/** What makes two failures "the same" for RepeatedWarnings: their class and their status or code. */
export function failureKey(error: PeerRequestError): string {
  return `${error.errorClass} ${error.status ?? error.code}`;
}

/** Classify anything thrown by a peer request, once, by `code`. */
export function classifyPeerError(error: unknown): PeerRequestError {
  if (error instanceof PeerRequestError) return error;
  const code = codeOf(error);
  const errorClass =
    (code && CODE_CLASSES[code]) || (isCutByEof(error, code) ? 'reset' : isParserError(error, code) || isTlsFailure(code) ? 'protocol' : 'unknown');
  const message = error instanceof Error ? error.message : String(error);
  return new PeerRequestError(errorClass, message, { cause: error, ...(code ? { code } : {}) });
}

/**
 * An answer whose connection ended before it did, on a connection that was to close after it
 * (`Connection: close`, where the end of the stream may end a body): undici hands the end to
 * its parser, which fails an unfinished chunked body with llhttp's "Invalid EOF state" as an
 * HTTPParserError, where a cut with a Content-Length is a socket error. Either is a peer that
 * went away mid-answer (killed, a proxy between cut it), not one that speaks something else:
 * transient, like any reset. undici leaves the code unset here (7.x), so the reason decides.
 */
function isCutByEof(error: unknown, code: string | undefined): boolean {
  if (code === 'HPE_INVALID_EOF_STATE') return true;
  return isParserError(error, code) && /\(Invalid EOF state\)$/.test(String((error as { message?: unknown }).message));
}

/**
 * An answer that is not HTTP/1.1 (a garbled status line, a bad Content-Length: another service
 * on the peer's port, a broken proxy between). undici's HTTPParserError usually carries no
 * code (its `HPE_*` code is set only for some of llhttp's errors), so its name decides.
 * Permanent: the same peer will answer the same way to a retry.
 */
function isParserError(error: unknown, code: string | undefined): boolean {
  if (code?.startsWith('HPE_')) return true;
  return typeof error === 'object' && error !== null && (error as { name?: unknown }).name === 'HTTPParserError';
}

/**
 * OpenSSL's certificate verification results as Node names them (its "X509 certificate error
 * codes"): a peer whose chain ends at another root (UNABLE_TO_GET_ISSUER_CERT_LOCALLY), a
 * certificate not valid yet (clock skew), a revoked one.
 */
const TLS_VERIFY_CODES: ReadonlySet<string> = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'CERT_HAS_EXPIRED',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_CRL',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'UNABLE_TO_DECRYPT_CRL_SIGNATURE',
  'UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY',
  'CERT_SIGNATURE_FAILURE',
  'CRL_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CRL_NOT_YET_VALID',
  'CRL_HAS_EXPIRED',
  'ERROR_IN_CERT_NOT_BEFORE_FIELD',
  'ERROR_IN_CERT_NOT_AFTER_FIELD',
  'ERROR_IN_CRL_LAST_UPDATE_FIELD',
  'ERROR_IN_CRL_NEXT_UPDATE_FIELD',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'CERT_CHAIN_TOO_LONG',
  'CERT_REVOKED',
  'INVALID_CA',
  'PATH_LENGTH_EXCEEDED',
  'INVALID_PURPOSE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'HOSTNAME_MISMATCH',
]);

/**
 * A TLS handshake that failed on what the two ends are (a certificate the CA does not verify,
 * a peer that speaks plain HTTP: ERR_SSL_WRONG_VERSION_NUMBER, an alert from the peer): a
 * configuration problem, permanent like any answer that is not the protocol. Left as
 * `unknown` it would escape the alert on permanent failures (docs/operations.md).
 */
function isTlsFailure(code: string | undefined): boolean {
  if (code === undefined) return false;
  return TLS_VERIFY_CODES.has(code) || code.startsWith('ERR_SSL_') || code.startsWith('ERR_TLS_');
}

function codeOf(error: unknown): string | undefined {
  if (typeof error !== 'object' || error === null) return undefined;
  const code = (error as { code?: unknown }).code;
  if (typeof code === 'string') return code;
  // undici wraps connection failures: the system error is the cause.
  const cause = (error as { cause?: unknown }).cause;
  return cause === undefined || cause === error ? undefined : codeOf(cause);
}

export interface PeerClientOptions {
  /** Connections kept per peer (the pool bound). */
  readonly connections: number;
  /** Shared secret sent as a Bearer token ('' = none). */
  readonly token: string;
  /** This replica's instance ID: a peer that answers with it is this replica itself. */
  readonly instanceId: string;
  /** 'https' when the peer API uses TLS. */
  readonly scheme?: 'http' | 'https';
  /** TLS material (client certificate, trusted CA) for the connections to peers; see setTls. */
  readonly tls?: PeerTlsMaterial;
  /** Test hook: count dispatched requests. */
  readonly onRequest?: (peer: string, path: string) => void;
}

/** What a peer answered for each entry of a push. */
export interface PushAck {
  readonly applied: number;
  readonly ignored: number;
  /** Indexes in the batch of the entries the peer rejected (anything but applied or ignored). */
  readonly rejectedAt: readonly number[];
  /**
   * Set when the peer refused the whole batch (400 `invalid_route`, all or nothing) for the
   * entries in `rejectedAt` and applied none: the others are owed to it still, to be sent again.
   */
  readonly resend?: true;
}

const NONE_REJECTED: readonly number[] = Object.freeze([]);

/** undici's own connect timeout (the attempt's AbortSignal is the real budget). */
const CONNECT_TIMEOUT_MS = 10_000;

function tlsConnector(tls: PeerTlsMaterial): buildConnector.connector {
  return buildConnector({ timeout: CONNECT_TIMEOUT_MS, ...tlsOptions(tls) });
}

export const INSTANCE_HEADER = 'x-routesync-instance';
export const PEER_PUSH_PATH = '/v1/peer/routes';
const EMPTY_PUSH = '{"routes":[]}';

export class PeerClient {
  readonly agent: Agent;
  private readonly headers: Record<string, string>;
  private readonly scheme: 'http' | 'https';

  /** undici's connector for TLS, replaced by setTls; connections already open keep theirs. */
  private connector: buildConnector.connector | undefined;

  constructor(private readonly options: PeerClientOptions) {
    this.scheme = options.scheme ?? 'http';
    this.connector = options.tls ? tlsConnector(options.tls) : undefined;
    this.agent = new Agent({
      connections: options.connections,
      pipelining: 1,
      // Long enough to reuse a connection across the gaps between lifecycle calls; the peer's
      // own keep-alive hint (Node's default 5 s) still wins when shorter.
      keepAliveTimeout: 30_000,
      keepAliveMaxTimeout: 60_000,
      // Through a field, so that a certificate rotation (setTls) reaches the next connection
      // without a new pool: the Agent builds its connector once.
      ...(this.connector ? { connect: (connectOptions, callback) => this.connector!(connectOptions, callback) } : {}),
    });
    this.headers = { 'content-type': 'application/json', [INSTANCE_HEADER]: options.instanceId };
    if (options.token !== '') this.headers.authorization = `Bearer ${options.token}`;
  }

  /**
   * New TLS material (a rotated certificate or CA): connections opened from now on use it;
   * pooled ones keep the handshake they made until they close (at most keepAliveMaxTimeout).
   * A client made without TLS ignores it.
   */
  setTls(tls: PeerTlsMaterial): void {
    if (this.connector) this.connector = tlsConnector(tls);
  }

  origin(peer: string): string {
    return `${this.scheme}://${peer}`;
  }

  /** Push changes to a peer's batch endpoint. Resolves on 2xx; throws a classified PeerRequestError otherwise. */
  async push(peer: string, changes: readonly RouteChange[], signal: AbortSignal): Promise<PushAck> {
    // One await on the request and one on its body: this runs ten times per lifecycle call.
    const response = await this.request(peer, 'POST', PEER_PUSH_PATH, pushBody(changes), signal, 400);
    if (response.statusCode === 400) return refusedEntries(peer, response, changes.length);
    const json = await jsonBody(peer, response);
    const results = (json as { results?: unknown }).results;
    if (!Array.isArray(results) || results.length !== changes.length) {
      throw new PeerRequestError('protocol', `peer ${peer} answered a push without one result per route`);
    }
    let applied = 0;
    let ignored = 0;
    let rejectedAt: number[] | undefined;
    for (let i = 0; i < results.length; i++) {
      const outcome = (results[i] as { outcome?: unknown } | null)?.outcome;
      if (outcome === 'applied') applied++;
      else if (outcome === 'ignored') ignored++;
      else (rejectedAt ??= []).push(i);
    }
    return { applied, ignored, rejectedAt: rejectedAt ?? NONE_REJECTED };
  }

  /**
   * An ejected peer's cheap probe: `GET /healthz`, or, when `authenticated`, an empty push, which
   * needs the peer token as a push does (the probe of a peer ejected for a 401/403: /healthz is
   * open, and would let it back in to fail again). Healthy only once the whole answer has
   * arrived: a 200 whose body is cut off (reset, stall) is a failure like any other attempt's,
   * where `dump()` would have resolved and readmitted the peer.
   */
  async probe(peer: string, signal: AbortSignal, authenticated = false): Promise<void> {
    if (authenticated) await jsonBody(peer, await this.request(peer, 'POST', PEER_PUSH_PATH, EMPTY_PUSH, signal));
    else await textBody(await this.request(peer, 'GET', '/healthz', undefined, signal));
  }

  /** GET or POST returning parsed JSON; throws a classified PeerRequestError. */
  async requestJson(peer: string, method: 'GET' | 'POST', path: string, body: string | undefined, signal: AbortSignal): Promise<unknown> {
    return jsonBody(peer, await this.request(peer, method, path, body, signal));
  }

  /**
   * One request. On a non-2xx status the body is dumped and a classified error thrown; the
   * caller consumes the body of a 2xx.
   */
  async request(
    peer: string,
    method: 'GET' | 'POST',
    path: string,
    body: string | undefined,
    signal: AbortSignal,
    /** A non-2xx status whose body the caller reads too. */
    alsoRead?: number,
  ): Promise<Dispatcher.ResponseData> {
    this.options.onRequest?.(peer, path);
    let response: Dispatcher.ResponseData;
    try {
      // undici takes an undefined body as none.
      response = await this.agent.request({ origin: this.origin(peer), path, method, headers: this.headers, body, signal });
    } catch (error) {
      throw classifyPeerError(error);
    }
    if (response.headers[INSTANCE_HEADER] === this.options.instanceId) {
      await response.body.dump();
      throw new PeerRequestError('self', `peer ${peer} is this replica`);
    }
    if ((response.statusCode < 200 || response.statusCode >= 300) && response.statusCode !== alsoRead) {
      await response.body.dump();
      const retryAfter = response.statusCode === 429 || response.statusCode === 503 ? response.headers['retry-after'] : undefined;
      throw new PeerRequestError(classifyStatus(response.statusCode), `peer ${peer} answered ${response.statusCode}`, {
        status: response.statusCode,
        ...(retryAfter === undefined ? {} : { retryAfterMs: retryAfterMs(retryAfter) }),
      });
    }
    return response;
  }

  async close(): Promise<void> {
    await this.agent.close();
  }

  /** Drop every connection now (shutdown after the grace period). */
  async destroy(): Promise<void> {
    await this.agent.destroy();
  }
}

/**
 * A 2xx response's body as JSON. (No async frame of its own: pushes call it.)
 *
 * Reading the body is part of the request: our attempt timeout, a reset or a short body while
 * it is being read are classified by `code` like any request error (so transient ones are
 * retried and count toward ejection). Only a body that arrived whole and does not parse — the
 * SyntaxError of JSON.parse, which has no code — is `protocol`. In every case the body is done
 * with: read to its end, or destroyed by undici with the error; the `destroy()` is for a
 * failure before reading started, which would otherwise pin the connection.
 */
function jsonBody(peer: string, response: Dispatcher.ResponseData): Promise<unknown> {
  return response.body.json().catch((error: unknown) => {
    response.body.destroy();
    if (error instanceof SyntaxError) throw new PeerRequestError('protocol', `peer ${peer} sent a body that is not JSON`, { cause: error });
    throw classifyPeerError(error);
  });
}

/**
 * A push answered 400. The peer API refuses a batch with an invalid route whole, listing every
 * refused entry by index (`error.invalid`; a replica of an older version names only the first,
 * as `error.index`). This replica validated each of them, so the peer runs another version: the
 * refused entries are reported `rejected` and the rest is owed still (`resend`), instead of the
 * whole batch being dropped as a permanent failure. A 400 that names no entry of this batch is
 * that permanent failure (`http_4xx`).
 */
async function refusedEntries(peer: string, response: Dispatcher.ResponseData, count: number): Promise<PushAck> {
  let body: unknown;
  try {
    body = await jsonBody(peer, response);
  } catch (error) {
    // A body that is not JSON is a 400 like any other; a read that failed is classified as one.
    if (!(error instanceof PeerRequestError) || error.errorClass !== 'protocol') throw error;
  }
  const refusal = (body as { error?: { code?: unknown; index?: unknown; invalid?: unknown } } | null | undefined)?.error;
  const indexes = new Set<number>();
  if (refusal?.code === 'invalid_route') {
    const listed: unknown[] = Array.isArray(refusal.invalid) ? refusal.invalid : [refusal];
    for (const entry of listed) {
      const index = (entry as { index?: unknown } | null)?.index;
      if (typeof index === 'number' && Number.isInteger(index) && index >= 0 && index < count) indexes.add(index);
    }
  }
  if (indexes.size === 0) throw new PeerRequestError('http_4xx', `peer ${peer} answered 400`, { status: 400 });
  return { applied: 0, ignored: 0, rejectedAt: [...indexes].sort((a, b) => a - b), resend: true };
}

/** A 2xx response's body read to its end (the probe's), failures classified as in jsonBody. */
function textBody(response: Dispatcher.ResponseData): Promise<string> {
  return response.body.text().catch((error: unknown) => {
    response.body.destroy();
    throw classifyPeerError(error);
  });
}

/**
 * Each change's wire JSON, made once however many peers it goes to: the fan-out queues one
 * shared, immutable RouteChange object in every peer's outbox, and serializing it again for
 * each peer was the largest self time of routesync's own code under load (bench/, docs/benchmarks.md).
 */
const wireJson = new WeakMap<RouteChange, string>();

function changeJson(change: RouteChange): string {
  let json = wireJson.get(change);
  if (json === undefined) {
    json = JSON.stringify(changeToWire(change));
    wireJson.set(change, json);
  }
  return json;
}

/** The body of a push: byte for byte `JSON.stringify({ routes: changes.map(changeToWire) })`. */
export function pushBody(changes: readonly RouteChange[]): string {
  return `{"routes":[${changes.map(changeJson).join(',')}]}`;
}

/**
 * The per-attempt timeout of one peer's pushes, as one AbortSignal reused from attempt to
 * attempt. A peer has at most one push attempt in flight, so one controller and one timer serve
 * them all: `start()` re-arms the timer (`refresh()`) and hands out the same signal until a
 * timeout (or `outer`) has fired it, and only then makes a new one. A fresh controller, timer
 * and listener on `outer` for every attempt cost ~5 µs, ten times per lifecycle call
 * (docs/benchmarks.md, finding 1).
 *
 * Between attempts the timer is left armed and its firing ignored, since clearing it would mean
 * making a new one next time. undici lets go of the signal when a response body closes, so an
 * answered request may keep its listener a tick longer: aborting a request that has finished
 * is a no-op.
 */
export class AttemptDeadline {
  private controller = new AbortController();
  private timer: NodeJS.Timeout | null = null;
  private active = false;
  private readonly onOuterAbort = (): void => this.controller.abort(this.outer.reason);

  constructor(
    readonly timeoutMs: number,
    private readonly outer: AbortSignal,
  ) {
    outer.addEventListener('abort', this.onOuterAbort, { once: true });
  }

  /** The signal for an attempt starting now: it fires `timeoutMs` from now, or with `outer`. */
  start(): AbortSignal {
    if (this.outer.aborted) return AbortSignal.abort(this.outer.reason);
    if (this.controller.signal.aborted) this.controller = new AbortController();
    this.active = true;
    if (this.timer) this.timer.refresh();
    else {
      this.timer = setTimeout(this.onTimeout, this.timeoutMs);
      this.timer.unref();
    }
    return this.controller.signal;
  }

  /** The attempt started last has ended (its body consumed or dumped). */
  end(): void {
    this.active = false;
  }

  /** Abort the attempt in flight, if any, and release the timer and the listener on `outer` (the peer is gone or the sync closed). */
  close(): void {
    if (this.active) this.controller.abort(new SyncAbortedError('peer removed'));
    this.active = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.outer.removeEventListener('abort', this.onOuterAbort);
  }

  private readonly onTimeout = (): void => {
    if (!this.active) return;
    this.active = false;
    this.controller.abort(new AttemptTimeoutError(this.timeoutMs));
  };
}

/**
 * An AbortSignal that fires after `timeoutMs` with an AttemptTimeoutError, or when `outer`
 * fires (with its reason). `clear()` releases the timer.
 */
export function attemptSignal(timeoutMs: number, outer?: AbortSignal): { signal: AbortSignal; clear: () => void } {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(new AttemptTimeoutError(timeoutMs)), timeoutMs);
  timer.unref();
  let onOuterAbort: (() => void) | undefined;
  if (outer) {
    if (outer.aborted) controller.abort(outer.reason);
    else {
      onOuterAbort = () => controller.abort(outer.reason);
      outer.addEventListener('abort', onOuterAbort, { once: true });
    }
  }
  return {
    signal: controller.signal,
    clear: () => {
      clearTimeout(timer);
      if (outer && onOuterAbort) outer.removeEventListener('abort', onOuterAbort);
    },
  };
}
