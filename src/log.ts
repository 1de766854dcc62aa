// The pino logger. Redaction paths are fixed here, in code, never taken from input.
//
// Redaction is the second line of defence: the first is that no code path hands a route's
// accessToken, the peer token or an Authorization header to the logger at all.
import pino, { type DestinationStream, type Logger } from 'pino';
import type { LogLevel } from './config.js';

export type { Logger };

const SECRET_KEYS = ['accessToken', 'peerToken', 'token', 'authorization', 'Authorization', 'x-access-token', 'e2b-traffic-access-token'];

/** Every secret key at the top level and up to three levels deep (pino's fast-redact needs explicit depth). */
export const REDACT_PATHS: readonly string[] = SECRET_KEYS.flatMap((key) => {
  const k = /^[A-Za-z_$][\w$]*$/.test(key) ? key : `["${key}"]`;
  const dot = k.startsWith('[') ? '' : '.';
  return [k, `*${dot}${k}`, `*.*${dot}${k}`, `*.*.*${dot}${k}`];
});

export interface LoggerOptions {
  readonly level: LogLevel;
  /** Where lines go; standard output when omitted. */
  readonly destination?: DestinationStream;
  /** Fields on every line (for example the replica's peer address). */
  readonly base?: Record<string, unknown>;
}

export function createLogger(options: LoggerOptions): Logger {
  return pino(
    {
      level: options.level,
      base: { service: 'routesync', ...options.base },
      redact: { paths: [...REDACT_PATHS], censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
    },
    options.destination ?? pino.destination({ sync: false }),
  );
}

/** How long the same failure, repeated, stays a debug line after its warning. */
const WARNING_REPEAT_MS = 60_000;

/**
 * One warning a minute for a failure that repeats, not one per occurrence: a failure is a
 * warning when its key differs from the last warned one or that warning is WARNING_REPEAT_MS
 * old; the same failure meanwhile is a debug line (the metrics count every one). `reset()` once
 * the failure is over, so that the next one warns at once.
 */
export class RepeatedWarnings {
  private last: { readonly key: string; readonly atMs: number } | undefined;

  /** The level to log this occurrence at, recording it. */
  level(key: string): 'warn' | 'debug' {
    // Monotonic: a wall clock stepped back would keep the same failure quiet for as long.
    const now = performance.now();
    if (this.last?.key === key && now - this.last.atMs < WARNING_REPEAT_MS) return 'debug';
    this.last = { key, atMs: now };
    return 'warn';
  }

  reset(): void {
    this.last = undefined;
  }
}
