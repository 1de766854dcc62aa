// Soak run (issue 6 §4): three routesync replicas as real processes, a real upstream process,
// a steady stream of route changes at random replicas and of proxied requests through every
// data plane, for minutes. Every few seconds it samples each replica's heap (its /metrics),
// RSS (/proc/<pid>/status), open file descriptors (/proc/<pid>/fd) and outbox size (/metrics),
// writes bench/results/soak.json, and judges whether each series levels off: the mean of the
// last third against the middle third (the first third is warm-up), plus a least-squares slope
// over the last two thirds.
//
//   npm run soak -- [--minutes 3] [--changes-per-s 50] [--requests-per-s 200] [--sample-s 5] [--preload 0]
//   make soak SOAK_ARGS="--minutes 5"
//
// --preload N first loads N distinct routes (benchmark 5's, in batches of 1,000 through
// POST /v1/routes/batch, spread over the replicas) that the steady load leaves alone: the
// memory of a replica holding a large table under traffic (docs/deploy.md, "Resource figures").
//
// Exit code 0 when every series levels off, 1 when one climbs, 2 when the run itself failed.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Agent, request } from 'undici';
import { NODE_FLAGS } from '../src/node-flags.js';
import { routesyncEntry } from './lib/contenders.js';
import { distinctRoutes } from './lib/routes.js';
import { metricValue } from './lib/metrics.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const UPSTREAM = fileURLToPath(new URL('./upstream.ts', import.meta.url));
const RESULT = fileURLToPath(new URL('./results/soak.json', import.meta.url));

const { values: args } = parseArgs({
  options: {
    minutes: { type: 'string', default: '3' },
    'changes-per-s': { type: 'string', default: '50' },
    'requests-per-s': { type: 'string', default: '200' },
    'sample-s': { type: 'string', default: '5' },
    keys: { type: 'string', default: '2000' },
    preload: { type: 'string', default: '0' },
    out: { type: 'string', default: RESULT },
  },
});
const MINUTES = Number(args.minutes);
const CHANGES_PER_S = Number(args['changes-per-s']);
const REQUESTS_PER_S = Number(args['requests-per-s']);
const SAMPLE_S = Number(args['sample-s']);
/** Route identities the changes cycle through: the table's size is bounded, so anything that grows is a leak. */
const KEYS = Number(args.keys);
/** Routes loaded before the steady load starts, which it leaves alone. */
const PRELOAD = Number(args.preload);
const PRELOAD_BATCH = 1000;
const TICK_MS = 100;
const TOKEN = 'soak-peer-token';
/** As the benchmarks choose: the build when it is fresh (what ships, so RSS is the shipped process's), else src/ through tsx. */
const ENTRY = routesyncEntry();

interface Node {
  readonly child: ChildProcess;
  readonly api: string;
  readonly peer: string;
  readonly proxy: string;
  readonly lines: string[];
}

