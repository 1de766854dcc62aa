// Benchmark 3: sustained single-route lifecycle calls per second acknowledged by all 10 peers,
// 64 calls in flight; beside it the same server's no-op requests per second at the same
// concurrency (the HTTP stack's limit), the legacy re-enactment and the floor.
import { closedLoop, HttpTarget } from '../lib/driver.js';
import { startFloor, startLegacy, startPeers, startRoutesync, stopAll } from '../lib/contenders.js';
import type { Child } from '../lib/proc.js';
import type { SuiteContext, SuiteResult, TargetCheck } from '../lib/report.js';
import { RouteFactory } from '../lib/routes.js';
import { formatSpread, round, spread } from '../lib/stats.js';
import { PEERS, profileFlags } from './lifecycle.js';

const IN_FLIGHT = 64;
type Phase = 'routesync' | 'noop' | 'legacy' | 'floor';
const PHASES: readonly Phase[] = ['routesync', 'noop', 'legacy', 'floor'];
const LABELS: Record<Phase, string> = {
  routesync: 'routesync: PUT /v1/routes acked by all 10',
  noop: 'routesync no-op (GET /healthz), same process',
  legacy: 'legacy re-enactment: PUT acked by all 10',
  floor: 'floor: PUT acked by all 10',
};

/** CPU cores each party used during a window (CPU time ÷ wall time): where the machine's 2 cores went. */
interface CoresUsed {
  readonly server: number;
  readonly peers: number;
  readonly driver: number;
}

interface ThroughputRun {
  readonly perSecond: Record<Phase, number>;
  readonly cores: Record<Phase, CoresUsed>;
  readonly notCounted: Record<Phase, number>;
  readonly ratios: { readonly toNoop: number; readonly toLegacy: number; readonly toFloor: number };
}

