// CPU time per lifecycle call, routesync against the floor, read from /proc/<pid>/stat (user +
// system) of each server process: what a call costs the server itself, whatever the machine's
// speed of the moment does to latency; and how long each server's main thread was runnable but
// waiting for a CPU (/proc/<pid>/schedstat), the share of a call's latency that the peers and the
// driver on the same cores cost it. For finding where the cost is (run it before and after a
// change), not a benchmark of record.
//
//   node --import tsx bench/tools/cpu-per-call.ts [--calls 3000] [--in-flight 1] [--rev HEAD | --entry dist/main.js]
//                                                 [--node-flag=--max-semi-space-size=16] [--profile] [--trace-gc] [--alloc]
//
// --profile starts both servers with --cpu-prof (bench/results/profiles/cpu-per-call-*/, one
// file per thread: the floor runs through tsx, whose loader has a thread of its own). --alloc
// samples everything routesync allocates (bench/tools/alloc-sampler.mjs) into
// bench/results/profiles/alloc-*.heapprofile, for bench/tools/profile-top.ts --per.
//
// Calls alternate between the two servers (one to the floor, one to routesync), so both run
// against the same ten peer processes in the same minutes.
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildRevision, pinRoutesyncEntry, startFloor, startPeers, startRoutesync, stopAll } from '../lib/contenders.js';
import { fixedCount, HttpTarget } from '../lib/driver.js';
import { metricTotal } from '../lib/metrics.js';
import { BENCH_DIR, processCpuTimes, processSchedMs } from '../lib/proc.js';
import { RouteFactory } from '../lib/routes.js';
import { summarize } from '../lib/stats.js';

const { values } = parseArgs({
  options: {
    calls: { type: 'string', default: '3000' },
    rev: { type: 'string' },
    'in-flight': { type: 'string', default: '1' },
    profile: { type: 'boolean', default: false },
    entry: { type: 'string' },
    'node-flag': { type: 'string', multiple: true },
    'trace-gc': { type: 'boolean', default: false },
    alloc: { type: 'boolean', default: false },
  },
});
if (values.rev !== undefined) pinRoutesyncEntry(buildRevision(values.rev));
if (values.entry !== undefined) pinRoutesyncEntry({ script: values.entry, tsx: values.entry.endsWith('.ts'), note: values.entry });
const calls = Number(values.calls);
const inFlight = Number(values['in-flight']);

const stamp = Date.now();
const profile = (who: string) =>
  values.profile ? ['--cpu-prof', '--cpu-prof-dir', join(BENCH_DIR, 'results', 'profiles', `cpu-per-call-${stamp}-${who}`)] : [];
