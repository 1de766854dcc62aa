// The suite-wide secrets scan (issue 6 §5): every log line a replica writes during the tests
// is collected here, and test/helpers/secrets-setup.ts scans them after each test file.
//
// What counts as a leak in a line:
//  - any secret a test registered (peer tokens of the replicas it started, access tokens of
//    the routes it made; see cluster.ts and process.ts);
//  - the marker SECRET_MARKER, which tests put in the tokens they want watched;
//  - an `accessToken`, `token`, `peerToken` or `authorization` field whose value is not the
//    redaction censor, or a `Bearer <something>` anywhere.
//
// State lives on globalThis so that every copy of this module in a worker shares it.

/** Put this in a token, and any log line containing the token fails the suite. */
export const SECRET_MARKER = 'SECRET-MARKER';

/** Shorter secrets are not registered: they would match ordinary text (a route named "tok"). */
const MIN_SECRET_LENGTH = 8;

const SECRET_FIELDS = /"(accessToken|token|peerToken|authorization|Authorization|x-access-token|e2b-traffic-access-token)"\s*:\s*"(?!\[redacted\]")[^"]*"/;
const BEARER = /\bBearer\s+(?!realm=)[A-Za-z0-9._~+/=-]{4,}/;

export interface LogSource {
  /** Where the lines come from (for the report). */
  readonly name: string;
  readonly lines: readonly string[];
}

export interface Leak {
  readonly source: string;
  readonly line: string;
  readonly why: string;
}

interface Registry {
  sources: LogSource[];
  secrets: Set<string>;
}

const KEY = Symbol.for('routesync.test.secrets');

function registry(): Registry {
  const holder = globalThis as unknown as Record<symbol, Registry | undefined>;
  holder[KEY] ??= { sources: [], secrets: new Set() };
  return holder[KEY];
}

/** Collect a replica's log lines (the array is read at scan time, so later lines count too). */
export function registerLogSource(source: LogSource): void {
  registry().sources.push(source);
}

/** A value that must never appear in a log line. */
export function registerSecret(value: unknown): void {
  if (typeof value === 'string' && value.length >= MIN_SECRET_LENGTH) registry().secrets.add(value);
}

/** The leaks in `lines`: pure, so a test can prove the scanner catches a planted secret. */
export function findLeaks(source: string, lines: readonly string[], secrets: Iterable<string>): Leak[] {
  const known = [...secrets];
  const leaks: Leak[] = [];
  for (const line of lines) {
    const secret = known.find((value) => line.includes(value));
    let why: string | undefined;
    if (secret !== undefined) why = `contains the registered secret ${mask(secret)}`;
    else if (line.includes(SECRET_MARKER)) why = `contains the marker ${SECRET_MARKER}`;
    else if (SECRET_FIELDS.test(line)) why = `has an unredacted ${SECRET_FIELDS.exec(line)?.[1]} field`;
    else if (BEARER.test(line)) why = 'has a Bearer credential';
    if (why !== undefined) leaks.push({ source, line: line.length > 300 ? `${line.slice(0, 300)}...` : line, why });
  }
  return leaks;
}

/** Scan every registered source, then forget them (the next test file starts empty). */
export function scanRegisteredLogs(): { lines: number; sources: number; leaks: Leak[] } {
  const { sources, secrets } = registry();
  let lines = 0;
  const leaks: Leak[] = [];
  for (const source of sources) {
    lines += source.lines.length;
    leaks.push(...findLeaks(source.name, source.lines, secrets));
  }
  const result = { lines, sources: sources.length, leaks };
  sources.length = 0;
  secrets.clear();
  return result;
}

/** Forget a source (the scanner's own test plants a leak and must not fail the file for it). */
export function unregisterLogSource(source: LogSource): void {
  const { sources } = registry();
  const index = sources.indexOf(source);
  if (index >= 0) sources.splice(index, 1);
}

function mask(secret: string): string {
  return `${secret.slice(0, 4)}...(${secret.length} chars)`;
}
