// Benchmark 1: lifecycle latency with 10 healthy peers, sequential calls, interleaved with the
// floor's and the legacy re-enactment's calls against the same peers, and no-op requests.
import { seededRandom } from '../../test/helpers/random.js';
import { HttpTarget } from '../lib/driver.js';
import { startFloor, startLegacy, startPeers, startRoutesync, stopAll } from '../lib/contenders.js';
import type { Child } from '../lib/proc.js';
import type { SuiteContext, SuiteResult, TargetCheck } from '../lib/report.js';
import { RouteFactory } from '../lib/routes.js';
import { formatSpread, round, spread, summarize, type LatencySummary } from '../lib/stats.js';

export const PEERS = 10;

type Series = 'floor' | 'routesync' | 'legacy' | 'routesyncNoop' | 'floorNoop';
const SERIES: readonly Series[] = ['floor', 'routesync', 'legacy', 'routesyncNoop', 'floorNoop'];
const LABELS: Record<Series, string> = {
  floor: 'floor: PUT, 10 peers',
  routesync: 'routesync: PUT /v1/routes, 10 peers',
  legacy: 'legacy re-enactment: PUT, 10 peers',
  routesyncNoop: 'routesync no-op (GET /healthz)',
  floorNoop: 'floor no-op (node:http)',
};

/** Server CPU time (user + system, /proc) per measured round: one PUT and one no-op to that server. */
type CpuPerRound = Record<'routesync' | 'floor' | 'legacy', number>;

interface LifecycleRun {
  readonly latency: Record<Series, LatencySummary>;
  readonly cpuUsPerRound: CpuPerRound;
  readonly routesyncNotAcked: number;
  readonly ratios: { readonly p50: number; readonly p99: number; readonly legacyP50: number; readonly legacyP99: number };
}

