// The secrets scan itself: it must catch a planted secret (or the suite-wide check proves
// nothing), and it must not flag what the logger redacts.
import { describe, expect, it } from 'vitest';
import { createLogger } from '../../src/log.js';
import { LogSink } from '../helpers/cluster.js';
import { SECRET_MARKER, findLeaks, registerSecret, scanRegisteredLogs } from '../helpers/secrets.js';

const PEER_TOKEN = 'unit-peer-token-3c9d1e77';

describe('secrets scanner', () => {
  it('catches a registered secret, the marker, an unredacted secret field and a Bearer value', () => {
    const lines = [
      '{"level":"info","msg":"ok"}',
      `{"level":"warn","msg":"push failed for ${PEER_TOKEN}"}`,
      `{"level":"info","msg":"route","owner":"x-${SECRET_MARKER}-y"}`,
      '{"level":"debug","route":{"accessToken":"abc"}}',
      '{"level":"debug","headers":{"authorization":"Basic dXNlcjpwYXNz"}}',
      '{"level":"debug","msg":"sent Bearer abcdef123"}',
    ];
    const leaks = findLeaks('planted', lines, [PEER_TOKEN]);
    expect(leaks.map((leak) => leak.line)).toEqual(lines.slice(1));
    expect(leaks[0]!.why).toContain('registered secret');
    expect(leaks[0]!.why).not.toContain(PEER_TOKEN);
  });

  it('leaves redacted fields and ordinary lines alone', () => {
    const lines = [
      '{"level":"debug","route":{"accessToken":"[redacted]","hasAccessToken":true}}',
      '{"level":"info","headers":{"authorization":"[redacted]"},"msg":"WWW-Authenticate: Bearer realm=\\"routesync-peer\\""}',
      '{"level":"info","msg":"token accepted","tokenSource":"header"}',
    ];
    expect(findLeaks('clean', lines, [PEER_TOKEN])).toEqual([]);
  });

  it('a planted secret in a real logger\'s sink is found by the registry scan; redaction keeps the fields out', async () => {
    const sink = new LogSink();
    const logger = createLogger({ level: 'debug', destination: sink });
    const token = `access-${SECRET_MARKER}-unit`;
    registerSecret(PEER_TOKEN);
    logger.info({ accessToken: token, peerToken: PEER_TOKEN, headers: { authorization: `Bearer ${PEER_TOKEN}` } }, 'redacted fields');
    logger.flush();
    await new Promise((resolve) => setImmediate(resolve));
    expect(sink.lines).toHaveLength(1);
    expect(findLeaks('sink', sink.lines, [PEER_TOKEN, token])).toEqual([]);

    logger.warn(`careless message with ${PEER_TOKEN}`);
    logger.flush();
    await new Promise((resolve) => setImmediate(resolve));
    // The sink registered itself: the suite-wide scan sees the planted line.
    const scan = scanRegisteredLogs();
    expect(scan.leaks.some((leak) => leak.line.includes('careless message'))).toBe(true);
    // scanRegisteredLogs forgot every source, so this file's own after-scan stays clean.
  });
});
