// Replica: the composition root. config -> components -> listeners; ordered shutdown.
// main.ts runs one; the integration tests run several in one process, each with its own
// registry, logger, Agent and servers.
import { randomUUID, X509Certificate } from 'node:crypto';
import { createServer, type RequestListener, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { DestinationStream } from 'pino';
import { answerUnparsable } from './api/errors.js';
import { createLocalApp } from './api/local.js';
import { createPeerApp } from './api/peer.js';
import { reconcileEndpoints } from './api/reconcile.js';
import { ConfigError, formatHostPort, readPeerTls, tlsOptions, type Config, type ListenAddress, type PeerTlsMaterial } from './config.js';
import { createLogger, type Logger } from './log.js';
import { Metrics } from './metrics.js';
import { PeerClient } from './peers/client.js';
import { DnsDiscovery, selfAddresses, staticPeers } from './peers/discovery.js';
import { PeerSync } from './peers/fanout.js';
import { PeerFaults } from './peers/faults.js';
import { Reconciler, type BootstrapOptions, type BootstrapOutcome } from './peers/reconcile.js';
import { DataPlane } from './proxy/server.js';
import { RouteTable } from './routes/table.js';
import { RouteService } from './service.js';
import { VERSION } from './version.js';

export interface ReplicaOptions {
  /** Log destination (tests collect lines); standard output when omitted. */
  readonly logDestination?: DestinationStream;
  /** Process metrics (default on; tests with many replicas in one process turn them off). */
  readonly processMetrics?: boolean;
  /** Test hook: this replica's instance ID instead of a new random UUID (tests that need an order between replicas). */
  readonly instanceId?: string;
  /** Test hook: called for every peer request this replica sends. */
  readonly onPeerRequest?: (peer: string, path: string) => void;
  /**
   * Test hook: false starts no reconcile timer, so rounds run only when a test calls
   * `reconciler.runRound()` (the interval cannot be made long enough for that with a short
   * fence TTL: config refuses an interval of TTL / 5 or more).
   */
  readonly reconcileTimer?: boolean;
  /**
   * Test hook: the replica's monotonic clock (fence arrivals, caught-up reports, contact age and
   * suspicion), instead of the process's: a test moves it on to stand for time passing, as it
   * moves Date.now for the fences' wall-clock TTL.
   */
  readonly monotonicNow?: () => number;
  /** The peer TLS material, when the caller has read it already (main.ts, to fail with exit 2); read from config otherwise. */
  readonly peerTls?: PeerTlsMaterial;
}

export interface ReplicaAddresses {
  /** Bound addresses, host:port (IPv6 bracketed). */
  readonly api: string;
  readonly peer: string;
  readonly proxy: string;
}

export class Replica {
  readonly instanceId: string;
  readonly logger: Logger;
  readonly metrics: Metrics;
  readonly table: RouteTable;
  readonly client: PeerClient;
  readonly sync: PeerSync;
  readonly service: RouteService;
  readonly apiServer: Server;
  readonly peerServer: Server;
  readonly dataPlane: DataPlane;
  readonly reconciler: Reconciler;
  /** 'https' when the peer listener and the peer client use TLS. */
  readonly peerScheme: 'http' | 'https';
  /** Test hook: cut this replica off from its peers (see src/peers/faults.ts). Off unless a test turns it on. */
  readonly faults = new PeerFaults();
  /** DNS discovery, when ROUTESYNC_PEER_DNS is set. */
  dns: DnsDiscovery | undefined;
  /** When the bootstrap timeout began: before the first DNS resolution, with DNS discovery. */
  private bootstrapStartedAt: number | undefined;
  /** Settles when bootstrap is over and the replica is ready (or closed). */
  readonly bootstrapped: Promise<BootstrapOutcome>;
  private resolveBootstrapped!: (outcome: BootstrapOutcome) => void;
  private ready = false;
  private shuttingDown = false;
  private closing: Promise<void> | undefined;
  private readonly timers: NodeJS.Timeout[] = [];
  /** The peer TLS material in use (undefined without TLS), and the HTTPS peer listener it serves. */
  private peerTls: PeerTlsMaterial | undefined;
  private readonly tlsServer: HttpsServer | undefined;
  /** The last failed re-read of the TLS files, so that a lasting failure is logged once. */
  private tlsReloadFailure: string | undefined;
  private bound: ReplicaAddresses | undefined;
  /** Responses of the local and peer APIs, so that shutdown can make each close its connection. */
  private readonly apiResponses = new KeepAliveCutter();
  private readonly peerResponses = new KeepAliveCutter();

  private constructor(
    readonly config: Config,
    private readonly options: ReplicaOptions,
  ) {
    this.instanceId = options.instanceId ?? randomUUID();
    this.logger = createLogger({
      level: config.logLevel,
      ...(options.logDestination ? { destination: options.logDestination } : {}),
      // The address its peers know it by: ROUTESYNC_SELF (the pod IP in the shipped Deployment),
      // else the peer listen address (which may be a wildcard, 0.0.0.0, on every replica alike).
      base: { replica: config.self !== '' ? config.self : formatHostPort(config.peerAddr.host, config.peerAddr.port) },
    });
    this.metrics = new Metrics({ processMetrics: options.processMetrics ?? true });
    // TLS is symmetric: a replica that serves HTTPS dials its peers over HTTPS with the same
    // certificate (its client certificate when the peers ask for one) and the same CA.
    const tls = options.peerTls ?? readPeerTls(config);
    this.peerScheme = tls ? 'https' : 'http';
    this.peerTls = tls;
    this.table = new RouteTable({
      tombstoneTtlMs: config.tombstoneTtlMs,
      ...(options.monotonicNow ? { monotonicNow: options.monotonicNow } : {}),
      // A fence past its TTL is held while a peer has not caught up on it (docs/reconcile.md).
      fenceHoldMaxMs: config.tombstoneHoldMaxMs,
      caughtUpThrough: () => this.reconciler.caughtUpThrough(),
    });
    this.client = new PeerClient({
      connections: config.peerConnections,
      token: config.peerToken,
      instanceId: this.instanceId,
      ...(tls ? { scheme: 'https' as const, tls } : {}),
      onRequest: (peer, path) => {
        this.faults.checkOutgoing(peer, path);
        options.onPeerRequest?.(peer, path);
      },
    });
    this.sync = new PeerSync({
      config,
      client: this.client,
      metrics: this.metrics,
      logger: this.logger,
      // An upsert queued through a long cut can be older than a deletion made elsewhere whose
      // fence has expired at the peer: pushed, it would bring the route back (Reconciler.stillOwed).
      stillOwed: (change, key) => this.reconciler.stillOwed(change, key),
    });
    this.service = new RouteService(this.table, this.sync, this.metrics, this.logger);
    this.reconciler = new Reconciler({
      config,
      table: this.table,
      service: this.service,
      sync: this.sync,
      client: this.client,
      metrics: this.metrics,
      logger: this.logger,
      instanceId: this.instanceId,
      ...(options.monotonicNow ? { monotonicNow: options.monotonicNow } : {}),
    });
    this.service.onLocalApplied = (key) => this.reconciler.noteLocalChange(key);
    this.bootstrapped = new Promise((resolve) => {
      this.resolveBootstrapped = resolve;
    });

    const localApp = createLocalApp({ service: this.service, table: this.table, sync: this.sync, logger: this.logger });
    const peerApp = createPeerApp({
      service: this.service,
      metrics: this.metrics,
      logger: this.logger,
      token: config.peerToken,
      instanceId: this.instanceId,
      isReady: () => this.ready,
      isShuttingDown: () => this.shuttingDown || this.closing !== undefined,
      beforeMetrics: () => this.refreshGauges(),
      extend: reconcileEndpoints(this.reconciler, this.table.digestBuckets),
    });
    // Once shutdown starts, new local calls get 503 and their connection closed. server.close()
    // alone stops only new connections: a manager's busy keep-alive connection would keep
    // feeding changes for the whole grace period and leave the drain no time.
    this.apiServer = createServer((req, res) => {
      this.apiResponses.track(res);
      if (this.shuttingDown) {
        res
          .writeHead(503, { 'content-type': 'application/json', connection: 'close' })
          .end('{"error":{"code":"shutting_down","message":"this replica is shutting down; send the change to another replica or retry"}}');
        return;
      }
      localApp(req, res);
    });
    const mutualTls = tls?.ca !== undefined;
    const peerListener: RequestListener = (req, res) => {
      this.peerResponses.track(res);
      if (this.faults.refusesIncoming(req)) {
        res.writeHead(503, { 'content-type': 'application/json' }).end('{"error":{"code":"fault_injected","message":"isolated by a test fault"}}');
        return;
      }
      if (mutualTls && !clientCertificateVerified(req.socket as TLSSocket) && !OPEN_PEER_PATHS.has((req.url ?? '/').split('?')[0] ?? '/')) {
        res
          .writeHead(403, { 'content-type': 'application/json' })
          .end('{"error":{"code":"client_certificate_required","message":"a client certificate signed by the peer CA is required"}}');
        return;
      }
      peerApp(req, res);
    };
    // With a CA the peer listener is mTLS: it asks every client for a certificate and verifies
    // it against the CA. The handshake itself accepts a client without one, so the kubelet's
    // HTTPS probes and Prometheus still reach /healthz, /readyz and /metrics; every other path
    // answers 403 unless the certificate verified (checked above, before Express sees it).
    this.tlsServer = tls
      ? createHttpsServer({ ...tlsOptions(tls), ...(tls.ca ? { requestCert: true, rejectUnauthorized: false } : {}) }, peerListener)
      : undefined;
    this.peerServer = this.tlsServer ?? createServer(peerListener);
    this.apiServer.on('clientError', answerUnparsable);
    this.peerServer.on('clientError', answerUnparsable);
    if (tls) this.metrics.setPeerTlsCertExpiry(expirySeconds(new X509Certificate(tls.cert)));
    // Outlive the peers' pooled idle connections (undici keeps them 30 s at most), so a
    // connection is never closed by the server just as a peer reuses it.
    this.peerServer.keepAliveTimeout = 65_000;
    this.peerServer.headersTimeout = 66_000;
    this.dataPlane = new DataPlane({ config, table: this.table, metrics: this.metrics, logger: this.logger });
  }

  /** Build the replica and open its listeners. */
  static async start(config: Config, options: ReplicaOptions = {}): Promise<Replica> {
    const replica = new Replica(config, options);
    try {
      await replica.listen();
    } catch (error) {
      await replica.close();
      throw error;
    }
    return replica;
  }

  get addresses(): ReplicaAddresses {
    if (!this.bound) throw new Error('replica is not listening');
    return this.bound;
  }

  isReady(): boolean {
    return this.ready;
  }

  private async listen(): Promise<void> {
    const peer = await namingAddress('ROUTESYNC_PEER_ADDR', this.config.peerAddr, listenOn(this.peerServer, this.config.peerAddr));
    const api = await namingAddress('ROUTESYNC_API_ADDR', this.config.apiAddr, listenOn(this.apiServer, this.config.apiAddr));
    const proxy = await namingAddress('ROUTESYNC_PROXY_ADDR', this.config.proxyAddr, this.dataPlane.listen());
    this.bound = {
      api: formatHostPort(api.address, api.port),
      peer: formatHostPort(peer.address, peer.port),
      proxy: formatHostPort(proxy.address, proxy.port),
    };

    const self = selfAddresses(this.config, peer.port);
    const fixedPeers = staticPeers(this.config, self);
    this.sync.setPeers(fixedPeers);
    if (this.config.peerDns !== '') {
      this.dns = new DnsDiscovery({ config: this.config, self, staticPeers: fixedPeers, defaultPort: peer.port, sync: this.sync, metrics: this.metrics, logger: this.logger });
      // The first answer decides whom bootstrap asks; a failure is logged, and retried before
      // bootstrap (discoverPeers) and then on the timer. The bootstrap timeout counts from
      // here: a DNS server that never answers costs at most that, not c-ares' own ~7 s first.
      this.bootstrapStartedAt = Date.now();
      await this.dns.within(this.config.bootstrapTimeoutMs);
    }

    // Fences expire on a timer of their own; TTL/10 (at most a minute) keeps expiry precise
    // enough without scanning the fences often.
    const sweepMs = Math.max(10, Math.min(60_000, Math.floor(this.config.tombstoneTtlMs / 10)));
    const sweep = setInterval(() => this.table.sweepExpiredFences(), sweepMs);
    sweep.unref();
    this.timers.push(sweep);

    // A certificate rotation (cert-manager renews a Secret; the kubelet swaps the mounted files)
    // is picked up by reading the files again: no restart, no connection dropped.
    if (this.peerTls && this.config.peerTlsReloadMs > 0) {
      const reload = setInterval(() => {
        try {
          this.reloadPeerTls();
        } catch (error) {
          // Not a file problem (those are handled inside): logged, and the material in use kept.
          this.metrics.peerTlsReloads.inc({ outcome: 'failed' });
          this.logger.error({ err: error }, 'peer TLS reload failed; the certificate in use is kept');
        }
      }, this.config.peerTlsReloadMs);
      reload.unref();
      this.timers.push(reload);
    }

    if (!isLoopback(this.config.apiAddr.host)) {
      this.logger.warn(
        { apiAddr: this.bound.api },
        'LOCAL API IS NOT ON LOOPBACK: anything that reaches this address can change routes without a token',
      );
    }
    // The peer API changes routes and its pull returns every access token: open to anything
    // that reaches it unless a token or mutual TLS guards it (or it is on loopback).
    if (this.config.peerToken === '' && this.config.peerTlsCa === '' && !isLoopback(this.config.peerAddr.host)) {
      this.logger.warn(
        { peerAddr: this.bound.peer },
        'PEER API HAS NO TOKEN: anything that reaches this address can change routes and read every access token; set ROUTESYNC_PEER_TOKEN (or ROUTESYNC_PEER_TLS_CA)',
      );
    }
    this.logger.info(
      { version: VERSION, api: this.bound.api, peer: this.bound.peer, proxy: this.bound.proxy, peers: this.sync.peerAddresses(), peerScheme: this.peerScheme },
      'routesync listening',
    );
    // Not ready until the table is bootstrapped from a peer (or no peer answered in time); the
    // local API takes changes meanwhile (a manager's batch push at start merges with the pull).
    void this.discoverPeers()
      .then((discovery) => this.reconciler.bootstrap(discovery))
      .then((outcome) => {
        // Once shutdown has started the replica stays not-ready (and starts no rounds), even when
        // bootstrap ends during the drain.
        if (this.shuttingDown || this.closing) return this.resolveBootstrapped(outcome);
        this.ready = true;
        if (this.options.reconcileTimer !== false) this.reconciler.start();
        this.logger.info({ bootstrap: outcome, routes: this.table.size }, 'ready');
        this.resolveBootstrapped(outcome);
      });
  }

  /**
   * Before bootstrap: with DNS discovery whose first resolution failed, retry it within the
   * bootstrap timeout (what is left of it goes to the pull), then start the periodic timer.
   */
  private async discoverPeers(): Promise<BootstrapOptions> {
    const dns = this.dns;
    if (!dns) return {};
    const started = this.bootstrapStartedAt ?? Date.now();
    const leftMs = (): number => Math.max(0, this.config.bootstrapTimeoutMs - (Date.now() - started));
    // Static peers are known peers to bootstrap from; without any, wait for DNS to name some.
    const peersKnown = dns.resolved || (this.sync.peerCount === 0 && (await dns.awaitAnswer(leftMs())));
    dns.start();
    return { peersKnown, timeoutMs: leftMs() };
  }

  refreshGauges(): void {
    this.metrics.routes.set(this.table.size);
    this.metrics.tombstones.set(this.table.fenceCount);
    this.metrics.tombstonesHeld.set(this.table.heldFenceCount);
    this.metrics.peers.set(this.sync.peerCount);
    this.metrics.peersEjected.set(this.sync.ejectedCount());
    this.metrics.outboxRoutes.set(this.sync.outboxSize());
    this.metrics.convergenceLag.set(this.reconciler.lagSeconds());
  }

  /**
   * Graceful stop: turn not-ready, stop accepting lifecycle calls, let in-flight calls finish
   * and queued changes reach reachable peers within `graceMs`, then close everything.
   * Returns whether everything queued was delivered (false too when changes for an ejected peer
   * were left, which the drain does not wait for).
   */
  async shutdown(graceMs = this.config.shutdownGraceMs): Promise<boolean> {
    const deadline = Date.now() + graceMs;
    this.ready = false;
    this.shuttingDown = true;
    // Calls in flight are answered with `Connection: close`: a kept-alive connection left idle
    // after its answer would hold server.close() (below) for the client's keep-alive timeout,
    // up to the grace period, before the drain of queued pushes even begins. Peers get the same,
    // so they open a fresh connection rather than reuse one that close() is about to cut.
    this.apiResponses.cut();
    this.peerResponses.cut();
    this.logger.info({ graceMs }, 'shutting down');
    // The data plane drains in parallel: in-flight requests finish, WebSockets get close 1001
    // at the end of the grace period.
    const proxyClosed = this.dataPlane.close(graceMs);
    await closeServer(this.apiServer, graceMs);
    const delivered = await this.sync.drain(Math.max(0, deadline - Date.now()));
    await proxyClosed;
    // The drain waits for reachable peers only: what is queued for an ejected peer is dropped
    // here too, and says so (the drain alone would report everything delivered).
    const queued = this.sync.outboxSize();
    if (!delivered) this.logger.warn({ queued }, 'grace period over with changes still queued; peers will reconcile');
    else if (queued > 0) this.logger.warn({ queued, ejectedPeers: this.sync.ejectedCount() }, 'changes queued for ejected peers dropped at shutdown; peers will reconcile');
    await this.close();
    return delivered && queued === 0;
  }

  /**
   * Read the peer TLS files again and, when they changed and are usable, serve and dial with
   * them: the listener's new handshakes (setSecureContext) and the client's new connections
   * (PeerClient.setTls). Connections already open keep the handshake they made. Files caught
   * half-rotated (a certificate whose key has not landed yet) or gone leave the material in use,
   * and say so once until they are usable again.
   */
  reloadPeerTls(): 'applied' | 'unchanged' | 'failed' {
    const current = this.peerTls;
    if (!current || !this.tlsServer) return 'unchanged';
    let next: PeerTlsMaterial | undefined;
    try {
      next = readPeerTls(this.config);
    } catch (error) {
      if (!(error instanceof ConfigError)) throw error;
      this.metrics.peerTlsReloads.inc({ outcome: 'failed' });
      if (error.message !== this.tlsReloadFailure) {
        this.logger.warn({ reason: error.message }, 'peer TLS files are not usable; the certificate in use is kept');
      }
      this.tlsReloadFailure = error.message;
      return 'failed';
    }
    this.tlsReloadFailure = undefined;
    if (!next || (next.cert.equals(current.cert) && next.key.equals(current.key) && sameBuffer(next.ca, current.ca))) return 'unchanged';
    this.tlsServer.setSecureContext(tlsOptions(next));
    this.client.setTls(next);
    this.peerTls = next;
    const certificate = new X509Certificate(next.cert);
    this.metrics.peerTlsReloads.inc({ outcome: 'applied' });
    this.metrics.setPeerTlsCertExpiry(expirySeconds(certificate));
    this.logger.info({ subject: certificate.subject, notAfter: certificate.validTo, fingerprint256: certificate.fingerprint256 }, 'peer TLS material reloaded');
    return 'applied';
  }

  /** Close everything now (tests, and the end of shutdown). Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.ready = false;
      for (const timer of this.timers) clearInterval(timer);
      this.dns?.close();
      this.reconciler.close();
      this.sync.close();
      await Promise.all([closeServer(this.apiServer, 0), closeServer(this.peerServer, 0), this.dataPlane.close(0)]);
      await this.client.destroy();
      // A start-up that failed (an address that cannot be bound) says so on stderr; "stopped"
      // would read as a clean stop.
      if (this.bound) this.logger.info('stopped');
      else this.logger.debug('start-up failed: what was opened is closed');
      this.logger.flush();
    })();
    return this.closing;
  }
}

function sameBuffer(a: Buffer | undefined, b: Buffer | undefined): boolean {
  return a === undefined || b === undefined ? a === b : a.equals(b);
}

/** A certificate's notAfter in Unix seconds (X509Certificate reads the first of a chain file). */
function expirySeconds(certificate: X509Certificate): number {
  return Math.floor(Date.parse(certificate.validTo) / 1000);
}

/**
 * The responses a server is writing, so that from one moment on (shutdown) every response
 * closes its connection, the ones already under way included. Node offers no hook for "the
 * headers are about to be written", so each response is tracked until it closes.
 */
class KeepAliveCutter {
  private readonly inFlight = new Set<ServerResponse>();
  private cutting = false;

  /** Call first thing for every request. */
  track(res: ServerResponse): void {
    if (this.cutting) {
      res.setHeader('connection', 'close');
      return;
    }
    this.inFlight.add(res);
    res.once('close', () => this.inFlight.delete(res));
  }

  /** From now on every response says `Connection: close` (Node then closes the socket after it). */
  cut(): void {
    this.cutting = true;
    for (const res of this.inFlight) {
      if (!res.headersSent) res.setHeader('connection', 'close');
      else {
        // Too late for the header (a response still streaming): end the connection once it is written.
        const socket = res.socket;
        res.once('finish', () => socket?.destroySoon());
      }
    }
    this.inFlight.clear();
  }
}

/** Peer paths open without a client certificate (and without the token): probes and metrics. */
const OPEN_PEER_PATHS: ReadonlySet<string> = new Set(['/healthz', '/readyz', '/metrics']);

/**
 * Whether the client presented a certificate the peer CA verified. `authorized` alone is not
 * enough: on a resumed TLS session of a client that presented no certificate at all, Node
 * reports `authorized` true (seen on Node 20), so a certificate must be present as well.
 */
function clientCertificateVerified(socket: TLSSocket): boolean {
  if (!socket.authorized) return false;
  const certificate = socket.getPeerCertificate();
  return certificate !== null && typeof certificate === 'object' && Object.keys(certificate).length > 0;
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}

function listenOn(server: Server, address: ListenAddress): Promise<AddressInfo> {
  return new Promise((resolve, reject) => {
    const onError = (error: Error) => reject(error);
    server.once('error', onError);
    server.listen(address.port, address.host, () => {
      server.off('error', onError);
      resolve(server.address() as AddressInfo);
    });
  });
}

/**
 * A listen address that cannot be bound (not on this host, a name that does not resolve, a port
 * another listener holds) is bad configuration: a ConfigError naming its variable, so start-up
 * stops with one clear line (main.ts, exit 2) instead of a bare `listen EADDRNOTAVAIL`.
 */
async function namingAddress(variable: string, address: ListenAddress, listening: Promise<AddressInfo>): Promise<AddressInfo> {
  try {
    return await listening;
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    const reason = typeof code === 'string' ? code : ((error as Error).message.split('\n')[0] ?? String(error));
    throw new ConfigError(variable, `cannot listen on ${formatHostPort(address.host, address.port)} (${reason})`);
  }
}

/** Stop accepting; wait up to `graceMs` for in-flight requests, then drop every connection. */
function closeServer(server: Server, graceMs: number): Promise<void> {
  if (!server.listening) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => server.closeAllConnections(), graceMs);
    server.close(() => {
      clearTimeout(timer);
      resolve();
    });
    server.closeIdleConnections();
  });
}
