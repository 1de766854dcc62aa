import { describe, expect, it } from 'vitest';
import { PeerOutbox, type DeliveryOutcome } from '../../src/peers/outbox.js';
import type { RouteChange } from '../../src/routes/route.js';

function upsert(name: string, resourceVersion: string): RouteChange {
  return { op: 'upsert', route: { namespace: 'ns', name, id: name, uid: name, resourceVersion, ip: '', state: 'running' } };
}

function remove(name: string, resourceVersion: string): RouteChange {
  return { op: 'delete', deletion: { namespace: 'ns', name, resourceVersion } };
}

/** A promise over watch(), with its cancel (unwatch): one call waiting on one change (an upsert unless `op` says). */
function waitFor(outbox: PeerOutbox, key: string, version: string, op: RouteChange['op'] = 'upsert'): { promise: Promise<DeliveryOutcome>; cancel: () => void } {
  let settle!: (outcome: DeliveryOutcome) => void;
  const promise = new Promise<DeliveryOutcome>((resolve) => {
    settle = resolve;
  });
  const watcher = { version, op, settle };
  outbox.watch(key, watcher);
  return { promise, cancel: () => outbox.unwatch(key, watcher) };
}

/** An upsert at version 5 in flight, then a delete at the same version queued behind it; a waiter on each. */
function upsertInFlightThenDelete() {
  const outbox = new PeerOutbox(100);
  outbox.enqueue(upsert('a', '5'));
  const upserted = waitFor(outbox, 'ns/a', '5');
  outbox.takeBatch(10);
  outbox.enqueue(remove('a', '5'));
  const deleted = waitFor(outbox, 'ns/a', '5', 'delete');
  let settled = false;
  void deleted.promise.then(() => (settled = true));
  return { outbox, upserted, deleted, deleteSettled: () => settled };
}