export async function lifecycle(ctx: SuiteContext): Promise<SuiteResult> {
  const calls = ctx.quick ? 300 : 1_000;
  const warmup = ctx.quick ? 100 : 300;
  const peers = await startPeers(PEERS);
  const processes: { child: Child }[] = [...peers];
  const clients: HttpTarget[] = [];
  try {
    const addresses = peers.map((peer) => peer.address);
    const [floor, legacy, routesync] = await Promise.all([
      startFloor(addresses),
      startLegacy(addresses),
      startRoutesync({ peers: addresses, nodeFlags: ctx.profile ? profileFlags('lifecycle') : [] }),
    ]);
    processes.push(floor, legacy, routesync);
    const floorApi = new HttpTarget(`http://${floor.address}`);
    const legacyApi = new HttpTarget(`http://${legacy.address}`);
    const routesyncApi = new HttpTarget(`http://${routesync.api}`);
    const routesyncPeerApi = new HttpTarget(`http://${routesync.peer}`);
    clients.push(floorApi, legacyApi, routesyncApi, routesyncPeerApi);
    const routes = new RouteFactory();
    let notAcked = 0;

    const call: Record<Series, () => Promise<number>> = {
      floor: async () => (await floorApi.call('PUT', '/v1/routes', routes.nextBody())).ms,
      legacy: async () => (await legacyApi.call('PUT', '/v1/routes', routes.nextBody())).ms,
      routesync: async () => {
        const answer = await routesyncApi.call('PUT', '/v1/routes', routes.nextBody());
        const sync = (JSON.parse(answer.text) as { sync?: { peers: number; acked: number } }).sync;
        if (answer.status !== 200 || !sync || sync.acked !== sync.peers) notAcked++;
        return answer.ms;
      },
      routesyncNoop: async () => (await routesyncPeerApi.call('GET', '/healthz')).ms,
      floorNoop: async () => (await floorApi.call('GET', '/noop')).ms,
    };

    const runs: LifecycleRun[] = [];
    const random = seededRandom(0x5eed);
    for (let run = 0; run < ctx.runs; run++) {
      const samples: Record<Series, number[]> = { floor: [], routesync: [], legacy: [], routesyncNoop: [], floorNoop: [] };
      notAcked = 0;
      const rounds = (run === 0 ? warmup : Math.round(warmup / 3)) + calls;
      let cpuBefore: CpuPerRound | undefined;
      for (let i = 0; i < rounds; i++) {
        const measured = i >= rounds - calls;
        if (i === rounds - calls) cpuBefore = { routesync: routesync.child.cpuMs(), floor: floor.child.cpuMs(), legacy: legacy.child.cpuMs() };
        // A fresh random order each round (seeded, so a run can be repeated): every contender
        // follows every other one, and itself across rounds, equally often. A rotation of one
        // fixed order only moved its start: the floor's PUT followed its own no-op in four
        // rounds of five, and routesync's PUT the floor's.
        for (const series of shuffled(SERIES, random)) {
          const ms = await call[series]();
          if (measured) samples[series].push(ms);
        }
      }
      const latency = Object.fromEntries(SERIES.map((series) => [series, summarize(samples[series])])) as Record<Series, LatencySummary>;
      const perRound = (ms: number, before: number | undefined) => round(((ms - (before ?? Number.NaN)) * 1000) / calls, 0);
      const cpuUsPerRound: CpuPerRound = {
        routesync: perRound(routesync.child.cpuMs(), cpuBefore?.routesync),
        floor: perRound(floor.child.cpuMs(), cpuBefore?.floor),
        legacy: perRound(legacy.child.cpuMs(), cpuBefore?.legacy),
      };
      const result: LifecycleRun = {
        latency,
        cpuUsPerRound,
        routesyncNotAcked: notAcked,
        ratios: {
          p50: round(latency.routesync.p50 / latency.floor.p50),
          p99: round(latency.routesync.p99 / latency.floor.p99),
          legacyP50: round(latency.legacy.p50 / latency.floor.p50),
          legacyP99: round(latency.legacy.p99 / latency.floor.p99),
        },
      };
      runs.push(result);
      ctx.log(
        `  run ${run + 1}/${ctx.runs}: routesync p50 ${latency.routesync.p50} ms p99 ${latency.routesync.p99} ms; floor p50 ${latency.floor.p50} p99 ${latency.floor.p99}; ` +
          `ratio p50 ${result.ratios.p50} p99 ${result.ratios.p99}; legacy p50 ${latency.legacy.p50} p99 ${latency.legacy.p99}; ` +
          `CPU µs per call: routesync ${cpuUsPerRound.routesync}, floor ${cpuUsPerRound.floor}, legacy ${cpuUsPerRound.legacy}` +
          (notAcked > 0 ? `; ${notAcked} routesync calls not acked by all peers` : ''),
      );
    }

    const summary: SuiteResult['summary'] = {
      ratioP50: spread(runs.map((r) => r.ratios.p50)),
      ratioP99: spread(runs.map((r) => r.ratios.p99)),
      legacyRatioP50: spread(runs.map((r) => r.ratios.legacyP50)),
      legacyRatioP99: spread(runs.map((r) => r.ratios.legacyP99)),
      routesyncCpuUs: spread(runs.map((r) => r.cpuUsPerRound.routesync)),
      floorCpuUs: spread(runs.map((r) => r.cpuUsPerRound.floor)),
      legacyCpuUs: spread(runs.map((r) => r.cpuUsPerRound.legacy)),
      cpuRatio: spread(runs.map((r) => r.cpuUsPerRound.routesync / r.cpuUsPerRound.floor)),
      legacyCpuRatio: spread(runs.map((r) => r.cpuUsPerRound.legacy / r.cpuUsPerRound.floor)),
    };
    for (const series of SERIES) {
      summary[`${series}P50`] = spread(runs.map((r) => r.latency[series].p50));
      summary[`${series}P99`] = spread(runs.map((r) => r.latency[series].p99));
    }
    const table: string[][] = [['benchmark 1: sequential calls', 'p50 ms', 'p99 ms', 'p50 × floor', 'p99 × floor']];
    for (const series of SERIES) {
      const p50 = summary[`${series}P50`]!;
      const p99 = summary[`${series}P99`]!;
      const ratio = (which: 'p50' | 'p99') => spread(runs.map((r) => r.latency[series][which] / r.latency.floor[which]));
      table.push([LABELS[series], formatSpread(p50), formatSpread(p99), formatSpread(ratio('p50')), formatSpread(ratio('p99'))]);
    }
    // What each call costs the server itself (its process's CPU time), beside the latency: the
    // machine's swings move it less than latency, and the ratio of two servers' less still.
    table.push(['server CPU per call (µs, one PUT and one no-op)', '', '', '', '']);
    table.push(['  floor', formatSpread(summary.floorCpuUs!, 0), '', '1.00', '']);
    table.push(['  routesync', formatSpread(summary.routesyncCpuUs!, 0), '', formatSpread(summary.cpuRatio!), '']);
    table.push(['  legacy re-enactment', formatSpread(summary.legacyCpuUs!, 0), '', formatSpread(summary.legacyCpuRatio!), '']);
    const targets: TargetCheck[] = [
      { description: 'routesync p50 / floor p50', value: summary.ratioP50!.median, target: '≤ 1.25', met: summary.ratioP50!.median <= 1.25 },
      { description: 'routesync p99 / floor p99', value: summary.ratioP99!.median, target: '≤ 1.25', met: summary.ratioP99!.median <= 1.25 },
      { description: 'routesync server CPU per call / floor server CPU per call (reported)', value: summary.cpuRatio!.median, target: 'report', met: null },
    ];
    const totalNotAcked = runs.reduce((sum, r) => sum + r.routesyncNotAcked, 0);
    return {
      name: 'lifecycle',
      number: 1,
      title: 'Lifecycle latency, 10 healthy peers',
      method:
        `${calls} sequential calls per run to each contender, interleaved round by round (order rotated), ` +
        `after ${warmup} warm-up rounds; the floor, routesync and the legacy re-enactment push to the same 10 peer processes. ` +
        `Server CPU per call: each server process's user + system time (/proc) over the measured rounds, divided by the calls (each round also sends that server one no-op).`,
      config: { peers: PEERS, calls, warmup, runs: ctx.runs },
      runs,
      summary,
      targets,
      table,
      notes: totalNotAcked > 0 ? [`${totalNotAcked} routesync calls were not acknowledged by all 10 peers`] : [],
    };
  } finally {
    await Promise.all(clients.map((client) => client.close()));
    await stopAll(processes);
  }
}

/** --cpu-prof into bench/results/profiles/, one file per process. */
export function profileFlags(name: string): string[] {
  return ['--cpu-prof', '--cpu-prof-dir', 'bench/results/profiles', '--cpu-prof-name', `${name}-${Date.now()}.cpuprofile`];
}

/** A Fisher-Yates shuffle of a copy. */
function shuffled<T>(items: readonly T[], random: () => number): T[] {
  const out = [...items];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}
