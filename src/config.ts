// Environment + command-line flags -> one validated, typed, frozen Config.
//
// Every setting has an environment variable `ROUTESYNC_<NAME>` and a flag `--<name>`
// (lower case, dashes): ROUTESYNC_SYNC_DEADLINE_MS <-> --sync-deadline-ms. A flag wins over
// the variable. Bad configuration throws ConfigError whose message is one line naming the
// variable; main.ts prints it and exits 2.
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { createSecureContext } from 'node:tls';
import { parseArgs } from 'node:util';

export interface ListenAddress {
  readonly host: string;
  readonly port: number;
}

export type LogLevel = 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';

export interface Config {
  /** Local API (the local manager only). */
  readonly apiAddr: ListenAddress;
  /** Peer API (other replicas, an openkruise manager's /refresh). */
  readonly peerAddr: ListenAddress;
  /** Data plane. */
  readonly proxyAddr: ListenAddress;
  /** Static peers, `host:port` each. */
  readonly peers: readonly string[];
  /** A DNS name (headless Service) whose A/AAAA records are the peers; `name` or `name:port`. */
  readonly peerDns: string;
  readonly peerDnsIntervalMs: number;
  /** DNS servers for ROUTESYNC_PEER_DNS, comma-separated `ip[:port]`; '' = the system's resolvers. */
  readonly peerDnsServers: string;
  /** This replica's own peer address (`host:port`), excluded from its peer list; '' = derived. */
  readonly self: string;
  readonly peerToken: string;
  /** Optional TLS for the peer API and the peer client (file paths; all empty = plain HTTP). */
  readonly peerTlsCert: string;
  readonly peerTlsKey: string;
  readonly peerTlsCa: string;
  /** How often the peer TLS files are read again to pick up a rotation (0 = read once, at start). */
  readonly peerTlsReloadMs: number;

  /** Cap on peer requests in flight across all peers (p-limit). */
  readonly syncConcurrency: number;
  /** How long a lifecycle call may wait for its peers. */
  readonly syncDeadlineMs: number;
  /** One peer request's timeout (AbortSignal). */
  readonly attemptTimeoutMs: number;
  /** Retries after the first attempt, transient failures only (p-retry). */
  readonly syncRetries: number;
  readonly retryMinMs: number;
  readonly retryMaxMs: number;
  /** Connections the one undici Agent keeps per peer. */
  readonly peerConnections: number;
  /** Routes one peer request carries at most. */
  readonly batchMaxRoutes: number;
  /** Routes an outbox holds per peer before the oldest are dropped (reconciliation repairs them). */
  readonly outboxMaxRoutes: number;

  /** Outlier ejection: consecutive failed requests that eject a peer. */
  readonly ejectAfterFailures: number;
  /** How often an ejected peer is probed; the first ejection lasts at least this long. */
  readonly ejectProbeMs: number;
  /** Ceiling of the doubling ejection time for a peer ejected again and again. */
  readonly ejectMaxMs: number;

  readonly reconcileIntervalMs: number;
  readonly bootstrapTimeoutMs: number;
  readonly tombstoneTtlMs: number;
  /**
   * How long past its TTL a fence is still kept while a current peer has not caught up on it
   * (pulled this replica's table since the fence arrived): a bound on a split's memory.
   */
  readonly tombstoneHoldMaxMs: number;

  readonly defaultSandboxPort: number;
  /** Optional: when set, host-based routing only accepts `<port>-<id>.<proxyDomain>`. */
  readonly proxyDomain: string;
  /** Upstream timeout of a proxied HTTP request (no response headers by then -> 504). */
  readonly proxyTimeoutMs: number;
  /** Sockets the data plane's upstream agent keeps per sandbox address. */
  readonly proxyMaxSockets: number;
  /**
   * How long an answer may stay held back for a client whose socket stays full (not drained
   * once) before the answer is cut and its upstream socket freed; 0: never (nginx's send_timeout).
   */
  readonly proxySendTimeoutMs: number;
  readonly accessLog: boolean;
  /** The data plane may proxy to a route on a loopback address (one machine: tests, demos). */
  readonly proxyAllowLoopback: boolean;
  /** Pass on the X-Forwarded-Proto the ingress in front set (it terminated TLS), instead of `http`. */
  readonly proxyTrustForwardedProto: boolean;

