// routesync ctl: the operator's view of a replica, over the same HTTP APIs the replicas use.
//   status  one replica: liveness, readiness, route count, peers
//   routes  the route table (GET /v1/routes on the local API)
//   peers   every peer's health (GET /v1/peers on the local API)
//   diff    two replicas' tables compared through their digests (peer API), listing the
//           routes that differ; only the buckets whose digests differ are pulled.
// Exit codes: 0 ok, 1 a difference found or not ready, 2 usage error, 3 unreachable (or an
// answer that is not what the API documents). The peer token is read from
// ROUTESYNC_PEER_TOKEN or --token-file and only ever sent as a header, never printed.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Agent, type Dispatcher } from 'undici';
import { ConfigError, parsePeerToken, withoutCredentials } from './config.js';

export const EXIT_OK = 0;
export const EXIT_DIFFERENT = 1;
export const EXIT_USAGE = 2;
export const EXIT_UNREACHABLE = 3;

const DEFAULT_API = '127.0.0.1:7788';
const DEFAULT_PEER = '127.0.0.1:7789';
const DEFAULT_TIMEOUT_MS = 5_000;
const CTL_TIMEOUT_MAX_MS = 600_000;
/** Buckets named in one pull: keeps a pull's body and answer bounded on a large table. */
const PULL_CHUNK_BUCKETS = 256;

export const CTL_HELP = `Usage: routesync ctl <command> [options]

Commands:
  status                  one replica: alive, ready, routes, peers (exit 1 when not ready)
  routes                  the route table of the local API (tokens never shown)
  peers                   every peer with its health, ejection, outbox and last reconcile
  diff <peerA> <peerB>    compare two replicas' tables through their peer APIs' digests and
                          list the routes that differ (exit 1 when they differ); the digests
                          hold identities and versions only, so a route held at one version
                          with different contents is found only with --full

Options:
  --api <host:port>       local API (default ${DEFAULT_API})
  --peer <host:port>      peer API, for status probes (default ${DEFAULT_PEER}); for diff,
                          give it twice instead of the positional addresses
  --namespace <ns>        routes: only this namespace
  --full                  diff: pull both whole tables and compare every route's contents
  --token-file <path>     file holding the peer token (default: ROUTESYNC_PEER_TOKEN)
  --timeout-ms <n>        per-request timeout, 1 to ${CTL_TIMEOUT_MAX_MS} (default ${DEFAULT_TIMEOUT_MS})
  --ca <file>             CA that signs the peers' certificates, for https:// peer addresses
                          (default: ROUTESYNC_PEER_TLS_CA)
  --cert <file>, --key <file>
                          client certificate and key, for peers that run mutual TLS
                          (default: ROUTESYNC_PEER_TLS_CERT and ROUTESYNC_PEER_TLS_KEY)
  --json                  machine-readable output
  -h, --help              this text

Addresses are host:port, [v6]:port, or a full http:// or https:// URL. A peer address
without a scheme is https:// when a client certificate is given (--cert, or
ROUTESYNC_PEER_TLS_CERT as in the replica's own container), http:// otherwise.
Exit codes: 0 ok, 1 difference found / not ready (shutting down included), 2 usage error,
3 unreachable.
`;

export interface CtlIo {
  readonly stdout: (text: string) => void;
  readonly stderr: (text: string) => void;
  readonly env: NodeJS.ProcessEnv;
  /** Wall clock, for "12s ago". */
  readonly now: () => number;
}

/** A failure that ends the command with an exit code and one line on stderr. */
export class CtlError extends Error {
  constructor(
    readonly exitCode: number,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'CtlError';
  }
}

interface Options {
  readonly api: string;
  readonly peers: readonly string[];
  /** The scheme of a peer address given without one: https when a client certificate is at hand. */
  readonly peerScheme: 'http' | 'https';
  readonly namespace: string | undefined;
  readonly json: boolean;
  /** diff: compare every route's contents, not only the buckets whose digests differ. */
  readonly full: boolean;
  readonly token: string;
  readonly timeoutMs: number;
}

