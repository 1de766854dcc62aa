// Every metric, in one place, on a registry of the replica's own (several replicas can live
// in one process in tests). Names follow Prometheus conventions: base units, `_total` on
// counters. The README lists them all; deploy/grafana-dashboard.json charts them.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { VERSION } from './version.js';

/** Latency buckets in seconds: from a loopback round trip to well past any sane deadline. */
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

const PEER_TLS_CERT_EXPIRY = 'routesync_peer_tls_cert_expiry_timestamp_seconds';

export class Metrics {
  readonly registry = new Registry();

  // Route table
  readonly routes = new Gauge({ name: 'routesync_routes', help: 'Routes in the table', registers: [this.registry] });
  readonly tombstones = new Gauge({ name: 'routesync_tombstones', help: 'Deletion fences in the table', registers: [this.registry] });
  readonly tombstonesHeld = new Gauge({
    name: 'routesync_tombstones_held',
    help: 'Deletion fences past their TTL kept because a peer has not caught up on them (as of the last sweep)',
    registers: [this.registry],
  });
  readonly changes = new Counter({
    name: 'routesync_changes_total',
    help: 'Route changes offered to the table, by source (local, peer, reconcile), outcome (applied, ignored) and reason (input refused with a 4xx never reaches the table)',
    labelNames: ['source', 'outcome', 'reason'] as const,
    registers: [this.registry],
  });

  // Peers and fan-out
  readonly peers = new Gauge({ name: 'routesync_peers', help: 'Known peers (self excluded)', registers: [this.registry] });
  readonly peersEjected = new Gauge({ name: 'routesync_peers_ejected', help: 'Peers currently ejected', registers: [this.registry] });
  readonly syncDuration = new Histogram({
    name: 'routesync_sync_duration_seconds',
    help: 'Time a lifecycle call waited for its peers, by result (acked: every peer acknowledged; partial: every peer had an outcome before the deadline, not all of them an ack; deadline; no_peers)',
    labelNames: ['result'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly peerRequestDuration = new Histogram({
    name: 'routesync_peer_request_duration_seconds',
    help: 'Duration of one peer request attempt, by kind (push, probe, digest, pull)',
    labelNames: ['kind'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly peerAttempts = new Counter({
    name: 'routesync_peer_attempts_total',
    help: 'Peer push attempts, by result (ok, or the error class)',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });
  readonly peerRetries = new Counter({ name: 'routesync_peer_retries_total', help: 'Peer push attempts that were retries', registers: [this.registry] });
  readonly peerFailures = new Counter({
    name: 'routesync_peer_failures_total',
    help: 'Peer pushes that failed after their retries, by error class',
    labelNames: ['class'] as const,
    registers: [this.registry],
  });
  readonly peerEjections = new Counter({ name: 'routesync_peer_ejections_total', help: 'Times a peer was ejected', registers: [this.registry] });
  readonly routesPushed = new Counter({ name: 'routesync_routes_pushed_total', help: 'Route changes acknowledged by peers (one per peer)', registers: [this.registry] });
  readonly outboxRoutes = new Gauge({ name: 'routesync_outbox_routes', help: 'Route changes queued for peers, all outboxes together', registers: [this.registry] });
  readonly dnsResolutions = new Counter({
    name: 'routesync_peer_dns_resolutions_total',
    help: 'Peer DNS resolutions, by result (ok, or the error code: ESERVFAIL, ETIMEOUT, ENOTFOUND, EMPTY_ANSWER, ...)',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });
  readonly peerTlsReloads = new Counter({
    name: 'routesync_peer_tls_reloads_total',
    help: 'Changed peer TLS files read again, by outcome (applied, or failed: unreadable or unusable, the current ones kept)',
    labelNames: ['outcome'] as const,
    registers: [this.registry],
  });
  /**
   * Registered only once a certificate is in use (setPeerTlsCertExpiry): a label-less gauge is
   * always printed, at 0 until set, and an expiry alert (`… - time() < 7 * 86400`) then fired on
   * every replica without TLS.
   */
  readonly peerTlsCertExpiry = new Gauge({
    name: PEER_TLS_CERT_EXPIRY,
    help: 'The peer TLS certificate in use: its notAfter, in Unix seconds (absent without TLS)',
    registers: [],
  });
  readonly outboxDropped = new Counter({
    name: 'routesync_outbox_dropped_total',
    help: 'Queued changes dropped because an outbox was full (reconciliation repairs them)',
    registers: [this.registry],
  });

  // Reconciliation
  readonly reconcileRounds = new Counter({
    name: 'routesync_reconcile_rounds_total',
    help: 'Anti-entropy rounds, by result (in_sync, repaired, unchanged, rebuilt, kept, skipped, failed)',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });
  readonly reconcileDigests = new Counter({ name: 'routesync_reconcile_digests_compared_total', help: 'Digest comparisons with peers', registers: [this.registry] });
  readonly reconcileRepaired = new Counter({ name: 'routesync_reconcile_routes_repaired_total', help: 'Routes and fences changed by reconciliation', registers: [this.registry] });
  readonly reconcileRefused = new Counter({
    name: 'routesync_reconcile_changes_refused_total',
    help: "Changes in a peer's pull that fail this replica's validation, skipped (a peer of another version)",
    registers: [this.registry],
  });
  readonly reconcileBytes = new Counter({ name: 'routesync_reconcile_bytes_pulled_total', help: 'Bytes received by reconciliation (digests and pulls)', registers: [this.registry] });
  readonly convergenceLag = new Gauge({
    name: 'routesync_convergence_lag_seconds',
    help: 'Seconds since this replica last completed a reconcile round in which it matched a peer or repaired itself',
    registers: [this.registry],
  });

  // Data plane
  readonly proxyRequests = new Counter({
    name: 'routesync_proxy_requests_total',
    help: 'Data-plane requests by outcome code (proxied, sandbox_not_found, upstream_unreachable, upstream_timeout, ...)',
    labelNames: ['outcome'] as const,
    registers: [this.registry],
  });
  readonly proxyDuration = new Histogram({
    name: 'routesync_proxy_request_duration_seconds',
    help: 'Data-plane request duration by outcome code',
    labelNames: ['outcome'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly proxyWebsockets = new Gauge({ name: 'routesync_proxy_websockets_active', help: 'Open proxied WebSocket connections', registers: [this.registry] });

  /** The peer TLS certificate now in use expires at `notAfterSeconds` (Unix seconds). */
  setPeerTlsCertExpiry(notAfterSeconds: number): void {
    if (this.registry.getSingleMetric(PEER_TLS_CERT_EXPIRY) === undefined) this.registry.registerMetric(this.peerTlsCertExpiry);
    this.peerTlsCertExpiry.set(notAfterSeconds);
  }

  /** 1, labelled with this build's version: which version each replica runs (a rolling upgrade, a `rejected` push). */
  readonly buildInfo = new Gauge({ name: 'routesync_build_info', help: 'Always 1; the version label is the routesync version this replica runs', labelNames: ['version'] as const, registers: [this.registry] });

  constructor(options: { processMetrics?: boolean } = {}) {
    this.buildInfo.set({ version: VERSION }, 1);
    if (options.processMetrics ?? true) collectDefaultMetrics({ register: this.registry, prefix: 'routesync_' });
  }
}