  readonly shutdownGraceMs: number;
  readonly logLevel: LogLevel;
}

export class ConfigError extends Error {
  readonly code = 'ROUTESYNC_CONFIG';
  constructor(
    readonly variable: string,
    message: string,
  ) {
    super(`invalid ${variable}: ${withoutCredentials(message)}`);
    this.name = 'ConfigError';
  }
}

/**
 * The line repeats the bad value, and a value written as a URL may carry credentials
 * (`http://user:token@peer:7789`); the line goes to the container's log, where no token may
 * appear. A token may hold any visible character, a quote or a space included, so no word
 * boundary is trusted: everything up to the last `@` goes, from just after the first `//` before
 * it, or else from the start of the value (the first quote before it, or the start of the line).
 * More than the credentials may go; never less.
 */
export function withoutCredentials(message: string): string {
  const at = message.lastIndexOf('@');
  if (at < 0) return message;
  // The first `//`: a token may hold `//` itself (base64 does), and a later URL an `@`.
  const authority = message.indexOf('//');
  const quote = message.indexOf('"');
  const start = authority >= 0 && authority < at ? authority + 2 : quote >= 0 && quote < at ? quote + 1 : 0;
  return `${message.slice(0, start)}[redacted]${message.slice(at)}`;
}

type Kind = 'addr' | 'int' | 'string' | 'peers' | 'bool' | 'level' | 'file' | 'token';

interface Setting {
  readonly key: keyof Config;
  readonly kind: Kind;
  readonly fallback: string;
  readonly min?: number;
  readonly max?: number;
}

