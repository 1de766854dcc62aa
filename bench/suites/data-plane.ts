// Benchmark 6: the data plane. Requests per second and latency through routesync's proxy
// against the same upstream hit directly: at 100 connections (closed loop), then at a fixed
// rate of half the direct maximum; beside them a bare node:http proxy (bench/bare-proxy.ts), the
// floor of any Node.js proxy, and http-proxy-3 alone (bench/library-proxy.ts), the library the
// data plane is built on. autocannon drives; the upstream is a real HTTP server in a process of
// its own. Each proxy's CPU time per request (/proc) is reported beside its rate. Latencies are taken from autocannon's per-response events (sub-ms), not
// its integer histogram.
import autocannon, { type Options } from 'autocannon';
import { HttpTarget } from '../lib/driver.js';
import { startBareProxy, startLibraryProxy, startRoutesync, startUpstream, stopAll } from '../lib/contenders.js';
import type { Child } from '../lib/proc.js';
import type { SuiteContext, SuiteResult, TargetCheck } from '../lib/report.js';
import { formatSpread, round, spread, summarize, type LatencySummary } from '../lib/stats.js';
import { profileFlags } from './lifecycle.js';

const CONNECTIONS = 100;
const SANDBOX_ID = 'ibench0000000000001';

interface CannonFigures {
  readonly perSecond: number;
  /** CPU time of the proxy process (user + system) per completed request, µs; absent for direct. */
  readonly proxyCpuUs?: number;
  readonly latency: LatencySummary;
  readonly non2xx: number;
  readonly errors: number;
}

type Path = 'direct' | 'bare' | 'library' | 'routesync';
const PATHS: readonly Path[] = ['direct', 'bare', 'library', 'routesync'];
const PROXIES: readonly Exclude<Path, 'direct'>[] = ['bare', 'library', 'routesync'];
const LABELS: Record<Path, string> = {
  direct: 'direct to the upstream',
  bare: 'bare node:http proxy (floor of a Node proxy)',
  library: 'http-proxy-3 alone (same agent)',
  routesync: 'through routesync',
};

interface DataPlaneRun {
  readonly max: Record<Path, CannonFigures>;
  /** Half of this run's direct maximum. */
  readonly rate: number;
  readonly atRate: Record<Path, CannonFigures>;
}

