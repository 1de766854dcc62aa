// Two builds of routesync side by side against the same ten peer processes, in alternating
// rounds: lifecycle calls per second at a given number in flight (benchmark 3's measure), CPU
// time per call from /proc (and the main thread's time runnable but waiting for a CPU), and how
// many changes each push carried. For telling whether a change to the code moved the figures,
// when the machine's speed swings more between two benchmark runs than the change moves them;
// not a benchmark of record. Two copies of one build differ by ~5 % over two rounds here.
//
//   node --import tsx bench/tools/compare-builds.ts [--a HEAD] [--b DIR/dist/main.js | --b REV]
//                                                   [--in-flight 64] [--rounds 6] [--seconds 3] [--profile] [--interleave]
//
// --a and --b each take a git revision (built into a directory of its own, as `--rev` does) or
// a path to a built main.js; --b defaults to this tree's dist/ (`npm run build` first).
// --profile starts b with --cpu-prof (bench/results/profiles/compare-builds-*/). --interleave
// alternates single calls between a and b within each round instead of alternating whole rounds:
// much less noise on CPU per call and latency, but each server then sees half the calls in flight.
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { buildRevision, HOSTS, startPeers, startRoutesync, stopAll, type RoutesyncEntry, type RoutesyncProcess } from '../lib/contenders.js';
import { closedLoop, HttpTarget } from '../lib/driver.js';
import { metricTotal } from '../lib/metrics.js';
import { BENCH_DIR, processSchedMs, ROOT_DIR } from '../lib/proc.js';
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
    interleave: { type: 'boolean', default: false },
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
  /** Time the main thread was runnable but waiting for a CPU (the peers and the driver share the cores). */
  readonly waitingUsPerCall: number;
  readonly changesPerPush: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
}

/** Counters to subtract: CPU time, push attempts, changes acknowledged. */
async function counters(which: 'a' | 'b'): Promise<{ cpuMs: number; waitingMs: number; attempts: number; pushed: number }> {
  const text = await (await fetch(`http://${servers[which].peer}/metrics`)).text();
  return {
    cpuMs: servers[which].child.cpuMs(),
    waitingMs: processSchedMs(servers[which].child.process.pid).waitingMs,
    attempts: metricTotal(text, 'routesync_peer_attempts_total'),
    pushed: metricTotal(text, 'routesync_routes_pushed_total'),
  };
}

/**
 * One measured window of `who`: one server alone, or with `interleave` both, each worker
 * calling a then b (b then a on odd workers), so that both see the same minutes of the
 * machine; calls/s is then the pair's rate, and the comparison is of CPU and latency.
 */
async function round(who: readonly ('a' | 'b')[]): Promise<Partial<Record<'a' | 'b', Round>>> {
  let latencies: Record<'a' | 'b', number[]> = { a: [], b: [] };
  let worker = 0;
  const fire = async () => {
    const order = worker++ % 2 === 0 ? who : [...who].reverse();
    let ok = true;
    for (const which of order) {
      const answer = await targets[which].call('PUT', '/v1/routes', routes.nextBody());
      latencies[which].push(answer.ms);
      ok &&= answer.status === 200;
    }
    return ok;
  };
  // The warm-up window is not counted, so the counters are read once it is over.
  await closedLoop(inFlight, 0, 500, fire);
  latencies = { a: [], b: [] };
  const before = Object.fromEntries(await Promise.all(who.map(async (which) => [which, await counters(which)] as const)));
  const result = await closedLoop(inFlight, 0, durationMs, fire);
  const after = Object.fromEntries(await Promise.all(who.map(async (which) => [which, await counters(which)] as const)));
  const rounds: Partial<Record<'a' | 'b', Round>> = {};
  for (const which of who) {
    const [was, now] = [before[which]!, after[which]!];
    const calls = latencies[which].length;
    rounds[which] = {
      perSecond: result.perSecond,
      cpuUsPerCall: ((now.cpuMs - was.cpuMs) * 1000) / Math.max(1, calls),
      waitingUsPerCall: ((now.waitingMs - was.waitingMs) * 1000) / Math.max(1, calls),
      changesPerPush: (now.pushed - was.pushed) / Math.max(1, now.attempts - was.attempts),
      p50Ms: percentile(latencies[which], 50),
      p99Ms: percentile(latencies[which], 99),
    };
  }
  return rounds;
}

const results: Record<'a' | 'b', Round[]> = { a: [], b: [] };
try {
  // One round first, not counted: JIT warm-up and the peers' first connections.
  await round(['a', 'b']);
  for (let r = 0; r < rounds; r++) {
    if (values.interleave) {
      const both = await round(['a', 'b']);
      results.a.push(both.a!);
      results.b.push(both.b!);
    } else {
      // Alternate which goes first, so that a drift in the machine's speed favours neither.
      const order: ('a' | 'b')[] = r % 2 === 0 ? ['a', 'b'] : ['b', 'a'];
      for (const which of order) results[which].push((await round([which]))[which]!);
    }
    const [a, b] = [results.a.at(-1)!, results.b.at(-1)!];
    const line = (x: Round) =>
      `${x.perSecond.toFixed(0)}/s, ${x.cpuUsPerCall.toFixed(0)} µs/call (+${x.waitingUsPerCall.toFixed(0)} waiting for a CPU), ${x.changesPerPush.toFixed(1)} changes/push, p50 ${x.p50Ms.toFixed(3)} p99 ${x.p99Ms.toFixed(3)} ms`;
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