const LEVELS: readonly LogLevel[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/**
 * The most routes a push may carry (ROUTESYNC_BATCH_MAX_ROUTES's maximum): every push of the
 * widest routes fits the peer API's body limit, and the peer API refuses a longer batch.
 */
export const PUSH_MAX_ROUTES = 2_000;

/**
 * The table of settings. Defaults are chosen for a real cluster (in-cluster RTT well under
 * 5 ms); the README explains each number. Tests that need short timers set them.
 */
export const SETTINGS: Readonly<Record<string, Setting>> = {
  ROUTESYNC_API_ADDR: { key: 'apiAddr', kind: 'addr', fallback: '127.0.0.1:7788' },
  ROUTESYNC_PEER_ADDR: { key: 'peerAddr', kind: 'addr', fallback: '0.0.0.0:7789' },
  ROUTESYNC_PROXY_ADDR: { key: 'proxyAddr', kind: 'addr', fallback: '0.0.0.0:8080' },
  ROUTESYNC_PEERS: { key: 'peers', kind: 'peers', fallback: '' },
  ROUTESYNC_PEER_DNS: { key: 'peerDns', kind: 'string', fallback: '' },
  ROUTESYNC_PEER_DNS_INTERVAL_MS: { key: 'peerDnsIntervalMs', kind: 'int', fallback: '5000', min: 100, max: 3_600_000 },
  ROUTESYNC_PEER_DNS_SERVERS: { key: 'peerDnsServers', kind: 'string', fallback: '' },
  ROUTESYNC_SELF: { key: 'self', kind: 'string', fallback: '' },
  ROUTESYNC_PEER_TOKEN: { key: 'peerToken', kind: 'token', fallback: '' },
  ROUTESYNC_PEER_TLS_CERT: { key: 'peerTlsCert', kind: 'file', fallback: '' },
  ROUTESYNC_PEER_TLS_KEY: { key: 'peerTlsKey', kind: 'file', fallback: '' },
  ROUTESYNC_PEER_TLS_CA: { key: 'peerTlsCa', kind: 'file', fallback: '' },
  ROUTESYNC_PEER_TLS_RELOAD_MS: { key: 'peerTlsReloadMs', kind: 'int', fallback: '60000', min: 0, max: 86_400_000 },
  ROUTESYNC_SYNC_CONCURRENCY: { key: 'syncConcurrency', kind: 'int', fallback: '64', min: 1, max: 10_000 },
  ROUTESYNC_SYNC_DEADLINE_MS: { key: 'syncDeadlineMs', kind: 'int', fallback: '500', min: 0, max: 60_000 },
  ROUTESYNC_ATTEMPT_TIMEOUT_MS: { key: 'attemptTimeoutMs', kind: 'int', fallback: '100', min: 1, max: 60_000 },
  ROUTESYNC_SYNC_RETRIES: { key: 'syncRetries', kind: 'int', fallback: '2', min: 0, max: 10 },
  ROUTESYNC_RETRY_MIN_MS: { key: 'retryMinMs', kind: 'int', fallback: '10', min: 0, max: 60_000 },
  ROUTESYNC_RETRY_MAX_MS: { key: 'retryMaxMs', kind: 'int', fallback: '25', min: 0, max: 60_000 },
  ROUTESYNC_PEER_CONNECTIONS: { key: 'peerConnections', kind: 'int', fallback: '4', min: 1, max: 1024 },
  // At most 2,000: a push of that many routes of the largest kind validation admits (~15 KB on
  // the wire each, a 4,096-character token of 3-byte characters) stays under the peer API's
  // 64 MiB body limit; past it the peer answered 413, a permanent failure, and the batch was dropped.
  ROUTESYNC_BATCH_MAX_ROUTES: { key: 'batchMaxRoutes', kind: 'int', fallback: '1000', min: 1, max: PUSH_MAX_ROUTES },
  ROUTESYNC_OUTBOX_MAX_ROUTES: { key: 'outboxMaxRoutes', kind: 'int', fallback: '100000', min: 1, max: 10_000_000 },
  ROUTESYNC_EJECT_AFTER_FAILURES: { key: 'ejectAfterFailures', kind: 'int', fallback: '5', min: 1, max: 1000 },
  ROUTESYNC_EJECT_PROBE_MS: { key: 'ejectProbeMs', kind: 'int', fallback: '1000', min: 10, max: 600_000 },
  ROUTESYNC_EJECT_MAX_MS: { key: 'ejectMaxMs', kind: 'int', fallback: '30000', min: 10, max: 3_600_000 },
  ROUTESYNC_RECONCILE_INTERVAL_MS: { key: 'reconcileIntervalMs', kind: 'int', fallback: '5000', min: 50, max: 3_600_000 },
  ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: { key: 'bootstrapTimeoutMs', kind: 'int', fallback: '5000', min: 0, max: 600_000 },
  ROUTESYNC_TOMBSTONE_TTL_MS: { key: 'tombstoneTtlMs', kind: 'int', fallback: '600000', min: 1, max: 604_800_000 },
  ROUTESYNC_TOMBSTONE_HOLD_MAX_MS: { key: 'tombstoneHoldMaxMs', kind: 'int', fallback: '3600000', min: 0, max: 604_800_000 },
  ROUTESYNC_DEFAULT_SANDBOX_PORT: { key: 'defaultSandboxPort', kind: 'int', fallback: '49983', min: 1, max: 65_535 },
  ROUTESYNC_PROXY_DOMAIN: { key: 'proxyDomain', kind: 'string', fallback: '' },
  ROUTESYNC_PROXY_TIMEOUT_MS: { key: 'proxyTimeoutMs', kind: 'int', fallback: '60000', min: 1, max: 3_600_000 },
  ROUTESYNC_PROXY_MAX_SOCKETS: { key: 'proxyMaxSockets', kind: 'int', fallback: '256', min: 1, max: 100_000 },
  ROUTESYNC_PROXY_SEND_TIMEOUT_MS: { key: 'proxySendTimeoutMs', kind: 'int', fallback: '60000', min: 0, max: 3_600_000 },
  ROUTESYNC_ACCESS_LOG: { key: 'accessLog', kind: 'bool', fallback: 'true' },
  ROUTESYNC_PROXY_ALLOW_LOOPBACK: { key: 'proxyAllowLoopback', kind: 'bool', fallback: 'false' },
  ROUTESYNC_PROXY_TRUST_FORWARDED_PROTO: { key: 'proxyTrustForwardedProto', kind: 'bool', fallback: 'false' },
  ROUTESYNC_SHUTDOWN_GRACE_MS: { key: 'shutdownGraceMs', kind: 'int', fallback: '10000', min: 0, max: 600_000 },
  ROUTESYNC_LOG_LEVEL: { key: 'logLevel', kind: 'level', fallback: 'info' },
};

/** Dot-separated labels of letters, digits and inner hyphens, each at most 63 characters. */
const DNS_DOMAIN = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

/** `ROUTESYNC_SYNC_DEADLINE_MS` -> `sync-deadline-ms`. */
export function flagName(variable: string): string {
  return variable.replace(/^ROUTESYNC_/, '').toLowerCase().replaceAll('_', '-');
}

/** `host:port`, `[v6]:port` or `:port` (all interfaces). */
export function parseHostPort(text: string): { host: string; port: number } | undefined {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]*)):(\d{1,5})$/.exec(text.trim());
  if (!match) return undefined;
  const host = match[1] ?? match[2] ?? '';
  const port = Number(match[3]);
  if (port > 65_535) return undefined;
  if (match[1] !== undefined && isIP(host) !== 6) return undefined;
  if (match[2] !== undefined && host !== '' && !/^[A-Za-z0-9.-]+$/.test(host)) return undefined;
  return { host: host === '' ? '0.0.0.0' : host, port };
}

