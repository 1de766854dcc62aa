// Benchmark 6: the data plane. Requests per second and latency through routesync's proxy
// against the same upstream hit directly: at 100 connections (closed loop), then at a fixed
// rate of half the direct maximum. autocannon drives; the upstream is a real HTTP server in a
// process of its own. Latencies are taken from autocannon's per-response events (sub-ms), not
// its integer histogram.
import autocannon, { type Options } from 'autocannon';
import { HttpTarget } from '../lib/driver.js';
import { listening, startRoutesync, startUpstream, stopAll } from '../lib/contenders.js';
import type { Child } from '../lib/proc.js';
import type { SuiteContext, SuiteResult, TargetCheck } from '../lib/report.js';
import { formatSpread, round, spread, summarize, type LatencySummary } from '../lib/stats.js';
import { profileFlags } from './lifecycle.js';

const CONNECTIONS = 100;
const SANDBOX_ID = 'ibench0000000000001';

interface CannonFigures {
  readonly perSecond: number;
  readonly latency: LatencySummary;
  readonly non2xx: number;
  readonly errors: number;
}

interface DataPlaneRun {
  readonly direct: CannonFigures;
  readonly proxied: CannonFigures | null;
  readonly rate: number;
  readonly directAtRate: CannonFigures;
  readonly proxiedAtRate: CannonFigures | null;
}

