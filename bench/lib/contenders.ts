// Starting the processes a benchmark measures: peers, routesync, the floor, the legacy
// re-enactment and the upstream. Each is a process of its own on a loopback address of its
// own (127.0.0.x), so no two contenders share an event loop or a port space.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Child, BENCH_DIR, GiveUp, ROOT_DIR, freePort, start, waitUntil } from './proc.js';
import type { PeerStats } from '../peer-server.js';
import { NODE_FLAGS } from '../../src/node-flags.js';

/** Loopback addresses, one per role. */
export const HOSTS = {
  routesync: '127.0.0.2',
  floor: '127.0.0.3',
  legacy: '127.0.0.4',
  /** A second routesync (benchmark 2's reference). */
  routesyncB: '127.0.0.5',
  legacyFresh: '127.0.0.6',
  bareProxy: '127.0.0.7',
  libraryProxy: '127.0.0.8',
  upstream: '127.0.0.30',
  /** Peers are 127.0.0.11 ... 127.0.0.(10 + n). */
  peer: (index: number) => `127.0.0.${11 + index}`,
} as const;

export class PeerProcess {
  constructor(
    readonly child: Child,
    readonly address: string,
  ) {}

  async stats(): Promise<PeerStats> {
    return (await this.child.request<{ stats: PeerStats }>({ type: 'stats' })).stats;
  }

  async reset(): Promise<void> {
    await this.child.request({ type: 'reset' });
  }
}

export async function startPeer(index: number, options: { hang?: boolean } = {}): Promise<PeerProcess> {
  const host = HOSTS.peer(index);
  const child = start({
    name: `peer ${host}${options.hang ? ' (hang)' : ''}`,
    script: join(BENCH_DIR, 'peer-server.ts'),
    args: ['--host', host, '--port', '0', ...(options.hang ? ['--hang'] : [])],
    tsx: true,
  });
  const { address } = await child.waitFor<{ address: string }>('listening');
  return new PeerProcess(child, address);
}

export async function startPeers(count: number, options: { hangIndex?: number; firstIndex?: number } = {}): Promise<PeerProcess[]> {
  const first = options.firstIndex ?? 0;
  return Promise.all(Array.from({ length: count }, (_, i) => startPeer(first + i, { hang: first + i === options.hangIndex })));
}

export async function stopAll(processes: readonly { child: Child }[] | readonly Child[]): Promise<void> {
  await Promise.all(processes.map((entry) => ('child' in entry ? entry.child : entry).stop()));
}

/** A small server (floor, legacy, upstream) that announces its address over IPC. */
export async function startScript(name: string, script: string, args: readonly string[], nodeFlags: readonly string[] = []): Promise<{ child: Child; address: string }> {
  const child = start({ name, script: join(BENCH_DIR, script), args, tsx: true, nodeFlags });
  const { address } = await child.waitFor<{ address: string }>('listening');
  return { child, address };
}

export function startFloor(peers: readonly string[], nodeFlags: readonly string[] = []) {
  return startScript('floor', 'floor.ts', ['--listen', `${HOSTS.floor}:0`, '--peers', peers.join(',')], nodeFlags);
}

export function startLegacy(peers: readonly string[], options: { fresh?: boolean } = {}) {
  const host = options.fresh ? HOSTS.legacyFresh : HOSTS.legacy;
  return startScript(options.fresh ? 'legacy re-enactment (fresh)' : 'legacy re-enactment', 'legacy.ts', [
    '--listen',
    `${host}:0`,
    '--peers',
    peers.join(','),
    ...(options.fresh ? ['--fresh'] : []),
  ]);
}

export function startBareProxy(upstream: string) {
  return startScript('bare proxy', 'bare-proxy.ts', ['--listen', `${HOSTS.bareProxy}:0`, '--upstream', upstream]);
}

export function startLibraryProxy(upstream: string) {
  return startScript('http-proxy-3 alone', 'library-proxy.ts', ['--listen', `${HOSTS.libraryProxy}:0`, '--upstream', upstream]);
}

export function startUpstream() {
  return startScript('upstream', 'upstream.ts', ['--listen', `${HOSTS.upstream}:0`]);
}

export interface RoutesyncEntry {
  readonly script: string;
  readonly tsx: boolean;
  readonly note: string;
}

let pinned: RoutesyncEntry | undefined;

/** Run every routesync of this benchmark run from `entry` (a build of one commit, see --rev). */
export function pinRoutesyncEntry(entry: RoutesyncEntry): void {
  pinned = entry;
}

/**
 * Build routesync as of git revision `rev` into a directory of its own (the sources of that
 * commit, compiled with the project's tsconfig; node_modules linked), so that a benchmark
 * measures one known commit while the working tree changes under it.
 */