/** The all-interfaces addresses: where to listen, never where a replica is. */
function isWildcard(host: string): boolean {
  return host === '0.0.0.0' || (isIP(host) === 6 && canonicalIpv6(host) === '::');
}

/**
 * Canonical `host:port` text of an address; IPv6 bracketed. Peer sets, self-exclusion and DNS
 * answers are compared as these strings, so one address must have one spelling: IPv6 in the
 * compressed lower-case form (RFC 5952, what DNS answers and os.networkInterfaces() give) and
 * host names in lower case (DNS names are case-insensitive).
 */
export function formatHostPort(host: string, port: number): string {
  return isIP(host) === 6 ? `[${canonicalIpv6(host)}]:${port}` : `${host.toLowerCase()}:${port}`;
}

export function canonicalIpv6(address: string): string {
  try {
    return new URL(`http://[${address}]/`).hostname.slice(1, -1);
  } catch {
    // A zone ID (fe80::1%eth0), which URL refuses: kept as written, in lower case.
    return address.toLowerCase();
  }
}

function parseValue(variable: string, setting: Setting, raw: string): unknown {
  switch (setting.kind) {
    case 'addr': {
      const addr = parseHostPort(raw);
      if (!addr) throw new ConfigError(variable, `"${raw}" is not host:port (for example 127.0.0.1:7788)`);
      // IPv6 in its one compressed form, so that what reads it ("is this the wildcard, or
      // loopback?") need not know every way of writing it: [0:0:0:0:0:0:0:0] is [::].
      return Object.freeze(isIP(addr.host) === 6 ? { ...addr, host: canonicalIpv6(addr.host) } : addr);
    }
    case 'int': {
      if (!/^\d+$/.test(raw.trim())) throw new ConfigError(variable, `"${raw}" is not a non-negative integer`);
      const value = Number(raw.trim());
      if (setting.min !== undefined && value < setting.min) throw new ConfigError(variable, `${value} is below the minimum ${setting.min}`);
      if (setting.max !== undefined && value > setting.max) throw new ConfigError(variable, `${value} is above the maximum ${setting.max}`);
      return value;
    }
    case 'peers': {
      const peers: string[] = [];
      for (const part of raw.split(',')) {
        const text = part.trim();
        if (text === '') continue;
        const addr = parseHostPort(text);
        if (!addr || addr.port === 0) throw new ConfigError(variable, `peer "${text}" is not host:port`);
        // A wildcard (":7789", "0.0.0.0:7789") is a listen address: as a peer it would dial this
        // machine, not another replica.
        if (isWildcard(addr.host)) throw new ConfigError(variable, `peer "${text}" names no address (a wildcard): give each peer's own address`);
        const canonical = formatHostPort(addr.host, addr.port);
        if (!peers.includes(canonical)) peers.push(canonical);
      }
      return Object.freeze(peers);
    }
    case 'bool': {
      const text = raw.trim().toLowerCase();
      if (['1', 'true', 'yes', 'on'].includes(text)) return true;
      if (['0', 'false', 'no', 'off'].includes(text)) return false;
      throw new ConfigError(variable, `"${raw}" is not a boolean (true/false)`);
    }
    case 'level': {
      const text = raw.trim().toLowerCase();
      if (!(LEVELS as readonly string[]).includes(text)) throw new ConfigError(variable, `"${raw}" is not one of ${LEVELS.join(', ')}`);
      return text;
    }
    case 'token':
      return parsePeerToken(raw, variable);
    case 'file':
    case 'string':
      return raw.trim();
  }
}

