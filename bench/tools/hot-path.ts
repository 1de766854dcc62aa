// Profile routesync's lifecycle hot path alone: 10 peer processes, one routesync started with
// --cpu-prof, N sequential PUT /v1/routes after a warm-up; prints the mean and the top of the
// profile. For finding where a call's time goes, not for figures to quote.
//
//   node --import tsx bench/tools/hot-path.ts [--calls 3000] [--rev HEAD] [--in-flight 1]
import { execFileSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildRevision, pinRoutesyncEntry, startFloor, startPeers, startRoutesync, stopAll } from '../lib/contenders.js';
import { fixedCount, HttpTarget } from '../lib/driver.js';
import { BENCH_DIR } from '../lib/proc.js';
import { RouteFactory } from '../lib/routes.js';
import { summarize } from '../lib/stats.js';

const { values } = parseArgs({ options: { calls: { type: 'string', default: '3000' }, rev: { type: 'string' }, 'in-flight': { type: 'string', default: '1' } } });
if (values.rev !== undefined) pinRoutesyncEntry(buildRevision(values.rev));
const calls = Number(values.calls);
const inFlight = Number(values['in-flight']);
const dir = join(BENCH_DIR, 'results', 'profiles');
const name = `hot-path-${Date.now()}`;
const peers = await startPeers(10);
const routesync = await startRoutesync({
  peers: peers.map((peer) => peer.address),
  nodeFlags: ['--cpu-prof', '--cpu-prof-dir', dir, '--cpu-prof-name', `${name}.cpuprofile`],
});
const floor = await startFloor(peers.map((peer) => peer.address));
const api = new HttpTarget(`http://${routesync.api}`, inFlight);
const floorApi = new HttpTarget(`http://${floor.address}`, inFlight);
const routes = new RouteFactory();
const samples: number[] = [];
// routesync's own clock for the fan-out (sync.elapsedMs): the rest of a call is HTTP, Express,
// parsing, validation and the table.
const fanOut: number[] = [];
const floorSamples: number[] = [];
const floorFanOut: number[] = [];
const fire = async () => {
  // The floor first, on the same peers, so that both see the machine alike.
  const floorAnswer = await floorApi.call('PUT', '/v1/routes', routes.nextBody());
  floorSamples.push(floorAnswer.ms);
  floorFanOut.push((JSON.parse(floorAnswer.text) as { elapsedMs?: number }).elapsedMs ?? Number.NaN);
  const answer = await api.call('PUT', '/v1/routes', routes.nextBody());
  samples.push(answer.ms);
  fanOut.push((JSON.parse(answer.text) as { sync?: { elapsedMs?: number } }).sync?.elapsedMs ?? Number.NaN);
  return answer.status === 200;
};
await fixedCount(inFlight, 500, fire);
for (const list of [samples, fanOut, floorSamples, floorFanOut]) list.length = 0;
const result = await fixedCount(inFlight, calls, fire);
process.stdout.write(
  `${calls} calls, ${inFlight} in flight: ${(result.ms / 1000).toFixed(1)} s, call ${JSON.stringify(summarize(samples))}\nfan-out ${JSON.stringify(summarize(fanOut))}\n` +
    `floor call ${JSON.stringify(summarize(floorSamples))}\nfloor fan-out ${JSON.stringify(summarize(floorFanOut))}\n`,
);
await api.close();
await floorApi.close();
await routesync.stop();
await floor.child.stop();
await stopAll(peers);
const file = readdirSync(dir).find((entry) => entry.startsWith(name));
if (file) process.stdout.write(execFileSync(process.execPath, ['--import', 'tsx', join(BENCH_DIR, 'tools', 'profile-top.ts'), join(dir, file), '--top', '45'], { encoding: 'utf8' }));