/** Run `routesync ctl <argv...>`; resolves to the exit code. Never calls process.exit. */
export async function runCtl(argv: readonly string[], io: Partial<CtlIo> = {}): Promise<number> {
  const out: CtlIo = {
    stdout: io.stdout ?? ((text) => process.stdout.write(text)),
    stderr: io.stderr ?? ((text) => process.stderr.write(text)),
    env: io.env ?? process.env,
    now: io.now ?? Date.now,
  };
  let parsed;
  try {
    parsed = parseArgs({
      args: [...argv],
      allowPositionals: true,
      strict: true,
      options: {
        api: { type: 'string' },
        peer: { type: 'string', multiple: true },
        namespace: { type: 'string' },
        'token-file': { type: 'string' },
        'timeout-ms': { type: 'string' },
        ca: { type: 'string' },
        cert: { type: 'string' },
        key: { type: 'string' },
        json: { type: 'boolean', default: false },
        full: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    });
  } catch (error) {
    out.stderr(`routesync ctl: ${(error as Error).message}\nRun "routesync ctl --help" for usage.\n`);
    return EXIT_USAGE;
  }
  const { values, positionals } = parsed;
  const [command, ...args] = positionals;
  if (values.help || command === 'help') {
    out.stdout(CTL_HELP);
    return EXIT_OK;
  }

  let http: CtlHttp | undefined;
  try {
    const timeoutMs = values['timeout-ms'] === undefined ? DEFAULT_TIMEOUT_MS : Number(values['timeout-ms']);
    // A timer holds at most 2^31 - 1 ms (Node cuts a longer one to 1 ms); 10 minutes is plenty.
    if (!/^\d+$/.test(values['timeout-ms'] ?? '1') || timeoutMs < 1 || timeoutMs > CTL_TIMEOUT_MAX_MS) {
      throw usage(`--timeout-ms must be an integer from 1 to ${CTL_TIMEOUT_MAX_MS}`);
    }
    const tls = readTls(values, out.env);
    http = new CtlHttp(timeoutMs, tls);
    // A replica with a certificate serves its peer API over TLS only, and ctl run beside it
    // (kubectl exec) has the same variables: a peer address without a scheme is then https.
    const peerScheme = tls.cert === undefined ? 'http' : 'https';
    const options: Options = {
      api: origin(values.api ?? DEFAULT_API, '--api'),
      peers: (values.peer ?? []).map((peer) => origin(peer, '--peer', peerScheme)),
      peerScheme,
      namespace: values.namespace,
      json: values.json,
      full: values.full,
      token: readToken(values['token-file'], out.env),
      timeoutMs: http.timeoutMs,
    };
    switch (command) {
      case 'status':
        if (args.length > 0) throw usage(`status takes no arguments (got ${args.join(' ')})`);
        if (options.peers.length > 1) throw usage('status looks at one replica: give --peer once');
        return await status(http, options, out);
      case 'routes':
        if (args.length > 0) throw usage(`routes takes no arguments (got ${args.join(' ')})`);
        return await routes(http, options, out);
      case 'peers':
        if (args.length > 0) throw usage(`peers takes no arguments (got ${args.join(' ')})`);
        return await peers(http, options, out);
      case 'diff': {
        const targets = [...options.peers, ...args.map((arg) => origin(arg, 'diff', peerScheme))];
        if (targets.length !== 2) throw usage('diff needs exactly two peer addresses: routesync ctl diff <peerA> <peerB>');
        return await diff(http, options, targets[0]!, targets[1]!, out);
      }
      case undefined:
        throw usage('a command is required');
      default:
        throw usage(`unknown command "${command}"`);
    }
  } catch (error) {
    if (!(error instanceof CtlError)) throw error;
    out.stderr(`routesync ctl: ${error.message}\n`);
    if (error.exitCode === EXIT_USAGE) out.stderr('Run "routesync ctl --help" for usage.\n');
    return error.exitCode;
  } finally {
    await http?.close();
  }
}

function usage(message: string): CtlError {
  return new CtlError(EXIT_USAGE, message);
}

/** `host:port`, `[v6]:port` or a URL -> an origin `http(s)://host:port`. */
export function origin(address: string, what: string, scheme: 'http' | 'https' = 'http'): string {
  const text = address.trim();
  const withScheme = /^https?:\/\//i.test(text) ? text : `${scheme}://${text}`;
  // The address as the error line shows it: credentials in it are a secret (a token) and
  // never printed.
  const shown = withoutCredentials(address);
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    throw usage(`${what}: "${shown}" is not host:port or an http(s) URL`);
  }
  if (url.port === '' && !/^https?:\/\//i.test(text)) throw usage(`${what}: "${shown}" has no port (host:port)`);
  // A password without a user name (http://:token@host) is credentials too: dropping it
  // silently would send the requests without them.
  if ((url.pathname !== '/' && url.pathname !== '') || url.search !== '' || url.username !== '' || url.password !== '') {
    throw usage(`${what}: "${shown}" must be just an address, without a path, query or credentials`);
  }
  return url.origin;
}

/** The peer token, read exactly as the replica reads it (parsePeerToken), so the same Secret works for both. */
function readToken(file: string | undefined, env: NodeJS.ProcessEnv): string {
  let raw: string;
  if (file === undefined) raw = env.ROUTESYNC_PEER_TOKEN ?? '';
  else {
    try {
      raw = readFileSync(file, 'utf8');
    } catch (error) {
      // The path only: the content is a secret.
      throw usage(`--token-file: cannot read "${file}" (${(error as { code?: string }).code ?? (error as Error).message})`);
    }
  }
  try {
    return parsePeerToken(raw, file === undefined ? 'ROUTESYNC_PEER_TOKEN' : '--token-file');
  } catch (error) {
    // A token that cannot be sent is a usage error, not an unreachable peer.
    if (error instanceof ConfigError) throw usage(error.message);
    throw error;
  }
}

/** TLS material for https:// addresses: flags first, then the variables the replica itself reads. */
function readTls(values: { ca?: string; cert?: string; key?: string }, env: NodeJS.ProcessEnv): { ca?: Buffer; cert?: Buffer; key?: Buffer } {
  const file = (flag: 'ca' | 'cert' | 'key', variable: string): Buffer | undefined => {
    const path = values[flag] ?? (env[variable] || undefined);
    if (path === undefined) return undefined;
    try {
      return readFileSync(path);
    } catch (error) {
      throw usage(`--${flag}: cannot read "${path}" (${(error as { code?: string }).code ?? (error as Error).message})`);
    }
  };
  const tls = { ca: file('ca', 'ROUTESYNC_PEER_TLS_CA'), cert: file('cert', 'ROUTESYNC_PEER_TLS_CERT'), key: file('key', 'ROUTESYNC_PEER_TLS_KEY') };
  if ((tls.cert === undefined) !== (tls.key === undefined)) throw usage('--cert and --key go together');
  return Object.fromEntries(Object.entries(tls).filter(([, value]) => value !== undefined));
}

interface Answer {
  readonly status: number;
  readonly body: unknown;
  readonly instance: string | undefined;
}

/** One undici Agent for the command's requests; every request bounded by the timeout. */
class CtlHttp {
  private readonly agent: Agent;

  constructor(
    readonly timeoutMs: number,
    tls: { ca?: Buffer; cert?: Buffer; key?: Buffer } = {},
  ) {
    this.agent = new Agent({ connections: 4, keepAliveTimeout: 1_000, ...(Object.keys(tls).length > 0 ? { connect: tls } : {}) });
  }

  async get(base: string, path: string, token?: string): Promise<Answer> {
    return this.send(base, 'GET', path, undefined, token);
  }

  async post(base: string, path: string, body: unknown, token?: string): Promise<Answer> {
    return this.send(base, 'POST', path, JSON.stringify(body), token);
  }

  private async send(base: string, method: Dispatcher.HttpMethod, path: string, body: string | undefined, token: string | undefined): Promise<Answer> {
    const headers: Record<string, string> = { accept: 'application/json' };
    if (body !== undefined) headers['content-type'] = 'application/json';
    if (token) headers.authorization = `Bearer ${token}`;
    let response: Dispatcher.ResponseData;
    try {
      response = await this.agent.request({
        origin: base,
        path,
        method,
        headers,
        ...(body === undefined ? {} : { body }),
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (error) {
      throw new CtlError(EXIT_UNREACHABLE, `${base}${path}: unreachable (${errorCode(error)})`, { cause: error });
    }
    const text = await response.body.text();
    let parsed: unknown = text;
    try {
      parsed = text === '' ? undefined : JSON.parse(text);
    } catch {
      // not JSON (for example /metrics); callers that need JSON check the shape
    }
    const instance = response.headers['x-routesync-instance'];
    return { status: response.statusCode, body: parsed, instance: typeof instance === 'string' ? instance : undefined };
  }

  async close(): Promise<void> {
    await this.agent.close();
  }
}

function errorCode(error: unknown): string {
  for (let current: unknown = error, depth = 0; current && depth < 5; current = (current as { cause?: unknown }).cause, depth++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === 'string') return code;
    if ((current as { name?: unknown }).name === 'TimeoutError') return 'timeout';
  }
  return (error as Error).message;
}

/**
 * A 2xx JSON object, or a CtlError that says what came back. A 401 says what to fix: `token` is
 * the one a peer-API request carried ('' for none); a local-API request carries none (undefined)
 * and needs none, so a 401 there means the address is a peer listener's.
 */
function expectOk(answer: Answer, what: string, token?: string): Record<string, unknown> {
  if (answer.status === 401) {
    const hint =
      token === undefined
        ? 'the local API takes no token: this address is a peer listener (--api takes the local API\'s, default 127.0.0.1:7788)'
        : token === ''
          ? 'no peer token set (set ROUTESYNC_PEER_TOKEN or --token-file)'
          : 'the peer token was refused (is it the fleet\'s current one?)';
    throw new CtlError(EXIT_UNREACHABLE, `${what}: 401 unauthorized: ${hint}`);
  }
  if (answer.status < 200 || answer.status >= 300) {
    const code = (answer.body as { error?: { code?: unknown } } | undefined)?.error?.code;
    throw new CtlError(EXIT_UNREACHABLE, `${what}: answered ${answer.status}${typeof code === 'string' ? ` ${code}` : ''}`);
  }
  if (typeof answer.body !== 'object' || answer.body === null || Array.isArray(answer.body)) {
    throw new CtlError(EXIT_UNREACHABLE, `${what}: the answer is not a JSON object`);
  }
  return answer.body as Record<string, unknown>;
}

// ---------------------------------------------------------------------------------------------
// status, routes, peers

interface PeerRow {
  readonly peer: string;
  readonly reachable: boolean;
  readonly consecutiveFailures: number;
  readonly ejected: boolean;
  readonly ejectedUntil: string | null;
  readonly lastSuccess: string | null;
  readonly lastFailure: { readonly errorClass: string; readonly at: string } | null;
  readonly pendingRoutes: number;
  readonly lastReconcile: string | null;
  /** Absent from a replica of an older version. */
  readonly lastReconcileFailure?: { readonly errorClass: string; readonly at: string } | null;
}

async function status(http: CtlHttp, options: Options, io: CtlIo): Promise<number> {
  const peerApi = options.peers[0] ?? origin(DEFAULT_PEER, '--peer', options.peerScheme);
  const [healthz, readyz, table, peerList] = await Promise.allSettled([
    http.get(peerApi, '/healthz'),
    http.get(peerApi, '/readyz'),
    http.get(options.api, '/v1/routes'),
    http.get(options.api, '/v1/peers'),
  ]);
  if (healthz.status === 'rejected') throw healthz.reason;
  if (readyz.status === 'rejected') throw readyz.reason;
  const alive = healthz.value.status === 200;
  const ready = readyz.value.status === 200;
  const notReadyReason = ready ? null : ((readyz.value.body as { error?: { code?: string } } | undefined)?.error?.code ?? `status ${readyz.value.status}`);
  // A replica shutting down has closed its local API (or answers it 503) while its peer API
  // still answers the probes for the grace period: that is "not ready", not "unreachable".
  const draining = notReadyReason === 'shutting_down';
  const listed = (answer: PromiseSettledResult<Answer>, path: string): Record<string, unknown> | undefined => {
    if (draining && (answer.status === 'rejected' || answer.value.status === 503)) return undefined;
    if (answer.status === 'rejected') throw answer.reason;
    return expectOk(answer.value, `${options.api} GET ${path}`);
  };
  const tableBody = listed(table, '/v1/routes');
  const peerBody = listed(peerList, '/v1/peers');
  const peerRows = (peerBody?.peers ?? []) as PeerRow[];
  const report = {
    api: options.api,
    peerApi,
    instance: readyz.value.instance ?? healthz.value.instance ?? null,
    alive,
    ready,
    notReadyReason,
    routes: tableBody === undefined ? null : Number(tableBody.count ?? 0),
    fences: tableBody === undefined ? null : Number(tableBody.tombstones ?? 0),
    peers:
      peerBody === undefined
        ? null
        : {
            total: peerRows.length,
            reachable: peerRows.filter((p) => p.reachable).length,
            ejected: peerRows.filter((p) => p.ejected).map((p) => p.peer),
            queuedRoutes: peerRows.reduce((sum, p) => sum + p.pendingRoutes, 0),
          },
  };
  if (options.json) {
    io.stdout(`${JSON.stringify(report, null, 2)}\n`);
  } else {
    const unavailable = '- (the local API no longer answers: shutting down)';
    const lines: [string, string][] = [
      ['local API', report.api],
      ['peer API', `${report.peerApi}${report.instance ? ` (instance ${report.instance})` : ''}`],
      ['alive', alive ? 'yes' : `NO (status ${healthz.value.status})`],
      ['ready', ready ? 'yes' : `NO (${report.notReadyReason})`],
      ['routes', report.routes === null ? unavailable : `${report.routes} (${report.fences} deletion fences)`],
      [
        'peers',
        report.peers === null
          ? unavailable
          : `${report.peers.total} (${report.peers.reachable} reachable, ${report.peers.ejected.length} ejected, ${report.peers.queuedRoutes} changes queued)`,
      ],
    ];
    if (report.peers !== null && report.peers.ejected.length > 0) lines.push(['ejected', report.peers.ejected.join(', ')]);
    io.stdout(formatPairs(lines));
  }
  return alive && ready ? EXIT_OK : EXIT_DIFFERENT;
}

interface ListedRoute {
  readonly namespace: string;
  readonly name: string;
  readonly id: string;
  readonly resourceVersion: string;
  readonly ip: string;
  readonly state: string;
  readonly owner?: string;
  readonly requireTrafficAuth?: boolean;
  readonly hasAccessToken?: boolean;
}

async function routes(http: CtlHttp, options: Options, io: CtlIo): Promise<number> {
  const query = options.namespace === undefined ? '' : `?namespace=${encodeURIComponent(options.namespace)}`;
  const body = expectOk(await http.get(options.api, `/v1/routes${query}`), `${options.api} GET /v1/routes`);
  const list = (Array.isArray(body.routes) ? body.routes : []) as ListedRoute[];
  if (options.json) {
    io.stdout(`${JSON.stringify(body, null, 2)}\n`);
    return EXIT_OK;
  }
  const sorted = [...list].sort((a, b) => `${a.namespace}/${a.name}`.localeCompare(`${b.namespace}/${b.name}`));
  io.stdout(
    formatTable(
      ['NAMESPACE', 'NAME', 'ID', 'STATE', 'IP', 'VERSION', 'OWNER', 'AUTH'],
      sorted.map((r) => [
        r.namespace,
        r.name,
        r.id,
        r.state === '' ? '-' : r.state,
        r.ip === '' ? '-' : r.ip,
        r.resourceVersion,
        r.owner ?? '-',
        r.requireTrafficAuth ? 'token' : '-',
      ]),
    ),
  );
  io.stdout(`${list.length} routes, ${Number(body.tombstones ?? 0)} deletion fences\n`);
  return EXIT_OK;
}

async function peers(http: CtlHttp, options: Options, io: CtlIo): Promise<number> {
  const body = expectOk(await http.get(options.api, '/v1/peers'), `${options.api} GET /v1/peers`);
  const list = (Array.isArray(body.peers) ? body.peers : []) as PeerRow[];
  if (options.json) {
    io.stdout(`${JSON.stringify(body, null, 2)}\n`);
    return EXIT_OK;
  }
  const ago = (iso: string | null) => (iso === null ? 'never' : age(io.now() - Date.parse(iso)));
  io.stdout(
    formatTable(
      ['PEER', 'REACHABLE', 'EJECTED', 'FAILURES', 'OUTBOX', 'LAST SUCCESS', 'LAST FAILURE', 'LAST RECONCILE'],
      list.map((p) => [
        p.peer,
        p.reachable ? 'yes' : 'no',
        p.ejected ? `yes, until ${p.ejectedUntil === null ? '?' : in_(Date.parse(p.ejectedUntil) - io.now())}` : 'no',
        String(p.consecutiveFailures),
        String(p.pendingRoutes),
        ago(p.lastSuccess),
        p.lastFailure === null ? '-' : `${p.lastFailure.errorClass} ${ago(p.lastFailure.at)}`,
        // A failed round newer than the last completed one says so, with its class.
        p.lastReconcileFailure != null && (p.lastReconcile === null || Date.parse(p.lastReconcileFailure.at) > Date.parse(p.lastReconcile))
          ? `failed: ${p.lastReconcileFailure.errorClass} ${ago(p.lastReconcileFailure.at)}`
          : ago(p.lastReconcile),
      ]),
    ),
  );
  io.stdout(`${list.length} peers\n`);
  return EXIT_OK;
}

// ---------------------------------------------------------------------------------------------
// diff

interface Digest {
  readonly instance: string;
  readonly buckets: number;
  readonly root: string;
  readonly digests: readonly string[];
  readonly routes: number;
  readonly fences: number;
  /** An optional field: the replica knows its table may hold routes deleted elsewhere (see docs/operations.md). */
  readonly suspect: boolean | undefined;
}

/** One identity's entry as pulled: a route, or a deletion fence (`state: dead`). */
interface Entry {
  readonly key: string;
  readonly resourceVersion: string;
  readonly state: string;
  readonly dead: boolean;
  readonly id: string | undefined;
  readonly ip: string | undefined;
  /** The entry's content without secrets, for comparison. */
  readonly fingerprint: string;
}

export interface RouteDifference {
  readonly key: string;
  readonly kind: 'only_in_a' | 'only_in_b' | 'different_version' | 'different_content';
  readonly a: Omit<Entry, 'fingerprint' | 'key'> | null;
  readonly b: Omit<Entry, 'fingerprint' | 'key'> | null;
}

async function fetchDigest(http: CtlHttp, base: string, token: string): Promise<Digest> {
  const body = expectOk(await http.get(base, '/v1/peer/digest', token), `${base} GET /v1/peer/digest`, token);
  const { instance, buckets, root, digests, routes: routeCount, fences, suspect } = body;
  if (
    typeof buckets !== 'number' ||
    !Number.isInteger(buckets) ||
    buckets < 1 ||
    typeof root !== 'string' ||
    !Array.isArray(digests) ||
    digests.length !== buckets
  ) {
    throw new CtlError(EXIT_UNREACHABLE, `${base} GET /v1/peer/digest: the answer does not match the digest contract`);
  }
  return {
    instance: String(instance ?? ''),
    buckets,
    root,
    digests: digests.map(String),
    routes: Number(routeCount ?? 0),
    fences: Number(fences ?? 0),
    suspect: typeof suspect === 'boolean' ? suspect : undefined,
  };
}

async function pull(http: CtlHttp, base: string, token: string, buckets: readonly number[]): Promise<Map<string, Entry>> {
  const entries = new Map<string, Entry>();
  for (let start = 0; start < buckets.length; start += PULL_CHUNK_BUCKETS) {
    const chunk = buckets.slice(start, start + PULL_CHUNK_BUCKETS);
    const body = expectOk(await http.post(base, '/v1/peer/pull', { buckets: chunk }, token), `${base} POST /v1/peer/pull`, token);
    if (!Array.isArray(body.changes)) throw new CtlError(EXIT_UNREACHABLE, `${base} POST /v1/peer/pull: the answer has no "changes" array`);
    for (const change of body.changes as Record<string, unknown>[]) {
      const entry = toEntry(change);
      if (entry) entries.set(entry.key, entry);
    }
  }
  return entries;
}

function toEntry(change: Record<string, unknown>): Entry | undefined {
  if (typeof change !== 'object' || change === null) return undefined;
  const { namespace, name, resourceVersion, state } = change;
  if (typeof namespace !== 'string' || typeof name !== 'string' || typeof resourceVersion !== 'string') return undefined;
  const stateText = typeof state === 'string' ? state : '';
  const dead = stateText.toLowerCase() === 'dead';
  // The fingerprint holds every field (a changed accessToken is a difference too); it is
  // compared, never printed. A fence's creation time is not content: replicas may differ by
  // milliseconds on it without disagreeing about the route.
  const { fencedAtMs: _fencedAtMs, ...content } = change;
  return {
    key: `${namespace}/${name}`,
    resourceVersion,
    state: dead ? 'dead' : stateText,
    dead,
    id: typeof change.id === 'string' ? change.id : undefined,
    ip: typeof change.ip === 'string' ? change.ip : undefined,
    fingerprint: JSON.stringify(Object.keys(content).sort().map((key) => [key, content[key]])),
  };
}

function publicEntry(entry: Entry | undefined): RouteDifference['a'] {
  if (!entry) return null;
  const { fingerprint: _fingerprint, key: _key, ...visible } = entry;
  return visible;
}

/** Compare by numeric resourceVersion (canonical decimal strings: length first). */
function compareVersions(a: string, b: string): number {
  return a.length === b.length ? (a < b ? -1 : a > b ? 1 : 0) : a.length - b.length;
}

export function compareEntries(a: ReadonlyMap<string, Entry>, b: ReadonlyMap<string, Entry>): RouteDifference[] {
  const keys = [...new Set([...a.keys(), ...b.keys()])].sort();
  const differences: RouteDifference[] = [];
  for (const key of keys) {
    const left = a.get(key);
    const right = b.get(key);
    let kind: RouteDifference['kind'] | undefined;
    // A fence on one side and nothing on the other is a difference too (one side forgot a delete).
    if (!right) kind = 'only_in_a';
    else if (!left) kind = 'only_in_b';
    else if (compareVersions(left.resourceVersion, right.resourceVersion) !== 0 || left.dead !== right.dead) kind = 'different_version';
    else if (left.fingerprint !== right.fingerprint) kind = 'different_content';
    if (kind) differences.push({ key, kind, a: publicEntry(left), b: publicEntry(right) });
  }
  return differences;
}

async function diff(http: CtlHttp, options: Options, a: string, b: string, io: CtlIo): Promise<number> {
  const [digestA, digestB] = await Promise.all([fetchDigest(http, a, options.token), fetchDigest(http, b, options.token)]);
  const comparable = digestA.buckets === digestB.buckets;
  const buckets: number[] = [];
  if (comparable) for (let i = 0; i < digestA.buckets; i++) if (digestA.digests[i] !== digestB.digests[i]) buckets.push(i);
  let differences: RouteDifference[] = [];
  // A bucket's digest covers identities and versions, not contents (reconciliation orders by
  // version alone), so equal digests do not prove equal routes: --full pulls everything.
  const pullAll = options.full || !comparable;
  if (pullAll || buckets.length > 0) {
    // Different bucket counts cannot be compared bucket by bucket: then pull everything.
    const all = (n: number) => Array.from({ length: n }, (_v, i) => i);
    const [entriesA, entriesB] = await Promise.all([
      pull(http, a, options.token, pullAll ? all(digestA.buckets) : buckets),
      pull(http, b, options.token, pullAll ? all(digestB.buckets) : buckets),
    ]);
    differences = compareEntries(entriesA, entriesB);
  }
  const same = digestA.root === digestB.root && comparable && differences.length === 0;
  const summary = (base: string, d: Digest) => ({
    address: base,
    instance: d.instance,
    routes: d.routes,
    fences: d.fences,
    root: d.root,
    buckets: d.buckets,
    suspect: d.suspect ?? null,
  });
  const suspectText = (d: Digest) => (d.suspect === undefined ? '?' : d.suspect ? 'YES' : 'no');
  if (options.json) {
    io.stdout(
      `${JSON.stringify(
        {
          same,
          full: options.full,
          a: summary(a, digestA),
          b: summary(b, digestB),
          differingBuckets: comparable ? buckets : null,
          differences,
        },
        null,
        2,
      )}\n`,
    );
    return same ? EXIT_OK : EXIT_DIFFERENT;
  }
  io.stdout(
    formatTable(
      ['', 'REPLICA', 'INSTANCE', 'ROUTES', 'FENCES', 'SUSPECT', 'ROOT DIGEST'],
      [
        ['A', a, digestA.instance, String(digestA.routes), String(digestA.fences), suspectText(digestA), digestA.root],
        ['B', b, digestB.instance, String(digestB.routes), String(digestB.fences), suspectText(digestB), digestB.root],
      ],
    ),
  );
  if (same) {
    io.stdout(
      options.full
        ? '\nThe tables are identical.\n'
        : '\nThe tables are identical in routes and versions (--full compares their contents too).\n',
    );
    return EXIT_OK;
  }
  const bucketNote = !comparable
    ? `bucket counts differ (${digestA.buckets} vs ${digestB.buckets}); compared every bucket`
    : options.full
      ? `${buckets.length} of ${digestA.buckets} digest buckets differ; compared every bucket (--full)`
      : `${buckets.length} of ${digestA.buckets} digest buckets differ`;
  io.stdout(`\n${bucketNote}; ${differences.length} routes differ:\n\n`);
  const show = (e: RouteDifference['a']) => (e === null ? '-' : e.dead ? `v${e.resourceVersion} deleted` : `v${e.resourceVersion} ${e.state || '-'} ${e.ip || '-'}`);
  io.stdout(
    formatTable(
      ['DIFFERENCE', 'NAMESPACE/NAME', 'A', 'B'],
      differences.map((d) => [d.kind.replaceAll('_', '-'), d.key, show(d.a), show(d.b)]),
    ),
  );
  return EXIT_DIFFERENT;
}

// ---------------------------------------------------------------------------------------------
// formatting

/** Columns aligned to their widest cell, two spaces apart. */
export function formatTable(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((title, column) => Math.max(title.length, ...rows.map((row) => (row[column] ?? '').length)));
  const line = (cells: readonly string[]) =>
    cells
      .map((cell, column) => (column === cells.length - 1 ? cell : cell.padEnd(widths[column]!)))
      .join('  ')
      .trimEnd();
  return `${[line(header), ...rows.map(line)].join('\n')}\n`;
}

function formatPairs(pairs: readonly (readonly [string, string])[]): string {
  const width = Math.max(...pairs.map(([label]) => label.length));
  return pairs.map(([label, value]) => `${label.padEnd(width)}  ${value}\n`).join('');
}

function age(ms: number): string {
  return `${duration(Math.max(0, ms))} ago`;
}

function in_(ms: number): string {
  return ms <= 0 ? 'now' : `in ${duration(ms)}`;
}

function duration(ms: number): string {
  if (ms < 1_000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${Math.round(ms / 1_000)}s`;
  if (ms < 3_600_000) return `${Math.round(ms / 60_000)}m`;
  return `${Math.round(ms / 3_600_000)}h`;
}