/** Visible ASCII (RFC 9110's VCHAR), what a token in `Authorization: Bearer <token>` can hold. */
const VISIBLE_ASCII = /^[\x21-\x7e]*$/;

/**
 * The peer token as the replica and `routesync ctl` both read it (from ROUTESYNC_PEER_TOKEN or
 * a file): surrounding whitespace trimmed, since a Kubernetes Secret written with `echo` ends in
 * a newline; then visible ASCII only, since it travels in a header: a character outside
 * Latin-1 or an inner newline cannot be sent at all (every push would fail), and a space or
 * other control character is not a bearer token. One function, so that a token that works
 * between replicas works for ctl too. The message never shows the value: it is a secret.
 */
export function parsePeerToken(raw: string, variable = 'ROUTESYNC_PEER_TOKEN'): string {
  const token = raw.trim();
  // Set, but to whitespace only (a Secret written with `echo ""`): not "no auth", which is
  // written as an empty or unset variable, but a token lost on the way.
  if (token === '' && raw !== '') {
    throw new ConfigError(variable, 'the token is whitespace only: set a token, or leave the variable empty to run the peer API without auth; value not shown');
  }
  if (!VISIBLE_ASCII.test(token)) {
    throw new ConfigError(variable, 'the token may hold only visible ASCII characters (no spaces, control characters or non-ASCII); value not shown');
  }
  return token;
}

/**
 * `ROUTESYNC_*` variables that are no setting: most often a typo (`ROUTESYNC_SYNC_DEADLINE`
 * without `_MS`), which would otherwise leave the default in force without a word. Start-up
 * warns and goes on (a variable of a newer or older version must not stop a rollout). Names
 * only, each with the closest setting when one is a few edits away; never a value.
 */
export function unknownVariables(env: NodeJS.ProcessEnv): { variable: string; didYouMean?: string }[] {
  const unknown: { variable: string; didYouMean?: string }[] = [];
  for (const variable of Object.keys(env).sort()) {
    if (!variable.startsWith('ROUTESYNC_') || variable in SETTINGS) continue;
    let best: string | undefined;
    let bestDistance = 4;
    for (const known of Object.keys(SETTINGS)) {
      const distance = editDistance(variable, known);
      if (distance < bestDistance) [best, bestDistance] = [known, distance];
    }
    unknown.push(best === undefined ? { variable } : { variable, didYouMean: best });
  }
  return unknown;
}