interface Sample {
  readonly tSec: number;
  readonly replica: number;
  readonly heapUsedBytes: number;
  readonly rssBytes: number;
  readonly openFds: number;
  readonly outboxRoutes: number;
  readonly routes: number;
  readonly tombstones: number;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

function waitForLine(child: ChildProcess, lines: string[], pattern: RegExp, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no line matching ${pattern} within ${timeoutMs} ms`)), timeoutMs);
    const check = (line: string) => {
      if (pattern.test(line)) {
        clearTimeout(timer);
        resolve(line);
      }
    };
    lines.forEach(check);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      // Keep the start-up lines and the warnings; the rest would grow the driver's own memory.
      if (lines.length < 200 || /"level":"(warn|error|fatal)"/.test(line)) lines.push(line);
      check(line);
    });
    child.once('exit', (code) => reject(new Error(`process exited with ${code} before ${pattern}`)));
  });
}

async function startCluster(): Promise<Node[]> {
  const ports = await Promise.all(Array.from({ length: 9 }, freePort));
  const peers = [0, 1, 2].map((i) => `127.0.0.1:${ports[i * 3 + 1]}`);
  const nodes: Node[] = [];
  for (let i = 0; i < 3; i++) {
    const api = `127.0.0.1:${ports[i * 3]}`;
    const peer = peers[i]!;
    const proxy = `127.0.0.1:${ports[i * 3 + 2]}`;
    const child = spawn(process.execPath, [...(ENTRY.tsx ? ['--import', 'tsx'] : []), ...NODE_FLAGS, ENTRY.script], {
      cwd: ROOT,
      env: {
        PATH: process.env.PATH ?? '',
        ROUTESYNC_API_ADDR: api,
        ROUTESYNC_PEER_ADDR: peer,
        ROUTESYNC_PROXY_ADDR: proxy,
        ROUTESYNC_PROXY_ALLOW_LOOPBACK: 'true',
        ROUTESYNC_PEERS: peers.join(','),
        ROUTESYNC_SELF: peer,
        ROUTESYNC_PEER_TOKEN: TOKEN,
        ROUTESYNC_RECONCILE_INTERVAL_MS: '2000',
        ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '1000',
        ROUTESYNC_TOMBSTONE_TTL_MS: '30000',
        ROUTESYNC_ACCESS_LOG: 'false',
        ROUTESYNC_LOG_LEVEL: 'warn',
      },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const lines: string[] = [];
    // Drain standard output (a full pipe would stall the replica); keep its warnings and errors.
    createInterface({ input: child.stdout! }).on('line', (line) => {
      if (lines.length < 1000) lines.push(line);
    });
    nodes.push({ child, api, peer, proxy, lines });
  }
  // Warn level hides "ready"; /readyz says it.
  for (const node of nodes) await waitReady(node);
  return nodes;
}

async function waitReady(node: Node): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      const response = await request(`http://${node.peer}/readyz`);
      await response.body.dump();
      if (response.statusCode === 200) return;
    } catch {
      // not listening yet
    }
    if (node.child.exitCode !== null) throw new Error(`replica on ${node.peer} exited with ${node.child.exitCode}`);
    if (Date.now() > deadline) throw new Error(`replica on ${node.peer} not ready within 30 s`);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

async function startUpstream(): Promise<{ child: ChildProcess; address: string }> {
  const port = await freePort();
  const child = spawn(process.execPath, ['--import', 'tsx', UPSTREAM, '--listen', `127.0.0.1:${port}`], { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await waitForLine(child, [], /upstream listening on/, 20_000);
  return { child, address: line.replace(/^.*listening on /, '').trim() };
}

/** An unlabelled metric's value, NaN when absent (a gap in the series, not a zero). */
function gauge(text: string, name: string): number {
  return metricValue(text, name) ?? Number.NaN;
}

async function sample(nodes: readonly Node[], tSec: number): Promise<Sample[]> {
  return Promise.all(
    nodes.map(async (node, replica) => {
      const pid = node.child.pid!;
      const response = await request(`http://${node.peer}/metrics`);
      const text = await response.body.text();
      const rssKb = Number(/^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? Number.NaN);
      return {
        tSec,
        replica,
        heapUsedBytes: gauge(text, 'routesync_nodejs_heap_size_used_bytes'),
        rssBytes: rssKb * 1024,
        openFds: readdirSync(`/proc/${pid}/fd`).length,
        outboxRoutes: gauge(text, 'routesync_outbox_routes'),
        routes: gauge(text, 'routesync_routes'),
        tombstones: gauge(text, 'routesync_tombstones'),
      };
    }),
  );
}

interface Judgement {
  readonly series: string;
  readonly replica: number;
  readonly middleMean: number;
  readonly lastMean: number;
  readonly growthPct: number;
  readonly slopePerMin: number;
  readonly levelsOff: boolean;
}

/** Least-squares slope of y over t (per second). */
function slope(points: readonly { t: number; y: number }[]): number {
  const n = points.length;
  if (n < 2) return 0;
  const mt = points.reduce((sum, p) => sum + p.t, 0) / n;
  const my = points.reduce((sum, p) => sum + p.y, 0) / n;
  let num = 0;
  let den = 0;
  for (const p of points) {
    num += (p.t - mt) * (p.y - my);
    den += (p.t - mt) ** 2;
  }
  return den === 0 ? 0 : num / den;
}

const mean = (values: readonly number[]) => values.reduce((sum, v) => sum + v, 0) / Math.max(1, values.length);

/**
 * A series levels off when its last third is not meaningfully above its middle third. The
 * allowances are absolute floors as well as ratios, so a gauge that wobbles around a small
 * number (three descriptors, a dozen queued changes) is not called a leak.
 */
const ALLOWANCE: Record<'heapUsedBytes' | 'rssBytes' | 'openFds' | 'outboxRoutes', { pct: number; abs: number }> = {
  heapUsedBytes: { pct: 10, abs: 8 * 1024 * 1024 },
  rssBytes: { pct: 10, abs: 16 * 1024 * 1024 },
  openFds: { pct: 10, abs: 5 },
  outboxRoutes: { pct: 50, abs: 200 },
};

function judge(samples: readonly Sample[]): Judgement[] {
  const judgements: Judgement[] = [];
  const end = Math.max(...samples.map((s) => s.tSec));
  for (const replica of [0, 1, 2]) {
    const own = samples.filter((s) => s.replica === replica);
    for (const series of Object.keys(ALLOWANCE) as (keyof typeof ALLOWANCE)[]) {
      const middle = own.filter((s) => s.tSec > end / 3 && s.tSec <= (2 * end) / 3).map((s) => s[series]);
      const last = own.filter((s) => s.tSec > (2 * end) / 3).map((s) => s[series]);
      const middleMean = mean(middle);
      const lastMean = mean(last);
      const growth = lastMean - middleMean;
      const { pct, abs } = ALLOWANCE[series];
      const growthPct = middleMean === 0 ? (growth === 0 ? 0 : 100) : (100 * growth) / middleMean;
      const slopePerMin = 60 * slope(own.filter((s) => s.tSec > end / 3).map((s) => ({ t: s.tSec, y: s[series] })));
      judgements.push({ series, replica, middleMean, lastMean, growthPct, slopePerMin, levelsOff: growth <= abs || growthPct <= pct });
    }
  }
  return judgements;
}

async function main(): Promise<number> {
  const startedAt = Date.now();
  console.log(`soak: ${MINUTES} min, ${CHANGES_PER_S} changes/s over ${KEYS} routes, ${REQUESTS_PER_S} proxied requests/s, sample every ${SAMPLE_S} s`);
  const upstream = await startUpstream();
  const [upstreamHost, upstreamPort] = [upstream.address.slice(0, upstream.address.lastIndexOf(':')), upstream.address.slice(upstream.address.lastIndexOf(':') + 1)];
  const nodes = await startCluster();
  console.log(`soak: replicas ${nodes.map((n) => `pid ${n.child.pid} api ${n.api} peer ${n.peer} proxy ${n.proxy}`).join('; ')}; upstream ${upstream.address}`);
  const dispatcher = new Agent({ connections: 16, keepAliveTimeout: 30_000 });
  if (PRELOAD > 0) {
    const loadStart = Date.now();
    for (let start = 0; start < PRELOAD; start += PRELOAD_BATCH) {
      const routes = distinctRoutes(start, Math.min(PRELOAD_BATCH, PRELOAD - start)).map((route) => ({ ...route, namespace: 'preload', ip: upstreamHost }));
      const node = nodes[(start / PRELOAD_BATCH) % nodes.length]!;
      const response = await request(`http://${node.api}/v1/routes/batch`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ routes }),
        dispatcher,
      });
      const text = await response.body.text();
      if (response.statusCode !== 200) throw new Error(`preload batch answered ${response.statusCode}: ${text.slice(0, 300)}`);
    }
    console.log(`soak: preloaded ${PRELOAD} routes in ${((Date.now() - loadStart) / 1000).toFixed(1)} s`);
  }
  const loadStartedAt = Date.now();

