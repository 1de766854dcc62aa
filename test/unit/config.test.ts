import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, maxReconcileIntervalMs, RECONCILE_JITTER_MAX, SUSPECT_AFTER_TTL_FRACTION, worstCaseBackoffMs } from '../../src/config.js';
import { selfAddresses, staticPeers } from '../../src/peers/discovery.js';
import { SUSPECT_AFTER_TTL_FRACTION as RECONCILER_SUSPECT_FRACTION } from '../../src/peers/reconcile.js';

describe('configuration', () => {
  it('runs a single replica out of the box', () => {
    const config = loadConfig({});
    expect(config.apiAddr).toEqual({ host: '127.0.0.1', port: 7788 });
    expect(config.peerAddr).toEqual({ host: '0.0.0.0', port: 7789 });
    expect(config.proxyAddr).toEqual({ host: '0.0.0.0', port: 8080 });
    expect(config.peers).toEqual([]);
    expect(config.tombstoneTtlMs).toBe(600_000);
    expect(config.defaultSandboxPort).toBe(49983);
    expect(Object.isFrozen(config)).toBe(true);
  });

  it('keeps the default retry budget below one attempt timeout and inside the deadline', () => {
    const config = loadConfig({});
    const worst = worstCaseBackoffMs(config);
    expect(worst).toBeLessThan(config.attemptTimeoutMs);
    expect((config.syncRetries + 1) * config.attemptTimeoutMs + worst).toBeLessThanOrEqual(config.syncDeadlineMs);
  });

  it('takes flags over environment variables', () => {
    const config = loadConfig({ ROUTESYNC_SYNC_DEADLINE_MS: '900' }, ['--sync-deadline-ms', '250', '--peers=10.0.0.2:7789,[fd00::2]:7789']);
    expect(config.syncDeadlineMs).toBe(250);
    expect(config.peers).toEqual(['10.0.0.2:7789', '[fd00::2]:7789']);
  });

  it('writes an IPv6 peer the one way DNS answers and interfaces do, so one peer is never two and self is recognised', () => {
    // DNS answers (c-ares) and os.networkInterfaces() give compressed lower-case IPv6 text.
    expect(loadConfig({ ROUTESYNC_PEERS: '[fd00::2]:7789,[FD00:0:0::2]:7789,Peer-0.Peers:7789,peer-0.peers:7789' }).peers).toEqual([
      '[fd00::2]:7789',
      'peer-0.peers:7789',
    ]);
    const self = selfAddresses({ self: '[FD00:0::1]:7789', peerAddr: { host: '0.0.0.0', port: 7789 } });
    expect([...self]).toEqual(['[fd00::1]:7789']);
    expect(staticPeers({ peers: loadConfig({ ROUTESYNC_PEERS: '[fd00::1]:7789,[fd00::3]:7789' }).peers }, self)).toEqual(['[fd00::3]:7789']);
  });

  it('knows a listen address however IPv6 writes it: the uncompressed wildcard still means every interface', () => {
    const written = loadConfig({ ROUTESYNC_PEER_ADDR: '[0:0:0:0:0:0:0:0]:7789', ROUTESYNC_API_ADDR: '[0:0::1]:7788' });
    expect(written.peerAddr).toEqual({ host: '::', port: 7789 });
    expect(written.apiAddr).toEqual({ host: '::1', port: 7788 });
    // Every interface's address is this replica, so a peer list naming one of them excludes it.
    expect([...selfAddresses(written)]).toEqual([...selfAddresses(loadConfig({ ROUTESYNC_PEER_ADDR: '[::]:7789' }))]);
    expect(selfAddresses(written).size).toBeGreaterThan(1);
  });

  it('never repeats a stray command-line argument, which may be a flag\'s secret value cut off by a space', () => {
    let message = '';
    try {
      loadConfig({}, ['--sync-deadline-ms', '500', '--peer-token=', 's3cret-token-value']);
    } catch (error) {
      message = (error as Error).message;
    }
    expect(message).toBe('invalid command line: argument 4 is not a --flag or --flag=value (its text is not shown: it may be a secret)');
  });

  it('never repeats the credentials of a URL-like value in its one line', () => {
    const cases: Record<string, string>[] = [
      { ROUTESYNC_PEERS: 'http://admin:s3cret@peer-0:7789' },
      { ROUTESYNC_PEERS: 'peer-0:7789,:s3cret@peer-1:7789' },
      { ROUTESYNC_PEER_DNS: 'admin:s3cret@routesync-peers' },
      { ROUTESYNC_SELF: 'https://s3cret@10.0.0.5:7789' },
      { ROUTESYNC_API_ADDR: 'admin:s3cret@127.0.0.1:7788' },
      { ROUTESYNC_PEER_DNS_SERVERS: 's3cret@10.0.0.10' },
      // A token may hold a quote or a space: no part of it is shown either.
      { ROUTESYNC_PEERS: 'http://u:s3cret"s3cret@peer-0:7789' },
      { ROUTESYNC_PEERS: 'http://u:s3cret s3cret@peer-0:7789' },
      // A token holding `//` (base64 does), and a later URL with an `@` of its own.
      { ROUTESYNC_PEERS: 'http://s3cret:Zm9v//s3cret@peer-0:7789' },
      { ROUTESYNC_PEERS: 'https://s3cret:s3cret@p1:7789/x?next=http://y@z' },
      { ROUTESYNC_PEERS: 'u:s3cret"s3cret@peer-0:7789' },
    ];
    for (const env of cases) {
      const variable = Object.keys(env)[0]!;
      let message = '';
      try {
        loadConfig(env);
      } catch (error) {
        message = (error as Error).message;
      }
      expect(message).toMatch(new RegExp(`^invalid ${variable}: `));
      expect(message).not.toContain('s3cret');
      expect(message).toContain('[redacted]@');
    }
  });

  it('names the variable in one line for a bad value', () => {
    const cases: [Record<string, string>, RegExp][] = [
      [{ ROUTESYNC_SYNC_DEADLINE_MS: 'soon' }, /^invalid ROUTESYNC_SYNC_DEADLINE_MS: "soon" is not a non-negative integer$/],
      [{ ROUTESYNC_API_ADDR: 'localhost' }, /^invalid ROUTESYNC_API_ADDR:/],
      [{ ROUTESYNC_PEERS: 'a:1,b' }, /^invalid ROUTESYNC_PEERS: peer "b"/],
      [{ ROUTESYNC_LOG_LEVEL: 'loud' }, /^invalid ROUTESYNC_LOG_LEVEL:/],
      [{ ROUTESYNC_SYNC_CONCURRENCY: '0' }, /^invalid ROUTESYNC_SYNC_CONCURRENCY: 0 is below the minimum 1$/],
      [{ ROUTESYNC_DEFAULT_SANDBOX_PORT: '70000' }, /^invalid ROUTESYNC_DEFAULT_SANDBOX_PORT:/],
      [{ ROUTESYNC_RETRY_MIN_MS: '60', ROUTESYNC_RETRY_MAX_MS: '80' }, /^invalid ROUTESYNC_SYNC_RETRIES: worst-case total backoff/],
      [{ ROUTESYNC_EJECT_PROBE_MS: '5000', ROUTESYNC_EJECT_MAX_MS: '1000' }, /^invalid ROUTESYNC_EJECT_MAX_MS: 1000 is below ROUTESYNC_EJECT_PROBE_MS 5000/],
      [{ ROUTESYNC_PEER_TLS_CERT: '/tmp/cert.pem' }, /^invalid ROUTESYNC_PEER_TLS_KEY:/],
      [{ ROUTESYNC_PEER_DNS: 'routesync-peers.ns.svc.cluster.local:0' }, /^invalid ROUTESYNC_PEER_DNS: port 0 in "routesync-peers.ns.svc.cluster.local:0" is not 1-65535$/],
      [{ ROUTESYNC_PEER_DNS: 'routesync-peers:65536' }, /^invalid ROUTESYNC_PEER_DNS: port 65536 /],
      [{ ROUTESYNC_PEER_DNS: 'routesync-peers:99999' }, /^invalid ROUTESYNC_PEER_DNS: port 99999 /],
      [{ ROUTESYNC_PEER_DNS: 'routesync-peers:00000' }, /^invalid ROUTESYNC_PEER_DNS: port 00000 /],
      // A wildcard as self would exclude nothing from the peer list.
      [{ ROUTESYNC_SELF: ':7789' }, /^invalid ROUTESYNC_SELF: ":7789" names no address \(a wildcard\)/],
      [{ ROUTESYNC_SELF: '0.0.0.0:7789' }, /^invalid ROUTESYNC_SELF: "0.0.0.0:7789" names no address/],
      [{ ROUTESYNC_SELF: '[::]:7789' }, /^invalid ROUTESYNC_SELF: "\[::\]:7789" names no address/],
      [{ ROUTESYNC_SELF: '10.0.0.5:0' }, /^invalid ROUTESYNC_SELF: "10.0.0.5:0" has port 0/],
      // A wildcard as a peer would dial this machine.
      [{ ROUTESYNC_PEERS: '10.0.0.6:7789,:7789' }, /^invalid ROUTESYNC_PEERS: peer ":7789" names no address \(a wildcard\)/],
      [{ ROUTESYNC_PEERS: '0.0.0.0:7789' }, /^invalid ROUTESYNC_PEERS: peer "0.0.0.0:7789" names no address/],
      [{ ROUTESYNC_PEERS: '[0::0]:7789' }, /^invalid ROUTESYNC_PEERS: peer "\[0::0\]:7789" names no address/],
    ];
    for (const [env, message] of cases) {
      expect(() => loadConfig(env)).toThrow(ConfigError);
      expect(() => loadConfig(env)).toThrow(message);
    }
    expect(() => loadConfig({}, ['--no-such-flag', '1'])).toThrow(/^invalid command line:/);
  });

  it('takes ROUTESYNC_PEER_DNS as name or name:port with a port of 1-65535', () => {
    for (const value of ['routesync-peers', 'routesync-peers.ns.svc.cluster.local:7789', 'routesync-peers.ns.svc.cluster.local.', 'peers.:7789', 'peers:1', 'peers:65535']) {
      expect(loadConfig({ ROUTESYNC_PEER_DNS: value }).peerDns).toBe(value);
    }
  });

  it('refuses a ROUTESYNC_PEER_DNS the resolver could never answer, rather than starting a replica that finds no peer', () => {
    for (const value of ['routesync..ns.svc', `${'a'.repeat(64)}.ns.svc`, '-peers.ns.svc', 'peers-.ns.svc', '.', '-', 'peers..', `${'abc.'.repeat(64)}svc`, 'peers_x.ns', ':7789']) {
      expect(() => loadConfig({ ROUTESYNC_PEER_DNS: value }), value).toThrow(/^invalid ROUTESYNC_PEER_DNS: .* is not a DNS name/);
    }
  });

  it('reads the peer token trimmed, and refuses one that cannot travel in a header, naming the variable and never the value', () => {
    expect(loadConfig({ ROUTESYNC_PEER_TOKEN: '  tok-1_~!./+=\n' }).peerToken).toBe('tok-1_~!./+=');
    // Empty is "no auth"; whitespace only is a token lost on the way (a Secret written with
    // `echo ""`), which must not turn the peer API's auth off without a word.
    expect(loadConfig({ ROUTESYNC_PEER_TOKEN: '' }).peerToken).toBe('');
    for (const blank of ['\n', '  ', ' \r\n']) {
      expect(() => loadConfig({ ROUTESYNC_PEER_TOKEN: blank }), JSON.stringify(blank)).toThrow(/^invalid ROUTESYNC_PEER_TOKEN: the token is whitespace only/);
    }
    for (const token of ['pass\u20acphrase-1', 'caf\u00e9-latin1', 'two\nlines', 'with space', 'tab\there', 'nul\u0000byte', 'del\u007f']) {
      let error: unknown;
      try {
        loadConfig({ ROUTESYNC_PEER_TOKEN: token });
      } catch (caught) {
        error = caught;
      }
      expect(error, JSON.stringify(token)).toBeInstanceOf(ConfigError);
      const message = (error as ConfigError).message;
      expect(message).toMatch(/^invalid ROUTESYNC_PEER_TOKEN: the token may hold only visible ASCII characters/);
      expect(message).not.toContain(token.slice(0, 4));
      expect(message.includes('\n')).toBe(false);
    }
    expect(() => loadConfig({}, ['--peer-token', 'pass\u20acphrase'])).toThrow(/^invalid --peer-token: /);
  });

  it('refuses a shutdown grace shorter than the sync deadline, naming both variables', () => {
    const tooShort = () => loadConfig({ ROUTESYNC_SYNC_DEADLINE_MS: '2000', ROUTESYNC_SHUTDOWN_GRACE_MS: '1999' });
    expect(tooShort).toThrow(ConfigError);
    expect(tooShort).toThrow(/^invalid ROUTESYNC_SHUTDOWN_GRACE_MS: 1999 ms is shorter than ROUTESYNC_SYNC_DEADLINE_MS 2000 ms/);
    expect(loadConfig({ ROUTESYNC_SYNC_DEADLINE_MS: '2000', ROUTESYNC_SHUTDOWN_GRACE_MS: '2000' }).shutdownGraceMs).toBe(2000);
    // An immediate stop needs no deadline to wait for.
    expect(loadConfig({ ROUTESYNC_SYNC_DEADLINE_MS: '0', ROUTESYNC_SHUTDOWN_GRACE_MS: '0' }).shutdownGraceMs).toBe(0);
  });

  it('refuses a reconcile interval at which healthy replicas could turn suspect, naming both variables', () => {
    // Suspect after half the TTL without a round; rounds up to 1.25 intervals apart; two such gaps must fit.
    expect(SUSPECT_AFTER_TTL_FRACTION).toBe(RECONCILER_SUSPECT_FRACTION);
    const tooLong = () => loadConfig({ ROUTESYNC_TOMBSTONE_TTL_MS: '2000', ROUTESYNC_RECONCILE_INTERVAL_MS: '1600' });
    expect(tooLong).toThrow(ConfigError);
    expect(tooLong).toThrow(/^invalid ROUTESYNC_RECONCILE_INTERVAL_MS: 1600 ms is too long for ROUTESYNC_TOMBSTONE_TTL_MS 2000 ms: .*\(at most 399 ms\)/);
    expect(loadConfig({ ROUTESYNC_TOMBSTONE_TTL_MS: '2000', ROUTESYNC_RECONCILE_INTERVAL_MS: '399' }).reconcileIntervalMs).toBe(399);
    expect(() => loadConfig({ ROUTESYNC_TOMBSTONE_TTL_MS: '2000', ROUTESYNC_RECONCILE_INTERVAL_MS: '400' })).toThrow(ConfigError);
    // The default TTL (10 min) allows up to just under 2 min; an hour needs a longer TTL.
    expect(loadConfig({ ROUTESYNC_RECONCILE_INTERVAL_MS: '119999' }).reconcileIntervalMs).toBe(119_999);
    expect(() => loadConfig({ ROUTESYNC_RECONCILE_INTERVAL_MS: '120000' })).toThrow(/ROUTESYNC_TOMBSTONE_TTL_MS/);
    expect(() => loadConfig({}, ['--reconcile-interval-ms=3600000'])).toThrow(/^invalid ROUTESYNC_RECONCILE_INTERVAL_MS: /);
    expect(loadConfig({ ROUTESYNC_RECONCILE_INTERVAL_MS: '3600000', ROUTESYNC_TOMBSTONE_TTL_MS: '604800000' }).reconcileIntervalMs).toBe(3_600_000);
    for (const ttlMs of [250, 1001, 2000, 600_000, 604_800_000]) {
      const longest = maxReconcileIntervalMs(ttlMs);
      expect(2 * RECONCILE_JITTER_MAX * longest, `TTL ${ttlMs}`).toBeLessThan(ttlMs * SUSPECT_AFTER_TTL_FRACTION);
      expect(2 * RECONCILE_JITTER_MAX * (longest + 1), `TTL ${ttlMs}`).toBeGreaterThanOrEqual(ttlMs * SUSPECT_AFTER_TTL_FRACTION);
    }
  });

  it('refuses a ROUTESYNC_PROXY_DOMAIN that no Host could match, instead of silently turning host routing off', () => {
    for (const domain of ['sandbox.example.com', 'Sandbox.Example.COM', 'localhost', 'a-1.b2.io', `${'a'.repeat(63)}.io`]) {
      expect(loadConfig({ ROUTESYNC_PROXY_DOMAIN: domain }).proxyDomain, domain).toBe(domain);
    }
    expect(loadConfig({ ROUTESYNC_PROXY_DOMAIN: '  sandbox.example.com\n' }).proxyDomain).toBe('sandbox.example.com');
    for (const domain of ['.sandbox.example.com', 'sandbox.example.com.', 'sandbox..example.com', '*.sandbox.example.com', 'sandbox.example.com:8080', 'https://sandbox.example.com', '-x.io', 'x-.io', 'sand box.io', `${'a'.repeat(64)}.io`]) {
      expect(() => loadConfig({ ROUTESYNC_PROXY_DOMAIN: domain }), domain).toThrow(/^invalid ROUTESYNC_PROXY_DOMAIN: .* is not a DNS domain/);
    }
  });
});
