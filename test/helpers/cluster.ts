// In-process replicas on loopback, each with its own servers, registry, logger and Agent.
import { Writable } from 'node:stream';
import { configFromEnv } from '../../src/config.js';
import { Replica } from '../../src/replica.js';
import { registerLogSource, registerSecret } from './secrets.js';

/** Defaults for tests: ephemeral ports on loopback, quiet logs, deadlines generous for a slow shared machine. */
export const TEST_ENV: Record<string, string> = {
  ROUTESYNC_API_ADDR: '127.0.0.1:0',
  ROUTESYNC_PEER_ADDR: '127.0.0.1:0',
  ROUTESYNC_PROXY_ADDR: '127.0.0.1:0',
  // The tests' sandboxes are servers on loopback.
  ROUTESYNC_PROXY_ALLOW_LOOPBACK: 'true',
  ROUTESYNC_LOG_LEVEL: 'debug',
  ROUTESYNC_SYNC_DEADLINE_MS: '5000',
  ROUTESYNC_ATTEMPT_TIMEOUT_MS: '2000',
};

/** Log lines a test can read (and scan for secrets). */
export class LogSink extends Writable {
  readonly lines: string[] = [];
  constructor() {
    super();
    // Every sink's lines are scanned for secrets after the test file (test/helpers/secrets-setup.ts).
    registerLogSource({ name: 'LogSink', lines: this.lines });
  }
  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    for (const line of chunk.toString('utf8').split('\n')) if (line !== '') this.lines.push(line);
    callback();
  }
}

export interface TestReplica {
  readonly replica: Replica;
  readonly logs: LogSink;
  /** Base URL of the local API. */
  readonly api: string;
  /** Base URL of the peer API. */
  readonly peerUrl: string;
}

export async function startReplica(env: Record<string, string> = {}): Promise<TestReplica> {
  const logs = new LogSink();
  const config = configFromEnv({ ...TEST_ENV, ...env });
  registerSecret(config.peerToken);
  const replica = await Replica.start(config, { logDestination: logs, processMetrics: false });
  return { replica, logs, api: `http://${replica.addresses.api}`, peerUrl: `${replica.peerScheme}://${replica.addresses.peer}` };
}

/** N replicas, each with every other as its peer. */
export async function startCluster(count: number, env: Record<string, string> = {}): Promise<TestReplica[]> {
  const nodes: TestReplica[] = [];
  for (let i = 0; i < count; i++) nodes.push(await startReplica(env));
  for (const node of nodes) {
    node.replica.sync.setPeers(nodes.filter((other) => other !== node).map((other) => other.replica.addresses.peer));
  }
  return nodes;
}

export async function stopAll(nodes: readonly { replica: Replica }[]): Promise<void> {
  await Promise.all(nodes.map((node) => node.replica.close()));
}

let counter = 0;

/** A valid route; `overrides` win. */
export function makeRoute(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  counter++;
  registerSecret(overrides.accessToken);
  return {
    namespace: 'default',
    name: `sandbox-${counter}`,
    id: `sb-${counter}`,
    uid: `uid-${counter}`,
    resourceVersion: '1',
    ip: '10.0.0.1',
    state: 'Running',
    ...overrides,
  };
}

export async function putRoute(api: string, route: Record<string, unknown>): Promise<{ status: number; body: any }> {
  const response = await fetch(`${api}/v1/routes`, {
    method: 'PUT',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(route),
  });
  return { status: response.status, body: await response.json() };
}