  const versions = new Array<number>(KEYS).fill(0);
  const counts = { changes: 0, changeErrors: 0, notAcked: 0, requests: 0, requestErrors: 0, non2xx: 0 };
  let change = 0;
  let sent = 0;
  const inflight = new Set<Promise<void>>();
  const track = (work: Promise<void>) => {
    inflight.add(work);
    void work.finally(() => inflight.delete(work));
  };

  const sendChange = async () => {
    const key = change++ % KEYS;
    const node = nodes[Math.floor(Math.random() * nodes.length)]!;
    versions[key] = (versions[key] ?? 0) + 1;
    const resourceVersion = String(versions[key]);
    const name = `soak-${key}`;
    // One change in five is a delete (keys take their turn on different laps); the next lap
    // re-creates the route at a newer version.
    const remove = (versions[key] + key) % 5 === 0;
    try {
      const response = remove
        ? await request(`http://${node.api}/v1/routes/soak/${name}?resourceVersion=${resourceVersion}`, { method: 'DELETE', dispatcher })
        : await request(`http://${node.api}/v1/routes`, {
            method: 'PUT',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ namespace: 'soak', name, id: `sb-soak-${key}`, uid: `uid-${key}`, resourceVersion, ip: upstreamHost, state: 'Running' }),
            dispatcher,
          });
      const body = (await response.body.json()) as { sync?: { acked: number; peers: number } | null };
      counts.changes++;
      if (response.statusCode !== 200) counts.changeErrors++;
      else if (body.sync && body.sync.acked !== body.sync.peers) counts.notAcked++;
    } catch {
      counts.changeErrors++;
    }
  };

  const sendRequest = async () => {
    const node = nodes[sent++ % nodes.length]!;
    // Routes that exist right now: any key not on a delete lap (a 404 from a deleted one is counted, not an error of ours).
    const key = Math.floor(Math.random() * Math.min(KEYS, Math.max(1, change)));
    try {
      const response = await request(`http://${node.proxy}/kruise/sb-soak-${key}/${upstreamPort}/soak`, { dispatcher });
      await response.body.dump();
      counts.requests++;
      if (response.statusCode !== 200) counts.non2xx++;
    } catch {
      counts.requestErrors++;
    }
  };

  const samples: Sample[] = [];
  const endAt = loadStartedAt + MINUTES * 60_000;
  let changeCredit = 0;
  let requestCredit = 0;
  const tick = setInterval(() => {
    changeCredit += (CHANGES_PER_S * TICK_MS) / 1000;
    requestCredit += (REQUESTS_PER_S * TICK_MS) / 1000;
    // Steady rate, not a closed loop: if the cluster falls behind, work piles up in flight and shows.
    for (; changeCredit >= 1; changeCredit--) track(sendChange());
    for (; requestCredit >= 1; requestCredit--) track(sendRequest());
  }, TICK_MS);

  const sampleStart = Date.now();
  let failure: Error | undefined;
  while (Date.now() < endAt) {
    await new Promise((resolve) => setTimeout(resolve, SAMPLE_S * 1000));
    try {
      const tSec = Math.round((Date.now() - sampleStart) / 1000);
      const batch = await sample(nodes, tSec);
      samples.push(...batch);
      const mb = (bytes: number) => (bytes / 1048576).toFixed(1);
      console.log(
        `t=${String(tSec).padStart(4)}s ` +
          batch.map((s) => `r${s.replica} heap ${mb(s.heapUsedBytes)} MiB rss ${mb(s.rssBytes)} MiB fds ${s.openFds} outbox ${s.outboxRoutes} routes ${s.routes}`).join(' | ') +
          ` | in flight ${inflight.size}`,
      );
    } catch (error) {
      failure = error as Error;
      break;
    }
  }
  clearInterval(tick);
  await Promise.allSettled([...inflight]);
  await dispatcher.close();

  for (const node of nodes) node.child.kill('SIGTERM');
  const exits = await Promise.all(nodes.map((node) => new Promise<number | null>((resolve) => (node.child.exitCode !== null ? resolve(node.child.exitCode) : node.child.once('exit', resolve)))));
  upstream.child.kill('SIGTERM');

  if (failure) {
    console.error(`soak: sampling failed: ${failure.message}`);
    return 2;
  }
  const judgements = judge(samples);
  const verdict = judgements.every((j) => j.levelsOff);
  const summary = {
    when: new Date(startedAt).toISOString(),
    minutes: MINUTES,
    rates: { changesPerSecond: CHANGES_PER_S, proxiedRequestsPerSecond: REQUESTS_PER_S, routeKeys: KEYS, preloadedRoutes: PRELOAD },
    node: process.version,
    routesync: ENTRY.note,
    counts,
    exitCodes: exits,
    verdict: verdict ? 'levels off' : 'climbs',
    judgements,
    samples,
  };
  mkdirSync(fileURLToPath(new URL('./results/', import.meta.url)), { recursive: true });
  writeFileSync(args.out ?? RESULT, `${JSON.stringify(summary, null, 2)}\n`);

  console.log(`soak: ${counts.changes} changes (${counts.changeErrors} errors, ${counts.notAcked} not acked by every peer), ${counts.requests} proxied requests (${counts.non2xx} non-2xx, ${counts.requestErrors} errors); exits ${exits.join(',')}`);
  for (const series of Object.keys(ALLOWANCE)) {
    const rows = judgements.filter((j) => j.series === series);
    console.log(
      `soak: ${series.padEnd(14)} ` +
        rows
          .map((j) => {
            const bytes = series.endsWith('Bytes');
            return `r${j.replica} ${fmt(j.middleMean, bytes)} -> ${fmt(j.lastMean, bytes)} (${j.growthPct >= 0 ? '+' : ''}${j.growthPct.toFixed(1)}%, ${fmt(j.slopePerMin, bytes)}/min)${j.levelsOff ? '' : ' CLIMBS'}`;
          })
          .join(' | '),
    );
  }
  console.log(`soak: ${verdict ? 'every series levels off' : 'a series climbs'}; results in ${args.out ?? RESULT}`);
  return verdict ? 0 : 1;
}

function fmt(value: number, bytes = false): string {
  if (bytes) return `${(value / 1048576).toFixed(2)} MiB`;
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    console.error(`soak: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(2);
  },
);
