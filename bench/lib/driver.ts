// The load side: timed requests through undici, sequential or closed-loop, the same for every
// contender. Times are measured from dispatch to the last byte of the answer.
import { performance } from 'node:perf_hooks';
import { Pool } from 'undici';

export interface Timed {
  readonly ms: number;
  readonly status: number;
  readonly text: string;
}

const JSON_HEADERS = { 'content-type': 'application/json' };

export class HttpTarget {
  readonly pool: Pool;

  constructor(
    readonly origin: string,
    connections = 1,
  ) {
    this.pool = new Pool(origin, { connections, pipelining: 1, keepAliveTimeout: 30_000 });
  }

  async call(method: 'GET' | 'PUT' | 'POST', path: string, body?: string, timeoutMs = 30_000): Promise<Timed> {
    const started = performance.now();
    const response = await this.pool.request({
      method,
      path,
      headers: JSON_HEADERS,
      ...(body === undefined ? {} : { body }),
      signal: AbortSignal.timeout(timeoutMs),
    });
    const text = await response.body.text();
    return { ms: performance.now() - started, status: response.statusCode, text };
  }

  async close(): Promise<void> {
    await this.pool.destroy();
  }
}

export interface ClosedLoopResult {
  /** Successful completions per second in the measured window. */
  readonly perSecond: number;
  readonly ok: number;
  readonly notOk: number;
  readonly errors: number;
  readonly measuredMs: number;
  readonly firstError?: string;
}

/**
 * `concurrency` workers, each firing its next request as soon as the last one answered, for
 * `warmupMs` (not counted) then `durationMs` (counted). `fire` resolves true when the answer
 * counts (for a lifecycle call: acknowledged by every peer).
 */
export async function closedLoop(concurrency: number, warmupMs: number, durationMs: number, fire: () => Promise<boolean>): Promise<ClosedLoopResult> {
  const started = performance.now();
  const measureFrom = started + warmupMs;
  const stopAt = measureFrom + durationMs;
  let ok = 0;
  let notOk = 0;
  let errors = 0;
  let firstError: string | undefined;
  const worker = async () => {
    while (performance.now() < stopAt) {
      let good = false;
      let failed = false;
      try {
        good = await fire();
      } catch (error) {
        failed = true;
        firstError ??= error instanceof Error ? error.message : String(error);
      }
      const now = performance.now();
      if (now < measureFrom || now > stopAt) continue;
      if (failed) errors++;
      else if (good) ok++;
      else notOk++;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { perSecond: (ok * 1000) / durationMs, ok, notOk, errors, measuredMs: durationMs, ...(firstError ? { firstError } : {}) };
}

/** Fire `total` requests with `concurrency` in flight; resolves with the count that counted. */
export async function fixedCount(concurrency: number, total: number, fire: () => Promise<boolean>): Promise<{ ok: number; notOk: number; errors: number; ms: number }> {
  const started = performance.now();
  let issued = 0;
  let ok = 0;
  let notOk = 0;
  let errors = 0;
  const worker = async () => {
    while (issued < total) {
      issued++;
      try {
        if (await fire()) ok++;
        else notOk++;
      } catch {
        errors++;
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { ok, notOk, errors, ms: performance.now() - started };
}
