// The data plane: an http.Server that maps each request to a sandbox (target.ts), admits it
// or answers with a JSON error, and relays admitted HTTP and WebSocket traffic to the route's
// pod IP through http-proxy-3 and one bounded keep-alive agent.
//
// Why it is built this way:
//  - Nothing buffers a body: the library pipes request and response streams with
//    backpressure; there is no body parser anywhere on this server.
//  - Every failure path ends in exactly one place per exchange (`record`), which counts the
//    outcome, observes the duration and writes the access-log line. The first outcome set wins.
//  - The upstream timeout is ours, not the library's `proxyTimeout` (which cannot be told apart
//    from a reset and keeps running while a response streams). It bounds, with the one figure
//    `proxyTimeoutMs`: the wait for a pooled socket, the TCP connect, and then upstream silence
//    until the response headers arrive (socket idle, so a long upload that keeps moving is never
//    cut; a request without a body has nothing to keep moving, so its wait is one plain timer).
//    Once headers are in, the response streams for as long as both ends keep it open.
//    A WebSocket handshake gets the same figure as a hard deadline; an open WebSocket has none.
//  - The library's `error` event always has a listener and every call passes a callback, so no
//    proxy error can become an uncaught exception; the request handlers are wrapped as well.
import { randomBytes } from 'node:crypto';
import http, { type ClientRequest, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http';
import net, { type AddressInfo, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { performance } from 'node:perf_hooks';
import { ProxyServer } from 'http-proxy-3';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import type { Route } from '../routes/route.js';
import type { RouteTable } from '../routes/table.js';
import { cleanResponseHeaders, headerTokens, upstreamRequestHeaders } from './headers.js';
import {
  classifyUpstreamError,
  dataPlaneError,
  decide,
  errorBody,
  readmit,
  splitRequestTarget,
  upstreamTimeoutError,
  type DataPlaneError,
  type DataPlaneErrorCode,
  type SandboxAddress,
  type UpstreamTarget,
} from './target.js';
import { CLOSE_GOING_AWAY, FrameRelay, closeFrame } from './ws-frames.js';

export interface DataPlaneOptions {
  readonly config: Config;
  /** Looked up on every request, so a route change applies to the next one. */
  readonly table: Pick<RouteTable, 'getById'>;
  readonly metrics: Metrics;
  readonly logger: Logger;
  /**
   * How long a WebSocket may take to finish its closing handshake after the data plane sent
   * close 1001 at the end of the shutdown grace period, before its sockets are destroyed.
   * Default 1000 ms.
   */
  readonly webSocketCloseTimeoutMs?: number;
  /**
   * How often open WebSockets are checked against their routes (a sandbox paused, deleted or
   * moved, its token rotated: the WebSocket is closed, 1001). Default 1000 ms.
   */
  readonly webSocketRecheckMs?: number;
  /**
   * Idle time after which a pooled upstream socket is closed. Default 4000 ms: below the 5 s
   * keep-alive timeout of a default Node.js server, so the agent drops a socket before the
   * sandbox does, instead of sending a request into a connection the sandbox is closing.
   */
  readonly upstreamIdleSocketTimeoutMs?: number;
  /**
   * How long a client may take to send its request headers before the connection is answered
   * 408 and closed (slow-header clients). Default 60000 ms, Node's own default, which Node
   * drops to "no limit" once requestTimeout is 0, as it is here. Checked every
   * min(30 s, this value), so a client is cut between one and two times this value.
   */
  readonly clientHeadersTimeoutMs?: number;
}

/** What a request ended as: the metric label and the access log's `outcome`. */
/**
 * route_changed: an answer cut while it streamed, its route no longer admitting it (guardAnswer).
 * client_stalled: an answer cut because its client took none of it for proxySendTimeoutMs (watchSendStall).
 */
export type ProxyOutcome = 'proxied' | 'client_aborted' | 'route_changed' | 'client_stalled' | DataPlaneErrorCode;

interface Exchange {
  readonly kind: 'http' | 'websocket';
  readonly startedAt: number;
  readonly method: string;
  /** Path without the query (the query may carry secrets). */
  readonly path: string;
  readonly remoteAddress: string | undefined;
  readonly hasBody: boolean;
  sandboxId: string | undefined;
  port: number | undefined;
  outcome: ProxyOutcome | undefined;
  status: number | undefined;
  timedOut: boolean;
  clientError: unknown;
  /** The upstream request once it has a socket (set from the library's proxyReq event). */
  proxyReq: ClientRequest | undefined;
  /** The upstream request from its creation, while it may still wait in the agent's queue (see UpstreamAgent). */
  upstreamRequest: ClientRequest | undefined;
  timer: NodeJS.Timeout | undefined;
  /** Armed while the answer is held back by a full client socket (watchSendStall). */
  stallTimer: NodeJS.Timeout | undefined;
  /** The recheck round (recheckRounds) in which the exchange was last checked against its route. */
  checkedRound: number;
  /** The wait for the response headers is the upstream socket's idle timer (a request with a body). */
  idleTimer: boolean;
  /** WebSocket: reads the client socket until the sandbox answers the handshake (see HandshakeClientReader). */
  handshakeClient: HandshakeClientReader | undefined;
  /** What the request was admitted for, checked again when it gets its upstream socket (readmit): the route, the address, the client's own headers. */
  admittedRoute: Route | undefined;
  admittedAddress: SandboxAddress | undefined;
  clientHeaders: IncomingHttpHeaders | undefined;
  recorded: boolean;
}

interface ProxiedWebSocket {
  readonly client: Socket;
  readonly upstream: Socket;
  /** The handshake's exchange: what it was admitted for, checked again while it is open. */
  readonly exchange: Exchange;
  /** Closed because its route no longer admits it (recheckWebSockets). */
  revoked: boolean;
  toClient?: FrameRelay;
  toUpstream?: FrameRelay;
  readonly closed: Promise<void>;
}

/** What an answer is written to: the client's response, or the client's socket (a plain answer to a handshake). */
type AnswerSink = Pick<ServerResponse, 'writableEnded' | 'writableNeedDrain' | 'destroyed'>;

/**
 * Each request carries its exchange on a property of its own, found again from the library's
 * events. Not a WeakMap, nor a Set of exchanges in flight: a long-lived collection pointing at
 * every request's young objects made V8's young-generation collections three times as costly
 * (old-to-new references, ephemerons) and promoted exchanges that then died in old space;
 * measured at ~520 ms against ~170 ms of scavenges for 30,000 proxied requests
 * (docs/benchmarks.md, benchmark 6).
 */
const EXCHANGE = Symbol('routesync.exchange');

type CarriesExchange = IncomingMessage & { [EXCHANGE]?: Exchange };

function attachExchange(req: IncomingMessage, exchange: Exchange): void {
  (req as CarriesExchange)[EXCHANGE] = exchange;
}

/** The library's events pass the request they are about; tolerate one that does not. */
function exchangeOf(req: IncomingMessage | undefined): Exchange | undefined {
  return (req as CarriesExchange | undefined)?.[EXCHANGE];
}

export const DEFAULT_WS_CLOSE_TIMEOUT_MS = 1000;
const DEFAULT_WS_RECHECK_MS = 1000;
const DEFAULT_UPSTREAM_IDLE_SOCKET_TIMEOUT_MS = 4000;
const DEFAULT_CLIENT_HEADERS_TIMEOUT_MS = 60_000;

function hasRequestBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

/** A character Node's ServerResponse refuses in a reason phrase (as in a header value). */
const INVALID_REASON_CHAR = /[^\t\x20-\x7e\x80-\xff]/;

/**
 * Whether Node can write this upstream status line to the client. Its parser reads any
 * three-digit status and a reason phrase with control characters, but ServerResponse throws
 * on a status below 100 and on such a reason, and it throws from inside the library's pipe:
 * an uncaught exception, which a single answer from a sandbox turned into the end of the
 * process.
 */
function isWritableStatusLine(proxyRes: IncomingMessage): boolean {
  const status = proxyRes.statusCode ?? 0;
  return status >= 100 && status <= 999 && !INVALID_REASON_CHAR.test(proxyRes.statusMessage ?? '');
}

/** The sandbox switched protocols on a plain HTTP request, which never asks it to. */
function switchedProtocolsError(): DataPlaneError {
  return dataPlaneError('upstream_protocol_error', 'the sandbox switched protocols (101) on a request that asked for no upgrade');
}

/**
 * Why an upstream answer that Node reads as a final one cannot be relayed, if it cannot: a 101
 * without an Upgrade header (relayed, it would tell the client the connection has switched to
 * no protocol at all; to a plain request, which asked for none, a 101 is wrong in any case),
 * or a status line Node cannot write.
 */
function unrelayableAnswer(proxyRes: IncomingMessage, askedForUpgrade = false): DataPlaneError | undefined {
  if (proxyRes.statusCode === 101) {
    return askedForUpgrade ? dataPlaneError('upstream_protocol_error', 'the sandbox switched protocols (101) without saying to which (no Upgrade header)') : switchedProtocolsError();
  }
  if (!isWritableStatusLine(proxyRes)) return dataPlaneError('upstream_protocol_error', 'the sandbox sent a status line that is not valid HTTP');
  const codings = proxyRes.headers['transfer-encoding'];
  if (codings !== undefined && codings.toLowerCase() !== 'chunked') return unsupportedTransferCoding(codings);
  return undefined;
}

/**
 * A transfer coding other than chunked (`Transfer-Encoding: gzip, chunked`). Node decodes only
 * the chunked framing and the library drops the header, so relayed, the body would reach the
 * client still gzipped with nothing saying so: refused instead of corrupted.
 */
function unsupportedTransferCoding(codings: string): DataPlaneError | undefined {
  const other = [...headerTokens(codings)].filter((coding) => coding !== 'chunked');
  if (other.length === 0) return undefined;
  return dataPlaneError('upstream_protocol_error', `the sandbox sent a transfer coding this proxy does not decode (${other.join(', ').slice(0, 64)})`);
}

function errorResponseHeaders(error: DataPlaneError, body: string): Record<string, string | number> {
  return {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(body),
    'cache-control': 'no-store',
    'x-routesync-error': error.code,
    // Short of descriptors now, likely not in a second (connections close all the time).
    ...(error.code === 'proxy_overloaded' ? { 'retry-after': 1 } : {}),
  };
}

/**
 * Remove http-proxy-3's `deleteLength` web pass from this ProxyServer instance.
 *
 * That pass sets `Content-Length: 0` and deletes `Transfer-Encoding` on a DELETE or OPTIONS
 * without a Content-Length, but the body is still piped upstream: a chunked body then reaches
 * the pooled sandbox connection unframed and is parsed there as further requests (request
 * smuggling: unadmitted, unlogged, with headers of the client's choosing). Without the pass
 * the client's own framing header goes upstream and Node frames the body itself; a DELETE
 * without a body goes without either header, which HTTP/1.1 reads as an empty body.
 *
 * The library's only public pass API (`before`/`after`) inserts passes; it cannot remove one,
 * and undoing the pass's effect from another pass would depend on the pass order all the same.
 * So this edits the instance's (TypeScript-private) `webPasses` list, per instance (the
 * module's shared pass table is untouched). If the library renames the list, start-up fails
 * here rather than silently smuggling again; `proxy.test.ts` ("a chunked DELETE or OPTIONS
 * body...") pins the behaviour.
 */
function withoutDeleteLengthPass(proxy: ProxyServer): void {
  const internals = proxy as unknown as { webPasses?: unknown };
  if (!Array.isArray(internals.webPasses)) throw new Error('http-proxy-3 internals changed: ProxyServer.webPasses is not a list of passes');
  internals.webPasses = internals.webPasses.filter((pass: unknown) => typeof pass !== 'function' || pass.name !== 'deleteLength');
}

/** Write errors that mean the sandbox closed or reset the connection, which it may have answered first. */
const PEER_CLOSED_WRITE_CODES: ReadonlySet<string> = new Set(['EPIPE', 'ECONNRESET']);

/**
 * An upstream socket that survives a write failing because the sandbox closed the connection,
 * so that an answer the sandbox sent before closing is still read and relayed.
 *
 * A sandbox may answer an upload early without reading it (413, 401) and close; its kernel
 * then resets the connection as more of the body arrives. The answer is already in this
 * side's receive buffer, but a net.Socket destroys itself on the write error (EPIPE) before it
 * reads that buffer, and the client got `502` for a sandbox that had answered. Here such a
 * write is dropped instead, and so is the rest of the body (the sandbox is not reading it);
 * the socket keeps reading: the answer is parsed and relayed, then the read side ends or fails
 * by itself (the reset), and the idle timer still bounds the wait when there is no answer.
 */
class UpstreamSocket extends net.Socket {
  /** A write failed because the sandbox closed the connection; see UpstreamAgent.keepSocketAlive. */
  peerClosedDuringWrite = false;
  /** HTTP only: an upgraded (WebSocket) connection fails on a write error as any socket does. */
  toleratesClosedWrites = true;

  override _write(chunk: unknown, encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.peerClosedDuringWrite) {
      callback();
      return;
    }
    super._write(chunk, encoding, (error) => callback(this.tolerated(error)));
  }

  override _writev(chunks: Array<{ chunk: unknown; encoding: BufferEncoding }>, callback: (error?: Error | null) => void): void {
    if (this.peerClosedDuringWrite) {
      callback();
      return;
    }
    super._writev!(chunks, (error) => callback(this.tolerated(error)));
  }

  private tolerated(error: Error | null | undefined): Error | null | undefined {
    if (!error || !this.toleratesClosedWrites || !PEER_CLOSED_WRITE_CODES.has((error as NodeJS.ErrnoException).code ?? '')) return error;
    this.peerClosedDuringWrite = true;
    return null;
  }
}

/**
 * What a client may send before its handshake's 101 that is kept for the WebSocket. A conforming
 * client sends nothing then (RFC 6455 §4.1: it waits for the server's handshake); the bound stops
 * one that does from growing the buffer without limit.
 */
const MAX_EARLY_CLIENT_BYTES = 64 * 1024;

/**
 * Reads an upgrade's client socket while the handshake is pending upstream, so that a client
 * that leaves meanwhile is noticed.
 *
 * Node hands the socket over paused, and the library reads it only once it pipes it after a 101:
 * until then a client's FIN went unseen (and the server's sockets are allowHalfOpen, so a FIN
 * would not close one by itself either). The upstream handshake then stayed open until the
 * handshake deadline, no client_aborted was counted, and a handshake queued for a busy pool was
 * still sent once a socket freed, for a client long gone.
 *
 * A FIN before the 101 is the client leaving, as Node's HTTP server takes it for a request
 * (httpAllowHalfOpen false): the socket is destroyed, and its 'close' ends the exchange. What
 * the client sends before the 101 is kept and put back in front of the socket for the library's
 * pipe; past MAX_EARLY_CLIENT_BYTES the socket is paused instead, as Node handed it over (only
 * such a client goes unnoticed if it leaves). After a plain (non-101) answer nothing will read
 * what the client sends (the connection closes once the answer is relayed): it is dropped, and
 * the socket is still read to see the client leave.
 */
class HandshakeClientReader {
  private early: Buffer[] | undefined = [];
  private earlyBytes = 0;

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.once('end', this.onEnd);
  }

  /** The sandbox answered 101: stop reading and put back what was read, before the library pipes the socket. */
  handOver(): void {
    // Paused first: without a 'data' listener a flowing socket would drop what it reads next.
    this.socket.pause();
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    const early = this.early;
    this.early = undefined;
    if (early !== undefined && early.length > 0 && !this.socket.destroyed) this.socket.unshift(Buffer.concat(early));
  }

  /** The sandbox answered with plain HTTP: what the client sends from now on is dropped. */
  answeredPlainly(): void {
    this.early = undefined;
    this.socket.resume(); // paused at the bound: read again, to see the client leave
  }

  private readonly onData = (chunk: Buffer): void => {
    if (this.early === undefined) return;
    this.early.push(chunk);
    this.earlyBytes += chunk.length;
    if (this.earlyBytes >= MAX_EARLY_CLIENT_BYTES) this.socket.pause();
  };

  private readonly onEnd = (): void => {
    this.socket.destroy();
  };
}