export async function dataPlane(ctx: SuiteContext): Promise<SuiteResult> {
  const seconds = ctx.quick ? 3 : 5;
  const processes: { child: Child }[] = [];
  const clients: HttpTarget[] = [];
  try {
    const upstream = await startUpstream();
    processes.push(upstream);
    const routesync = await startRoutesync({ peers: [], nodeFlags: ctx.profile ? profileFlags('data-plane') : [], env: { ROUTESYNC_ACCESS_LOG: 'false' } });
    processes.push(routesync);
    const api = new HttpTarget(`http://${routesync.api}`);
    clients.push(api);
    const [upstreamHost, upstreamPort] = [upstream.address.slice(0, upstream.address.lastIndexOf(':')), upstream.address.slice(upstream.address.lastIndexOf(':') + 1)];
    const put = await api.call(
      'PUT',
      '/v1/routes',
      JSON.stringify({ namespace: 'sandbox-system', name: 'bench-upstream', id: SANDBOX_ID, uid: 'bench-uid', resourceVersion: '1', ip: upstreamHost, state: 'running' }),
    );
    if (put.status !== 200) throw new Error(`could not load the upstream's route: ${put.status} ${put.text}`);

    // The data plane is wired only when its listener answers and routes to the upstream.
    let wired = false;
    let wiredNote = '';
    if (await listening(routesync.proxy)) {
      const probe = new HttpTarget(`http://${routesync.proxy}`);
      try {
        const response = await probe.pool.request({ method: 'GET', path: '/', headers: { 'e2b-sandbox-id': SANDBOX_ID, 'e2b-sandbox-port': upstreamPort! } });
        const text = await response.body.text();
        wired = response.statusCode === 200 && text.includes('"sandbox":"bench"');
        if (!wired) wiredNote = `the proxy answered ${response.statusCode} ${text.slice(0, 200)}`;
      } finally {
        await probe.close();
      }
    } else {
      wiredNote = `nothing listens on ROUTESYNC_PROXY_ADDR (${routesync.proxy}): the data plane is not wired into the replica yet`;
    }
    if (!wired) ctx.log(`  data plane NOT measured: ${wiredNote}`);

    const direct: Options = { url: `http://${upstream.address}/` };
    const proxied: Options = { url: `http://${routesync.proxy}/`, headers: { 'e2b-sandbox-id': SANDBOX_ID, 'e2b-sandbox-port': upstreamPort! } };
    // Warm both paths (JIT, pools) before anything is counted.
    await cannon({ ...direct, connections: CONNECTIONS, duration: 1 });
    if (wired) await cannon({ ...proxied, connections: CONNECTIONS, duration: 1 });

    const runs: DataPlaneRun[] = [];
    for (let run = 0; run < ctx.runs; run++) {
      const first = run % 2 === 0;
      const directMax = first || !wired ? await cannon({ ...direct, connections: CONNECTIONS, duration: seconds }) : null;
      const proxiedMax = wired ? await cannon({ ...proxied, connections: CONNECTIONS, duration: seconds }) : null;
      const directMaxFigures = directMax ?? (await cannon({ ...direct, connections: CONNECTIONS, duration: seconds }));
      const rate = Math.max(1, Math.round(directMaxFigures.perSecond / 2));
      const atRate = (options: Options) => cannon({ ...options, connections: CONNECTIONS, duration: seconds, overallRate: rate });
      const proxiedAtRate = wired && !first ? await atRate(proxied) : null;
      const directAtRate = await atRate(direct);
      const proxiedAtRateFigures = wired ? (proxiedAtRate ?? (await atRate(proxied))) : null;
      const result: DataPlaneRun = { direct: directMaxFigures, proxied: proxiedMax, rate, directAtRate, proxiedAtRate: proxiedAtRateFigures };
      runs.push(result);
      ctx.log(
        `  run ${run + 1}/${ctx.runs}: direct ${directMaxFigures.perSecond}/s p99 ${directMaxFigures.latency.p99} ms; ` +
          (proxiedMax ? `proxied ${proxiedMax.perSecond}/s p99 ${proxiedMax.latency.p99} ms; ` : 'proxied: not wired; ') +
          `at ${rate}/s direct p99 ${directAtRate.latency.p99} ms` +
          (proxiedAtRateFigures ? `, proxied p99 ${proxiedAtRateFigures.latency.p99} ms` : ''),
      );
    }

    const pick = (f: (r: DataPlaneRun) => number | undefined) => spread(runs.map((r) => f(r) ?? Number.NaN));
    const summary: SuiteResult['summary'] = {
      directPerSecond: pick((r) => r.direct.perSecond),
      directP99: pick((r) => r.direct.latency.p99),
      proxiedPerSecond: pick((r) => r.proxied?.perSecond),
      proxiedP99: pick((r) => r.proxied?.latency.p99),
      throughputRatio: pick((r) => (r.proxied ? r.proxied.perSecond / r.direct.perSecond : undefined)),
      rate: pick((r) => r.rate),
      directAtRateP50: pick((r) => r.directAtRate.latency.p50),
      directAtRateP99: pick((r) => r.directAtRate.latency.p99),
      proxiedAtRateP50: pick((r) => r.proxiedAtRate?.latency.p50),
      proxiedAtRateP99: pick((r) => r.proxiedAtRate?.latency.p99),
      p99RatioAtRate: pick((r) => (r.proxiedAtRate ? r.proxiedAtRate.latency.p99 / r.directAtRate.latency.p99 : undefined)),
    };
    const f = (name: string, digits = 2) => formatSpread(summary[name]!, digits);
    const table: string[][] = [
      ['benchmark 6: data plane', 'req/s', 'p50 ms', 'p99 ms', 'proxied ÷ direct'],
      [`direct, ${CONNECTIONS} connections`, f('directPerSecond', 0), formatSpread(pick((r) => r.direct.latency.p50)), f('directP99'), ''],
      [`through routesync, ${CONNECTIONS} connections`, f('proxiedPerSecond', 0), formatSpread(pick((r) => r.proxied?.latency.p50)), f('proxiedP99'), f('throughputRatio')],
      [`direct at half the direct max`, f('rate', 0), f('directAtRateP50'), f('directAtRateP99'), ''],
      [`through routesync at the same rate`, f('rate', 0), f('proxiedAtRateP50'), f('proxiedAtRateP99'), f('p99RatioAtRate')],
    ];
    const targets: TargetCheck[] = wired
      ? [
          { description: `proxied req/s ÷ direct req/s at ${CONNECTIONS} connections`, value: summary.throughputRatio!.median, target: '≥ 0.5', met: summary.throughputRatio!.median >= 0.5 },
          { description: 'proxied p99 ÷ direct p99 at half the direct max rate', value: summary.p99RatioAtRate!.median, target: '≤ 2', met: summary.p99RatioAtRate!.median <= 2 },
        ]
      : [
          { description: `proxied req/s ÷ direct req/s at ${CONNECTIONS} connections`, value: null, target: '≥ 0.5', met: null, note: wiredNote },
          { description: 'proxied p99 ÷ direct p99 at half the direct max rate', value: null, target: '≤ 2', met: null, note: wiredNote },
        ];
    return {
      name: 'data-plane',
      number: 6,
      title: 'Data plane: through the proxy vs direct',
      method:
        `autocannon, ${CONNECTIONS} connections, ${seconds} s per measurement, direct and proxied alternating which goes first; then a fixed overall rate ` +
        `of half the direct maximum of the same run. The sandbox is named by the e2b-sandbox-id/e2b-sandbox-port headers.`,
      config: { connections: CONNECTIONS, seconds, runs: ctx.runs, wired },
      runs,
      summary,
      targets,
      table,
      notes: wired ? [] : [wiredNote],
    };
  } finally {
    await Promise.all(clients.map((client) => client.close()));
    await stopAll(processes);
  }
}

function cannon(options: Options): Promise<CannonFigures> {
  const samples: number[] = [];
  return new Promise((resolve, reject) => {
    const instance = autocannon({ timeout: 10, ...options }, (error, result) => {
      if (error) {
        reject(error);
        return;
      }
      const completed = result['2xx'];
      resolve({
        perSecond: round(completed / result.duration, 0),
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
