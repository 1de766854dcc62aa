// The sync deadline is the lifecycle call's: it counts from when the call arrived, and the wait
// ends a small reserve before it so that the answer reaches the caller by the deadline.
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { answerReserveMs, type PeerSync } from '../../src/peers/fanout.js';
import { PeerOutbox } from '../../src/peers/outbox.js';
import { parseChange, type RouteChange } from '../../src/routes/route.js';
import { makeRoute } from '../helpers/cluster.js';
import { startPeerSync } from '../helpers/peer-sync.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  vi.restoreAllMocks();
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A peer that accepts connections and never answers. */
async function hungPeer(): Promise<string> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(
    () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  );
  const { port } = server.address() as net.AddressInfo;
  return `127.0.0.1:${port}`;
}

function fanout(deadlineMs: number): PeerSync {
  return startPeerSync(
    { ROUTESYNC_SYNC_DEADLINE_MS: String(deadlineMs), ROUTESYNC_ATTEMPT_TIMEOUT_MS: String(deadlineMs * 2), ROUTESYNC_EJECT_AFTER_FAILURES: '1000' },
    (close) => cleanups.push(close),
  );
}

function change(): RouteChange {
  return parseChange(makeRoute());
}

describe('sync deadline', () => {
  it('keeps 5% of the deadline, at most 25 ms, for the answer', () => {
    expect(answerReserveMs(500)).toBe(25);
    expect(answerReserveMs(5000)).toBe(25);
    expect(answerReserveMs(100)).toBe(5);
    expect(answerReserveMs(0)).toBe(0);
  });

  it('counts from the call’s arrival: time spent before the fan-out comes off the wait', async () => {
    const sync = fanout(1000);
    sync.setPeers([await hungPeer()]);
    // The call arrived 900 ms ago (a slow body, say): 1000 - 25 - 900 = 75 ms are left to wait.
    const outcome = await sync.sync([change()], performance.now() - 900);
    expect(outcome.acked).toBe(0);
    expect(outcome.pending).toEqual([{ peer: expect.any(String), reason: 'in_flight' }]);
    // Counted from the fan-out's own start it would wait ~975 ms.
    expect(outcome.elapsedMs).toBeLessThan(500);
  });

  it('without an arrival time, waits the deadline less the reserve', async () => {
    const sync = fanout(300);
    sync.setPeers([await hungPeer()]);
    const outcome = await sync.sync([change()]);
    expect(outcome.pending).toHaveLength(1);
    // Never less: Node's whole-millisecond timers alone would end it up to ~2 ms early.
    expect(outcome.elapsedMs).toBeGreaterThanOrEqual(300 - answerReserveMs(300));
  });

  it('counts the time spent queueing a call\'s changes for every peer against its deadline', async () => {
    const sync = fanout(5000);
    sync.setPeers(await Promise.all(Array.from({ length: 10 }, hungPeer)));
    // Slow queueing (a manager's resync of many thousand routes) without a slow machine: each
    // change queued for a peer moves the clock the fan-out reads by 600 ms, so queueing for ten
    // peers spends 6 s, more than the whole 5 s deadline.
    let offsetMs = 0;
    const realNow = performance.now.bind(performance);
    vi.spyOn(performance, 'now').mockImplementation(() => realNow() + offsetMs);
    const enqueue = PeerOutbox.prototype.enqueue;
    vi.spyOn(PeerOutbox.prototype, 'enqueue').mockImplementation(function (this: PeerOutbox, ...args: Parameters<PeerOutbox['enqueue']>) {
      offsetMs += 600;
      return enqueue.apply(this, args);
    });
    const startedReal = realNow();
    const outcome = await sync.sync([change()], performance.now());
    // The budget was spent queueing: the call answers at once instead of waiting another ~5 s.
    expect(realNow() - startedReal).toBeLessThan(2500);
    expect(outcome.elapsedMs).toBeGreaterThanOrEqual(6000);
    expect(outcome.pending).toHaveLength(10);
  });
});
