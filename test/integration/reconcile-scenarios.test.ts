// Randomized, seeded scenarios against real replicas on loopback (reconciliation's rules under
// faults). Each seed draws a sequence of: upserts and deletes from any replica's local API
// (resourceVersions from one increasing counter, as etcd's), a partition of one replica,
// heals (some keeping pushes blocked for a while, so rounds run before the queued pushes),
// restarts (empty, same address), rounds run by hand, and the wall clock moved on past half the
// fence TTL or the whole TTL (in steps of TTL/8, each followed by a round on every replica, as
// the reconcile timer would run them; fences are swept as their timer would).
//
// After the faults stop and a few rounds run, every replica must hold the same routes, equal to
// a model: the last write per identity (a deletion wins when its version is >= the route's).
// A write is uncertain, and resent with a fresh version once the faults stop (as a manager does
// after an error), only when a restart removed the last replica that held it.
//
// Upserts go to any replica, the partitioned one too. A cut replica trusts its own manager's
// change over the fleet's word only while the change is younger than 3/4 of the fence TTL (a
// deletion of it made elsewhere may have outlived its fences): an upsert made there that is
// older at the heal, and still the last write of its identity, is uncertain too (its manager saw
// its sync reach no peer, and resends it).
//
// The fixed seeds include 181 and 187, which failed (one or both, by timing) without the fan-out's stillOwed check (a queued
// upsert pushed after its deletion's fence expired), and 20, 43 and 134, which failed without the 3/4-TTL trust of local
// changes (a route created on the cut replica and deleted elsewhere came back). SCENARIO_SEEDS=1,2,3 replays seeds; a failure prints the seed and the sequence of steps.
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { configFromEnv } from '../../src/config.js';
import { Replica } from '../../src/replica.js';
import { monotonicClock } from '../../src/routes/table.js';
import { LogSink, TEST_ENV } from '../helpers/cluster.js';
import { seededRandom } from '../helpers/random.js';

const SEEDS = process.env.SCENARIO_SEEDS ? process.env.SCENARIO_SEEDS.split(',').map(Number) : [1, 2, 3, 4, 5, 6, 7, 8, 20, 43, 102, 124, 134, 150, 161, 175, 180, 181, 187];
const STEPS = 70;
const KEYS = 6;
const TTL_MS = 60_000;
const TICK_MS = TTL_MS / 8;

// The wall clock every replica reads (fences, suspicion, ejection), moved on by the test.
// Installed before any replica starts: components keep a reference to Date.now.
const realNow = Date.now.bind(Date);
let clockOffsetMs = 0;
beforeAll(() => {
  vi.spyOn(Date, 'now').mockImplementation(() => realNow() + clockOffsetMs);
});
afterAll(() => {
  vi.restoreAllMocks();
});

/** Waits on real time (performance.now), so a clock step never cuts a wait short. */
async function waitFor(predicate: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!predicate()) {
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

interface Slot {
  readonly index: number;
  readonly address: string;
  replica: Replica;
  api: string;
}

interface Write {
  readonly op: 'upsert' | 'delete';
  readonly version: number;
  readonly ip?: string;
}

/** The peer port every scenario replica listens on, each on its own 127.0.5.x. */
const SCENARIO_PEER_PORT = 17_789;

const running: Replica[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((replica) => replica.close()));
});