/** What UpstreamAgent hands each upstream request to. */
interface UpstreamRequestClaimant {
  upstreamRequest: ClientRequest | undefined;
}

type AddRequest = (this: http.Agent, request: ClientRequest, options: unknown) => void;
const agentAddRequest = (http.Agent.prototype as unknown as { addRequest: AddRequest }).addRequest;

/**
 * The keep-alive agent to the sandboxes, which lets the data plane withdraw an upstream request
 * that is still queued for a pooled socket (every socket busy) when its exchange ends first:
 * a pool-wait timeout (504) or a client that went away.
 *
 * Node 20's agent keeps such a request queued even once it is destroyed, holding it (and the
 * library's listeners with their request, response and exchange) until a socket frees, which
 * may be hours behind SSE streams or long polls; and the library would only see the request
 * once it gets a socket, which the data plane then had to destroy: one connection opened and
 * dropped per stale request, each ahead of fresh requests. The library creates the upstream
 * request synchronously inside `web()`, and Node's ClientRequest constructor calls
 * `agent.addRequest` synchronously (an undocumented but long-stable method, absent from
 * @types/node), so `claimant`, set only for the duration of that call, is told which request
 * is the exchange's before any socket is assigned.
 */
class UpstreamAgent extends http.Agent {
  claimant: UpstreamRequestClaimant | undefined;