/** Levenshtein distance (insertions, deletions, substitutions), one row at a time. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) {
      row[j] = Math.min(previous[j]! + 1, row[j - 1]! + 1, previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = row;
  }
  return previous[b.length]!;
}

/**
 * Build the Config from an environment and argv (flags only, no positionals).
 * Throws ConfigError on the first bad value.
 */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, argv: readonly string[] = []): Config {
  const options: Record<string, { type: 'string' }> = {};
  for (const variable of Object.keys(SETTINGS)) options[flagName(variable)] = { type: 'string' };
  let flags: Record<string, string | boolean | undefined>;
  try {
    flags = parseArgs({ args: [...argv], options, strict: true, allowPositionals: false }).values as Record<string, string | undefined>;
  } catch (error) {
    // A stray argument is often a flag's value cut off by a space (`--peer-token= s3cret`):
    // named by position, never repeated, since it may be a secret.
    if ((error as { code?: string }).code === 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL') {
      const { tokens } = parseArgs({ args: [...argv], options, strict: false, allowPositionals: true, tokens: true });
      const position = (tokens.find((token) => token.kind === 'positional')?.index ?? 0) + 1;
      throw new ConfigError('command line', `argument ${position} is not a --flag or --flag=value (its text is not shown: it may be a secret)`);
    }
    throw new ConfigError('command line', (error as Error).message.split('\n')[0] ?? 'bad flag');
  }

  const values: Record<string, unknown> = {};
  for (const [variable, setting] of Object.entries(SETTINGS)) {
    const fromFlag = flags[flagName(variable)];
    const raw = typeof fromFlag === 'string' ? fromFlag : (env[variable] ?? setting.fallback);
    const name = typeof fromFlag === 'string' ? `--${flagName(variable)}` : variable;
    values[setting.key] = parseValue(name, setting, raw);
  }
  const config = values as unknown as Config;

  if (config.self !== '') {
    const self = parseHostPort(config.self);
    if (!self) throw new ConfigError('ROUTESYNC_SELF', `"${config.self}" is not host:port`);
    // A wildcard is a listen address, not one a peer list can hold: as self it excludes nothing.
    if (isWildcard(self.host)) {
      throw new ConfigError('ROUTESYNC_SELF', `"${config.self}" names no address (a wildcard): give this replica's own address, or leave it empty to derive it`);
    }
    if (self.port === 0) throw new ConfigError('ROUTESYNC_SELF', `"${config.self}" has port 0, which no peer address has: give the peer port`);
  }
  if (config.peerDns !== '') {
    const match = /^([^:]*)(?::(\d{1,5}))?$/.exec(config.peerDns);
    // The name the resolver is asked as it is: labels of 1-63 letters, digits and inner hyphens,
    // at most 253 characters, one trailing dot allowed (a fully qualified name). Anything else
    // would start a replica that resolves nothing, every interval, and never finds a peer.
    const name = match?.[1]?.replace(/\.$/, '') ?? '';
    if (!match || name.length > 253 || !DNS_DOMAIN.test(name)) {
      throw new ConfigError('ROUTESYNC_PEER_DNS', `"${config.peerDns}" is not a DNS name (name or name:port; labels of 1-63 letters, digits and inner hyphens)`);
    }
    const port = match[2] === undefined ? undefined : Number(match[2]);
    if (port !== undefined && (port < 1 || port > 65_535)) {
      throw new ConfigError('ROUTESYNC_PEER_DNS', `port ${match[2]} in "${config.peerDns}" is not 1-65535`);
    }
  }
  if (config.proxyDomain !== '') {
    // The data plane compares the Host's domain with this exactly: a leading or trailing dot, a
    // port or a wildcard would silently match no request and turn host-form routing off.
    if (config.proxyDomain.length > 253 || !DNS_DOMAIN.test(config.proxyDomain)) {
      throw new ConfigError('ROUTESYNC_PROXY_DOMAIN', `"${config.proxyDomain}" is not a DNS domain such as sandbox.example.com (no leading or trailing dot, port or wildcard)`);
    }
  }
  for (const server of config.peerDnsServers.split(',').map((part) => part.trim()).filter((part) => part !== '')) {
    const hostPort = parseHostPort(server);
    const host = hostPort ? hostPort.host : server;
    if (isIP(host) === 0 || (hostPort && hostPort.port === 0) || (!hostPort && server.includes(':') && isIP(server) !== 6)) {
      throw new ConfigError('ROUTESYNC_PEER_DNS_SERVERS', `"${server}" is not an IP address or ip:port`);
    }
  }
  // A replica that goes half a fence TTL without a completed round is suspect (its peers stop
  // pulling from it and its next round rebuilds its table); healthy replicas must never get there.
  const longestIntervalMs = maxReconcileIntervalMs(config.tombstoneTtlMs);
  if (config.reconcileIntervalMs > longestIntervalMs) {
    throw new ConfigError(
      'ROUTESYNC_RECONCILE_INTERVAL_MS',
      `${config.reconcileIntervalMs} ms is too long for ROUTESYNC_TOMBSTONE_TTL_MS ${config.tombstoneTtlMs} ms: rounds come up to ` +
        `${RECONCILE_JITTER_MAX} intervals apart and a replica turns suspect after half the TTL without one; ` +
        `${RECONCILE_GAPS_PER_SUSPECT_WINDOW} such gaps must fit in it, so the interval must stay below TTL / ${RECONCILE_INTERVALS_PER_TTL} ` +
        `(at most ${longestIntervalMs} ms) or the TTL above ${RECONCILE_INTERVALS_PER_TTL} intervals`,
    );
  }
  // The first ejection lasts ROUTESYNC_EJECT_PROBE_MS and doubles up to the ceiling; a ceiling
  // below it would silently cut the first one short.
  if (config.ejectMaxMs < config.ejectProbeMs) {
    throw new ConfigError('ROUTESYNC_EJECT_MAX_MS', `${config.ejectMaxMs} is below ROUTESYNC_EJECT_PROBE_MS ${config.ejectProbeMs} (the first ejection's length)`);
  }
  if (config.retryMinMs > config.retryMaxMs) {
    throw new ConfigError('ROUTESYNC_RETRY_MIN_MS', `${config.retryMinMs} is above ROUTESYNC_RETRY_MAX_MS ${config.retryMaxMs}`);
  }
  // The invariant that removes the legacy failure: retrying must never cost more than one
  // attempt's timeout. p-retry's randomize multiplies each wait by up to 2.
  const worstBackoff = worstCaseBackoffMs(config);
  if (config.syncRetries > 0 && worstBackoff >= config.attemptTimeoutMs) {
    throw new ConfigError(
      'ROUTESYNC_SYNC_RETRIES',
      `worst-case total backoff ${worstBackoff} ms must stay below ROUTESYNC_ATTEMPT_TIMEOUT_MS ${config.attemptTimeoutMs} ms`,
    );
  }
  // SIGTERM lets in-flight lifecycle calls finish within the grace: one cut off before its own
  // deadline would tell its manager nothing of a change already applied here.
  if (config.syncDeadlineMs > config.shutdownGraceMs) {
    throw new ConfigError(
      'ROUTESYNC_SHUTDOWN_GRACE_MS',
      `${config.shutdownGraceMs} ms is shorter than ROUTESYNC_SYNC_DEADLINE_MS ${config.syncDeadlineMs} ms: a lifecycle call in flight at shutdown could be cut before its deadline`,
    );
  }
  const tls = [config.peerTlsCert, config.peerTlsKey].filter((file) => file !== '').length;
  if (tls === 1) {
    throw new ConfigError(config.peerTlsCert === '' ? 'ROUTESYNC_PEER_TLS_CERT' : 'ROUTESYNC_PEER_TLS_KEY', 'TLS needs both a certificate and a key');
  }
  if (tls === 0 && config.peerTlsCa !== '') {
    // Replicas are symmetric: a CA alone would make this replica dial HTTPS peers while serving
    // plain HTTP itself, which no peer of the same configuration could talk to.
    throw new ConfigError('ROUTESYNC_PEER_TLS_CA', 'a CA needs ROUTESYNC_PEER_TLS_CERT and ROUTESYNC_PEER_TLS_KEY too');
  }
  return Object.freeze(config);
}

