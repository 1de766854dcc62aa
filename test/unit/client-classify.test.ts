import { createServer, type AddressInfo } from 'node:net';
import { describe, expect, it } from 'vitest';
import { AttemptTimeoutError, classifyPeerError, classifyStatus, PeerClient, PeerRequestError, retryAfterMs, SyncAbortedError } from '../../src/peers/client.js';

function systemError(code: string): Error {
  return Object.assign(new Error(code), { code });
}

describe('peer error classification', () => {
  it('retries connection failures, timeouts, 429 and 5xx', () => {
    const transient: [unknown, string][] = [
      [systemError('ECONNREFUSED'), 'refused'],
      [systemError('ECONNRESET'), 'reset'],
      [systemError('UND_ERR_SOCKET'), 'reset'],
      [systemError('UND_ERR_CONNECT_TIMEOUT'), 'timeout'],
      [systemError('UND_ERR_HEADERS_TIMEOUT'), 'timeout'],
      [new AttemptTimeoutError(100), 'timeout'],
      [systemError('EHOSTUNREACH'), 'unreachable'],
      [systemError('EAI_AGAIN'), 'dns'],
      [systemError('EMFILE'), 'local_resources'],
      [systemError('ENOBUFS'), 'local_resources'],
      // undici wraps the system error of a failed connect: the cause carries the code.
      [Object.assign(new TypeError('fetch failed'), { cause: systemError('ECONNREFUSED') }), 'refused'],
    ];
    for (const [error, errorClass] of transient) {
      const classified = classifyPeerError(error);
      expect(classified.errorClass, String(error)).toBe(errorClass);
      expect(classified.transient).toBe(true);
    }
    expect(classifyStatus(408)).toBe('timeout');
    for (const status of [408, 429, 500, 502, 503, 504]) {
      expect(new PeerRequestError(classifyStatus(status), 'x').transient, String(status)).toBe(true);
    }
  });

  it('fails other 4xx, aborts and unknown errors at once', () => {
    for (const status of [400, 404, 409, 413, 401, 403]) {
      expect(new PeerRequestError(classifyStatus(status), 'x').transient, String(status)).toBe(false);
    }
    expect(classifyStatus(401)).toBe('unauthorized');
    expect(classifyPeerError(new SyncAbortedError()).errorClass).toBe('aborted');
    expect(classifyPeerError(new SyncAbortedError()).transient).toBe(false);
    expect(classifyPeerError(new Error('something odd')).errorClass).toBe('unknown');
    expect(classifyPeerError(new Error('something odd')).transient).toBe(false);
  });

  it('classifies by code, not by class identity', () => {
    // A structurally identical error from a second copy of undici still classifies.
    class OtherCopySocketError extends Error {
      code = 'UND_ERR_SOCKET';
    }
    expect(classifyPeerError(new OtherCopySocketError('other side closed')).errorClass).toBe('reset');
  });
});

describe('a peer whose answer is not HTTP', () => {
  it('fails the request as protocol (permanent), whatever part of the answer is garbled', async () => {
    // Real sockets: what undici's parser throws for each is what production would see.
    const answers = ['SSH-2.0-OpenSSH_9.6\r\n\r\n', 'HTTP/1.1 abc OK\r\n\r\n', 'HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n'];
    let answer = '';
    const server = createServer((socket) => socket.once('data', () => socket.end(answer)));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const client = new PeerClient({ connections: 1, token: '', instanceId: 'self' });
    try {
      const peer = `127.0.0.1:${(server.address() as AddressInfo).port}`;
      for (answer of answers) {
        const error = await client.requestJson(peer, 'GET', '/healthz', undefined, AbortSignal.timeout(5_000)).then(
          () => undefined,
          (thrown: unknown) => thrown,
        );
        expect(error, answer).toMatchObject({ errorClass: 'protocol', transient: false });
      }
    } finally {
      await client.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});

describe('retryAfterMs', () => {
  const now = Date.parse('2026-12-04T12:00:00Z');
  it('reads delay-seconds and HTTP-dates, a past date as now', () => {
    expect(retryAfterMs('30', now)).toBe(30_000);
    expect(retryAfterMs(' 0 ', now)).toBe(0);
    expect(retryAfterMs('Fri, 04 Dec 2026 12:00:05 GMT', now)).toBe(5_000);
    expect(retryAfterMs('Fri, 04 Dec 2026 11:00:00 GMT', now)).toBe(0);
  });
  it('takes anything else, a repeated header too, as no request to wait', () => {
    for (const value of ['soon', '-5', '1.5s', '', '2026-12-04T12:00:05Z']) expect(retryAfterMs(value, now), value).toBeUndefined();
    expect(retryAfterMs(['5', '6'], now)).toBeUndefined();
  });
});
