// make demo: a three-replica routesync cluster on loopback, end to end, narrated.
//
// Each replica is a real process on its own loopback address (127.0.0.1, .2, .3), all on the
// same ports, the way pods share ports on their own IPs. Three fake sandboxes (tiny HTTP
// servers on 127.0.1.x that answer with their name) stand in for sandbox pods. The script
// applies routes on replica 1, shows them arriving on replicas 2 and 3, sends traffic through
// every replica's data plane, pauses one sandbox and shows its traffic refused, then stops
// every replica with SIGTERM and checks each exits 0. Exit 0 when every step held, 1 otherwise.
//
//   node --import tsx scripts/demo.ts [--dist] [--ports api,peer,proxy]
//   --dist   run dist/main.js (after `npm run build`) instead of src/main.ts under tsx
//   --ports  the three listener ports every replica uses (default 7788,7789,8080)
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import http, { type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Agent, request } from 'undici';
import { formatTable, runCtl } from '../src/ctl.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DOMAIN = 'sandbox.demo';
const PEER_TOKEN = 'demo-peer-token';
/** Every wait in the demo is bounded: a step that does not happen in this time fails the demo. */
const STEP_TIMEOUT_MS = 15_000;

const { values } = parseArgs({
  options: { dist: { type: 'boolean', default: false }, ports: { type: 'string', default: '7788,7789,8080' } },
});
const ports = values.ports.split(',').map(Number);
if (ports.length !== 3 || ports.some((port) => !Number.isInteger(port) || port < 1 || port > 65_535)) {
  process.stderr.write('demo: --ports must be three ports: api,peer,proxy\n');
  process.exit(2);
}
const [API_PORT, PEER_PORT, PROXY_PORT] = ports as [number, number, number];

const agent = new Agent({ keepAliveTimeout: 1_000 });
const say = (text = '') => process.stdout.write(`${text}\n`);
const step = (n: number, title: string) => say(`\n== ${n}. ${title}`);

class DemoFailure extends Error {}
function check(condition: boolean, message: string): asserts condition {
  if (!condition) throw new DemoFailure(message);
}