  /** net.createConnection(), with an UpstreamSocket. */
  override createConnection(options: http.ClientRequestArgs): Duplex {
    const socket = new UpstreamSocket(options as net.SocketConstructorOpts);
    if (options.timeout) socket.setTimeout(options.timeout);
    return socket.connect(options as net.NetConnectOpts);
  }

  /**
   * A socket the sandbox closed while a request was being written to it is never reused, nor
   * one the sandbox's keep-alive hint says it is about to close.
   */
  override keepSocketAlive(socket: Duplex): boolean {
    if (socket instanceof UpstreamSocket && socket.peerClosedDuringWrite) return false;
    // Node's agent reads the sandbox's `Keep-Alive: timeout=N` from the response's headers (it
    // keeps the socket N - 1 s, or not at all for N <= 1), but cleanResponseHeaders has removed
    // it there, as hop-by-hop, before the client's answer was written: without it every socket
    // was kept for the agent's own timeout, and a sandbox that closes sooner got the next request
    // on a closing socket (502). It is put back from the raw headers, which nothing edits.
    const res = (socket as { _httpMessage?: { res?: IncomingMessage } | null })._httpMessage?.res;
    if (res && res.headers['keep-alive'] === undefined) {
      const hint = rawHeader(res.rawHeaders, 'keep-alive');
      if (hint !== undefined) res.headers['keep-alive'] = hint;
    }
    // Node's own returns whether to keep it (false for a server's keep-alive hint of 1 s or
    // less); @types/node types it as void.
    return (super.keepSocketAlive(socket) as unknown as boolean | undefined) !== false;
  }

  addRequest(request: ClientRequest, options: unknown): void {
    if (this.claimant) {
      this.claimant.upstreamRequest = request;
      this.claimant = undefined;
    }
    agentAddRequest.call(this, request, options);
  }

  /** Destroy a request that has no socket yet and take it out of the agent's queue. */
  withdraw(request: ClientRequest): void {
    request.destroy();
    const queues = this.requests as Record<string, ClientRequest[] | undefined>;
    for (const name in queues) {
      const queue = queues[name];
      const index = queue ? queue.indexOf(request) : -1;
      if (!queue || index === -1) continue;
      queue.splice(index, 1);
      // As Node does once a queue is drained: an empty queue is not kept.
      if (queue.length === 0) delete queues[name];
      return;
    }
  }
}

/** An upgrade that offers h2c and nothing else (a WebSocket handshake never does). */
function offersOnlyH2c(req: IncomingMessage): boolean {
  const offered = headerTokens(String(req.headers.upgrade ?? ''));
  return offered.size === 1 && offered.has('h2c');
}

export class DataPlane {
  readonly server: http.Server;
  private readonly config: Config;
  private readonly table: Pick<RouteTable, 'getById'>;
  private readonly metrics: Metrics;
  private readonly logger: Logger;
  private readonly webSocketCloseTimeoutMs: number;
  private readonly agent: UpstreamAgent;
  private readonly proxy: ProxyServer;
  /** HTTP exchanges not yet recorded (a count: see EXCHANGE for why no collection holds them). */
  private inFlightCount = 0;
  /** Upgrade requests whose handshake is not settled yet. */
  private readonly upgrading = new Set<Socket>();
  private readonly webSockets = new Set<ProxiedWebSocket>();
  private readonly webSocketsByUpstream = new WeakMap<Socket, ProxiedWebSocket>();
  private readonly recheckTimer: NodeJS.Timeout;
  /** Rounds of recheckWebSockets so far (tests wait on it). */
  private recheckRounds = 0;
  private draining = false;
  private closing: Promise<void> | undefined;
  private onQuietCheck: (() => void) | undefined;