/** The peer TLS files' contents, read once at start-up. */
export interface PeerTlsMaterial {
  readonly cert: Buffer;
  readonly key: Buffer;
  /** Trusted CA for peers' certificates; when set, peers must also present a client certificate it signed (mTLS). */
  readonly ca: Buffer | undefined;
}

/** The material as Node's and undici's TLS options take it (no `ca` key without a CA). */
export function tlsOptions(tls: PeerTlsMaterial): { cert: Buffer; key: Buffer; ca?: Buffer } {
  return { cert: tls.cert, key: tls.key, ...(tls.ca ? { ca: tls.ca } : {}) };
}

/**
 * Read and check the peer TLS files (undefined when TLS is off). An unreadable or unusable
 * file throws ConfigError naming its variable, so start-up stops with one clear line.
 */
export function readPeerTls(
  config: Pick<Config, 'peerTlsCert' | 'peerTlsKey' | 'peerTlsCa'>,
  readFile: (path: string) => Buffer = (path) => readFileSync(path),
): PeerTlsMaterial | undefined {
  if (config.peerTlsCert === '' || config.peerTlsKey === '') return undefined;
  const read = (variable: string, path: string): Buffer => {
    try {
      return readFile(path);
    } catch (error) {
      const code = (error as { code?: unknown }).code;
      throw new ConfigError(variable, `cannot read "${path}" (${typeof code === 'string' ? code : (error as Error).message})`);
    }
  };
  const cert = read('ROUTESYNC_PEER_TLS_CERT', config.peerTlsCert);
  const key = read('ROUTESYNC_PEER_TLS_KEY', config.peerTlsKey);
  const ca = config.peerTlsCa === '' ? undefined : read('ROUTESYNC_PEER_TLS_CA', config.peerTlsCa);
  // Load each part on its own first, so the message names the file that is wrong.
  const check = (variable: string, what: string, options: Parameters<typeof createSecureContext>[0]) => {
    try {
      createSecureContext(options);
    } catch (error) {
      throw new ConfigError(variable, `${what}: ${firstLine((error as Error).message)}`);
    }
  };
  check('ROUTESYNC_PEER_TLS_CERT', `"${config.peerTlsCert}" is not a usable PEM certificate`, { cert });
  check('ROUTESYNC_PEER_TLS_KEY', `"${config.peerTlsKey}" is not a usable PEM key for the certificate`, { cert, key });
  if (ca) {
    // createSecureContext skips a CA it cannot parse without a word; X509Certificate does not.
    try {
      new X509Certificate(ca);
    } catch (error) {
      throw new ConfigError('ROUTESYNC_PEER_TLS_CA', `"${config.peerTlsCa}" is not a PEM CA certificate: ${firstLine((error as Error).message)}`);
    }
  }
  return Object.freeze({ cert, key, ca });
}