async function until<T>(what: string, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  for (;;) {
    const value = await probe().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new DemoFailure(`timed out after ${STEP_TIMEOUT_MS} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function call(url: string, init: { method?: 'GET' | 'PUT'; headers?: Record<string, string>; body?: unknown } = {}): Promise<{ status: number; body: any; text: string }> {
  const response = await request(url, {
    dispatcher: agent,
    method: init.method ?? 'GET',
    headers: { ...(init.body === undefined ? {} : { 'content-type': 'application/json' }), ...init.headers },
    ...(init.body === undefined ? {} : { body: JSON.stringify(init.body) }),
    signal: AbortSignal.timeout(STEP_TIMEOUT_MS),
  });
  const text = await response.body.text();
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  return { status: response.statusCode, body, text };
}

// ---------------------------------------------------------------------------------------------
// fake sandboxes

interface Sandbox {
  readonly name: string;
  readonly id: string;
  readonly ip: string;
  port: number;
  readonly server: Server;
  hits: number;
}

async function startSandbox(name: string, ip: string): Promise<Sandbox> {
  const sandbox: Sandbox = { name, id: `sb-${name}`, ip, port: 0, hits: 0, server: http.createServer() };
  sandbox.server.on('request', (req, res) => {
    sandbox.hits++;
    res.setHeader('content-type', 'text/plain');
    res.end(`hello from ${name} (${req.method} ${req.url})`);
  });
  sandbox.server.listen(0, ip);
  await once(sandbox.server, 'listening');
  sandbox.port = (sandbox.server.address() as AddressInfo).port;
  return sandbox;
}

// ---------------------------------------------------------------------------------------------
// replicas as processes

interface ReplicaProcess {
  readonly n: number;
  readonly host: string;
  readonly child: ChildProcess;
  readonly log: string[];
  readonly exited: Promise<number | null>;
  readonly api: string;
  readonly peer: string;
  readonly proxy: string;
}

function startReplica(n: number): ReplicaProcess {
  const host = `127.0.0.${n}`;
  const peers = [1, 2, 3].map((i) => `127.0.0.${i}:${PEER_PORT}`).join(',');
  const entry = values.dist ? [`${ROOT}dist/main.js`] : ['--import', 'tsx', `${ROOT}src/main.ts`];
  if (values.dist && !existsSync(`${ROOT}dist/main.js`)) throw new DemoFailure('--dist: dist/main.js is missing; run `npm run build` first');
  const child = spawn(process.execPath, entry, {
    cwd: ROOT,
    env: {
      PATH: process.env.PATH ?? '',
      ROUTESYNC_API_ADDR: `${host}:${API_PORT}`,
      ROUTESYNC_PEER_ADDR: `${host}:${PEER_PORT}`,
      ROUTESYNC_PROXY_ADDR: `${host}:${PROXY_PORT}`,
      // The demo's sandboxes are processes on loopback.
      ROUTESYNC_PROXY_ALLOW_LOOPBACK: 'true',
      ROUTESYNC_PEERS: peers,
      ROUTESYNC_SELF: `${host}:${PEER_PORT}`,
      ROUTESYNC_PEER_TOKEN: PEER_TOKEN,
      ROUTESYNC_PROXY_DOMAIN: DOMAIN,
      ROUTESYNC_SHUTDOWN_GRACE_MS: '3000',
      // A slow shared machine: generous per-attempt time, still far below the deadline.
      ROUTESYNC_SYNC_DEADLINE_MS: '2000',
      ROUTESYNC_ATTEMPT_TIMEOUT_MS: '1000',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const log: string[] = [];
  createInterface({ input: child.stdout! }).on('line', (line) => log.push(line));
  createInterface({ input: child.stderr! }).on('line', (line) => log.push(`stderr: ${line}`));
  const exited = once(child, 'exit').then(([code]) => code as number | null);
  return {
    n,
    host,
    child,
    log,
    exited,
    api: `http://${host}:${API_PORT}`,
    peer: `http://${host}:${PEER_PORT}`,
    proxy: `http://${host}:${PROXY_PORT}`,
  };
}

// ---------------------------------------------------------------------------------------------

const sandboxes: Sandbox[] = [];
const replicas: ReplicaProcess[] = [];

async function demo(): Promise<void> {
  say('routesync demo: three replicas on 127.0.0.1-3, three fake sandboxes, one route table.');

  step(1, 'Start three fake sandboxes (HTTP servers that answer with their name)');
  for (const [i, name] of ['alpha', 'beta', 'gamma'].entries()) sandboxes.push(await startSandbox(name, `127.0.1.${i + 1}`));
  say(formatTable(['SANDBOX', 'ID', 'POD ADDRESS'], sandboxes.map((s) => [s.name, s.id, `${s.ip}:${s.port}`])).trimEnd());

  step(2, `Start three replicas as processes (local API :${API_PORT}, peer API :${PEER_PORT}, data plane :${PROXY_PORT}, each on its own address)`);
  for (const n of [1, 2, 3]) replicas.push(startReplica(n));
  for (const replica of replicas) {
    await Promise.race([
      until(`replica ${replica.n} to be ready`, async () => ((await call(`${replica.peer}/readyz`)).status === 200 ? true : undefined)),
      replica.exited.then((code) => {
        throw new DemoFailure(`replica ${replica.n} exited with ${code} before it was ready`);
      }),
    ]);
    say(`replica ${replica.n}  pid ${replica.child.pid}  ready  (peers: the other two, by ROUTESYNC_PEERS)`);
  }

  step(3, 'Apply the routes on replica 1 (what its sandbox manager does on create)');
  const routes = sandboxes.map((s, i) => ({
    namespace: 'demo',
    name: s.name,
    id: s.id,
    uid: `uid-${s.name}`,
    resourceVersion: String(100 + i),
    ip: s.ip,
    state: 'running',
  }));
  for (const route of routes) {
    const answer = await call(`${replicas[0]!.api}/v1/routes`, { method: 'PUT', body: route });
    check(answer.status === 200 && answer.body?.result?.outcome === 'applied', `PUT ${route.id} on replica 1 answered ${answer.status} ${answer.text}`);
    const sync = answer.body.sync as { peers: number; acked: number; elapsedMs: number };
    say(`PUT ${route.id.padEnd(8)} v${route.resourceVersion}  -> ${answer.body.result.reason}; synced to ${sync.acked}/${sync.peers} peers in ${sync.elapsedMs.toFixed(1)} ms`);
  }

  step(4, 'Each route arrives on replicas 2 and 3 (GET /v1/routes/:id on their local APIs)');
  const rows: string[][] = [];
  for (const replica of replicas.slice(1)) {
    for (const route of routes) {
      const seen = await until(`${route.id} on replica ${replica.n}`, async () => {
        const answer = await call(`${replica.api}/v1/routes/${route.id}`);
        return answer.status === 200 && answer.body.resourceVersion === route.resourceVersion ? answer.body : undefined;
      });
      rows.push([`replica ${replica.n}`, seen.id, seen.state, seen.ip, `v${seen.resourceVersion}`]);
    }
  }
  say(formatTable(['ON', 'ID', 'STATE', 'IP', 'VERSION'], rows).trimEnd());

  step(5, "Traffic through every replica's data plane reaches the right sandbox");
  const traffic: string[][] = [];
  for (const replica of replicas) {
    for (const [i, sandbox] of sandboxes.entries()) {
      // Alternate openkruise's forms: the e2b host form, and the e2b headers.
      const byHost = i % 2 === 0;
      const hostHeader = `${sandbox.port}-${sandbox.id}.${DOMAIN}`;
      const headers: Record<string, string> = byHost ? { host: hostHeader } : { 'e2b-sandbox-id': sandbox.id, 'e2b-sandbox-port': String(sandbox.port) };
      const answer = await call(`${replica.proxy}/hello`, { headers });
      check(answer.status === 200 && answer.text.startsWith(`hello from ${sandbox.name}`), `replica ${replica.n} -> ${sandbox.id}: ${answer.status} ${answer.text}`);
      traffic.push([`replica ${replica.n}`, byHost ? `Host: ${hostHeader}` : `e2b-sandbox-id: ${sandbox.id}`, String(answer.status), answer.text]);
    }
  }
  say(formatTable(['VIA', 'REQUEST NAMES THE SANDBOX BY', 'STATUS', 'ANSWER'], traffic).trimEnd());

  step(6, 'Pause sandbox beta (its manager calls replica 2 this time) and watch traffic refused everywhere');
  const beta = sandboxes[1]!;
  const paused = { ...routes[1]!, resourceVersion: '200', state: 'paused' };
  const pause = await call(`${replicas[1]!.api}/v1/routes`, { method: 'PUT', body: paused });
  check(pause.status === 200 && pause.body?.result?.outcome === 'applied', `pausing beta on replica 2 answered ${pause.status} ${pause.text}`);
  say(`PUT ${beta.id} v200 state=paused on replica 2 -> ${pause.body.result.reason}; synced to ${pause.body.sync.acked}/${pause.body.sync.peers} peers`);
  const hitsBefore = beta.hits;
  const refused: string[][] = [];
  for (const replica of replicas) {
    const answer = await until(`replica ${replica.n} to refuse traffic to the paused sandbox`, async () => {
      const result = await call(`${replica.proxy}/hello`, { headers: { host: `${beta.port}-${beta.id}.${DOMAIN}` } });
      return result.status === 503 ? result : undefined;
    });
    check(answer.body?.error?.code === 'sandbox_not_running' && answer.body.error.state === 'paused', `replica ${replica.n}: ${answer.text}`);
    refused.push([`replica ${replica.n}`, String(answer.status), answer.text]);
  }
  say(formatTable(['VIA', 'STATUS', 'ANSWER'], refused).trimEnd());
  check(beta.hits === hitsBefore, 'a request for the paused sandbox reached it');
  say(`beta saw no request while paused (${beta.hits} requests in all, every one before the pause).`);
  const alpha = await call(`${replicas[2]!.proxy}/still-up`, { headers: { host: `${sandboxes[0]!.port}-${sandboxes[0]!.id}.${DOMAIN}` } });
  check(alpha.status === 200, `alpha stopped answering: ${alpha.text}`);
  say(`alpha still answers through replica 3: ${alpha.text}`);

  step(7, 'What an operator sees: routesync ctl status on replica 1 (it pushed to both peers), routes on replica 3');
  let ctlOut = '';
  const capture = { stdout: (text: string) => (ctlOut += text), stderr: (text: string) => (ctlOut += text), env: {} };
  const statusCode = await runCtl(['status', '--api', `${replicas[0]!.host}:${API_PORT}`, '--peer', `${replicas[0]!.host}:${PEER_PORT}`], capture);
  const routesCode = await runCtl(['routes', '--api', `${replicas[2]!.host}:${API_PORT}`], capture);
  say(ctlOut.trimEnd());
  check(statusCode === 0 && routesCode === 0, `routesync ctl exited ${statusCode}/${routesCode}`);

  step(8, 'Stop every replica with SIGTERM; each drains and exits 0');
  for (const replica of replicas) replica.child.kill('SIGTERM');
  for (const replica of replicas) {
    const code = await Promise.race([
      replica.exited,
      new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), STEP_TIMEOUT_MS).unref()),
    ]);
    check(code === 0, `replica ${replica.n} exited with ${code} after SIGTERM`);
    say(`replica ${replica.n}  exit 0`);
  }
}

async function cleanup(): Promise<void> {
  for (const replica of replicas) if (replica.child.exitCode === null && replica.child.signalCode === null) replica.child.kill('SIGKILL');
  await Promise.all(sandboxes.map((s) => new Promise((resolve) => s.server.close(resolve))));
  await agent.close();
}

process.once('SIGINT', () => {
  void cleanup().then(() => process.exit(130));
});

try {
  await demo();
  await cleanup();
  say('\nDemo complete: routes synced, traffic routed, a paused sandbox refused, clean shutdown.');
} catch (error) {
  say(`\nDEMO FAILED: ${error instanceof Error ? error.message : String(error)}`);
  for (const replica of replicas) {
    say(`-- last log lines of replica ${replica.n}:`);
    for (const line of replica.log.slice(-8)) say(`   ${line}`);
  }
  await cleanup();
  process.exitCode = 1;
}