  constructor(options: DataPlaneOptions) {
    this.config = options.config;
    this.table = options.table;
    this.metrics = options.metrics;
    this.logger = options.logger.child({ component: 'data-plane' });
    this.webSocketCloseTimeoutMs = options.webSocketCloseTimeoutMs ?? DEFAULT_WS_CLOSE_TIMEOUT_MS;
    this.recheckTimer = setInterval(() => this.recheckWebSockets(), options.webSocketRecheckMs ?? DEFAULT_WS_RECHECK_MS);
    this.recheckTimer.unref();

    this.agent = new UpstreamAgent({
      keepAlive: true,
      maxSockets: this.config.proxyMaxSockets,
      maxFreeSockets: this.config.proxyMaxSockets,
      timeout: options.upstreamIdleSocketTimeoutMs ?? DEFAULT_UPSTREAM_IDLE_SOCKET_TIMEOUT_MS,
      scheduling: 'lifo',
    });
    // xfwd off: headers.ts sets X-Forwarded-* itself (the library would trust client values).
    // toProxy: the library sends req.url as it is (set to the origin-form target, see target.ts
    // upstreamPath) instead of reparsing it as a WHATWG URL, which resolves dot segments, turns
    // `\` into `/` and percent-encodes query characters (a signed query would break).
    this.proxy = new ProxyServer({ agent: this.agent, xfwd: false, prependPath: false, toProxy: true });
    withoutDeleteLengthPass(this.proxy);
    this.proxy.on('error', (error, req) => this.onLibraryError(error, req));
    this.proxy.on('econnreset', (_error, req) => this.markClientGone(req));
    this.proxy.on('proxyReq', (proxyReq, req, res) => this.onProxyRequest(proxyReq, req, res));
    this.proxy.on('proxyRes', (proxyRes, req, res) => this.onProxyResponse(proxyRes, req, res));
    this.proxy.on('proxyReqWs', (proxyReq, req) => this.onProxyWebSocketRequest(proxyReq, req));
    this.proxy.on('open', (upstream) => this.onWebSocketOpen(upstream));

    // requestTimeout 0: Node's default (300 s for the whole request) would cut a long upload.
    // headersTimeout must then be set explicitly: Node derives its default from requestTimeout,
    // and 0 would let a client that never finishes its headers hold a connection forever.
    const headersTimeoutMs = options.clientHeadersTimeoutMs ?? DEFAULT_CLIENT_HEADERS_TIMEOUT_MS;
    this.server = http.createServer({
      requestTimeout: 0,
      headersTimeout: headersTimeoutMs,
      connectionsCheckingInterval: Math.min(30_000, headersTimeoutMs),
    });
    this.server.on('request', (req: IncomingMessage, res: ServerResponse) => this.guard(() => this.onRequest(req, res, false), res));
    // Answering Expect: 100-continue ourselves means a refused request never sends its body.
    this.server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => this.guard(() => this.onRequest(req, res, true), res));
    // Any other expectation: refused, 417 (RFC 9110 §10.1.1), as a request of ours, logged and
    // counted; without a listener Node answered it itself, and nothing recorded it.
    this.server.on('checkExpectation', (req: IncomingMessage, res: ServerResponse) => this.guard(() => this.onRequest(req, res, false, true), res));
    this.server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
      this.afterPendingAnswer(socket, () => {
        try {
          if (offersOnlyH2c(req)) this.serveWithoutUpgrade(req, socket, head);
          else this.onUpgrade(req, socket, head);
        } catch (error) {
          this.logger.error({ err: error }, 'data plane upgrade handler failed');
          socket.destroy();
        }
      });
    });
    // CONNECT (a forward proxy's tunnel): Node hands the socket over as for an upgrade, and
    // without a listener destroys it, answering nothing and recording nothing.
    this.server.on('connect', (req: IncomingMessage, socket: Socket) => {
      socket.on('error', () => {});
      this.afterPendingAnswer(socket, () => {
        const exchange = this.begin(req, 'http');
        this.refuseUpgrade(exchange, socket, dataPlaneError('unsupported_method', 'CONNECT is not supported: this is a reverse proxy to sandboxes, not a forward proxy'));
      });
    });
    // Once listening (an accept failure such as EMFILE); a failure to bind is listen()'s, which
    // start-up reports as one configuration line.
    this.server.on('error', (error) => {
      if (this.server.listening) this.logger.error({ err: error }, 'data plane listener error');
    });
  }

  /** Listen on config.proxyAddr (port 0 picks a free port). */
  listen(): Promise<AddressInfo> {
    const { host, port } = this.config.proxyAddr;
    return new Promise((resolve, reject) => {
      const onError = (error: Error): void => reject(error);
      this.server.once('error', onError);
      this.server.listen(port, host, () => {
        this.server.off('error', onError);
        const address = this.server.address() as AddressInfo;
        this.logger.info({ address: address.address, port: address.port }, 'data plane listening');
        resolve(address);
      });
    });
  }

  /**
   * Stop accepting; let in-flight HTTP requests finish; after graceMs close WebSockets cleanly
   * (close frame 1001) and destroy what is left. Resolves once every socket is closed. Calling
   * it again returns the same promise.
   */
  close(graceMs: number): Promise<void> {
    this.closing ??= this.shutdown(graceMs);
    return this.closing;
  }

  // --- HTTP ---------------------------------------------------------------------------------

  private onRequest(req: IncomingMessage, res: ServerResponse, expectsContinue: boolean, unknownExpectation = false): void {
    const exchange = this.begin(req, 'http');
    this.inFlightCount++;
    // Listeners before the library's: they run first, so the library's own reactions to the
    // same events (destroying the upstream request) find the exchange already marked.
    res.on('close', () => this.onResponseClose(exchange, res));
    req.on('error', (error) => {
      exchange.clientError = error;
    });
    if (this.draining) res.shouldKeepAlive = false;
    if (unknownExpectation) {
      this.respondError(exchange, res, dataPlaneError('unsupported_expectation', 'the only expectation proxied is 100-continue'));
      return;
    }

    // Node decodes only `chunked`, and takes a list that ends with it (`identity, chunked`) as
    // chunked; passed on as written, such a value could make the sandbox's parser frame the
    // body otherwise than Node did, on a connection shared by every client of the sandbox
    // (request smuggling). Any coding but `chunked` alone is refused (RFC 9112 §6.1: 501).
    const codings = req.headers['transfer-encoding'];
    if (codings !== undefined && codings.trim().toLowerCase() !== 'chunked') {
      this.respondError(exchange, res, dataPlaneError('unsupported_transfer_coding', 'the only transfer coding proxied is chunked, alone'));
      return;
    }

    const decision = decide(req, (id) => this.table.getById(id), this.config);
    if (!decision.ok) {
      exchange.sandboxId = decision.sandboxId;
      exchange.port = decision.port;
      this.respondError(exchange, res, decision.error);
      return;
    }
    exchange.sandboxId = decision.address.sandboxId;
    exchange.port = decision.address.port;
    exchange.admittedRoute = decision.route;
    exchange.admittedAddress = decision.address;
    exchange.clientHeaders = req.headers;

    req.headers = upstreamRequestHeaders(req.headers, { requestTarget: req.url, remoteAddress: req.socket.remoteAddress, protocol: 'http', upgrade: false, trustForwardedProto: this.config.proxyTrustForwardedProto });
    req.url = decision.address.upstreamPath;
    if (expectsContinue) res.writeContinue();

    exchange.timer = setTimeout(() => this.onUpstreamTimeout(exchange, res), this.config.proxyTimeoutMs);
    attachExchange(req, exchange);
    this.agent.claimant = exchange;
    try {
      this.proxy.web(req, res, { target: this.libraryTarget(decision.target) }, (error) => this.onWebError(exchange, res, error));
    } finally {
      this.agent.claimant = undefined;
    }
  }

  /** Socket assigned to the upstream request: the connect, then the wait for headers, are timed. */
  private onProxyRequest(proxyReq: ClientRequest, req: IncomingMessage, res: ServerResponse): void {
    const exchange = exchangeOf(req);
    if (!exchange) return;
    if (exchange.outcome !== undefined) {
      // Already answered (timed out while waiting for a pooled socket): never send it.
      proxyReq.destroy();
      return;
    }
    // The socket came now; the route may have changed while the request waited for it.
    const refusal = this.readmitted(exchange);
    if (refusal) {
      this.respondError(exchange, res, refusal);
      proxyReq.destroy();
      return;
    }
    exchange.checkedRound = this.recheckRounds;
    exchange.proxyReq = proxyReq;
    // A 101 to a request that asked for no upgrade (RFC 9110 §15.2.2: a server must not send
    // one): without a listener Node destroys the socket and the request ends with neither an
    // answer nor an error, so the client waited for ever, past the upstream timeout too.
    proxyReq.once('upgrade', (_proxyRes: IncomingMessage, upstream: Socket) => {
      upstream.destroy();
      this.respondError(exchange, res, switchedProtocolsError());
    });
    const socket = proxyReq.socket;
    const startIdleTimer = (): void => {
      if (exchange.outcome !== undefined || exchange.status !== undefined) {
        clearTimeout(exchange.timer);
        exchange.timer = undefined;
        return;
      }
      if (!exchange.hasBody) {
        // Nothing will move upstream before the answer, so "idle until the headers" is one
        // plain wait from now: the exchange's own timer, re-armed (cheaper than a socket timer,
        // which adds and removes listeners on every request).
        exchange.timer?.refresh();
        return;
      }
      clearTimeout(exchange.timer);
      exchange.timer = undefined;
      exchange.idleTimer = true;
      proxyReq.setTimeout(this.config.proxyTimeoutMs, () => {
        if (exchange.status !== undefined) return;
        exchange.timedOut = true;
        proxyReq.destroy();
      });
    };
    if (socket && socket.connecting) socket.once('connect', startIdleTimer);
    else startIdleTimer();
  }

  private onProxyResponse(proxyRes: IncomingMessage, req: IncomingMessage, res: ServerResponse): void {
    const exchange = exchangeOf(req);
    if (!exchange) return;
    clearTimeout(exchange.timer);
    exchange.timer = undefined;
    if (exchange.outcome !== undefined) {
      exchange.proxyReq?.destroy();
      return;
    }
    // The wait for the answer may have outlasted the route that admitted the request (a long
    // poll whose token was rotated meanwhile): checked again before anything of it is relayed,
    // headers (a Set-Cookie) included.
    const refusal = this.routeRefusesSince(exchange);
    if (refusal) {
      exchange.proxyReq?.destroy();
      this.respondError(exchange, res, refusal);
      return;
    }
    const unrelayable = unrelayableAnswer(proxyRes);
    if (unrelayable) {
      exchange.proxyReq?.destroy();
      this.respondError(exchange, res, unrelayable);
      return;
    }
    exchange.status = proxyRes.statusCode;
    // The response now streams for as long as it takes: no idle limit on a started response.
    if (exchange.idleTimer) exchange.proxyReq?.setTimeout(0);
    cleanResponseHeaders(proxyRes.headers);
    // A request that was in flight when the drain started: its connection closes after this
    // answer, so the answer must not invite the client to send another request into it.
    if (this.draining) res.shouldKeepAlive = false;
    // http-proxy-3 copies this to the client; say what Node will actually do with the connection.
    proxyRes.headers.connection = res.shouldKeepAlive ? 'keep-alive' : 'close';
    // An upstream that dies mid-body: the library's pipe would leave the client waiting for
    // the rest forever, so cut the client response (it sees a truncated body, not a hang).
    proxyRes.on('error', () => {});
    proxyRes.on('close', () => {
      if (proxyRes.complete || res.writableEnded) return;
      exchange.outcome ??= 'upstream_unreachable';
      res.destroy();
    });
    // A sandbox that answers an upload early and closes (a 413 or 401 with Connection: close)
    // ends the upstream request, and the library's pipe stops reading the client's body with
    // it: the rest of the upload then sat unread, so the client's keep-alive connection, which
    // the answer said stays open, never got its next request read. The rest is read and
    // dropped instead, as Node does for a handler that leaves a body unread. (A request without
    // a body has nothing left to read: no listener for it.)
    if (exchange.hasBody) {
      const proxyReq = exchange.proxyReq;
      proxyReq?.once('close', () => {
        if (!req.complete && !req.destroyed) req.resume();
      });
      // The sandbox's whole answer came before the whole upload (a 401 to an upload it did not
      // read, on a connection it keeps): the rest of the upload is of no use to it, and the
      // upstream request, half-written, can never be reused. It is ended here, and the rest of
      // the client's body dropped (above). Left to the client, the sandbox's connection and its
      // pool slot stayed held by a client that went away (Node has detached the request from
      // its socket by then, and a paused socket does not even see its peer leave) until the
      // sandbox's own timeout, or for ever against one without a timeout.
      proxyRes.once('end', () => {
        if (!req.complete) proxyReq?.destroy();
      });
    }
    // Before the library's pipe, which pauses the answer while the client's socket is full.
    this.guardAnswer(
      exchange,
      proxyRes,
      res,
      () => res.socket,
      () => exchange.outcome !== undefined,
      (outcome) => {
        exchange.outcome = outcome;
        res.destroy();
      },
    );
    // Node writes a response's headers with its first body bytes: an answer that starts before
    // its body (an event stream, a long poll) reached the client only with its first event, and
    // a client waiting for the headers (EventSource's open, fetch) waited that long. Once the
    // library has set the headers (its passes run right after this listener), they are sent at
    // once unless body bytes came with them, which carry them in the same write.
    process.nextTick(flushHeadersAlone, res, proxyRes);
  }

  private onUpstreamTimeout(exchange: Exchange, res: ServerResponse): void {
    exchange.timer = undefined;
    if (exchange.outcome !== undefined || exchange.status !== undefined) return;
    exchange.timedOut = true;
    if (exchange.proxyReq) {
      // Connecting: destroying it reports an error to onWebError, which answers 504.
      exchange.proxyReq.destroy();
      return;
    }
    // Still waiting for a pooled socket: give up its place in the queue and answer now.
    this.withdrawQueued(exchange);
    this.respondError(exchange, res, upstreamTimeoutError(this.config.proxyTimeoutMs));
  }

  private onWebError(exchange: Exchange, res: ServerResponse, error: unknown): void {
    clearTimeout(exchange.timer);
    exchange.timer = undefined;
    if (exchange.outcome !== undefined) return;
    if (error === exchange.clientError || res.destroyed) {
      exchange.outcome = 'client_aborted';
      res.destroy();
      return;
    }
    // The response had started: its own 'close' (onProxyResponse) cuts the client response if
    // it is incomplete and leaves a complete one alone (a sandbox that answered an upload
    // early, then reset the connection: see UpstreamSocket).
    if (exchange.status !== undefined) return;
    const answer = this.upstreamFailure(exchange, error);
    this.respondError(exchange, res, answer);
  }

  /**
   * What a failed upstream request (or WebSocket handshake) is answered. The sandbox's failures
   * are logged at debug (their metric counts them); this replica's own shortage at warn, since
   * it is the operator's to fix (`ulimit -n`).
   */
  private upstreamFailure(exchange: Exchange, error: unknown): DataPlaneError {
    const answer = exchange.timedOut ? upstreamTimeoutError(this.config.proxyTimeoutMs) : classifyUpstreamError(error);
    const fields = { sandboxId: exchange.sandboxId, port: exchange.port, code: answer.code, cause: (error as { code?: string }).code };
    if (answer.code === 'proxy_overloaded') this.logger.warn(fields, 'out of file descriptors or socket buffers: sandbox traffic refused with 503');
    else this.logger.debug(fields, 'upstream request failed');
    return answer;
  }

  private respondError(exchange: Exchange, res: ServerResponse, error: DataPlaneError): void {
    clearTimeout(exchange.timer);
    exchange.timer = undefined;
    exchange.outcome ??= error.code;
    if (res.headersSent || res.destroyed) {
      // Mid-response: all the client can be told is that the response is cut short.
      res.destroy();
      return;
    }
    exchange.status = error.status;
    const body = errorBody(error);
    const headers = errorResponseHeaders(error, body);
    // An unread request body would have to be drained before the connection could be reused;
    // and while draining, the connection closes after this answer anyway.
    if (this.draining || (exchange.hasBody && !exchange.clientError)) res.shouldKeepAlive = false;
    res.writeHead(error.status, headers);
    res.end(body);
  }

  private onResponseClose(exchange: Exchange, res: ServerResponse): void {
    clearTimeout(exchange.timer);
    exchange.timer = undefined;
    // A client that went away while its request waited for a pooled socket.
    this.withdrawQueued(exchange);
    if (exchange.outcome === undefined) exchange.outcome = res.writableFinished ? 'proxied' : 'client_aborted';
    const status = res.headersSent ? res.statusCode : exchange.outcome === 'client_aborted' ? 499 : (exchange.status ?? 0);
    this.record(exchange, status);
    this.inFlightCount--;
    if (this.draining) setImmediate(() => this.server.closeIdleConnections());
    this.onQuietCheck?.();
  }

  /** An exchange that ends before its upstream request got a socket takes it out of the agent's queue. */
  private withdrawQueued(exchange: Exchange): void {
    const request = exchange.upstreamRequest;
    if (request === undefined || exchange.proxyReq !== undefined || request.socket) return;
    exchange.upstreamRequest = undefined;
    this.agent.withdraw(request);
  }

  /**
   * An `Upgrade: h2c` (curl --http2 to an http:// URL, some gRPC clients): served as the
   * HTTP/1.1 request it also is, as a server that does not speak h2c does (RFC 9110 §7.8 lets a
   * server ignore Upgrade; RFC 9113 §3.1, the client goes on in HTTP/1.1). Node has already
   * taken the socket out of HTTP parsing, so the request is written back in front of what
   * followed it, without its `Upgrade` header (without it Node's parser sees no upgrade), and
   * the socket handed to the server as a new connection (the documented way to inject one): its
   * parser reads it as any request, body and pipelined requests included. `Connection` and
   * `HTTP2-Settings` stay: like every request's hop-by-hop headers, upstreamRequestHeaders
   * drops them before the sandbox.
   */
  private serveWithoutUpgrade(req: IncomingMessage, socket: Socket, head: Buffer): void {
    const lines = [`${req.method ?? 'GET'} ${req.url ?? '/'} HTTP/${req.httpVersion}`];
    const raw = req.rawHeaders;
    for (let i = 0; i + 1 < raw.length; i += 2) {
      if (raw[i]!.toLowerCase() !== 'upgrade') lines.push(`${raw[i]!}: ${raw[i + 1]!}`);
    }
    // latin1: header bytes as they came (Node decodes raw headers as latin1).
    socket.unshift(Buffer.concat([Buffer.from(`${lines.join('\r\n')}\r\n\r\n`, 'latin1'), head]));
    // Parsed again only now that any earlier answer on the connection has finished
    // (afterPendingAnswer): otherwise this request's answer would queue behind that one in a
    // fresh connection state that nothing ever drains, and the client would wait for ever.
    this.server.emit('connection', socket);
  }

  /**
   * Node emits 'upgrade' as soon as the request is parsed, even while the answers to earlier
   * requests on the same connection (pipelined) are still being written. Handled at once, the
   * upgrade's own answer (a 101, a refusal, the h2c request's answer) would reach the client
   * before those, or inside one's body, against HTTP/1.1's order. So it is handled once every
   * earlier answer has finished, one after the other, after Node's own handling of each end;
   * what the client sent after the upgrade stays unread in the socket meanwhile. If an answer
   * closed the connection (`Connection: close`), the upgrade is dropped with it.
   *
   * While it waits, the socket has none of Node's HTTP listeners (removed with the upgrade) and
   * none of the exchange's yet: it gets an error listener (a client's reset would otherwise be
   * an uncaught exception, which ends the process), and it counts as upgrading, so that
   * shutdown waits for it and destroys it at the end of its grace like any handshake.
   */
  private afterPendingAnswer(socket: Socket, handle: () => void): void {
    // A client gone while it waited: its pending answer closed (unfinished, and still the
    // socket's: Node no longer tends it), and nothing more will come.
    if (socket.destroyed) {
      this.onQuietCheck?.();
      return;
    }
    const pending = (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage;
    if (pending && !pending.writableFinished && !pending.destroyed) {
      const onError = (): void => void socket.destroy();
      const onClose = (): void => {
        this.upgrading.delete(socket);
        this.onQuietCheck?.();
      };
      socket.on('error', onError);
      socket.once('close', onClose);
      this.upgrading.add(socket);
      // 'close' follows 'finish' and also comes when the answer is cut off (the client left).
      pending.once('close', () =>
        setImmediate(() => {
          socket.off('error', onError);
          socket.off('close', onClose);
          this.upgrading.delete(socket);
          this.afterPendingAnswer(socket, handle);
        }),
      );
      return;
    }
    if (socket.writableEnded || pending?.destroyed === true) {
      socket.destroy();
      return;
    }
    // The connection's HTTP state armed its keep-alive timer when the last answer finished;
    // left armed, it would cut the upgrade's exchange after 5 s.
    socket.setTimeout(0);
    handle();
  }

  // --- WebSocket ----------------------------------------------------------------------------

  private onUpgrade(req: IncomingMessage, socket: Socket, head: Buffer): void {
    const exchange = this.begin(req, 'websocket');
    this.upgrading.add(socket);
    socket.on('error', (error) => {
      exchange.clientError ??= error;
    });
    socket.once('close', () => {
      this.upgrading.delete(socket);
      clearTimeout(exchange.timer);
      if (exchange.outcome === undefined) {
        // The client left before the handshake finished: drop the upstream handshake too.
        exchange.outcome = 'client_aborted';
        this.dropUpstreamHandshake(exchange.proxyReq);
        this.record(exchange, 499);
      }
      this.onQuietCheck?.();
    });

    const upgrade = String(req.headers.upgrade ?? '').toLowerCase();
    if (req.method !== 'GET' || upgrade !== 'websocket') {
      this.refuseUpgrade(exchange, socket, dataPlaneError('unsupported_upgrade', 'only WebSocket upgrades (GET with Upgrade: websocket) are proxied'));
      return;
    }
    // A handshake has no body (RFC 6455 §4.1), and Node gives an upgrade none: what follows its
    // headers is the WebSocket's. Passed on, a `Content-Length: N` would tell the sandbox that N
    // bytes follow which never come, and a sandbox that answers plainly and keeps the connection
    // would take them from the next request on it, whoever sent that (request smuggling); a
    // `Transfer-Encoding` would have Node write a chunked terminator into the WebSocket stream.
    if (req.headers['transfer-encoding'] !== undefined || (req.headers['content-length'] ?? '0') !== '0') {
      this.refuseUpgrade(exchange, socket, dataPlaneError('unsupported_upgrade', 'a WebSocket handshake has no body: no Content-Length (other than 0) or Transfer-Encoding'));
      return;
    }
    const decision = decide(req, (id) => this.table.getById(id), this.config);
    if (!decision.ok) {
      exchange.sandboxId = decision.sandboxId;
      exchange.port = decision.port;
      this.refuseUpgrade(exchange, socket, decision.error);
      return;
    }
    exchange.sandboxId = decision.address.sandboxId;
    exchange.port = decision.address.port;
    exchange.admittedRoute = decision.route;
    exchange.admittedAddress = decision.address;
    exchange.clientHeaders = req.headers;

    req.headers = upstreamRequestHeaders(req.headers, { requestTarget: req.url, remoteAddress: socket.remoteAddress, protocol: 'http', upgrade: true, trustForwardedProto: this.config.proxyTrustForwardedProto });
    req.url = decision.address.upstreamPath;
    // The handshake is small: a hard deadline from the start (pooled-socket wait included).
    exchange.timer = setTimeout(() => {
      exchange.timer = undefined;
      if (exchange.outcome !== undefined) return;
      exchange.timedOut = true;
      // With a socket, the error reaches onWebSocketError, which answers 504.
      if (this.dropUpstreamHandshake(exchange.proxyReq)) return;
      this.refuseUpgrade(exchange, socket, upstreamTimeoutError(this.config.proxyTimeoutMs));
    }, this.config.proxyTimeoutMs);
    attachExchange(req, exchange);
    exchange.handshakeClient = new HandshakeClientReader(socket);
    this.proxy.ws(req, socket, head, { target: this.libraryTarget(decision.target) }, (error) => this.onWebSocketError(exchange, socket, error));
  }

  private onProxyWebSocketRequest(proxyReq: ClientRequest, req: IncomingMessage): void {
    const exchange = exchangeOf(req);
    if (!exchange) return;
    if (exchange.outcome !== undefined) {
      proxyReq.destroy();
      return;
    }
    exchange.proxyReq = proxyReq;
    const client = req.socket;
    // The library hands the handshake over at its creation; it is checked again once it has a
    // socket (Node writes it after this event), as a plain request is in onProxyRequest.
    proxyReq.once('socket', () => {
      const refusal = this.readmitted(exchange);
      if (!refusal) {
        exchange.checkedRound = this.recheckRounds;
        return;
      }
      this.refuseUpgrade(exchange, client, refusal);
      proxyReq.destroy();
    });
    // Registered before the library's own 'upgrade' listener, so this runs first: the 101 has
    // not been written yet and the sockets are not piped yet.
    proxyReq.once('upgrade', (_proxyRes: IncomingMessage, upstream: Socket) => {
      clearTimeout(exchange.timer);
      exchange.timer = undefined;
      if (exchange.outcome !== undefined) {
        upstream.destroy();
        return;
      }
      // As for a plain answer: a route that stopped admitting the handshake while it waited.
      const revoked = this.routeRefusesSince(exchange);
      if (revoked) {
        upstream.destroy();
        this.refuseUpgrade(exchange, client, revoked);
        return;
      }
      exchange.handshakeClient?.handOver();
      this.upgrading.delete(client);
      exchange.outcome = 'proxied';
      this.record(exchange, 101);
      this.trackWebSocket(client, upstream, exchange);
    });
    // The sandbox answered the handshake with plain HTTP (404, 401...): the library relays it,
    // writing the status line and headers to the socket itself, right after this listener.
    proxyReq.once('response', (proxyRes: IncomingMessage) => {
      clearTimeout(exchange.timer);
      exchange.timer = undefined;
      if (exchange.outcome !== undefined) return;
      exchange.handshakeClient?.answeredPlainly();
      const revoked = this.routeRefusesSince(exchange);
      if (revoked) {
        proxyRes.destroy();
        this.refuseUpgrade(exchange, client, revoked);
        return;
      }
      const unrelayable = unrelayableAnswer(proxyRes, true);
      if (unrelayable) {
        // Our 502 goes first and ends the socket; the library's write then fails on the ended
        // socket (its error is the socket's, already listened to) and writes nothing.
        proxyRes.destroy();
        this.refuseUpgrade(exchange, client, unrelayable);
        return;
      }
      // As on the HTTP path: no hop-by-hop header of the sandbox's reaches the client, and the
      // connection closes after this answer (the library ends the socket), which it says.
      // Set before the library's passes run, so they keep it (it would copy the request's
      // `Connection: Upgrade` otherwise).
      cleanResponseHeaders(proxyRes.headers);
      proxyRes.headers.connection = 'close';
      // Nor is the sandbox's connection reused: after a handshake, what it has read or will
      // read next is not certain to be the start of a request (defence in depth for the check
      // on bodies in onUpgrade).
      proxyReq.shouldKeepAlive = false;
      // Set now, so that nothing else answers; recorded once the answer has ended (as the
      // HTTP path does), by what ended it (endPlainAnswerWithClient).
      exchange.outcome = 'proxied';
      this.endPlainAnswerWithClient(exchange, proxyRes, client);
    });
  }

  /**
   * The library relays a plain answer to the client socket and closes that socket when the
   * answer ends, and only then; so whichever end goes first takes the other with it.
   *  - A client that leaves must release the upstream connection: a streaming answer (SSE, a
   *    long poll) would otherwise hold it for as long as the sandbox keeps it open, since the
   *    exchange is already recorded and the socket's 'close' handler in onUpgrade does nothing more.
   *  - A sandbox that cuts the answer short (a reset mid-body) must cut the client's connection,
   *    as the HTTP path does (onProxyResponse): the client sees a truncated answer, not a hang,
   *    and the socket stops counting as upgrading, which shutdown would wait out its whole grace for.
   * The exchange is recorded by whichever end goes first: `proxied` for a whole answer,
   * `client_aborted` for a client that left, `upstream_unreachable` for a cut answer.
   */
  private endPlainAnswerWithClient(exchange: Exchange, proxyRes: IncomingMessage, client: Socket): void {
    const status = proxyRes.statusCode ?? 0;
    // The library relays the answer chunk by chunk (`client.write(chunk)` in its own 'data'
    // listener) without backpressure: for a client that reads slowly or not at all, the whole
    // answer, however large, would be read from the sandbox and held here. The answer is paused
    // while the client's socket is full, checked once the library's write of the chunk has run
    // (this listener runs first, as it was added first).
    proxyRes.on('data', () => process.nextTick(holdBackWhileFull, proxyRes, client));
    // The same checks as a streaming HTTP answer's (an event stream asked for with an Upgrade
    // header must not outlive a revoked token), before the library's write, as above; the
    // exchange was marked `proxied` up front, so it is over once recorded.
    this.guardAnswer(
      exchange,
      proxyRes,
      client,
      () => client,
      () => exchange.recorded,
      (outcome) => {
        exchange.outcome = outcome;
        this.record(exchange, status);
        client.destroy();
      },
    );
    client.once('close', () => {
      if (proxyRes.complete || exchange.recorded) return;
      // A sandbox that cut the answer may have had the library close the client first (Node 24
      // does): its connection is gone already, which is not the case when the client leaves.
      exchange.outcome = proxyRes.socket?.destroyed ? 'upstream_unreachable' : 'client_aborted';
      this.record(exchange, status);
      proxyRes.destroy();
    });
    proxyRes.once('close', () => {
      if (!proxyRes.complete && !exchange.recorded) {
        exchange.outcome = 'upstream_unreachable';
        this.record(exchange, status);
        client.destroy();
        return;
      }
      this.record(exchange, status);
    });
  }

  /**
   * Give up an upstream handshake. Returns true when it had a socket: destroying it then
   * reports an error to onWebSocketError. One still waiting for a pooled socket reports
   * nothing until a socket frees, and is withdrawn from the agent's queue (as withdrawQueued
   * does for HTTP): Node 20 keeps a destroyed request queued and would still take a socket for it.
   */
  private dropUpstreamHandshake(proxyReq: ClientRequest | undefined): boolean {
    if (proxyReq === undefined) return false;
    if (proxyReq.socket) {
      proxyReq.destroy();
      return true;
    }
    this.agent.withdraw(proxyReq);
    return false;
  }

  /**
   * An open WebSocket was admitted once, at its handshake; a route that changes afterwards (the
   * sandbox paused, deleted or moved, its token rotated: a session revoked) closes it, 1001 to
   * both ends, as a new handshake would be refused. Checked every webSocketRecheckMs: one
   * reference comparison per open WebSocket when nothing changed.
   */
  private recheckWebSockets(): void {
    this.recheckRounds++;
    for (const ws of this.webSockets) {
      const { exchange } = ws;
      if (ws.revoked) continue;
      const refusal = this.stillAdmits(exchange);
      if (refusal === undefined) continue;
      ws.revoked = true;
      this.logger.info({ sandboxId: exchange.sandboxId, port: exchange.port, code: refusal.code }, 'websocket closed: its route no longer admits it');
      void this.goAway(ws);
    }
  }

  /**
   * The checks a streaming answer gets while it is relayed to `sink` (the client's response, or
   * its socket for a plain answer to a handshake). A long answer (an event stream, a download)
   * was admitted once, at its request: once a recheck round has passed since it was last
   * checked, its next chunk is checked against its route first (one counter comparison per
   * chunk otherwise), and a route that would refuse the request now cuts it before that chunk
   * reaches the client, as an open WebSocket is closed (recheckWebSockets). A pause (the
   * answer held back for a full client socket) arms the send timeout (watchSendStall). Added
   * before the library's own listeners, so these see each chunk and pause first. `over` says
   * whether the exchange has ended or been cut; `cut` ends the client's side with an outcome
   * (the upstream answer is destroyed here).
   */
  private guardAnswer(
    exchange: Exchange,
    proxyRes: IncomingMessage,
    sink: AnswerSink,
    clientSocket: () => Socket | null,
    over: () => boolean,
    cut: (outcome: 'route_changed' | 'client_stalled') => void,
  ): void {
    proxyRes.on('data', () => {
      if (over()) return;
      const refusal = this.routeRefusesSince(exchange);
      if (refusal === undefined) return;
      this.logger.info({ sandboxId: exchange.sandboxId, port: exchange.port, code: refusal.code }, 'response cut: its route no longer admits it');
      cut('route_changed');
      proxyRes.destroy();
    });
    if (this.config.proxySendTimeoutMs <= 0) return;
    proxyRes.on('pause', () => {
      const socket = clientSocket();
      if (socket === null || over()) return;
      this.watchSendStall(exchange, sink, socket, over, () => {
        cut('client_stalled');
        proxyRes.destroy();
      });
    });
  }

  /**
   * An answer held back because its client's socket is full holds a pooled upstream socket for
   * as long as the client makes no room: a client that opened many downloads and read none
   * would hold every socket of the sandbox's pool, and every other client of that sandbox would
   * wait for one until its 504. As nginx's send_timeout does, an answer that stays held back
   * for proxySendTimeoutMs without the client's socket draining once is cut (`cut`), its
   * upstream socket freed. A quiet stream (an event stream between events) is not held back and
   * is never cut by this (see guardAnswer for `sink`, `over` and `cut`).
   */
  private watchSendStall(exchange: Exchange, sink: AnswerSink, socket: Socket, over: () => boolean, cut: () => void): void {
    // The pipe also pauses the answer when it unpipes (the answer finished, or the client left):
    // only a pause for a full client socket is a stall.
    if (exchange.stallTimer !== undefined || over() || sink.writableEnded || !sink.writableNeedDrain) return;
    // Counts what was handed to the socket, its buffer included: unchanged while the answer is
    // held back, since nothing more is written until the socket's buffer has drained.
    let written = socket.bytesWritten;
    const timer = setTimeout(() => {
      if (over() || sink.destroyed || sink.writableEnded || !sink.writableNeedDrain) {
        exchange.stallTimer = undefined;
        return;
      }
      if (socket.bytesWritten !== written) {
        // It drained and is held back again: a new period.
        written = socket.bytesWritten;
        timer.refresh();
        return;
      }
      exchange.stallTimer = undefined;
      this.logger.info({ sandboxId: exchange.sandboxId, port: exchange.port, timeoutMs: this.config.proxySendTimeoutMs }, 'response cut: its client took none of it');
      cut();
    }, this.config.proxySendTimeoutMs);
    exchange.stallTimer = timer;
  }

  /**
   * Whether the route now serving an open exchange's sandbox ID still admits it: undefined if
   * so (one reference comparison when nothing changed; a change that still admits it, a newer
   * version with the same pod and token, becomes what it was admitted for), else the refusal a
   * new request would get.
   */
  private stillAdmits(exchange: Exchange): DataPlaneError | undefined {
    const { admittedRoute, admittedAddress, clientHeaders } = exchange;
    if (admittedRoute === undefined || admittedAddress === undefined || clientHeaders === undefined) return undefined;
    const current = this.table.getById(admittedAddress.sandboxId);
    if (current === admittedRoute) return undefined;
    const refusal = readmit(admittedAddress, admittedRoute, current, clientHeaders, this.config);
    if (refusal === undefined) exchange.admittedRoute = current;
    return refusal;
  }

  /**
   * Once a recheck round has passed since the exchange was last checked: the refusal a new
   * request would get now, if its route no longer admits it (stillAdmits). One counter
   * comparison otherwise.
   */
  private routeRefusesSince(exchange: Exchange): DataPlaneError | undefined {
    if (exchange.checkedRound === this.recheckRounds) return undefined;
    exchange.checkedRound = this.recheckRounds;
    return this.stillAdmits(exchange);
  }

  private trackWebSocket(client: Socket, upstream: Socket, exchange: Exchange): void {
    let resolveClosed!: () => void;
    const closed = new Promise<void>((resolve) => {
      resolveClosed = resolve;
    });
    if (upstream instanceof UpstreamSocket) upstream.toleratesClosedWrites = false;
    const ws: ProxiedWebSocket = { client, upstream, exchange, revoked: false, closed };
    this.webSockets.add(ws);
    this.webSocketsByUpstream.set(upstream, ws);
    this.metrics.proxyWebsockets.inc();
    let open = 2;
    // Once one side has ended (FIN) or closed, the other gets webSocketCloseTimeoutMs to finish,
    // then both are destroyed. The library only ends (FIN) the other side: a peer that never
    // answers a FIN (a frozen sandbox, a client that vanished) would hold a half-closed socket
    // forever, and one that no longer counts as open, so shutdown would not reach it either.
    let lingerTimer: NodeJS.Timeout | undefined;
    const linger = (): void => {
      lingerTimer ??= setTimeout(() => {
        client.destroy();
        upstream.destroy();
      }, this.webSocketCloseTimeoutMs);
    };
    const onClose = (other: Socket): void => {
      open -= 1;
      if (open === 1) {
        // One side is gone: the other is flushed, closed and released (not just sent a FIN);
        // the connection no longer counts.
        this.webSockets.delete(ws);
        this.metrics.proxyWebsockets.dec();
        other.destroySoon();
        linger();
        this.onQuietCheck?.();
      }
      if (open === 0) {
        clearTimeout(lingerTimer);
        resolveClosed();
      }
    };
    client.once('end', linger);
    upstream.once('end', linger);
    client.once('close', () => onClose(upstream));
    upstream.once('close', () => onClose(client));
  }

  /** The library has piped the two sockets: start following frames in each direction. */
  private onWebSocketOpen(upstream: Socket): void {
    const ws = this.webSocketsByUpstream.get(upstream);
    if (!ws) return;
    ws.toClient = new FrameRelay(upstream, ws.client, () => closeFrame(CLOSE_GOING_AWAY));
    ws.toUpstream = new FrameRelay(ws.client, upstream, () => closeFrame(CLOSE_GOING_AWAY, randomBytes(4)));
  }

  private onWebSocketError(exchange: Exchange, socket: Socket, error: unknown): void {
    clearTimeout(exchange.timer);
    exchange.timer = undefined;
    if (exchange.outcome !== undefined) {
      // An open WebSocket's upstream failed: the library closes the client; nothing to answer.
      this.logger.debug({ sandboxId: exchange.sandboxId, cause: (error as { code?: string }).code }, 'websocket upstream error');
      return;
    }
    if (error === exchange.clientError || socket.destroyed) {
      exchange.outcome = 'client_aborted';
      this.record(exchange, 499);
      return;
    }
    const answer = this.upstreamFailure(exchange, error);
    // The library calls socket.destroySoon() right after this callback: the answer is flushed first.
    this.writeSocketError(exchange, socket, answer);
  }

  private refuseUpgrade(exchange: Exchange, socket: Socket, error: DataPlaneError): void {
    clearTimeout(exchange.timer);
    exchange.timer = undefined;
    this.writeSocketError(exchange, socket, error);
    socket.destroySoon();
  }

  private writeSocketError(exchange: Exchange, socket: Socket, error: DataPlaneError): void {
    if (exchange.outcome !== undefined) return;
    exchange.outcome = error.code;
    this.record(exchange, error.status);
    if (!socket.writable || socket.destroyed) return;
    const body = errorBody(error);
    const lines = [`HTTP/1.1 ${error.status} ${http.STATUS_CODES[error.status] ?? ''}`];
    for (const [name, value] of Object.entries(errorResponseHeaders(error, body))) lines.push(`${name}: ${value}`);
    lines.push('connection: close');
    socket.write(`${lines.join('\r\n')}\r\n\r\n${body}`);
  }

  // --- shared -------------------------------------------------------------------------------

  private begin(req: IncomingMessage, kind: Exchange['kind']): Exchange {
    return {
      kind,
      startedAt: performance.now(),
      method: req.method ?? 'GET',
      path: splitRequestTarget(req.url ?? '/').pathname,
      remoteAddress: req.socket.remoteAddress,
      hasBody: hasRequestBody(req),
      sandboxId: undefined,
      port: undefined,
      outcome: undefined,
      status: undefined,
      timedOut: false,
      clientError: undefined,
      proxyReq: undefined,
      upstreamRequest: undefined,
      timer: undefined,
      stallTimer: undefined,
      idleTimer: false,
      handshakeClient: undefined,
      admittedRoute: undefined,
      admittedAddress: undefined,
      clientHeaders: undefined,
      recorded: false,
      checkedRound: this.recheckRounds,
    };
  }

  /** Undefined if the exchange may still go to the sandbox it was admitted for (readmit in target.ts). */
  private readmitted(exchange: Exchange): DataPlaneError | undefined {
    const { admittedRoute, admittedAddress, clientHeaders } = exchange;
    if (admittedRoute === undefined || admittedAddress === undefined || clientHeaders === undefined) return undefined;
    return readmit(admittedAddress, admittedRoute, this.table.getById(admittedAddress.sandboxId), clientHeaders, this.config);
  }

  /** The library's target: a literal IP from the route and the requested port, nothing else. */
  private libraryTarget(target: UpstreamTarget): { protocol: string; host: string; port: number } {
    return { protocol: 'http:', host: target.host, port: target.port };
  }

  /** Count, time and log one exchange, once. */
  private record(exchange: Exchange, status: number): void {
    if (exchange.recorded) return;
    exchange.recorded = true;
    clearTimeout(exchange.stallTimer);
    exchange.stallTimer = undefined;
    const outcome = exchange.outcome ?? 'proxied';
    const seconds = (performance.now() - exchange.startedAt) / 1000;
    this.metrics.proxyRequests.inc({ outcome });
    this.metrics.proxyDuration.observe({ outcome }, seconds);
    if (!this.config.accessLog) return;
    // Fields are chosen, never copied from the request: no header (so no token or
    // Authorization) and no query string can reach the log.
    this.logger.info(
      {
        kind: exchange.kind,
        method: exchange.method,
        path: exchange.path,
        sandboxId: exchange.sandboxId,
        port: exchange.port,
        status,
        outcome,
        durationMs: Math.round(seconds * 1e6) / 1e3,
        remoteAddress: exchange.remoteAddress,
      },
      'proxy request',
    );
  }

  private markClientGone(req: IncomingMessage): void {
    const exchange = exchangeOf(req);
    if (exchange && exchange.outcome === undefined) exchange.outcome = 'client_aborted';
  }

  /** The library's own 'error' event: client-socket errors of upgrades, and anything unforeseen. */
  private onLibraryError(error: unknown, req: IncomingMessage): void {
    const exchange = exchangeOf(req);
    if (exchange) exchange.clientError ??= error;
    this.logger.debug({ cause: (error as { code?: string }).code, sandboxId: exchange?.sandboxId }, 'proxy client socket error');
  }

  private guard(handler: () => void, res: ServerResponse): void {
    try {
      handler();
    } catch (error) {
      this.logger.error({ err: error }, 'data plane request handler failed');
      if (!res.headersSent && !res.destroyed) {
        const answer = dataPlaneError('internal_error', 'the data plane failed to handle the request');
        const body = errorBody(answer);
        res.writeHead(answer.status, errorResponseHeaders(answer, body));
        res.end(body);
      } else {
        res.destroy();
      }
    }
  }

  // --- shutdown -----------------------------------------------------------------------------

  private isQuiet(): boolean {
    return this.inFlightCount === 0 && this.upgrading.size === 0 && this.webSockets.size === 0;
  }

  /** Resolves when nothing is in flight, or when graceMs have passed. */
  private waitQuiet(graceMs: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.onQuietCheck = undefined;
        resolve();
      };
      const timer = setTimeout(done, graceMs);
      this.onQuietCheck = () => {
        if (this.isQuiet()) done();
      };
      this.onQuietCheck();
    });
  }

  private async shutdown(graceMs: number): Promise<void> {
    this.draining = true;
    const listened = this.server.listening;
    const serverClosed = new Promise<void>((resolve) => {
      if (!this.server.listening) resolve();
      else this.server.close(() => resolve());
    });
    this.server.closeIdleConnections();
    // Open WebSockets and streaming answers are still checked against their routes during the
    // grace: a session revoked then (a token rotated in a rolling restart) ends within a second,
    // not at the end of the grace.
    await this.waitQuiet(graceMs);
    clearInterval(this.recheckTimer);

    // Grace is over: cut what is left of HTTP, then say goodbye to every WebSocket.
    this.server.closeAllConnections();
    for (const socket of this.upgrading) socket.destroy();
    await Promise.all([...this.webSockets].map((ws) => this.goAway(ws)));
    await serverClosed;
    this.agent.destroy();
    // Not after a start-up that failed before the data plane listened.
    if (listened) this.logger.info('data plane closed');
  }

  /** Close frame 1001 to both ends at a frame boundary, then a bounded wait, then destroy. */
  private async goAway(ws: ProxiedWebSocket): Promise<void> {
    if (ws.toClient && ws.toUpstream) {
      ws.toClient.stop();
      ws.toUpstream.stop();
    } else {
      ws.client.destroy();
      ws.upstream.destroy();
    }
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<void>((resolve) => {
      timer = setTimeout(resolve, this.webSocketCloseTimeoutMs);
    });
    await Promise.race([ws.closed, deadline]);
    clearTimeout(timer);
    ws.client.destroy();
    ws.upstream.destroy();
  }
}

/** The first value of a header in `rawHeaders` (name, value, name, value, ...), by any case. */
function rawHeader(rawHeaders: readonly string[], name: string): string | undefined {
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) if (rawHeaders[i]!.toLowerCase() === name) return rawHeaders[i + 1];
  return undefined;
}

/** Send a response's headers now, unless body bytes came with them (see onProxyResponse). */
function flushHeadersAlone(res: ServerResponse, proxyRes: IncomingMessage): void {
  if (!res.headersSent && !res.destroyed && !res.writableEnded && proxyRes.readableLength === 0 && !proxyRes.complete) res.flushHeaders();
}

/** Pause `source` until `sink` drains, if the sink's buffer is full (see endPlainAnswerWithClient). */
function holdBackWhileFull(source: IncomingMessage, sink: Socket): void {
  if (!sink.writableNeedDrain || sink.destroyed || source.isPaused()) return;
  source.pause();
  sink.once('drain', () => source.resume());
}
