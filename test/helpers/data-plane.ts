// A DataPlane on loopback for tests, with its table, metrics and captured log lines, and a
// small HTTP client that never pools (so every socket it opens is closed when it is done).
import http, { type IncomingHttpHeaders, type OutgoingHttpHeaders } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Readable } from 'node:stream';
import { configFromEnv, type Config } from '../../src/config.js';
import { createLogger } from '../../src/log.js';
import { Metrics } from '../../src/metrics.js';
import { DataPlane, type DataPlaneOptions } from '../../src/proxy/server.js';
import type { Route } from '../../src/routes/route.js';
import { RouteTable } from '../../src/routes/table.js';
import { registerLogSource, registerSecret } from './secrets.js';

export interface TestDataPlane {
  readonly plane: DataPlane;
  readonly config: Config;
  readonly table: RouteTable;
  readonly metrics: Metrics;
  readonly address: AddressInfo;
  /** Every log line the data plane wrote, parsed. */
  readonly logs: Record<string, unknown>[];
  /** The raw log text, to search for secrets. */
  rawLog(): string;
  /** Put a route in the table (each call a newer resourceVersion). */
  setRoute(route: Partial<Route> & Pick<Route, 'id'>): Route;
  close(graceMs?: number): Promise<void>;
}

let resourceVersion = 1;

export async function startDataPlane(
  env: Record<string, string> = {},
  extra: Partial<Omit<DataPlaneOptions, 'config' | 'table' | 'metrics' | 'logger'>> = {},
): Promise<TestDataPlane> {
  const config = configFromEnv({ ROUTESYNC_PROXY_ADDR: '127.0.0.1:0', ROUTESYNC_PROXY_ALLOW_LOOPBACK: 'true', ROUTESYNC_LOG_LEVEL: 'info', ...env });
  const table = new RouteTable({ tombstoneTtlMs: 600_000 });
  const metrics = new Metrics({ processMetrics: false });
  const lines: string[] = [];
  const logger = createLogger({ level: config.logLevel, destination: { write: (line: string) => void lines.push(line) } });
  // Scanned for secrets after the test file, as every replica's lines are (test/helpers/secrets-setup.ts).
  registerLogSource({ name: 'DataPlane', lines });
  const plane = new DataPlane({ config, table, metrics, logger, ...extra });
  const address = await plane.listen();
  return {
    plane,
    config,
    table,
    metrics,
    address,
    get logs() {
      return lines.map((line) => JSON.parse(line) as Record<string, unknown>);
    },
    rawLog: () => lines.join(''),
    setRoute: (partial) => {
      resourceVersion += 1;
      const route: Route = {
        namespace: 'default',
        name: partial.id,
        uid: `uid-${partial.id}`,
        ip: '127.0.0.1',
        state: 'running',
        ...partial,
        resourceVersion: String(resourceVersion),
      };
      registerSecret(route.accessToken);
      const result = table.upsert(route);
      if (result.outcome !== 'applied') throw new Error(`route not applied: ${result.reason}`);
      return route;
    },
    close: (graceMs = 0) => plane.close(graceMs),
  };
}

export interface SendOptions {
  readonly method?: string;
  readonly path?: string;
  readonly headers?: OutgoingHttpHeaders;
  readonly body?: string | Buffer | Readable;
}

export interface Reply {
  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  readonly body: string;
  json<T = Record<string, unknown>>(): T;
}

/** One request to the data plane on a fresh connection; resolves with the whole (small) answer. */
export function send(address: AddressInfo, options: SendOptions = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const { body } = options;
    const headers: OutgoingHttpHeaders = { ...options.headers };
    // Node's client frames a DELETE or OPTIONS body only when told its length.
    if ((typeof body === 'string' || Buffer.isBuffer(body)) && headers['content-length'] === undefined) headers['content-length'] = Buffer.byteLength(body);
    const req = http.request({
      host: address.address,
      port: address.port,
      method: options.method ?? 'GET',
      path: options.path ?? '/',
      headers,
      agent: false,
    });
    req.on('error', reject);
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('error', reject);
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body, json: <T>() => JSON.parse(body) as T });
      });
    });
    if (body === undefined) req.end();
    else if (typeof body === 'string' || Buffer.isBuffer(body)) req.end(body);
    else body.pipe(req);
  });
}

/** The counter value of routesync_proxy_requests_total for one outcome. */
export async function proxyRequestCount(metrics: Metrics, outcome: string): Promise<number> {
  const metric = await metrics.proxyRequests.get();
  return metric.values.find((value) => value.labels.outcome === outcome)?.value ?? 0;
}
