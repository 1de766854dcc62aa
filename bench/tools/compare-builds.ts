// Two builds of routesync side by side against the same ten peer processes, in alternating
// rounds: lifecycle calls per second at a given number in flight (benchmark 3's measure), CPU
// time per call from /proc, and how many changes each push carried. For telling whether a
// change to the code moved the figures, when the machine's speed swings more between two
// benchmark runs than the change moves them; not a benchmark of record.
//
//   node --import tsx bench/tools/compare-builds.ts [--a HEAD] [--b DIR/dist/main.js | --b REV]
//                                                   [--in-flight 64] [--rounds 6] [--seconds 3] [--profile]
//
// --a and --b each take a git revision (built into a directory of its own, as `--rev` does) or
// a path to a built main.js; --b defaults to this tree's dist/ (`npm run build` first).
// --profile starts b with --cpu-prof (bench/results/profiles/compare-builds-*/).
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { buildRevision, HOSTS, startPeers, startRoutesync, stopAll, type RoutesyncEntry, type RoutesyncProcess } from '../lib/contenders.js';
import { closedLoop, HttpTarget } from '../lib/driver.js';
import { metricTotal } from '../lib/metrics.js';
import { BENCH_DIR, ROOT_DIR } from '../lib/proc.js';
import { RouteFactory } from '../lib/routes.js';
import { percentile, spread } from '../lib/stats.js';

const { values } = parseArgs({
  options: {
    a: { type: 'string', default: 'HEAD' },
    b: { type: 'string', default: join(ROOT_DIR, 'dist', 'main.js') },
    'in-flight': { type: 'string', default: '64' },
    rounds: { type: 'string', default: '6' },
    seconds: { type: 'string', default: '3' },
    profile: { type: 'boolean', default: false },
  },
});

function entryOf(spec: string): RoutesyncEntry {
  const path = resolve(spec);
  if (spec.endsWith('.js') && existsSync(path)) return { script: path, tsx: false, note: path };
  return buildRevision(spec);
}

const inFlight = Number(values['in-flight']);
const rounds = Number(values.rounds);
const durationMs = Number(values.seconds) * 1000;
const builds = { a: entryOf(values.a), b: entryOf(values.b) };
process.stdout.write(`a: ${builds.a.note}\nb: ${builds.b.note}\n`);

const peers = await startPeers(10);
const addresses = peers.map((peer) => peer.address);
const servers: Record<'a' | 'b', RoutesyncProcess> = {
  a: await startRoutesync({ peers: addresses, entry: builds.a, name: 'routesync a' }),
  b: await startRoutesync({
    peers: addresses,
    entry: builds.b,
    host: HOSTS.routesyncB,
    name: 'routesync b',
    nodeFlags: values.profile ? ['--cpu-prof', '--cpu-prof-dir', join(BENCH_DIR, 'results', 'profiles', `compare-builds-${Date.now()}`)] : [],
  }),
};
const targets = { a: new HttpTarget(`http://${servers.a.api}`, inFlight), b: new HttpTarget(`http://${servers.b.api}`, inFlight) };
const routes = new RouteFactory();

interface Round {
  readonly perSecond: number;
  readonly cpuUsPerCall: number;
  readonly changesPerPush: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
}

/** Counters to subtract: CPU time, push attempts, changes acknowledged. */
async function counters(which: 'a' | 'b'): Promise<{ cpuMs: number; attempts: number; pushed: number }> {
  const text = await (await fetch(`http://${servers[which].peer}/metrics`)).text();
  return {
    cpuMs: servers[which].child.cpuMs(),
    attempts: metricTotal(text, 'routesync_peer_attempts_total'),
    pushed: metricTotal(text, 'routesync_routes_pushed_total'),
  };
}

async function round(which: 'a' | 'b'): Promise<Round> {
  let latencies: number[] = [];
  const fire = async () => {
    const answer = await targets[which].call('PUT', '/v1/routes', routes.nextBody());
    latencies.push(answer.ms);
    return answer.status === 200;
  };
  // The warm-up window is not counted, so the counters are read once it is over.
  await closedLoop(inFlight, 0, 500, fire);
  latencies = [];
  const before = await counters(which);
  const result = await closedLoop(inFlight, 0, durationMs, fire);
  const after = await counters(which);
  const calls = result.ok + result.notOk + result.errors;
  return {
    perSecond: result.perSecond,
    cpuUsPerCall: ((after.cpuMs - before.cpuMs) * 1000) / Math.max(1, calls),
    changesPerPush: (after.pushed - before.pushed) / Math.max(1, after.attempts - before.attempts),
    p50Ms: percentile(latencies, 50),
    p99Ms: percentile(latencies, 99),
  };
}

const results: Record<'a' | 'b', Round[]> = { a: [], b: [] };
try {
  // One round each first, not counted: JIT warm-up and the peers' first connections.
  await round('a');
  await round('b');
  for (let r = 0; r < rounds; r++) {
    // Alternate which goes first, so that a drift in the machine's speed favours neither.
    const order: ('a' | 'b')[] = r % 2 === 0 ? ['a', 'b'] : ['b', 'a'];
    for (const which of order) results[which].push(await round(which));
    const [a, b] = [results.a.at(-1)!, results.b.at(-1)!];
    const line = (x: Round) =>
      `${x.perSecond.toFixed(0)}/s, ${x.cpuUsPerCall.toFixed(0)} µs/call, ${x.changesPerPush.toFixed(1)} changes/push, p50 ${x.p50Ms.toFixed(2)} p99 ${x.p99Ms.toFixed(2)} ms`;
    process.stdout.write(`round ${r + 1}: a ${line(a)}; b ${line(b)}\n`);
  }
  const ratio = (pick: (round: Round) => number) => spread(results.b.map((b, i) => pick(b) / pick(results.a[i]!))).median;
  process.stdout.write(
    `median b ÷ a over ${rounds} rounds (${inFlight} in flight): calls/s ${ratio((x) => x.perSecond).toFixed(3)}, ` +
      `CPU per call ${ratio((x) => x.cpuUsPerCall).toFixed(3)}, changes per push ${ratio((x) => x.changesPerPush).toFixed(3)}, ` +
      `p50 ${ratio((x) => x.p50Ms).toFixed(3)}, p99 ${ratio((x) => x.p99Ms).toFixed(3)}\n`,
  );
} finally {
  await targets.a.close();
  await targets.b.close();
  await servers.a.stop();
  await servers.b.stop();
  await stopAll(peers);
}