export async function throughput(ctx: SuiteContext): Promise<SuiteResult> {
  const warmupMs = ctx.quick ? 500 : 1_000;
  const durationMs = ctx.quick ? 2_000 : 4_000;
  const peers = await startPeers(PEERS);
  const processes: { child: Child }[] = [...peers];
  const clients: HttpTarget[] = [];
  try {
    const addresses = peers.map((peer) => peer.address);
    const [floor, legacy, routesync] = await Promise.all([
      startFloor(addresses),
      startLegacy(addresses),
      startRoutesync({ peers: addresses, nodeFlags: ctx.profile ? profileFlags('throughput') : [] }),
    ]);
    processes.push(floor, legacy, routesync);
    const api: Record<Phase, HttpTarget> = {
      routesync: new HttpTarget(`http://${routesync.api}`, IN_FLIGHT),
      noop: new HttpTarget(`http://${routesync.peer}`, IN_FLIGHT),
      legacy: new HttpTarget(`http://${legacy.address}`, IN_FLIGHT),
      floor: new HttpTarget(`http://${floor.address}`, IN_FLIGHT),
    };
    clients.push(...Object.values(api));
    const routes = new RouteFactory(10_000);
    const ackedByAll = (text: string, status: number) => {
      if (status !== 200) return false;
      const parsed = JSON.parse(text) as { sync?: { peers: number; acked: number }; peers?: number; acked?: number };
      const sync = parsed.sync ?? parsed;
      return sync.peers === PEERS && sync.acked === PEERS;
    };
    const fire: Record<Phase, () => Promise<boolean>> = {
      routesync: async () => {
        const answer = await api.routesync.call('PUT', '/v1/routes', routes.nextBody());
        return ackedByAll(answer.text, answer.status);
      },
      legacy: async () => {
        const answer = await api.legacy.call('PUT', '/v1/routes', routes.nextBody());
        return ackedByAll(answer.text, answer.status);
      },
      floor: async () => {
        const answer = await api.floor.call('PUT', '/v1/routes', routes.nextBody());
        return ackedByAll(answer.text, answer.status);
      },
      noop: async () => (await api.noop.call('GET', '/healthz')).status === 200,
    };

    const server: Record<Phase, Child> = { routesync: routesync.child, noop: routesync.child, legacy: legacy.child, floor: floor.child };
    const cpuNow = (phase: Phase) => {
      const driver = process.cpuUsage();
      return {
        server: server[phase].cpuMs(),
        peers: peers.reduce((sum, peer) => sum + peer.child.cpuMs(), 0),
        driver: (driver.user + driver.system) / 1000,
        wall: performance.now(),
      };
    };

    const runs: ThroughputRun[] = [];
    for (let run = 0; run < ctx.runs; run++) {
      const perSecond = {} as Record<Phase, number>;
      const notCounted = {} as Record<Phase, number>;
      const cores = {} as Record<Phase, CoresUsed>;
      for (let k = 0; k < PHASES.length; k++) {
        const phase = PHASES[(run + k) % PHASES.length]!;
        const before = cpuNow(phase);
        const result = await closedLoop(IN_FLIGHT, warmupMs, durationMs, fire[phase]);
        const after = cpuNow(phase);
        const wall = after.wall - before.wall;
        cores[phase] = {
          server: round((after.server - before.server) / wall),
          peers: round((after.peers - before.peers) / wall),
          driver: round((after.driver - before.driver) / wall),
        };
        perSecond[phase] = round(result.perSecond, 1);
        notCounted[phase] = result.notOk + result.errors;
        if (result.firstError) ctx.log(`    ${phase}: ${result.errors} errors, first: ${result.firstError}`);
      }
      const result: ThroughputRun = {
        perSecond,
        cores,
        notCounted,
        ratios: {
          toNoop: round(perSecond.routesync / perSecond.noop),
          toLegacy: round(perSecond.routesync / perSecond.legacy),
          toFloor: round(perSecond.routesync / perSecond.floor),
        },
      };
      runs.push(result);
      ctx.log(
        `  run ${run + 1}/${ctx.runs}: ${PHASES.map((phase) => `${phase} ${perSecond[phase]}/s${notCounted[phase] ? ` (${notCounted[phase]} not counted)` : ''}`).join(', ')}; ` +
          `÷ no-op ${result.ratios.toNoop}, ÷ legacy ${result.ratios.toLegacy}; cores used (server/peers/driver): ` +
          PHASES.map((phase) => `${phase} ${cores[phase].server}/${cores[phase].peers}/${cores[phase].driver}`).join(', '),
      );
    }

    const summary: SuiteResult['summary'] = {
      ratioToNoop: spread(runs.map((r) => r.ratios.toNoop)),
      ratioToLegacy: spread(runs.map((r) => r.ratios.toLegacy)),
      ratioToFloor: spread(runs.map((r) => r.ratios.toFloor)),
    };
    for (const phase of PHASES) {
      summary[`${phase}PerSecond`] = spread(runs.map((r) => r.perSecond[phase]));
      for (const party of ['server', 'peers', 'driver'] as const) summary[`${phase}Cores_${party}`] = spread(runs.map((r) => r.cores[phase][party]));
    }
    const table: string[][] = [[`benchmark 3: ${IN_FLIGHT} calls in flight`, 'per second', 'routesync ÷ this', 'cores: server', 'cores: 10 peers', 'cores: driver']];
    for (const phase of PHASES) {
      table.push([
        LABELS[phase],
        formatSpread(summary[`${phase}PerSecond`]!, 0),
        formatSpread(spread(runs.map((r) => r.perSecond.routesync / r.perSecond[phase]))),
        formatSpread(summary[`${phase}Cores_server`]!),
        formatSpread(summary[`${phase}Cores_peers`]!),
        formatSpread(summary[`${phase}Cores_driver`]!),
      ]);
    }
    const targets: TargetCheck[] = [
      { description: 'routesync lifecycle/s ÷ no-op/s', value: summary.ratioToNoop!.median, target: '≥ 0.5', met: summary.ratioToNoop!.median >= 0.5 },
      { description: 'routesync lifecycle/s ÷ legacy/s', value: summary.ratioToLegacy!.median, target: '≥ 10', met: summary.ratioToLegacy!.median >= 10 },
    ];
    return {
      name: 'throughput',
      number: 3,
      title: `Sustained lifecycle calls per second, ${IN_FLIGHT} in flight, 10 peers`,
      method:
        `closed loop, ${IN_FLIGHT} calls in flight, ${warmupMs} ms warm-up then ${durationMs} ms counted per contender per run, ` +
        `contenders one after the other in a rotated order; a call counts when every one of the 10 peers acknowledged it. ` +
        `Cores used: each party's CPU time (/proc for the server and the ten peer processes, process.cpuUsage for the driver) over the window's wall time; the machine has 2.`,
      config: { peers: PEERS, inFlight: IN_FLIGHT, warmupMs, durationMs, runs: ctx.runs },
      runs,
      summary,
      targets,
      table,
      notes: [],
    };
  } finally {
    await Promise.all(clients.map((client) => client.close()));
    await stopAll(processes);
  }
}