async function runScenario(seed: number): Promise<void> {
  const random = seededRandom(seed);
  const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)]!;
  const replicaCount = 3 + Math.floor(random() * 2);
  const log: string[] = [`seed ${seed}, ${replicaCount} replicas`];
  // As pods do: each replica its own loopback address, all on one peer port, below the
  // ephemeral range (32768-60999) so that no socket of another test can take it between a
  // replica's stop and its restart on the same address (a port found free on 127.0.0.1 could be).
  const addresses = Array.from({ length: replicaCount }, (_, i) => `127.0.5.${i + 1}:${SCENARIO_PEER_PORT}`);
  const env = (i: number): Record<string, string> => ({
    ...TEST_ENV,
    ROUTESYNC_LOG_LEVEL: 'warn',
    ROUTESYNC_PEER_ADDR: addresses[i]!,
    ROUTESYNC_SELF: addresses[i]!,
    ROUTESYNC_PEERS: addresses.filter((_, j) => j !== i).join(','),
    ROUTESYNC_TOMBSTONE_TTL_MS: String(TTL_MS),
    ROUTESYNC_RECONCILE_INTERVAL_MS: '1000',
    ROUTESYNC_BOOTSTRAP_TIMEOUT_MS: '300',
    ROUTESYNC_SYNC_DEADLINE_MS: '300',
    ROUTESYNC_ATTEMPT_TIMEOUT_MS: '200',
    ROUTESYNC_EJECT_AFTER_FAILURES: '2',
    ROUTESYNC_EJECT_PROBE_MS: '30',
    ROUTESYNC_EJECT_MAX_MS: '100',
  });
  const boot = async (i: number): Promise<Replica> => {
    const replica = await Replica.start(configFromEnv(env(i)), {
      logDestination: new LogSink(),
      processMetrics: false,
      reconcileTimer: false,
      // Contact age, suspicion and fence arrivals are on the replica's monotonic clock: moved on
      // with the wall clock, as real time moves both.
      monotonicNow: () => monotonicClock() + clockOffsetMs,
    });
    running.push(replica);
    return replica;
  };
  const started = await Promise.all(addresses.map((_, i) => boot(i)));
  await Promise.all(started.map((replica) => replica.bootstrapped));
  const slots: Slot[] = started.map((replica, index) => ({ index, address: addresses[index]!, replica, api: `http://${replica.addresses.api}` }));

  let version = 100;
  /** Every write accepted, per key (the model is the winner among them). */
  const writes = new Map<string, Write[]>();
  const uncertain = new Set<string>();
  let isolated: Slot | undefined;
  /** Upserts made on the isolated replica during its cut, with the (test) clock's time. */
  let cutWrites: { key: string; version: number; at: number }[] = [];
  /**
   * The cut ends. An upsert its manager made there more than 3/4 of the TTL ago that is still
   * the last write of its identity may be dropped (a deletion of it elsewhere may have been
   * forgotten): the manager would see its sync reach no peer and resend. A tick of margin: the
   * clock may move on once more before the healed replica's rebuild.
   */
  const endCut = (): void => {
    for (const write of cutWrites) {
      const last = winner(write.key);
      if (Date.now() - write.at > TTL_MS * 0.75 - TICK_MS && last?.op === 'upsert' && last.version === write.version) uncertain.add(write.key);
    }
    cutWrites = [];
  };
  /** Healed, but its pushes (both ways) still blocked until `release`. */
  const pushesBlocked = new Set<Slot>();
  const keyName = (k: number) => `k${k}`;

  const winner = (key: string): Write | undefined => {
    let best: Write | undefined;
    for (const write of writes.get(key) ?? []) {
      if (!best || write.version > best.version || (write.version === best.version && write.op === 'delete')) best = write;
    }
    return best;
  };

  async function send(slot: Slot, key: string, write: Write): Promise<void> {
    let response: Response;
    if (write.op === 'upsert') {
      const route = { namespace: 'scn', name: key, id: `sb-${key}`, uid: `uid-${key}`, resourceVersion: String(write.version), ip: write.ip, state: 'Running' };
      response = await fetch(`${slot.api}/v1/routes`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(route) });
    } else {
      response = await fetch(`${slot.api}/v1/routes/scn/${key}?resourceVersion=${write.version}`, { method: 'DELETE' });
    }
    const body = (await response.json()) as { result?: { outcome: string; reason: string } };
    expect(response.status, `${write.op} ${key}@${write.version} on r${slot.index}`).toBe(200);
    log.push(`${write.op} ${key}@${write.version} on r${slot.index}: ${body.result?.outcome} ${body.result?.reason}`);
    const list = writes.get(key) ?? [];
    list.push(write);
    writes.set(key, list);
  }

  /** Whether `replica` holds the winning write of `key` (a deletion: no older route, and a fence or nothing). */
  const holds = (replica: Replica, key: string, write: Write): boolean => {
    const route = replica.table.get('scn', key);
    if (write.op === 'upsert') return route?.resourceVersion === String(write.version);
    return route === undefined || Number(route.resourceVersion) > write.version;
  };

  async function restart(slot: Slot): Promise<void> {
    // A write only this replica holds goes with it: the manager would see an error and resend.
    for (const key of writes.keys()) {
      const write = winner(key)!;
      if (!holds(slot.replica, key, write)) continue;
      const others = slots.filter((other) => other !== slot);
      const heldElsewhere =
        write.op === 'upsert'
          ? others.some((other) => holds(other.replica, key, write))
          : others.some((other) => (other.replica.table.getFence('scn', key) ? Number(other.replica.table.getFence('scn', key)!.resourceVersion) >= write.version : false)) ||
            others.every((other) => holds(other.replica, key, write));
      if (!heldElsewhere) uncertain.add(key);
    }
    await slot.replica.close();
    running.splice(running.indexOf(slot.replica), 1);
    if (isolated === slot) {
      isolated = undefined;
      cutWrites = [];
    }
    pushesBlocked.delete(slot);
    for (const other of slots) if (other !== slot) other.replica.faults.heal(slot.address);
    slot.replica = await boot(slot.index);
    slot.api = `http://${slot.replica.addresses.api}`;
    // Blocks in force elsewhere apply to the newcomer's pushes too.
    for (const other of pushesBlocked) slot.replica.faults.blockPushes(other.address);
    const outcome = await slot.replica.bootstrapped;
    log.push(`restart r${slot.index}: bootstrap ${outcome}, seeded ${slot.replica.reconciler.isSeeded()}, ${slot.replica.table.size} routes`);
  }

  async function round(slot: Slot): Promise<string> {
    const report = await slot.replica.reconciler.runRound();
    return `r${slot.index}:${report.result}${report.peer ? `<${slots.find((s) => s.address === report.peer)?.index ?? '?'}` : ''}`;
  }

  async function tick(): Promise<void> {
    // A push path blocked while rounds work is a moment's state (the ejected peer's probe
    // readmits it within EJECT_MAX_MS); the fault hook blocks the probes too, so it ends here.
    if (pushesBlocked.size > 0) {
      for (const slot of [...pushesBlocked]) release(slot);
      await settle();
      log.push('release every blocked push, delivered');
    }
    clockOffsetMs += TICK_MS;
    for (const slot of slots) slot.replica.table.sweepExpiredFences();
    const order = [...slots].sort(() => random() - 0.5);
    const results: string[] = [];
    for (const slot of order) results.push(await round(slot));
    log.push(`tick +${TICK_MS} ms: ${results.join(' ')}`);
  }

  function release(slot: Slot): void {
    slot.replica.faults.heal();
    for (const other of slots) if (other !== slot) other.replica.faults.heal(slot.address);
    pushesBlocked.delete(slot);
  }

  /** Every queued push to a reachable peer delivered. */
  async function settle(): Promise<void> {
    const blocked = new Set([...pushesBlocked, ...(isolated ? [isolated] : [])].map((slot) => slot.address));
    await waitFor(
      () =>
        slots.every(
          (slot) => blocked.has(slot.address) || slot.replica.sync.status().every((peer) => blocked.has(peer.peer) || peer.pendingRoutes === 0),
        ),
      5000,
      'queued pushes to be delivered',
    );
  }

  for (let step = 0; step < STEPS; step++) {
    const roll = random();
    if (roll < 0.3) {
      version++;
      const k = keyName(Math.floor(random() * KEYS));
      const slot = pick(slots);
      await send(slot, k, { op: 'upsert', version, ip: `10.0.${Math.floor(version / 250) % 250}.${version % 250}` });
      if (slot === isolated) cutWrites.push({ key: k, version, at: Date.now() });
    } else if (roll < 0.45) {
      const k = keyName(Math.floor(random() * KEYS));
      const current = winner(k);
      // A manager deletes at the sandbox's current version, or at a newer one.
      const atCurrent = current?.op === 'upsert' && random() < 0.5;
      if (!atCurrent) version++;
      await send(pick(slots), k, { op: 'delete', version: atCurrent ? current.version : version });
    } else if (roll < 0.52) {
      if (isolated) continue;
      isolated = pick(slots);
      isolated.replica.faults.isolate();
      log.push(`isolate r${isolated.index}`);
    } else if (roll < 0.6) {
      if (!isolated) continue;
      const slot = isolated;
      isolated = undefined;
      endCut();
      slot.replica.faults.heal();
      if (random() < 0.5) {
        slot.replica.faults.blockPushes('*');
        for (const other of slots) if (other !== slot) other.replica.faults.blockPushes(slot.address);
        pushesBlocked.add(slot);
        // Its round first (a rebuild, if it turned suspect), before the queued pushes.
        log.push(`heal r${slot.index} (pushes to and from it still blocked), round ${await round(slot)}`);
      } else {
        await settle();
        log.push(`heal r${slot.index}, pushes delivered`);
      }
    } else if (roll < 0.64) {
      if (pushesBlocked.size === 0) continue;
      const slot = pick([...pushesBlocked]);
      release(slot);
      await settle();
      log.push(`release pushes of r${slot.index}, delivered`);
    } else if (roll < 0.7) {
      await restart(pick(slots));
    } else if (roll < 0.85) {
      const slot = pick(slots);
      log.push(`round ${await round(slot)}`);
    } else if (roll < 0.89) {
      await tick();
    } else if (roll < 0.94) {
      log.push('advance past half the TTL:');
      for (let t = 0; t < 5; t++) await tick();
    } else {
      log.push('advance past the TTL:');
      for (let t = 0; t < 9; t++) await tick();
    }
  }

  // The faults stop.
  log.push('--- faults stop');
  if (isolated) isolated.replica.faults.heal();
  isolated = undefined;
  endCut();
  for (const slot of [...pushesBlocked]) release(slot);
  await settle();
  for (const key of [...uncertain]) {
    const previous = winner(key)!;
    version++;
    await send(pick(slots), key, previous.op === 'upsert' ? { op: 'upsert', version, ip: `10.1.0.${version % 250}` } : { op: 'delete', version });
    log.push(`  (resent ${key}: its write was lost with a restart)`);
  }
  await settle();

  const differences = (): string[] => {
    const wrong: string[] = [];
    for (const slot of slots) {
      for (let k = 0; k < KEYS; k++) {
        const key = keyName(k);
        const write = winner(key);
        const route = slot.replica.table.get('scn', key);
        if (!write || write.op === 'delete') {
          if (route) wrong.push(`r${slot.index}: ${key} live at ${route.resourceVersion}, expected ${write ? `deleted at ${write.version}` : 'absent'}`);
        } else if (route?.resourceVersion !== String(write.version) || route.ip !== write.ip) {
          wrong.push(`r${slot.index}: ${key} ${route ? `at ${route.resourceVersion}` : 'missing'}, expected ${write.version}`);
        }
      }
      if (slot.replica.table.size > KEYS) wrong.push(`r${slot.index}: ${slot.replica.table.size} routes`);
    }
    return wrong;
  };
  const converge = async (phase: string): Promise<void> => {
    for (let pass = 0; pass < 3 * replicaCount; pass++) {
      const results: string[] = [];
      for (const slot of slots) results.push(await round(slot));
      log.push(`${phase} rounds: ${results.join(' ')}`);
      if (pass >= replicaCount && differences().length === 0) return;
    }
  };
  try {
    await converge('after');
    expect(differences(), 'every replica equals the model after the faults stop').toEqual([]);
    // And stays so once every fence has expired: nothing deleted comes back later.
    log.push('--- every fence expires');
    for (let t = 0; t < 9; t++) await tick();
    await settle();
    await converge('later');
    expect(differences(), 'every replica equals the model once the fences have expired').toEqual([]);
    for (const slot of slots) expect(slot.replica.reconciler.isSuspect(), `r${slot.index} suspect`).toBe(false);
    if (process.env.SCENARIO_VERBOSE) console.log(log.join('\n'));
  } catch (error) {
    console.log(`reconcile scenario FAILED, seed ${seed} (replay: SCENARIO_SEEDS=${seed})\n${log.join('\n')}`);
    for (const slot of slots) {
      console.log(`r${slot.index}: ${JSON.stringify(slot.replica.table.list().map((route) => `${route.name}@${route.resourceVersion}`).sort())}`);
    }
    console.log(`model: ${JSON.stringify([...writes.keys()].sort().map((key) => `${key}:${winner(key)!.op}@${winner(key)!.version}`))}`);
    throw error;
  }
}

describe('reconciliation under random, seeded faults', () => {
  for (const seed of SEEDS) {
    it(`converges on the model with nothing deleted coming back (seed ${seed})`, async () => {
      clockOffsetMs = 0;
      await runScenario(seed);
    }, 30_000);
  }
});
