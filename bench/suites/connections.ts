// Benchmark 4: connections opened per 10,000 changes to 10 peers, counted as sockets accepted
// by the peer processes. Each contender starts fresh in each run (no connection carried over),
// then takes the changes with 64 calls in flight (the burst that made the legacy fan-out dial).
import { fixedCount, HttpTarget } from '../lib/driver.js';
import { metricSamples } from '../lib/metrics.js';
import { startFloor, startLegacy, startPeers, startRoutesync, stopAll, type PeerProcess } from '../lib/contenders.js';
import { waitUntil, type Child } from '../lib/proc.js';
import type { SuiteContext, SuiteResult, TargetCheck } from '../lib/report.js';
import { RouteFactory } from '../lib/routes.js';
import { formatSpread, round, spread } from '../lib/stats.js';
import { PEERS } from './lifecycle.js';

const IN_FLIGHT = 64;
/** routesync's default ROUTESYNC_PEER_CONNECTIONS: the undici pool's bound per peer. */
const POOL_SIZE = 4;
type Contender = 'routesync' | 'legacy' | 'legacyFresh' | 'floor';
const CONTENDERS: readonly Contender[] = ['routesync', 'legacy', 'legacyFresh', 'floor'];
const LABELS: Record<Contender, string> = {
  routesync: 'routesync (pool of 4 per peer)',
  legacy: 'legacy re-enactment, Go default transport',
  legacyFresh: 'legacy re-enactment, fresh connection per attempt',
  floor: 'floor (bare undici Agent, unbounded)',
};

interface ContenderCount {
  readonly changes: number;
  readonly acked: number;
  /** Sockets accepted, all peers together, and by the busiest peer. */
  readonly connections: number;
  readonly maxPerPeer: number;
  /** Most sockets open at once on the busiest peer (what a pool bounds). */
  readonly peakOpenPerPeer: number;
  /** routesync only: attempts that failed (by class, from its /metrics); a failed attempt's socket is replaced. */
  readonly failedAttempts: Record<string, number> | null;
  readonly requests: number;
  /** Scaled to 10,000 changes, per peer (mean over peers), and the busiest peer. */
  readonly perPeerPer10k: number;
  readonly maxPerPeerPer10k: number;
  readonly ms: number;
}

export async function connectionsPerChange(ctx: SuiteContext): Promise<SuiteResult> {
  const changes: Record<Contender, number> = ctx.quick
    ? { routesync: 2_000, legacy: 2_000, legacyFresh: 1_000, floor: 2_000 }
    : { routesync: 10_000, legacy: 10_000, legacyFresh: 3_000, floor: 10_000 };
  const peers = await startPeers(PEERS);
  const processes: { child: Child }[] = [...peers];
  try {
    const addresses = peers.map((peer) => peer.address);
    const routes = new RouteFactory(10_000);
    const runs: Record<Contender, ContenderCount>[] = [];
    for (let run = 0; run < ctx.runs; run++) {
      const counts = {} as Record<Contender, ContenderCount>;
      for (const contender of CONTENDERS) {
        counts[contender] = await measure(contender, addresses, peers, changes[contender], routes);
      }
      runs.push(counts);
      ctx.log(
        `  run ${run + 1}/${ctx.runs}: ` +
          CONTENDERS.map(
            (c) =>
              `${c} ${counts[c].connections} sockets for ${counts[c].changes} changes (busiest peer ${counts[c].maxPerPeer}, at most ${counts[c].peakOpenPerPeer} open at once, ${(counts[c].ms / 1000).toFixed(1)} s` +
              `${counts[c].failedAttempts && Object.keys(counts[c].failedAttempts).length > 0 ? `, failed attempts ${JSON.stringify(counts[c].failedAttempts)}` : ''})`,
          ).join('; '),
      );
    }

    const summary: SuiteResult['summary'] = {};
    for (const contender of CONTENDERS) {
      summary[`${contender}PerPeerPer10k`] = spread(runs.map((r) => r[contender].perPeerPer10k));
      summary[`${contender}MaxPerPeerPer10k`] = spread(runs.map((r) => r[contender].maxPerPeerPer10k));
      summary[`${contender}Connections`] = spread(runs.map((r) => r[contender].connections));
      summary[`${contender}PeakOpenPerPeer`] = spread(runs.map((r) => r[contender].peakOpenPerPeer));
    }
    summary.legacyToRoutesync = spread(runs.map((r) => r.legacy.connections / r.routesync.connections));
    const table: string[][] = [['benchmark 4: 64 in flight, 10 peers', 'changes', 'sockets (all peers)', 'per peer per 10k changes', 'busiest peer per 10k', 'most open at once (a peer)']];
    for (const contender of CONTENDERS) {
      table.push([
        LABELS[contender],
        String(changes[contender]),
        formatSpread(summary[`${contender}Connections`]!, 0),
        formatSpread(summary[`${contender}PerPeerPer10k`]!, 1),
        formatSpread(summary[`${contender}MaxPerPeerPer10k`]!, 1),
        formatSpread(summary[`${contender}PeakOpenPerPeer`]!, 0),
      ]);
    }
    // The bound must hold whatever the number of changes: judge the raw count, not a rate, and
    // in every run (the worst), not at the median: a bound is broken by one run that breaks it.
    const busiest = spread(runs.map((r) => r.routesync.maxPerPeer));
    summary.routesyncBusiestPeer = busiest;
    const worstOpen = Math.max(...runs.map((r) => r.routesync.peakOpenPerPeer));
    const runsOver = runs.filter((r) => r.routesync.maxPerPeer > POOL_SIZE);
    const failures = runsOver.map((r) => JSON.stringify(r.routesync.failedAttempts ?? {})).join(', ');
    const targets: TargetCheck[] = [
      {
        description: 'routesync: sockets the busiest peer accepted for all the changes, start-up included (worst run)',
        value: busiest.max,
        target: `≤ ${POOL_SIZE} (the pool size)`,
        met: busiest.max <= POOL_SIZE,
        note:
          `runs: ${busiest.runs.join(', ')}` +
          (runsOver.length > 0 ? `; ${runsOver.length} of ${runs.length} runs above ${POOL_SIZE}, failed attempts in those runs: ${failures}` : ''),
      },
      { description: 'routesync: most sockets open at once on any peer', value: worstOpen, target: `≤ ${POOL_SIZE}`, met: worstOpen <= POOL_SIZE },
      { description: 'legacy re-enactment: sockets per peer per 10,000 changes (reported)', value: summary.legacyPerPeerPer10k!.median, target: 'report', met: null },
    ];
    return {
      name: 'connections',
      number: 4,
      title: 'Connections opened per 10,000 changes to 10 peers',
      method:
        `each contender starts fresh, then takes its changes with ${IN_FLIGHT} calls in flight; the peers count the sockets they accept. ` +
        `The fresh-connection legacy variant takes fewer changes (it opens one socket per attempt, so its count scales exactly) and is scaled to 10,000.`,
      config: { peers: PEERS, inFlight: IN_FLIGHT, changes, poolSize: POOL_SIZE, runs: ctx.runs },
      runs,
      summary,
      targets,
      table,
      notes: [],
    };
  } finally {
    await stopAll(processes);
  }
}