// --alloc: everything routesync allocates, sampled (bench/tools/alloc-sampler.mjs), warm-up included.
const allocProfile = join(BENCH_DIR, 'results', 'profiles', `alloc-${stamp}.heapprofile`);
if (values.alloc) mkdirSync(dirname(allocProfile), { recursive: true });
const peers = await startPeers(10);
const routesync = await startRoutesync({
  peers: peers.map((peer) => peer.address),
  nodeFlags: [
    ...(values['node-flag'] ?? []),
    ...profile('routesync'),
    ...(values['trace-gc'] ? ['--trace-gc'] : []),
    ...(values.alloc ? ['--import', join(BENCH_DIR, 'tools', 'alloc-sampler.mjs')] : []),
  ],
  ...(values.alloc ? { env: { ROUTESYNC_ALLOC_PROFILE: allocProfile } } : {}),
});
// --trace-gc: routesync's collections during the measured calls, by kind (count and pause ms).
const gc = { counting: false, byKind: new Map<string, { count: number; ms: number }>() };
routesync.child.process.stdout?.on('data', (chunk: Buffer) => {
  if (!gc.counting) return;
  for (const match of chunk.toString('utf8').matchAll(/ms: (Scavenge|Mark-Compact)[^,]*, ([0-9.]+) \//g)) {
    const entry = gc.byKind.get(match[1]!) ?? { count: 0, ms: 0 };
    entry.count++;
    entry.ms += Number(match[2]);
    gc.byKind.set(match[1]!, entry);
  }
});
const floor = await startFloor(
  peers.map((peer) => peer.address),
  profile('floor'),
);
const api = new HttpTarget(`http://${routesync.api}`, inFlight);
const floorApi = new HttpTarget(`http://${floor.address}`, inFlight);
const routes = new RouteFactory();
const ms = { routesync: [] as number[], floor: [] as number[] };
try {
  const warm = async () => {
    await floorApi.call('PUT', '/v1/routes', routes.nextBody());
    await api.call('PUT', '/v1/routes', routes.nextBody());
    return true;
  };
  await fixedCount(inFlight, 500, warm);
  const times = () => ({
    routesync: { ...processCpuTimes(routesync.child.process.pid), ...processSchedMs(routesync.child.process.pid) },
    floor: { ...processCpuTimes(floor.child.process.pid), ...processSchedMs(floor.child.process.pid) },
  });
  const before = times();
  gc.counting = true;
  await fixedCount(inFlight, calls, async () => {
    const floorAnswer = await floorApi.call('PUT', '/v1/routes', routes.nextBody());
    ms.floor.push(floorAnswer.ms);
    const answer = await api.call('PUT', '/v1/routes', routes.nextBody());
    ms.routesync.push(answer.ms);
    return answer.status === 200 && floorAnswer.status === 200;
  });
  const after = times();
  const usedOf = (who: 'routesync' | 'floor') => {
    const userMs = after[who].userMs - before[who].userMs;
    const systemMs = after[who].systemMs - before[who].systemMs;
    // How much of it is the kernel's (socket writes and reads on loopback do the receiving side's work too).
    // Runnable but not running: behind the peers and the driver for one of the two cores.
    const waitingMs = after[who].waitingMs - before[who].waitingMs;
    const mainMs = after[who].onCpuMs - before[who].onCpuMs;
    return { totalMs: userMs + systemMs, kernel: `${Math.round((100 * systemMs) / (userMs + systemMs))} % in the kernel`, mainMs, waitingMs };
  };
  const used = { routesync: usedOf('routesync'), floor: usedOf('floor') };
  // How much the outboxes coalesced: push attempts per call against changes delivered per call.
  const metrics = await (await fetch(`http://${routesync.peer}/metrics`)).text();
  const attempts = metricTotal(metrics, 'routesync_peer_attempts_total');
  const pushed = metricTotal(metrics, 'routesync_routes_pushed_total');
  const totalCalls = calls + 500;
  const perCallUs = (ms: number) => Math.round((ms * 1000) / calls);
  process.stdout.write(
    `${calls} calls each, ${inFlight} in flight\n` +
      `  floor:     ${perCallUs(used.floor.totalMs)} µs CPU per call (${used.floor.kernel}; main thread ${perCallUs(used.floor.mainMs)} µs), ${perCallUs(used.floor.waitingMs)} µs waiting for a CPU; latency ${JSON.stringify(summarize(ms.floor))}\n` +
      `  routesync: ${perCallUs(used.routesync.totalMs)} µs CPU per call (${used.routesync.kernel}; main thread ${perCallUs(used.routesync.mainMs)} µs), ${perCallUs(used.routesync.waitingMs)} µs waiting for a CPU; latency ${JSON.stringify(summarize(ms.routesync))}\n` +
      `  routesync CPU ÷ floor CPU: ${(used.routesync.totalMs / used.floor.totalMs).toFixed(2)}\n` +
      `  routesync pushes per call (all peers, warm-up included): ${(attempts / totalCalls).toFixed(2)}, ` +
      `changes acknowledged per push: ${(pushed / Math.max(1, attempts)).toFixed(2)}\n` +
      [...gc.byKind].map(([kind, { count, ms: pauseMs }]) => `  routesync ${kind}: ${count}, ${pauseMs.toFixed(1)} ms (${Math.round((pauseMs * 1000) / calls)} µs per call)\n`).join(''),
  );
} finally {
  await api.close();
  await floorApi.close();
  await routesync.stop();
  await floor.child.stop();
  await stopAll(peers);
}
if (values.alloc) {
  process.stdout.write(
    `  allocation profile (${calls + 500} calls, warm-up included): ${allocProfile}\n` +
      `  node --import tsx bench/tools/profile-top.ts ${allocProfile} --per ${calls + 500}\n`,
  );
}
