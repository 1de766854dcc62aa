// One peer's push attempts share one AbortSignal and one timer (src/peers/client.ts,
// AttemptDeadline): each attempt still gets its own full timeout, counted from its own start,
// whatever the previous attempts did; a fired signal is never handed out again; shutdown and
// removal abort the attempt in flight and leave no timer or listener behind.
import { getEventListeners } from 'node:events';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { AttemptDeadline } from '../../src/peers/client.js';

const TIMEOUT_MS = 100;

beforeEach(() => {
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

const reasonCode = (signal: AbortSignal) => (signal.reason as { code?: string } | undefined)?.code;

describe('AttemptDeadline', () => {
  it('aborts an attempt with a timeout error once its timeout has passed, not before', () => {
    const deadline = new AttemptDeadline(TIMEOUT_MS, new AbortController().signal);
    const signal = deadline.start();
    vi.advanceTimersByTime(TIMEOUT_MS - 1);
    expect(signal.aborted).toBe(false);
    vi.advanceTimersByTime(1);
    expect(signal.aborted).toBe(true);
    expect(reasonCode(signal)).toBe('ROUTESYNC_ATTEMPT_TIMEOUT');
    deadline.close();
  });

  it('gives the next attempt a full timeout from its own start, on the same signal', () => {
    const deadline = new AttemptDeadline(TIMEOUT_MS, new AbortController().signal);
    const first = deadline.start();
    vi.advanceTimersByTime(60);
    deadline.end();
    const second = deadline.start();
    expect(second).toBe(first);
    // 120 ms after the first attempt started, 60 ms into the second: not timed out.
    vi.advanceTimersByTime(60);
    expect(second.aborted).toBe(false);
    vi.advanceTimersByTime(40);
    expect(second.aborted).toBe(true);
    deadline.close();
  });

  it('ignores the timer when no attempt is in flight, and times out the next attempt all the same', () => {
    const deadline = new AttemptDeadline(TIMEOUT_MS, new AbortController().signal);
    const first = deadline.start();
    deadline.end();
    vi.advanceTimersByTime(3 * TIMEOUT_MS);
    expect(first.aborted).toBe(false);
    const next = deadline.start();
    vi.advanceTimersByTime(TIMEOUT_MS - 1);
    expect(next.aborted).toBe(false);
    vi.advanceTimersByTime(1);
    expect(next.aborted).toBe(true);
    deadline.close();
  });

  it('hands out a fresh signal after one has fired', () => {
    const deadline = new AttemptDeadline(TIMEOUT_MS, new AbortController().signal);
    const timedOut = deadline.start();
    vi.advanceTimersByTime(TIMEOUT_MS);
    deadline.end();
    const next = deadline.start();
    expect(next).not.toBe(timedOut);
    expect(next.aborted).toBe(false);
    deadline.close();
  });

  it('aborts the attempt in flight with the outer reason when the outer signal fires, and every later one at once', () => {
    const outer = new AbortController();
    const deadline = new AttemptDeadline(TIMEOUT_MS, outer.signal);
    const signal = deadline.start();
    const reason = Object.assign(new Error('shutting down'), { code: 'ROUTESYNC_ABORTED' });
    outer.abort(reason);
    expect(signal.reason).toBe(reason);
    deadline.end();
    expect(deadline.start().reason).toBe(reason);
    deadline.close();
  });

  it('on close aborts the attempt in flight, and leaves no timer and no listener on the outer signal', () => {
    const outer = new AbortController();
    const deadline = new AttemptDeadline(TIMEOUT_MS, outer.signal);
    const signal = deadline.start();
    expect(getEventListeners(outer.signal, 'abort')).toHaveLength(1);
    deadline.close();
    expect(reasonCode(signal)).toBe('ROUTESYNC_ABORTED');
    expect(vi.getTimerCount()).toBe(0);
    expect(getEventListeners(outer.signal, 'abort')).toHaveLength(0);
  });
});