export function buildRevision(rev: string): RoutesyncEntry {
  const commit = execFileSync('git', ['rev-parse', '--verify', `${rev}^{commit}`], { cwd: ROOT_DIR, encoding: 'utf8' }).trim();
  const dir = join(tmpdir(), `routesync-bench-${commit.slice(0, 12)}`);
  const main = join(dir, 'dist', 'main.js');
  if (!existsSync(main)) {
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    const archive = execFileSync('git', ['archive', commit, 'src', 'tsconfig.json', 'tsconfig.build.json', 'package.json'], { cwd: ROOT_DIR, maxBuffer: 64 * 1024 * 1024 });
    execFileSync('tar', ['-x', '-C', dir], { input: archive });
    symlinkSync(join(ROOT_DIR, 'node_modules'), join(dir, 'node_modules'));
    // tsconfig.json includes test/ and bench/, absent here: compile src/ only.
    execFileSync(process.execPath, [join(ROOT_DIR, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.build.json'], { cwd: dir, stdio: 'inherit' });
  }
  return { script: main, tsx: false, note: `commit ${commit.slice(0, 12)} built into ${dir} (--rev ${rev})` };
}

/** How routesync is run: the build (dist/main.js) when it is up to date, else the sources through tsx. */
export function routesyncEntry(forceTsx = false): RoutesyncEntry {
  if (pinned) return pinned;
  const dist = join(ROOT_DIR, 'dist', 'main.js');
  const src = join(ROOT_DIR, 'src', 'main.ts');
  if (forceTsx) return { script: src, tsx: true, note: 'src/main.ts through tsx (--tsx)' };
  if (!existsSync(dist)) return { script: src, tsx: true, note: 'src/main.ts through tsx (no dist/; run `npm run build`)' };
  const built = statSync(dist).mtimeMs;
  const newest = newestMtime(join(ROOT_DIR, 'src'));
  if (newest > built) return { script: src, tsx: true, note: 'src/main.ts through tsx (dist/ is older than src/; `make bench` builds first)' };
  return { script: dist, tsx: false, note: 'dist/main.js (npm run build)' };
}

function newestMtime(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    newest = Math.max(newest, entry.isDirectory() ? newestMtime(path) : statSync(path).mtimeMs);
  }
  return newest;
}

export interface RoutesyncOptions {
  readonly peers: readonly string[];
  readonly host?: string;
  readonly env?: Record<string, string>;
  readonly nodeFlags?: readonly string[];
  readonly name?: string;
  readonly forceTsx?: boolean;
  /** Run this build instead of the pinned or default one (bench/tools/compare-builds.ts). */
  readonly entry?: RoutesyncEntry;
}

export class RoutesyncProcess {
  constructor(
    readonly child: Child,
    /** host:port of each listener. */
    readonly api: string,
    readonly peer: string,
    readonly proxy: string,
  ) {}

  /** process.memoryUsage() in the child, after full collections when it runs with --expose-gc. */
  async memory(): Promise<NodeJS.MemoryUsage> {
    return (await this.child.request<{ usage: NodeJS.MemoryUsage }>({ type: 'memory' }, 60_000)).usage;
  }

  async stop(): Promise<void> {
    await this.child.stop(15_000);
  }
}

/**
 * Start routesync as its own process, configured by environment only, and wait until its local
 * API answers. Reconciliation is pushed out to its longest period so that anti-entropy rounds
 * against the benchmark peers (which speak only the push protocol) stay out of the figures.
 */
export async function startRoutesync(options: RoutesyncOptions): Promise<RoutesyncProcess> {
  const host = options.host ?? HOSTS.routesync;
  const [apiPort, peerPort, proxyPort] = [await freePort(host), await freePort(host), await freePort(host)];
  const entry = options.entry ?? routesyncEntry(options.forceTsx);
  const env: Record<string, string> = {
    ROUTESYNC_API_ADDR: `${host}:${apiPort}`,
    ROUTESYNC_PEER_ADDR: `${host}:${peerPort}`,
    ROUTESYNC_PROXY_ADDR: `${host}:${proxyPort}`,
    // The benchmark's upstream is a process on loopback.
    ROUTESYNC_PROXY_ALLOW_LOOPBACK: 'true',
    ROUTESYNC_PEERS: options.peers.join(','),
    ROUTESYNC_LOG_LEVEL: 'warn',
    ROUTESYNC_ACCESS_LOG: 'false',
    // No reconcile round during a measurement; config requires the interval below TTL / 5, and
    // the benchmarks make no deletions, so the longest TTL changes nothing else.
    ROUTESYNC_RECONCILE_INTERVAL_MS: '3600000',
    ROUTESYNC_TOMBSTONE_TTL_MS: '604800000',
    ...options.env,
  };
  const child = start({ name: options.name ?? `routesync ${host}`, script: entry.script, tsx: entry.tsx, env, nodeFlags: [...NODE_FLAGS, ...(options.nodeFlags ?? [])] });
  const api = `${host}:${apiPort}`;
  const peer = `${host}:${peerPort}`;
  // Ready, not just listening: until its bootstrap has ended (a pull from a peer, or its
  // timeout) a replica is still asking its peers, and a measurement would include that.
  await waitUntil(
    `${child.name} to be ready on ${peer}`,
    async () => {
      if (!child.alive) throw new GiveUp(`${child.name} exited`);
      const response = await fetch(`http://${peer}/readyz`, { signal: AbortSignal.timeout(1_000) });
      await response.arrayBuffer();
      return response.status === 200;
    },
    30_000,
    100,
  ).catch((error: unknown) => {
    throw new Error(`${(error as Error).message}\n${child.tail()}`);
  });
  return new RoutesyncProcess(child, api, peer, `${host}:${proxyPort}`);
}

/** Does something accept TCP connections at host:port? */
export function listening(address: string, timeoutMs = 1_000): Promise<boolean> {
  const colon = address.lastIndexOf(':');
  return new Promise((resolve) => {
    const socket = connect({ host: address.slice(0, colon), port: Number(address.slice(colon + 1)) });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}
