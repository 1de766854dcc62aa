// Discovery: the current peer set, with this replica's own address excluded.
//
// Static peers come from ROUTESYNC_PEERS; DNS peers from ROUTESYNC_PEER_DNS (DnsDiscovery below). This replica's own address is ROUTESYNC_SELF when
// set; otherwise it is derived: the peer listen address, or, when that is a wildcard
// (0.0.0.0 / ::), every address of this host's interfaces at the peer port. Peers named by a
// host name that is really this replica are caught at the first request: the peer API answers
// with its instance ID and PeerSync drops a peer that answers with ours.
import { Resolver } from 'node:dns/promises';
import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { setTimeout as delay } from 'node:timers/promises';
import type { Config } from '../config.js';
import { formatHostPort, parseHostPort } from '../config.js';
import { RepeatedWarnings, type Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import type { PeerSync } from './fanout.js';

/** The addresses (canonical host:port) that mean "this replica". */
export function selfAddresses(config: Pick<Config, 'self' | 'peerAddr'>, boundPort?: number): Set<string> {
  const own = new Set<string>();
  if (config.self !== '') {
    const parsed = parseHostPort(config.self);
    if (parsed) own.add(formatHostPort(parsed.host, parsed.port));
    return own;
  }
  const port = boundPort ?? config.peerAddr.port;
  const host = config.peerAddr.host;
  if (host !== '0.0.0.0' && host !== '::') {
    own.add(formatHostPort(host, port));
    return own;
  }
  for (const list of Object.values(networkInterfaces())) {
    for (const info of list ?? []) own.add(formatHostPort(info.address, port));
  }
  own.add(formatHostPort('localhost', port));
  return own;
}

/** The static peer list minus this replica. */
export function staticPeers(config: Pick<Config, 'peers'>, self: ReadonlySet<string>): string[] {
  return config.peers.filter((peer) => !self.has(peer));
}

/**
 * DNS discovery: the A and AAAA records of ROUTESYNC_PEER_DNS (a Kubernetes headless Service),
 * re-resolved every ROUTESYNC_PEER_DNS_INTERVAL_MS. Peers = static peers ∪ resolved addresses,
 * minus this replica. New peers start empty in PeerSync and get the table by pulling it
 * (bootstrap, then reconcile rounds); vanished peers are dropped and no longer waited on.
 *
 * A failed resolution (SERVFAIL, timeout, NXDOMAIN, or an answer with no address at all) keeps
 * the last good set and logs a warning with the error code: a DNS hiccup must never empty the
 * peer list of a running fleet.
 */
export interface DnsDiscoveryOptions {
  readonly config: Pick<Config, 'peerDns' | 'peerDnsIntervalMs' | 'peerDnsServers' | 'self' | 'peerAddr'>;
  readonly self: ReadonlySet<string>;
  readonly staticPeers: readonly string[];
  /** Port for a name given without one: this replica's peer port (every replica listens alike). */
  readonly defaultPort: number;
  readonly sync: Pick<PeerSync, 'setPeers' | 'peerAddresses'>;
  readonly metrics: Metrics;
  readonly logger: Logger;
}

/** Start-up re-resolution pace while no answer has arrived: a few tries inside the bootstrap timeout. */
const STARTUP_RETRY_MS = 200;

/** ENODATA: the name exists but has no record of that type (an IPv4-only Service has no AAAA). */
const NO_RECORDS = 'ENODATA';

export class DnsDiscovery {
  readonly name: string;
  readonly port: number;
  private readonly resolver: Resolver;
  private timer: NodeJS.Timeout | null = null;
  private closed = false;
  private lastGood: string[] | undefined;
  private readonly stop = new AbortController();
  /** The last failure warned about (warnFailure), until a resolution succeeds. */
  private readonly warnings = new RepeatedWarnings();
  /** The resolution in flight: a refresh asked for meanwhile joins it, so none overlap. */
  private inFlight: Promise<boolean> | undefined;

  /** The address family taken when the name has both A and AAAA records. */
  private readonly family: 4 | 6;

  constructor(private readonly options: DnsDiscoveryOptions) {
    // The listener decides (0.0.0.0 takes IPv4 only); a `::` one, which takes both, goes by
    // ROUTESYNC_SELF when that is an IPv4 address.
    const listen = isIP(options.config.peerAddr.host);
    const selfFamily = isIP(parseHostPort(options.config.self)?.host ?? '');
    this.family = listen === 4 ? 4 : listen === 6 ? (selfFamily === 4 ? 4 : 6) : selfFamily === 6 ? 6 : 4;
    const { name, port } = parseDnsTarget(options.config.peerDns, options.defaultPort);
    this.name = name;
    this.port = port;
    // c-ares' own timeout and tries bound a resolution: against a silent server about three
    // times the timeout (c-ares doubles it for the retry), ~7 s at the 5 s default period. The
    // next resolution waits for this one, so they never overlap.
    this.resolver = new Resolver({ timeout: Math.max(50, Math.min(2000, Math.floor(options.config.peerDnsIntervalMs / 2))), tries: 2 });
    const servers = parseDnsServers(options.config.peerDnsServers);
    if (servers.length > 0) this.resolver.setServers(servers);
  }

  /**
   * Resolve once and apply the answer; false (and the last good set kept) on failure. Never
   * throws. While one runs, another call gets the same answer: a resolution that outlived a
   * caller's bound (within) is never overtaken by a newer one whose answer it would overwrite.
   */
  refresh(): Promise<boolean> {
    this.inFlight ??= this.resolveOnce().finally(() => {
      this.inFlight = undefined;
    });
    return this.inFlight;
  }

  /**
   * refresh(), waited for at most `timeoutMs` (a silent DNS server costs c-ares three times
   * its timeout, ~7 s at the defaults): true once an answer has been applied. A resolution still
   * running then goes on and is applied when it ends.
   */
  async within(timeoutMs: number): Promise<boolean> {
    const cutoff = new AbortController();
    const signal = AbortSignal.any([this.stop.signal, cutoff.signal]);
    await Promise.race([this.refresh(), delay(Math.max(0, timeoutMs), undefined, { signal }).catch(() => undefined)]);
    cutoff.abort();
    return this.resolved;
  }

  private async resolveOnce(): Promise<boolean> {
    const [v4, v6] = await Promise.allSettled([this.resolver.resolve4(this.name), this.resolver.resolve6(this.name)]);
    if (this.closed) return false;
    let failure: string | undefined;
    for (const answer of [v4, v6]) {
      if (answer.status === 'fulfilled') continue;
      const code = dnsCode(answer.reason);
      if (code !== NO_RECORDS) failure ??= code;
    }
    // On a dual-stack cluster a headless Service has an A and an AAAA record for each pod: both
    // taken, every replica would be two peers (each change pushed to it twice, `peers` doubled,
    // and a call waiting for both). One family, then: that of this replica's own listener.
    const a = v4.status === 'fulfilled' ? v4.value : [];
    const aaaa = v6.status === 'fulfilled' ? v6.value : [];
    const addresses = a.length > 0 && aaaa.length > 0 ? (this.family === 6 ? aaaa : a) : [...a, ...aaaa];
    if (failure === undefined && addresses.length === 0) failure = 'EMPTY_ANSWER';
    if (failure !== undefined) {
      this.options.metrics.dnsResolutions.inc({ result: failure });
      this.warnFailure(failure);
      return false;
    }
    this.warnings.reset();
    this.options.metrics.dnsResolutions.inc({ result: 'ok' });
    const resolved = [...new Set(addresses.map((address) => formatHostPort(address, this.port)))].filter((peer) => !this.options.self.has(peer)).sort();
    const peers = [...new Set([...this.options.staticPeers, ...resolved])];
    if (!this.lastGood || this.lastGood.join(',') !== peers.join(',')) {
      this.options.logger.info({ name: this.name, peers }, 'peer DNS answer changed the peer set');
    }
    this.lastGood = peers;
    this.options.sync.setPeers(peers);
    return true;
  }

  /**
   * A failure is a warning when its code is new or the last warning is a minute old; the same
   * failure again meanwhile is a debug line (the metric counts every one). At start-up the first
   * resolution is retried every 200 ms, and a resolver that keeps refusing wrote 25 warnings in
   * the 5 s bootstrap timeout.
   */
  private warnFailure(code: string): void {
    const fields = { name: this.name, code, keptPeers: this.options.sync.peerAddresses().length };
    const message = this.resolved ? 'peer DNS resolution failed; keeping the last good peer set' : 'peer DNS resolution failed; no peer set yet, retrying';
    this.options.logger[this.warnings.level(code)](fields, message);
  }

  /** Whether a resolution has succeeded yet: until then the peer set is not known, empty or not. */
  get resolved(): boolean {
    return this.lastGood !== undefined;
  }

  /**
   * At start-up, before bootstrap: re-resolve every `retryMs` until an answer arrives or
   * `timeoutMs` pass (a resolution still running then is not waited for). True once one did.
   * A replica that took "no answer" for "no peers" would turn ready empty, and seeded, in a
   * fleet that has routes.
   */
  async awaitAnswer(timeoutMs: number, retryMs = STARTUP_RETRY_MS): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.resolved && !this.closed) {
      const leftMs = deadline - Date.now();
      if (leftMs <= 0) break;
      const waited = await delay(Math.min(retryMs, leftMs), true, { signal: this.stop.signal }).catch(() => false);
      if (!waited || Date.now() >= deadline) break;
      await this.within(deadline - Date.now());
    }
    return this.resolved;
  }

  start(): void {
    if (this.closed) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.refresh().finally(() => this.start());
    }, this.options.config.peerDnsIntervalMs);
    this.timer.unref();
  }

  close(): void {
    this.closed = true;
    this.stop.abort();
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.resolver.cancel();
  }
}

/** `name` or `name:port` (validated by config). */
export function parseDnsTarget(text: string, defaultPort: number): { name: string; port: number } {
  const match = /^(.*?)(?::(\d{1,5}))?$/.exec(text.trim());
  const name = match?.[1] ?? text;
  return { name, port: match?.[2] ? Number(match[2]) : defaultPort };
}

/** ROUTESYNC_PEER_DNS_SERVERS: comma-separated `ip`, `ip:port` or `[v6]:port` (validated by config). */
export function parseDnsServers(text: string): string[] {
  return text
    .split(',')
    .map((part) => part.trim())
    .filter((part) => part !== '');
}

function dnsCode(error: unknown): string {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : 'UNKNOWN';
}