async function measure(contender: Contender, addresses: string[], peers: readonly PeerProcess[], changes: number, routes: RouteFactory): Promise<ContenderCount> {
  // The previous contender's sockets must be gone, or they would count as this one's.
  await waitUntil('the peers to have no socket open', async () => (await Promise.all(peers.map((peer) => peer.stats()))).every((s) => s.openSockets === 0), 30_000, 50);
  // Counted from before the contender starts: a replica's bootstrap opens sockets to its peers
  // that its pushes then reuse, and they are sockets it opened.
  await Promise.all(peers.map((peer) => peer.reset()));
  let metricsAddress: string | null = null;
  const server =
    contender === 'routesync'
      ? await startRoutesync({ peers: addresses, env: { ROUTESYNC_PEER_CONNECTIONS: String(POOL_SIZE) } }).then((rs) => {
          metricsAddress = rs.peer;
          return { child: rs.child, address: rs.api };
        })
      : contender === 'floor'
        ? await startFloor(addresses)
        : await startLegacy(addresses, { fresh: contender === 'legacyFresh' });
  const client = new HttpTarget(`http://${server.address}`, IN_FLIGHT);
  try {
    const result = await fixedCount(IN_FLIGHT, changes, async () => {
      const answer = await client.call('PUT', '/v1/routes', routes.nextBody());
      if (answer.status !== 200) return false;
      const parsed = JSON.parse(answer.text) as { sync?: { peers: number; acked: number }; peers?: number; acked?: number };
      const sync = parsed.sync ?? parsed;
      return sync.acked === sync.peers;
    });
    const stats = await Promise.all(peers.map((peer) => peer.stats()));
    let failedAttempts: Record<string, number> | null = null;
    if (metricsAddress !== null) {
      const metrics = new HttpTarget(`http://${metricsAddress}`);
      try {
        failedAttempts = attemptFailures((await metrics.call('GET', '/metrics')).text);
      } finally {
        await metrics.close();
      }
    }
    const connections = stats.reduce((sum, s) => sum + s.connections, 0);
    const maxPerPeer = Math.max(...stats.map((s) => s.connections));
    const scale = 10_000 / changes;
    return {
      changes,
      acked: result.ok,
      connections,
      maxPerPeer,
      peakOpenPerPeer: Math.max(...stats.map((s) => s.peakOpenSockets)),
      failedAttempts,
      requests: stats.reduce((sum, s) => sum + s.requests, 0),
      perPeerPer10k: round((connections / peers.length) * scale, 1),
      maxPerPeerPer10k: round(maxPerPeer * scale, 1),
      ms: round(result.ms, 0),
    };
  } finally {
    await client.close();
    await server.child.stop();
  }
}

/** routesync_peer_attempts_total by result, without the successes. */
function attemptFailures(text: string): Record<string, number> {
  const failures: Record<string, number> = {};
  for (const { labels, value } of metricSamples(text, 'routesync_peer_attempts_total')) {
    const result = /^result="([^"]+)"$/.exec(labels)?.[1];
    if (result !== undefined && result !== 'ok' && value > 0) failures[result] = value;
  }
  return failures;
}