export async function dataPlane(ctx: SuiteContext): Promise<SuiteResult> {
  const seconds = ctx.quick ? 3 : 5;
  const processes: { child: Child }[] = [];
  const clients: HttpTarget[] = [];
  try {
    const upstream = await startUpstream();
    processes.push(upstream);
    const [bare, library, routesync] = await Promise.all([
      startBareProxy(upstream.address),
      startLibraryProxy(upstream.address),
      startRoutesync({ peers: [], nodeFlags: ctx.profile ? profileFlags('data-plane') : [], env: { ROUTESYNC_ACCESS_LOG: 'false' } }),
    ]);
    processes.push(bare, library, routesync);
    const api = new HttpTarget(`http://${routesync.api}`);
    clients.push(api);
    const upstreamHost = upstream.address.slice(0, upstream.address.lastIndexOf(':'));
    const upstreamPort = upstream.address.slice(upstream.address.lastIndexOf(':') + 1);
    const put = await api.call(
      'PUT',
      '/v1/routes',
      JSON.stringify({ namespace: 'sandbox-system', name: 'bench-upstream', id: SANDBOX_ID, uid: 'bench-uid', resourceVersion: '1', ip: upstreamHost, state: 'running' }),
    );
    if (put.status !== 200) throw new Error(`could not load the upstream's route: ${put.status} ${put.text}`);

    // The data plane must answer with the upstream's body before anything is measured.
    const probe = new HttpTarget(`http://${routesync.proxy}`);
    try {
      const response = await probe.pool.request({ method: 'GET', path: '/', headers: { 'e2b-sandbox-id': SANDBOX_ID, 'e2b-sandbox-port': upstreamPort } });
      const text = await response.body.text();
      if (response.statusCode !== 200 || !text.includes('"sandbox":"bench"')) throw new Error(`the data plane answered ${response.statusCode} ${text.slice(0, 200)}`);
    } finally {
      await probe.close();
    }

    const options: Record<Path, Options> = {
      direct: { url: `http://${upstream.address}/` },
      bare: { url: `http://${bare.address}/` },
      library: { url: `http://${library.address}/` },
      routesync: { url: `http://${routesync.proxy}/`, headers: { 'e2b-sandbox-id': SANDBOX_ID, 'e2b-sandbox-port': upstreamPort } },
    };
    const proxyProcess: Record<Path, Child | undefined> = { direct: undefined, bare: bare.child, library: library.child, routesync: routesync.child };
    const measure = (path: Path, extra: Partial<Options>) => cannon({ ...options[path], connections: CONNECTIONS, duration: seconds, ...extra }, proxyProcess[path]);
    // Warm every path (JIT, pools) before anything is counted.
    for (const path of PATHS) await cannon({ ...options[path], connections: CONNECTIONS, duration: 1 });

    const runs: DataPlaneRun[] = [];
    for (let run = 0; run < ctx.runs; run++) {
      // Rotate the order each run, so that no path always runs first or last.
      const order = PATHS.map((_, k) => PATHS[(run + k) % PATHS.length]!);
      const max = {} as Record<Path, CannonFigures>;
      for (const path of order) max[path] = await measure(path, {});
      const rate = Math.max(1, Math.round(max.direct.perSecond / 2));
      const atRate = {} as Record<Path, CannonFigures>;
      for (const path of order) atRate[path] = await measure(path, { overallRate: rate });
      runs.push({ max, rate, atRate });
      ctx.log(
        `  run ${run + 1}/${ctx.runs}: ` +
          PATHS.map((path) => `${path} ${max[path].perSecond}/s p99 ${max[path].latency.p99} ms${max[path].proxyCpuUs === undefined ? '' : ` (${max[path].proxyCpuUs} µs CPU/req)`}`).join('; ') +
          `; at ${rate}/s p99 ` +
          PATHS.map((path) => `${path} ${atRate[path].latency.p99} ms${atRate[path].errors + atRate[path].non2xx > 0 ? ` (${atRate[path].errors} errors, ${atRate[path].non2xx} non-2xx)` : ''}`).join(', '),
      );
    }

    const pick = (f: (r: DataPlaneRun) => number) => spread(runs.map(f));
    const summary: SuiteResult['summary'] = {
      throughputRatio: pick((r) => r.max.routesync.perSecond / r.max.direct.perSecond),
      bareThroughputRatio: pick((r) => r.max.bare.perSecond / r.max.direct.perSecond),
      libraryThroughputRatio: pick((r) => r.max.library.perSecond / r.max.direct.perSecond),
      routesyncToBareThroughput: pick((r) => r.max.routesync.perSecond / r.max.bare.perSecond),
      routesyncToLibraryThroughput: pick((r) => r.max.routesync.perSecond / r.max.library.perSecond),
      routesyncCpuToBare: pick((r) => r.max.routesync.proxyCpuUs! / r.max.bare.proxyCpuUs!),
      routesyncCpuToLibrary: pick((r) => r.max.routesync.proxyCpuUs! / r.max.library.proxyCpuUs!),
      rate: pick((r) => r.rate),
      p99RatioAtRate: pick((r) => r.atRate.routesync.latency.p99 / r.atRate.direct.latency.p99),
      bareP99RatioAtRate: pick((r) => r.atRate.bare.latency.p99 / r.atRate.direct.latency.p99),
    };
    for (const path of PATHS) {
      summary[`${path}PerSecond`] = pick((r) => r.max[path].perSecond);
      summary[`${path}P50`] = pick((r) => r.max[path].latency.p50);
      summary[`${path}P99`] = pick((r) => r.max[path].latency.p99);
      summary[`${path}AtRatePerSecond`] = pick((r) => r.atRate[path].perSecond);
      summary[`${path}AtRateP50`] = pick((r) => r.atRate[path].latency.p50);
      summary[`${path}AtRateP99`] = pick((r) => r.atRate[path].latency.p99);
    }
    for (const path of PROXIES) summary[`${path}CpuUs`] = pick((r) => r.max[path].proxyCpuUs!);
    const f = (name: string, digits = 2) => formatSpread(summary[name]!, digits);
    const table: string[][] = [['benchmark 6: data plane', 'req/s', 'p50 ms', 'p99 ms', '÷ direct', 'proxy CPU µs/req']];
    for (const path of PATHS) {
      table.push([
        `${LABELS[path]}, ${CONNECTIONS} connections`,
        f(`${path}PerSecond`, 0),
        f(`${path}P50`),
        f(`${path}P99`),
        path === 'direct' ? '' : `${formatSpread(pick((r) => r.max[path].perSecond / r.max.direct.perSecond))} (req/s)`,
        path === 'direct' ? '' : formatSpread(summary[`${path}CpuUs`]!, 0),
      ]);
    }
    for (const path of PATHS) {
      table.push([
        `${LABELS[path]}, at half the direct max`,
        f(`${path}AtRatePerSecond`, 0),
        f(`${path}AtRateP50`),
        f(`${path}AtRateP99`),
        path === 'direct' ? '' : `${formatSpread(pick((r) => r.atRate[path].latency.p99 / r.atRate.direct.latency.p99))} (p99)`,
        '',
      ]);
    }
    const targets: TargetCheck[] = [
      { description: `proxied req/s ÷ direct req/s at ${CONNECTIONS} connections`, value: summary.throughputRatio!.median, target: '≥ 0.5', met: summary.throughputRatio!.median >= 0.5 },
      { description: 'proxied p99 ÷ direct p99 at half the direct max rate', value: summary.p99RatioAtRate!.median, target: '≤ 2', met: summary.p99RatioAtRate!.median <= 2 },
      { description: 'routesync req/s ÷ bare node:http proxy req/s (reported)', value: summary.routesyncToBareThroughput!.median, target: 'report', met: null },
      { description: 'bare node:http proxy req/s ÷ direct req/s: the most any Node.js proxy reached here (reported)', value: summary.bareThroughputRatio!.median, target: 'report', met: null },
      { description: 'routesync CPU per request ÷ http-proxy-3 alone (reported)', value: summary.routesyncCpuToLibrary!.median, target: 'report', met: null },
      { description: 'routesync CPU per request ÷ bare node:http proxy (reported)', value: summary.routesyncCpuToBare!.median, target: 'report', met: null },
    ];
    return {
      name: 'data-plane',
      number: 6,
      title: 'Data plane: through the proxy vs direct',
      method:
        `autocannon in the driver process, ${CONNECTIONS} connections, ${seconds} s per measurement: direct, a bare node:http proxy, http-proxy-3 alone and routesync's data plane, ` +
        `in an order rotated each run; then the same three at a fixed overall rate of half that run's direct maximum. ` +
        `The sandbox is named by the e2b-sandbox-id/e2b-sandbox-port headers. Load generator, proxy and upstream share the machine's CPUs. ` +
        `Proxy CPU per request: the proxy process's user + system time (/proc) over the window, divided by the requests completed.`,
      config: { connections: CONNECTIONS, seconds, runs: ctx.runs },
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

function cannon(options: Options, proxy?: Child): Promise<CannonFigures> {
  const samples: number[] = [];
  const cpuBefore = proxy?.cpuMs();
  return new Promise((resolve, reject) => {
    const instance = autocannon({ timeout: 10, ...options }, (error, result) => {
      if (error) {
        reject(error);
        return;
      }
      const completed = result['2xx'];
      const cpuMs = proxy && cpuBefore !== undefined ? proxy.cpuMs() - cpuBefore : undefined;
      resolve({
        perSecond: round(completed / result.duration, 0),
        ...(cpuMs === undefined || completed === 0 ? {} : { proxyCpuUs: round((cpuMs * 1000) / completed, 0) }),
        latency: summarize(samples),
        non2xx: result.non2xx,
        errors: result.errors + result.timeouts,
      });
    });
    instance.on('response', (_client: unknown, statusCode: number, _bytes: number, responseTime: number) => {
      if (statusCode >= 200 && statusCode < 300) samples.push(responseTime);
    });
  });
}