describe('PeerOutbox', () => {
  it('coalesces by identity: the newest version wins, a delete wins a tie', () => {
    const outbox = new PeerOutbox(100);
    outbox.enqueue(upsert('a', '1'));
    outbox.enqueue(upsert('a', '3'));
    outbox.enqueue(upsert('a', '2'));
    outbox.enqueue(upsert('b', '1'));
    outbox.enqueue(remove('b', '1'));
    expect(outbox.size).toBe(2);
    expect(outbox.takeBatch(10)).toEqual([upsert('a', '3'), remove('b', '1')]);
  });

  it('on a batch refused whole, fails the refused entries and sends the rest again first, their waiters still waiting', async () => {
    const outbox = new PeerOutbox(100);
    for (const name of ['a', 'b', 'c']) outbox.enqueue(upsert(name, '1'));
    const [a, b, c] = ['a', 'b', 'c'].map((name) => waitFor(outbox, `ns/${name}`, '1'));
    outbox.takeBatch(10);
    outbox.enqueue(upsert('c', '2'));
    outbox.enqueue(upsert('d', '1'));
    let waiting = 2;
    for (const waiter of [a, c]) void waiter!.promise.then(() => waiting--);
    expect(outbox.refuseInFlight([1])).toEqual([]);
    await expect(b!.promise).resolves.toEqual({ status: 'failed', errorClass: 'rejected' });
    // a again, then c at its newer version (queued meanwhile), then what was queued behind.
    expect(outbox.takeBatch(10)).toEqual([upsert('a', '1'), upsert('c', '2'), upsert('d', '1')]);
    expect(waiting).toBe(2);
    outbox.ackInFlight();
    await expect(a!.promise).resolves.toEqual({ status: 'acked' });
    await expect(c!.promise).resolves.toEqual({ status: 'acked' });
  });

  it('resolves a waiter when the same or a newer version is acknowledged', async () => {
    const outbox = new PeerOutbox(100);
    outbox.enqueue(upsert('a', '1'));
    const first = waitFor(outbox, 'ns/a', '1');
    outbox.enqueue(upsert('a', '2'));
    const second = waitFor(outbox, 'ns/a', '2');
    outbox.takeBatch(10);
    outbox.ackInFlight();
    await expect(first.promise).resolves.toEqual({ status: 'acked' });
    await expect(second.promise).resolves.toEqual({ status: 'acked' });
    expect(outbox.waiterCount).toBe(0);
  });

  it('does not resolve a delete waiter with the ack of an upsert at the same version, in flight when the delete came', async () => {
    // A manager deletes at the sandbox's current version: the upsert at that version may still be on its way.
    const { outbox, upserted, deleted, deleteSettled } = upsertInFlightThenDelete();
    outbox.ackInFlight();
    await expect(upserted.promise).resolves.toEqual({ status: 'acked' });
    expect(deleteSettled()).toBe(false);
    expect(outbox.takeBatch(10)).toEqual([remove('a', '5')]);
    outbox.ackInFlight();
    await expect(deleted.promise).resolves.toEqual({ status: 'acked' });
    expect(outbox.waiterCount).toBe(0);
  });

  it('does not fail a delete waiter with the failure of an upsert at the same version', async () => {
    const { outbox, upserted, deleted, deleteSettled } = upsertInFlightThenDelete();
    // A permanent failure: the upsert is not requeued, the delete it did not carry stays queued.
    outbox.failInFlight({ status: 'failed', errorClass: 'http_4xx' }, false);
    await expect(upserted.promise).resolves.toEqual({ status: 'failed', errorClass: 'http_4xx' });
    expect(deleteSettled()).toBe(false);
    expect(outbox.takeBatch(10)).toEqual([remove('a', '5')]);
    outbox.ackInFlight();
    await expect(deleted.promise).resolves.toEqual({ status: 'acked' });
  });

  it('resolves an upsert waiter with the ack of a delete at the same version (the delete is the stronger change)', async () => {
    const outbox = new PeerOutbox(100);
    outbox.enqueue(upsert('a', '5'));
    const upserted = waitFor(outbox, 'ns/a', '5');
    outbox.enqueue(remove('a', '5'));
    const deleted = waitFor(outbox, 'ns/a', '5', 'delete');
    expect(outbox.takeBatch(10)).toEqual([remove('a', '5')]);
    outbox.ackInFlight();
    await expect(upserted.promise).resolves.toEqual({ status: 'acked' });
    await expect(deleted.promise).resolves.toEqual({ status: 'acked' });
  });

  it('fails the entries a peer rejected and acknowledges the rest of the batch; the rejected are not queued again', async () => {
    const outbox = new PeerOutbox(100);
    for (const name of ['a', 'b', 'c']) outbox.enqueue(upsert(name, '1'));
    const [a, b, c] = ['a', 'b', 'c'].map((name) => waitFor(outbox, `ns/${name}`, '1'));
    outbox.takeBatch(10);
    outbox.ackInFlight([1]);
    await expect(a!.promise).resolves.toEqual({ status: 'acked' });
    await expect(b!.promise).resolves.toEqual({ status: 'failed', errorClass: 'rejected' });
    await expect(c!.promise).resolves.toEqual({ status: 'acked' });
    expect(outbox.size).toBe(0);
  });

  it('keeps a newer change queued while an older one is in flight', async () => {
    const outbox = new PeerOutbox(100);
    outbox.enqueue(upsert('a', '1'));
    outbox.takeBatch(10);
    outbox.enqueue(upsert('a', '2'));
    const newer = waitFor(outbox, 'ns/a', '2');
    outbox.ackInFlight();
    expect(outbox.size).toBe(1);
    let settled = false;
    void newer.promise.then(() => (settled = true));
    await Promise.resolve();
    expect(settled).toBe(false);
    expect(outbox.takeBatch(10)).toEqual([upsert('a', '2')]);
  });

  it('requeues a failed batch in front, unless a newer version arrived meanwhile', async () => {
    const outbox = new PeerOutbox(100);
    outbox.enqueue(upsert('a', '1'));
    outbox.enqueue(upsert('b', '1'));
    const waiter = waitFor(outbox, 'ns/a', '1');
    outbox.takeBatch(10);
    outbox.enqueue(upsert('c', '1'));
    outbox.enqueue(upsert('b', '5'));
    outbox.failInFlight({ status: 'failed', errorClass: 'http_5xx' }, true);
    await expect(waiter.promise).resolves.toEqual({ status: 'failed', errorClass: 'http_5xx' });
    expect(outbox.takeBatch(10)).toEqual([upsert('a', '1'), upsert('b', '5'), upsert('c', '1')]);
  });

  it('drops the oldest change past its bound and tells its waiters', async () => {
    const outbox = new PeerOutbox(2);
    outbox.enqueue(upsert('a', '1'));
    const oldest = waitFor(outbox, 'ns/a', '1');
    outbox.enqueue(upsert('b', '1'));
    expect(outbox.enqueue(upsert('c', '1'))).toEqual([upsert('a', '1')]);
    await expect(oldest.promise).resolves.toEqual({ status: 'failed', errorClass: 'outbox_full' });
    expect(outbox.size).toBe(2);
  });

  it('forgets a cancelled waiter', () => {
    const outbox = new PeerOutbox(10);
    outbox.enqueue(upsert('a', '1'));
    const waiter = waitFor(outbox, 'ns/a', '1');
    waiter.cancel();
    expect(outbox.waiterCount).toBe(0);
  });
});
