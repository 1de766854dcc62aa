// PeerSync: delivers route changes to every peer — one PeerOutbox and one sender per peer,
// one p-limit cap on push requests in flight across all peers, p-retry on transient failures
// only, one overall deadline for the lifecycle call, and Envoy-style outlier ejection.
//
// The lifecycle call (sync) never waits longer than the deadline, and never waits for an
// ejected peer. What is not delivered by the deadline stays queued and the sender keeps going
// in the background; the outbox bound keeps that memory finite, and reconciliation repairs
// anything dropped.
import { setMaxListeners } from 'node:events';
import { performance } from 'node:perf_hooks';
import pLimit, { type LimitFunction } from 'p-limit';
import pRetry, { type Options as RetryOptions } from 'p-retry';
import type { Config } from '../config.js';
import { RepeatedWarnings, type Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import { changeKey, changeVersion, type RouteChange } from '../routes/route.js';
import { AttemptDeadline, attemptSignal, classifyPeerError, failureKey, PeerRequestError, SyncAbortedError, type PeerClient, type PeerErrorClass, type PushAck } from './client.js';
import { PeerOutbox, type DeliveryOutcome, type OutboxWatcher } from './outbox.js';

export type SyncConfig = Pick<
  Config,
  | 'syncConcurrency'
  | 'syncDeadlineMs'
  | 'attemptTimeoutMs'
  | 'syncRetries'
  | 'retryMinMs'
  | 'retryMaxMs'
  | 'batchMaxRoutes'
  | 'outboxMaxRoutes'
  | 'ejectAfterFailures'
  | 'ejectProbeMs'
  | 'ejectMaxMs'
>;

export interface SyncOutcome {
  /** Peers the change was sent to (self excluded). */
  readonly peers: number;
  /** Peers that acknowledged every change of the call. */
  readonly acked: number;
  /** Peers whose delivery failed before the deadline, with the error class (changes stay queued unless the failure was a permanent one about the request: a 4xx but 401/403, or `protocol`). */
  readonly failed: readonly { readonly peer: string; readonly errorClass: string }[];
  /** Peers still owed the change when the call returned: handed to the background path. */
  readonly pending: readonly { readonly peer: string; readonly reason: string }[];
  readonly elapsedMs: number;
}

export interface PeerStatus {
  readonly peer: string;
  readonly reachable: boolean;
  readonly consecutiveFailures: number;
  readonly ejected: boolean;
  readonly ejectedUntil: string | null;
  readonly ejections: number;
  readonly lastSuccess: string | null;
  readonly lastFailure: { readonly errorClass: string; readonly at: string } | null;
  readonly pendingRoutes: number;
  readonly lastReconcile: string | null;
  readonly lastReconcileFailure: { readonly errorClass: string; readonly at: string } | null;
}

interface PeerState {
  readonly address: string;
  readonly outbox: PeerOutbox;
  sending: boolean;
  /** The send in flight started after a failure (the re-send of a failed batch, or what followed it). */
  resending: boolean;
  removed: boolean;
  consecutiveFailures: number;
  ejected: boolean;
  ejectedUntilMs: number;
  /** Ejections in the current streak (reset after ejectMaxMs of health); sets the ejection time. */
  ejections: number;
  recoveredAtMs: number;
  lastSuccessAtMs: number | null;
  lastFailure: { errorClass: string; atMs: number } | null;
  lastReconcileAtMs: number | null;
  lastReconcileFailure: { errorClass: string; atMs: number } | null;
  /** Background retry of a failed batch, or the next probe of an ejected peer. */
  timer: NodeJS.Timeout | null;
  /**
   * Not sent to before this time (performance.now()): a 429 or 503 with `Retry-After` asked for
   * the wait, held to at most ejectMaxMs. 0 when nothing was asked.
   */
  notBeforeMs: number;
  /** The failed pushes' warnings: one a minute for the same failure (the metrics count each). */
  readonly warnings: RepeatedWarnings;
  /** A push was refused for the peer token (401/403) and none has succeeded since: probes carry the token too. */
  refusedToken: boolean;
  /** In the queue of peers to pump at the end of this event-loop turn. */
  pumpQueued: boolean;
  /** The timeout of its push attempts (one in flight at a time). */
  readonly attemptDeadline: AttemptDeadline;
  /** What p-retry is given for each of this peer's sends: made once, since the peer is all it refers to. */
  readonly retry: PeerRetry;
}

interface PeerRetry {
  readonly input: (attemptNumber: number) => Promise<PushAck>;
  readonly options: RetryOptions;
}

export interface PeerSyncOptions {
  readonly config: SyncConfig;
  readonly client: PeerClient;
  readonly metrics: Metrics;
  readonly logger: Logger;
  /** Wall clock (status times). */
  readonly now?: () => number;
  /** Random source for jitter, in [0, 1). */
  readonly random?: () => number;
  /**
   * Whether a queued change is still owed to peers, asked as it leaves the queue (each attempt's
   * batch). The replica refuses an upsert of an identity its table no longer holds, as a route
   * or as a live fence: deleted elsewhere, and the deletion's fence expired while the peer was
   * out of reach. Pushed, it would be taken by a peer that never saw the fence and offered back
   * to every replica. Given the change and its identity key. Default: every change is owed.
   */
  readonly stillOwed?: (change: RouteChange, key: string) => boolean;
}

export class PeerSync {
  private readonly peers = new Map<string, PeerState>();
  /** Addresses found to be this replica itself (a peer answering with our instance ID). */
  private readonly selfAddresses = new Set<string>();
  private readonly limit: LimitFunction;
  private readonly stop = new AbortController();
  private readonly idleWaiters = new Set<() => void>();
  /** When the drain under way ends (performance.now()); Infinity before any. */
  private drainUntilMs = Number.POSITIVE_INFINITY;
  private readonly pumpQueue: PeerState[] = [];
  private pumpImmediate: NodeJS.Immediate | null = null;
  private readonly config: SyncConfig;
  private readonly client: PeerClient;
  private readonly metrics: Metrics;
  private readonly logger: Logger;
  private readonly now: () => number;
  private readonly random: () => number;
  private readonly stillOwed: ((change: RouteChange, key: string) => boolean) | undefined;
  private closed = false;
  private peerSetVersion = 0;
  private readonly departureListeners: ((address: string) => void)[] = [];

  constructor(options: PeerSyncOptions) {
    this.config = options.config;
    this.client = options.client;
    this.metrics = options.metrics;
    this.logger = options.logger;
    this.now = options.now ?? Date.now;
    this.random = options.random ?? Math.random;
    this.stillOwed = options.stillOwed;
    // rejectOnClear: on shutdown, sends queued behind the cap settle instead of hanging forever.
    this.limit = pLimit({ concurrency: this.config.syncConcurrency, rejectOnClear: true });
    // Every peer's attempt deadline and every retry wait listens on the one shutdown signal:
    // many listeners are the design here, not a leak (each is removed with its peer or wait).
    setMaxListeners(0, this.stop.signal);
  }

  /** Requests queued behind the concurrency cap, and running under it. */
  get limiter(): { readonly active: number; readonly pending: number; readonly concurrency: number } {
    return { active: this.limit.activeCount, pending: this.limit.pendingCount, concurrency: this.limit.concurrency };
  }

  /** Replace the peer set (discovery). New peers start empty (reconciliation fills them); vanished peers stop being waited on. */
  setPeers(addresses: readonly string[]): void {
    const wanted = new Set(addresses.filter((address) => !this.selfAddresses.has(address)));
    for (const [address, peer] of this.peers) {
      if (!wanted.has(address)) {
        this.removePeer(peer, 'peer_removed');
        for (const listener of this.departureListeners) listener(address);
      }
    }
    for (const address of wanted) {
      if (this.peers.has(address)) continue;
      this.peers.set(address, this.newPeer(address));
      this.peerSetVersion++;
      this.logger.info({ peer: address }, 'peer added');
    }
    this.metrics.peers.set(this.peers.size);
  }

  peerAddresses(): string[] {
    return [...this.peers.keys()];
  }

  /** Grows whenever a peer is added or removed: lets a caller cache what it derives from the set. */
  get peersVersion(): number {
    return this.peerSetVersion;
  }

  /** Called with each address discovery (setPeers) drops; not for an address found to be this replica. */
  onPeerDeparted(listener: (address: string) => void): void {
    this.departureListeners.push(listener);
  }

  /** How many peers there are (without listing them: asked for every change a suspect check sees). */
  get peerCount(): number {
    return this.peers.size;
  }

  /** Peers not ejected: the ones a reconcile round may talk to. */
  healthyPeerAddresses(): string[] {
    return [...this.peers.values()].filter((peer) => !peer.ejected).map((peer) => peer.address);
  }

  isSelf(address: string): boolean {
    return this.selfAddresses.has(address);
  }

  /** A peer address found to be this replica (it answered a reconcile request with our instance ID): drop it for good. */
  excludeSelf(address: string): void {
    this.selfAddresses.add(address);
    const peer = this.peers.get(address);
    if (!peer) return;
    this.logger.info({ peer: address }, 'peer address is this replica; excluded');
    this.removePeer(peer, 'peer_removed');
    this.metrics.peers.set(this.peers.size);
  }

  /** Record a completed reconcile round with a peer (shown by GET /v1/peers). */
  markReconciled(address: string): void {
    const peer = this.peers.get(address);
    if (peer) peer.lastReconcileAtMs = this.now();
  }

  /** Record a failed reconcile round with a peer: a peer no change was pushed to lately shows its health by these. */
  markReconcileFailed(address: string, errorClass: string): void {
    const peer = this.peers.get(address);
    if (peer) peer.lastReconcileFailure = { errorClass, atMs: this.now() };
  }

  /** Queue changes for every peer without waiting (reconciliation never re-pushes; this is for callers that do not wait). */
  enqueue(changes: readonly RouteChange[]): void {
    const keys = changes.map(changeKey);
    for (const peer of this.peers.values()) {
      this.enqueueFor(peer, changes, keys);
      this.schedulePump(peer);
    }
  }

  /**
   * Queue changes for every peer and wait until each peer has acknowledged them all, or has
   * failed, or is ejected, or the deadline passes — whichever comes first per peer.
   *
   * The deadline is the caller's: it counts from `receivedAt` (when the lifecycle call arrived,
   * `performance.now()`; default now), and the wait ends `answerReserveMs` before it, so that
   * the answer is written and on its way by the deadline rather than starting at it.
   */
  async sync(changes: readonly RouteChange[], receivedAt?: number): Promise<SyncOutcome> {
    const started = performance.now();
    const peers = [...this.peers.values()];
    if (peers.length === 0 || changes.length === 0) {
      this.metrics.syncDuration.observe({ result: 'no_peers' }, 0);
      return { peers: peers.length, acked: peers.length, failed: [], pending: [], elapsedMs: 0 };
    }

    const budgetMs = this.config.syncDeadlineMs - answerReserveMs(this.config.syncDeadlineMs) - (started - (receivedAt ?? started));
    const wait = new CallWait(peers.length, changes.length);
    const keys = changes.map(changeKey);
    const watchers: ChangeWatcher[] = [];
    peers.forEach((peer, index) => {
      // Watched before they are queued: a change of this call that its own later changes push
      // out of a full outbox (a resync larger than outboxMaxRoutes) is settled `outbox_full` as
      // it is dropped, so the call reports the peer failed at once rather than waiting out its
      // deadline for a change that will never be sent. An ejected peer is not waited for, but
      // is watched while the call's changes are queued for it, for the same reason. Nor is a
      // peer whose last push failed and whose re-send waits out its back-off, or is under way
      // (`retrying`): the call would wait until its deadline, or the re-send's failure, for a
      // peer known to be failing, before ejection takes over; the re-send, or the push after
      // it, carries this call's changes too.
      const first = watchers.length;
      changes.forEach((change, k) => {
        const watcher = new ChangeWatcher(changeVersion(change), change.op, wait, index, peer.outbox, keys[k]!);
        watchers.push(watcher);
        peer.outbox.watch(watcher.key, watcher);
      });
      this.enqueueFor(peer, changes, keys);
      if (this.closed || peer.ejected || peer.timer !== null || peer.resending) {
        wait.decide(index, { status: 'pending', reason: this.closed ? 'shutdown' : peer.ejected ? 'ejected' : 'retrying' });
        for (let w = first; w < watchers.length; w++) {
          const watcher = watchers[w]!;
          if (!watcher.settled) watcher.outbox.unwatch(watcher.key, watcher);
        }
        watchers.length = first;
        return;
      }
      this.schedulePump(peer);
    });

    // What is left of the budget now: queueing a large batch and its waiters for every peer takes
    // time of its own (~150 ms for 10,000 changes to 10 peers), which the wait must not add.
    const result = await wait.until(Math.max(0, budgetMs - (performance.now() - started)));
    const outcomes = wait.outcomes;

    const elapsedMs = performance.now() - started;
    let acked = 0;
    let counted = 0;
    const failed: { peer: string; errorClass: string }[] = [];
    const pending: { peer: string; reason: string }[] = [];
    peers.forEach((peer, index) => {
      // An address found meanwhile to be this replica (its push answered with this instance ID)
      // was never a peer: not counted, not reported failed (`peers` is "self excluded").
      if (this.selfAddresses.has(peer.address)) return;
      counted++;
      const outcome = outcomes[index] ?? { status: 'pending', reason: 'in_flight' };
      if (outcome.status === 'acked') acked++;
      else if (outcome.status === 'failed') failed.push({ peer: peer.address, errorClass: outcome.errorClass });
      else pending.push({ peer: peer.address, reason: outcome.reason });
    });
    // `acked` only when every peer acknowledged: a call whose peers all had an outcome before the
    // deadline, some of them a failure or an ejection, is `partial`.
    this.metrics.syncDuration.observe({ result: result === 'deadline' ? 'deadline' : acked === counted ? 'acked' : 'partial' }, elapsedMs / 1000);
    // Past the deadline the calls stop waiting; the changes stay queued for background delivery.
    // Forgetting the waiters of a large batch takes as long as queueing them: done once the
    // answer is on its way, not before.
    if (watchers.some((watcher) => !watcher.settled)) {
      setImmediate(() => {
        for (const watcher of watchers) if (!watcher.settled) watcher.outbox.unwatch(watcher.key, watcher);
      });
    }
    return { peers: counted, acked, failed, pending, elapsedMs: Math.round(elapsedMs * 100) / 100 };
  }

  status(): PeerStatus[] {
    const iso = (ms: number | null) => (ms === null ? null : new Date(ms).toISOString());
    const failure = (record: { errorClass: string; atMs: number } | null) => (record ? { errorClass: record.errorClass, at: new Date(record.atMs).toISOString() } : null);
    return [...this.peers.values()].map((peer) => ({
      peer: peer.address,
      reachable: reachable(peer),
      consecutiveFailures: peer.consecutiveFailures,
      ejected: peer.ejected,
      ejectedUntil: peer.ejected ? iso(peer.ejectedUntilMs) : null,
      ejections: peer.ejections,
      lastSuccess: iso(peer.lastSuccessAtMs),
      lastFailure: failure(peer.lastFailure),
      pendingRoutes: peer.outbox.size,
      lastReconcile: iso(peer.lastReconcileAtMs),
      lastReconcileFailure: failure(peer.lastReconcileFailure),
    }));
  }

  /** Changes queued for all peers together (the outbox gauge). */
  outboxSize(): number {
    let total = 0;
    for (const peer of this.peers.values()) total += peer.outbox.size;
    return total;
  }

  ejectedCount(): number {
    let count = 0;
    for (const peer of this.peers.values()) if (peer.ejected) count++;
    return count;
  }

  /**
   * Resolve when no reachable peer has anything queued or in flight (ejected peers are left to
   * reconciliation), or after `timeoutMs`. Returns whether everything was delivered.
   */
  async drain(timeoutMs: number): Promise<boolean> {
    this.drainUntilMs = performance.now() + timeoutMs;
    if (this.isIdle()) return true;
    let timer: NodeJS.Timeout | undefined;
    let done!: () => void;
    const idle = new Promise<boolean>((resolve) => {
      done = () => resolve(true);
      this.idleWaiters.add(done);
    });
    const timeout = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    const delivered = await Promise.race([idle, timeout]);
    clearTimeout(timer);
    this.idleWaiters.delete(done);
    return delivered;
  }

  /** Stop: abort in-flight requests and retries, clear timers, tell waiting calls. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.stop.abort(new SyncAbortedError('shutting down'));
    if (this.pumpImmediate) clearImmediate(this.pumpImmediate);
    this.pumpImmediate = null;
    this.pumpQueue.length = 0;
    for (const peer of this.peers.values()) {
      if (peer.timer) clearTimeout(peer.timer);
      peer.timer = null;
      peer.attemptDeadline.close();
      peer.outbox.settleAll({ status: 'pending', reason: 'shutdown' });
    }
    this.limit.clearQueue();
  }

  // --- sender ----------------------------------------------------------------------------

  /** `keys[k]` is `changeKey(changes[k])`, made once for all peers. */
  private enqueueFor(peer: PeerState, changes: readonly RouteChange[], keys: readonly string[]): void {
    for (let k = 0; k < changes.length; k++) {
      const dropped = peer.outbox.enqueue(changes[k]!, keys[k]);
      if (dropped.length > 0) this.countDropped(peer, dropped.length);
    }
  }

  private countDropped(peer: PeerState, count: number): void {
    this.metrics.outboxDropped.inc(count);
    this.logger.warn({ peer: peer.address, dropped: count, bound: this.config.outboxMaxRoutes }, 'outbox full: oldest changes dropped, reconciliation will repair them');
  }

  private isIdle(): boolean {
    for (const peer of this.peers.values()) {
      // Nor a peer that asked (Retry-After) not to be sent to before the drain ends.
      if (peer.ejected || (!peer.sending && peer.notBeforeMs > this.drainUntilMs)) continue;
      if (peer.sending || peer.outbox.size > 0) return false;
    }
    return true;
  }

  private notifyIfIdle(): void {
    if (this.idleWaiters.size === 0 || !this.isIdle()) return;
    for (const resolve of [...this.idleWaiters]) resolve();
  }

  /** Start a send if this peer has work, nothing in flight, no back-off pending and is not ejected. */
  private pump(peer: PeerState): void {
    if (peer.sending || peer.ejected || peer.removed || peer.timer || this.closed) return;
    if (peer.outbox.pendingCount === 0) {
      this.notifyIfIdle();
      return;
    }
    const batch = peer.outbox.takeBatch(this.config.batchMaxRoutes, this.stillOwed);
    if (batch.length === 0) {
      this.notifyIfIdle();
      return;
    }
    peer.sending = true;
    peer.resending = peer.consecutiveFailures > 0;
    void this.send(peer, batch).finally(() => {
      peer.sending = false;
      peer.resending = false;
      this.schedulePump(peer);
      this.notifyIfIdle();
    });
  }

  /**
   * Pump `peer` at the end of this event-loop turn rather than now: every change queued in the
   * same turn (the lifecycle calls whose requests arrived together, the acks read together)
   * leaves in one batch. Under load that is what makes a push carry many changes; a lone call
   * loses only the rest of its turn, microseconds.
   */
  private schedulePump(peer: PeerState): void {
    if (peer.pumpQueued || this.closed) return;
    peer.pumpQueued = true;
    this.pumpQueue.push(peer);
    this.pumpImmediate ??= setImmediate(this.flushPumps);
  }

  private readonly flushPumps = (): void => {
    this.pumpImmediate = null;
    const queue = this.pumpQueue.splice(0);
    for (const peer of queue) {
      peer.pumpQueued = false;
      this.pump(peer);
    }
  };

  private newPeer(address: string): PeerState {
    const peer: PeerState = {
      address,
      outbox: new PeerOutbox(this.config.outboxMaxRoutes),
      sending: false,
      resending: false,
      removed: false,
      consecutiveFailures: 0,
      ejected: false,
      ejectedUntilMs: 0,
      ejections: 0,
      recoveredAtMs: 0,
      lastSuccessAtMs: null,
      lastFailure: null,
      lastReconcileAtMs: null,
      lastReconcileFailure: null,
      timer: null,
      notBeforeMs: 0,
      warnings: new RepeatedWarnings(),
      refusedToken: false,
      pumpQueued: false,
      attemptDeadline: new AttemptDeadline(this.config.attemptTimeoutMs, this.stop.signal),
      // Each attempt of the outbox's batch in flight under the cap; the closures are made once
      // per peer rather than once per send.
      retry: {
        input: (attemptNumber) => this.limit(this.runAttempt, peer, attemptNumber),
        options: {
          retries: this.config.syncRetries,
          minTimeout: this.config.retryMinMs,
          maxTimeout: this.config.retryMaxMs,
          factor: 2,
          randomize: true,
          signal: this.stop.signal,
          unref: true,
          onFailedAttempt: ({ error }) => this.recordFailure(peer, classifyPeerError(error)),
          // Transient failures only, and never once the peer is ejected or gone: the background
          // path and the probe take over from there. Nor a peer that asked to be left alone for
          // a while (`Retry-After`, whole seconds, more than a call's deadline): the background
          // re-send waits that long.
          shouldRetry: ({ error }) => {
            const classified = classifyPeerError(error);
            return classified.transient && !(classified.retryAfterMs! > 0) && !peer.ejected && !peer.removed;
          },
        },
      },
    };
    return peer;
  }

  private readonly runAttempt = (peer: PeerState, attemptNumber: number): Promise<PushAck> => this.attempt(peer, attemptNumber);

  private async send(peer: PeerState, batch: RouteChange[]): Promise<void> {
    let ack: PushAck;
    try {
      ack = await pRetry(peer.retry.input, peer.retry.options);
    } catch (error) {
      const classified = this.closed ? new PeerRequestError('aborted', 'shutting down', { cause: error }) : classifyPeerError(error);
      this.failBatch(peer, classified, batch.length);
      return;
    }
    if (peer.removed) return;
    const rejected = ack.rejectedAt.length;
    if (ack.resend) {
      // The peer refused the whole batch for these entries: the rest goes out again at once
      // (the pump after this send), their calls still waiting on it.
      const dropped = peer.outbox.refuseInFlight(ack.rejectedAt);
      if (dropped.length > 0) this.countDropped(peer, dropped.length);
    } else {
      // A rejected entry is not delivered: the calls waiting on it are told `rejected`.
      peer.outbox.ackInFlight(ack.rejectedAt);
      this.metrics.routesPushed.inc(batch.length - rejected);
    }
    if (rejected > 0) {
      // Our own validation passed these, so a rejection means the peer runs an incompatible
      // version; reconciliation cannot fix that either, so say it loudly, and count it where the
      // permanent failures are counted (the alert on them), and show it in /v1/peers.
      peer.lastFailure = { errorClass: 'rejected', atMs: this.now() };
      this.metrics.peerFailures.inc({ class: 'rejected' });
      this.logger.error({ peer: peer.address, rejected, resent: ack.resend ? batch.length - rejected : 0 }, 'peer rejected routes this replica accepted');
    }
  }

  /**
   * One request of the outbox's batch in flight, under the concurrency cap, with its own timeout.
   * A peer removed while this attempt waited for the cap is sent nothing (its outbox is empty by
   * then): the attempt fails as aborted, which is never retried.
   */
  private async attempt(peer: PeerState, attemptNumber: number): Promise<PushAck> {
    if (peer.removed) throw new SyncAbortedError('peer removed');
    const batch = peer.outbox.inFlightBatch;
    if (attemptNumber > 1) this.metrics.peerRetries.inc();
    const signal = peer.attemptDeadline.start();
    const started = performance.now();
    try {
      const ack = await this.client.push(peer.address, batch, signal);
      // A batch refused whole was answered (the peer is healthy) but delivered nothing.
      this.metrics.peerAttempts.inc({ result: ack.resend ? 'rejected' : 'ok' });
      this.recordSuccess(peer);
      return ack;
    } catch (error) {
      const classified = classifyPeerError(error);
      this.metrics.peerAttempts.inc({ result: classified.errorClass });
      throw classified;
    } finally {
      peer.attemptDeadline.end();
      this.metrics.peerRequestDuration.observe({ kind: 'push' }, (performance.now() - started) / 1000);
    }
  }

  private recordSuccess(peer: PeerState): void {
    peer.consecutiveFailures = 0;
    peer.lastSuccessAtMs = this.now();
    peer.notBeforeMs = 0;
    peer.refusedToken = false;
    peer.warnings.reset();
  }

  /** Count a failed attempt; eject the peer once it has failed too many times in a row. */
  private recordFailure(peer: PeerState, error: PeerRequestError): void {
    peer.lastFailure = { errorClass: error.errorClass, atMs: this.now() };
    if (error.errorClass === 'unauthorized') peer.refusedToken = true;
    // A peer that rejects our input or is shutting us down is not an unhealthy peer; one that
    // answered (a 4xx about the batch) ends a failure streak, as Envoy's consecutive-5xx count
    // does: its earlier timeouts no longer count toward ejecting it, nor make the next push a
    // re-send that lifecycle calls stop waiting for.
    if (error.errorClass === 'http_4xx') peer.consecutiveFailures = 0;
    if (!error.transient && !error.configuration) return;
    peer.consecutiveFailures++;
    if (!peer.ejected && !peer.removed && peer.consecutiveFailures >= this.config.ejectAfterFailures) this.eject(peer);
  }

  private failBatch(peer: PeerState, error: PeerRequestError, count: number): void {
    if (peer.removed) return;
    if (error.errorClass === 'self') {
      this.logger.info({ peer: peer.address }, 'peer address is this replica; excluded');
      this.selfAddresses.add(peer.address);
      this.removePeer(peer, 'peer_removed');
      this.metrics.peers.set(this.peers.size);
      return;
    }
    // Transient failures (and shutdown) keep the changes for background delivery; a permanent
    // failure (a 4xx) drops them: sending the same bytes again cannot succeed. A 401/403 or a
    // failed TLS handshake is the fleet's configuration, not these bytes (a token Secret or a
    // CA rotated on some pods only): they are kept, re-sent after a back-off like a transient
    // failure until the peer is ejected, and
    // sent once the configuration is fixed; and the calls it ejects the peer for are told
    // `pending: ejected`, which must mean their changes are still owed.
    const requeue = error.transient || error.errorClass === 'aborted' || error.configuration;
    const dropped = peer.outbox.failInFlight({ status: 'failed', errorClass: error.errorClass }, requeue);
    if (dropped.length > 0) this.countDropped(peer, dropped.length);
    if (error.errorClass === 'aborted') return;
    this.metrics.peerFailures.inc({ class: error.errorClass });
    const retryAfterMs = error.retryAfterMs === undefined ? undefined : Math.min(error.retryAfterMs, this.config.ejectMaxMs);
    if (retryAfterMs !== undefined) peer.notBeforeMs = performance.now() + retryAfterMs;
    // A peer that refuses every push the same way (a 4xx is never ejected for) would write a
    // warning per lifecycle call.
    this.logger[peer.warnings.level(failureKey(error))](
      { peer: peer.address, errorClass: error.errorClass, code: error.code, status: error.status, routes: count, requeued: requeue, retryAfterMs },
      'push to peer failed',
    );
    if (requeue && !peer.ejected) {
      this.scheduleRetry(peer);
      // Calls waiting on changes queued behind the failed batch stop waiting too, as later calls
      // do not wait (`retrying`, in sync()): the re-send carries their changes.
      if (peer.timer !== null) peer.outbox.settleAll({ status: 'pending', reason: 'retrying' });
    }
  }

  /**
   * Background retry of a failed batch, jittered, growing with the failure streak, never past
   * the probe period; and not before the time a `Retry-After` asked for.
   */
  private scheduleRetry(peer: PeerState): void {
    if (peer.timer || this.closed) return;
    const base = Math.min(this.config.attemptTimeoutMs * 2 ** Math.min(peer.consecutiveFailures, 10), this.config.ejectProbeMs);
    const delay = Math.max(base / 2 + (this.random() * base) / 2, peer.notBeforeMs - performance.now());
    peer.timer = setTimeout(() => {
      peer.timer = null;
      this.pump(peer);
    }, delay);
    peer.timer.unref();
  }

  private eject(peer: PeerState): void {
    const now = this.now();
    // A streak of ejections doubles the ejection time; health for ejectMaxMs forgives it.
    if (peer.ejections > 0 && now - peer.recoveredAtMs > this.config.ejectMaxMs) peer.ejections = 0;
    peer.ejections++;
    const durationMs = Math.min(this.config.ejectProbeMs * 2 ** (peer.ejections - 1), this.config.ejectMaxMs);
    peer.ejected = true;
    this.metrics.peerEjections.inc();
    this.metrics.peersEjected.set(this.ejectedCount());
    this.logger.warn(
      { peer: peer.address, consecutiveFailures: peer.consecutiveFailures, ejectedForMs: durationMs, queued: peer.outbox.size },
      'peer ejected: lifecycle calls stop waiting for it',
    );
    peer.outbox.settleAll({ status: 'pending', reason: 'ejected' });
    if (peer.timer) clearTimeout(peer.timer);
    this.scheduleProbe(peer, durationMs);
    this.notifyIfIdle();
  }

  /** The next probe; `ejectedUntil` says when (after a failed probe too, not the first ejection's end). */
  private scheduleProbe(peer: PeerState, delayMs: number): void {
    peer.ejectedUntilMs = this.now() + delayMs;
    peer.timer = setTimeout(() => {
      peer.timer = null;
      void this.probe(peer);
    }, delayMs);
    peer.timer.unref();
  }

  private async probe(peer: PeerState): Promise<void> {
    if (peer.removed || this.closed) return;
    const { signal, clear } = attemptSignal(this.config.attemptTimeoutMs, this.stop.signal);
    const started = performance.now();
    try {
      await this.client.probe(peer.address, signal, peer.refusedToken);
    } catch (error) {
      const classified = classifyPeerError(error);
      peer.lastFailure = { errorClass: classified.errorClass, atMs: this.now() };
      if (classified.configuration && !this.closed) {
        // While it is out nothing else reaches the peer: a token or TLS mismatch would go quiet,
        // and the alert on permanent failures with it. Counted, and warned about once a minute.
        this.metrics.peerFailures.inc({ class: classified.errorClass });
        this.logger[peer.warnings.level(failureKey(classified))](
          { peer: peer.address, errorClass: classified.errorClass, code: classified.code, status: classified.status },
          'probe of ejected peer refused: it stays ejected',
        );
      }
      if (!peer.removed && !this.closed) this.scheduleProbe(peer, this.config.ejectProbeMs);
      return;
    } finally {
      clear();
      this.metrics.peerRequestDuration.observe({ kind: 'probe' }, (performance.now() - started) / 1000);
    }
    if (peer.removed || this.closed) return;
    peer.ejected = false;
    peer.consecutiveFailures = 0;
    peer.refusedToken = false;
    peer.recoveredAtMs = this.now();
    this.metrics.peersEjected.set(this.ejectedCount());
    this.logger.info({ peer: peer.address, queued: peer.outbox.size }, 'peer answered its probe: back in rotation');
    // A peer that asked for a longer wait than its ejection gets it.
    if (peer.notBeforeMs > performance.now()) this.scheduleRetry(peer);
    else this.pump(peer);
  }

  private removePeer(peer: PeerState, errorClass: 'peer_removed'): void {
    peer.removed = true;
    this.peerSetVersion++;
    if (peer.timer) clearTimeout(peer.timer);
    peer.timer = null;
    peer.attemptDeadline.close();
    peer.outbox.settleAll({ status: 'failed', errorClass });
    peer.outbox.clear();
    this.peers.delete(peer.address);
    this.metrics.peersEjected.set(this.ejectedCount());
    this.logger.info({ peer: peer.address }, 'peer removed');
    this.notifyIfIdle();
  }
}

/**
 * Not ejected, no push failure streak, and the latest contact, a push or a reconcile round,
 * succeeded: a peer nothing was pushed to lately shows its health by its rounds (every
 * interval), so an idle fleet does not read as unreachable, nor a peer that refuses every
 * round as healthy.
 */
function reachable(peer: PeerState): boolean {
  if (peer.ejected || peer.consecutiveFailures > 0) return false;
  const lastGood = Math.max(peer.lastSuccessAtMs ?? -Infinity, peer.lastReconcileAtMs ?? -Infinity);
  if (lastGood === -Infinity) return false;
  return peer.lastReconcileFailure === null || peer.lastReconcileFailure.atMs <= lastGood;
}

/**
 * Time kept back from the sync deadline for answering the lifecycle call: a timer fires late on
 * a busy event loop, and the answer has to be serialized, written and carried back to a caller
 * whose own process may not run at once. Usually 2-3 ms in all here, but one call in 5,000 of
 * benchmark 2 reached its caller about 13 ms after the wait's planned end, on a slow minute of a
 * machine whose no-op request has a p99 of 13-20 ms; 5% of the deadline, at most 25 ms, covers
 * that without shortening the wait noticeably.
 */
export function answerReserveMs(deadlineMs: number): number {
  return Math.min(25, deadlineMs * 0.05);
}

/**
 * One lifecycle call's wait on its peers: one object and one promise per call, however many
 * peers. A peer's outcome is `acked` once every change of the call is acknowledged, or the
 * first failure or pending outcome as soon as it is known. Settles `acked` when every peer has
 * an outcome, or `deadline` when the budget runs out first.
 */
class CallWait {
  readonly outcomes: (DeliveryOutcome | undefined)[];
  /** Changes of the call each peer has still to acknowledge. */
  private readonly unacked: number[];
  private undecided: number;
  private finish: ((result: 'acked' | 'deadline') => void) | undefined;
  private timer: NodeJS.Timeout | undefined;

  constructor(peerCount: number, changeCount: number) {
    this.outcomes = new Array<DeliveryOutcome | undefined>(peerCount);
    this.unacked = new Array<number>(peerCount).fill(changeCount);
    this.undecided = peerCount;
  }

  /** One change's outcome at one peer (from the outbox, through a ChangeWatcher). */
  settle(peer: number, outcome: DeliveryOutcome): void {
    if (this.outcomes[peer] !== undefined) return;
    if (outcome.status === 'acked' && --this.unacked[peer]! > 0) return;
    this.decide(peer, outcome);
  }

  /** The peer's outcome for the whole call. */
  decide(peer: number, outcome: DeliveryOutcome): void {
    if (this.outcomes[peer] !== undefined) return;
    this.outcomes[peer] = outcome;
    if (--this.undecided === 0) this.finish?.('acked');
  }

  /**
   * Resolves `acked` once every peer has an outcome, or `deadline` after `budgetMs`. Node's timers
   * count whole milliseconds of the event loop's clock, so one set for 284.9 ms fires after 283.3
   * to 284.9 ms of `performance.now()`; a timer that fires before the budget is spent is set
   * again for what is left, and the wait never ends early.
   */
  until(budgetMs: number): Promise<'acked' | 'deadline'> {
    if (this.undecided === 0) return Promise.resolve('acked');
    const endsAt = performance.now() + budgetMs;
    return new Promise((resolve) => {
      this.finish = (result) => {
        this.finish = undefined;
        clearTimeout(this.timer);
        resolve(result);
      };
      const expire = (): void => {
        const leftMs = endsAt - performance.now();
        if (leftMs > 0) this.timer = setTimeout(expire, leftMs);
        else this.finish?.('deadline');
      };
      this.timer = setTimeout(expire, budgetMs);
    });
  }
}

/** A call waiting for one change at one peer: what the peer's outbox tells, it passes to the call. */
class ChangeWatcher implements OutboxWatcher {
  settled = false;
  constructor(
    readonly version: string,
    readonly op: RouteChange['op'],
    private readonly wait: CallWait,
    private readonly peer: number,
    readonly outbox: PeerOutbox,
    readonly key: string,
  ) {}

  settle(outcome: DeliveryOutcome): void {
    this.settled = true;
    this.wait.settle(this.peer, outcome);
  }
}

export type { PeerErrorClass };