function firstLine(text: string): string {
  return text.split('\n')[0] ?? text;
}

/** The reconcile timer's longest wait, in intervals (src/peers/reconcile.ts: 0.75-1.25 x, the ±25 % jitter). */
export const RECONCILE_JITTER_MAX = 1.25;
/** A replica without a completed round for this fraction of the fence TTL is suspect (reconcile.ts SUSPECT_AFTER_TTL_FRACTION). */
export const SUSPECT_AFTER_TTL_FRACTION = 0.5;
/**
 * A local change is trusted over the fleet's word (spared by a suspect rebuild, pushed by a
 * suspect replica) only while younger than this fraction of the fence TTL: any deletion that
 * supersedes it was made later, so its fence still lives everywhere it reached. The TTL / 4 left
 * covers clock skew and the manager's own delay (reconcile.ts, "No resurrection").
 */
export const LOCAL_CHANGE_TRUSTED_TTL_FRACTION = 0.75;
/**
 * The safety margin: this many of the longest gaps between rounds fit in the suspect window, so
 * a replica that loses one round (its peer was restarting, a request failed) is still trusted.
 */
export const RECONCILE_GAPS_PER_SUSPECT_WINDOW = 2;

/** So the interval must stay below TTL / 5. */
const RECONCILE_INTERVALS_PER_TTL = (RECONCILE_GAPS_PER_SUSPECT_WINDOW * RECONCILE_JITTER_MAX) / SUSPECT_AFTER_TTL_FRACTION;

/**
 * The longest ROUTESYNC_RECONCILE_INTERVAL_MS for a fence TTL, in whole ms: below TTL / 5
 * (119,999 ms for the default 10 minutes). Past 50 peers reconcile.ts stretches the interval by
 * peers / 50, but never past this (from 50 × TTL / (5 × interval) peers on, 1,200 with the
 * defaults), so the margin holds at any fleet size.
 */
export function maxReconcileIntervalMs(tombstoneTtlMs: number): number {
  return Math.ceil(tombstoneTtlMs / RECONCILE_INTERVALS_PER_TTL) - 1;
}

/** Sum of p-retry's waits with `randomize` at its maximum (factor 2), exponent 2. */
export function worstCaseBackoffMs(config: Pick<Config, 'syncRetries' | 'retryMinMs' | 'retryMaxMs'>): number {
  let total = 0;
  for (let attempt = 1; attempt <= config.syncRetries; attempt++) {
    total += Math.min(2 * config.retryMinMs * 2 ** (attempt - 1), config.retryMaxMs);
  }
  return total;
}

/** A Config for tests and tools: defaults plus overrides given as environment variables. */
export function configFromEnv(overrides: Record<string, string | undefined> = {}): Config {
  return loadConfig(overrides as NodeJS.ProcessEnv);
}
