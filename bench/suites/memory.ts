// Benchmark 5: memory holding 100,000 routes. A fresh routesync (no peers, so nothing is
// queued for anyone) started with --expose-gc takes the routes through POST /v1/routes/batch
// in chunks; RSS and heap are read in the process after two full collections (the preloaded
// hook), before and after, and cross-checked against its /metrics.
import { HttpTarget } from '../lib/driver.js';
import { startRoutesync } from '../lib/contenders.js';
import type { SuiteContext, SuiteResult, TargetCheck } from '../lib/report.js';
import { metricValue } from '../lib/metrics.js';
import { distinctRoutes } from '../lib/routes.js';
import { formatSpread, round, spread } from '../lib/stats.js';

const ROUTES = 100_000;
/** Routes per batch request: the size of a manager's periodic resync page, not one giant body. */
const CHUNK = Number(process.env.ROUTESYNC_BENCH_MEMORY_CHUNK ?? 1_000);
// The units read strictly: MB and KB as SI's 10^6 and 10^3 bytes (a MiB would grant
// the 150 MB bound 5 % more).
const MB = 1_000_000;
const KB = 1_000;

interface MemoryRun {
  readonly baseline: { rssBytes: number; heapUsedBytes: number };
  readonly loaded: { rssBytes: number; heapUsedBytes: number; heapTotalBytes: number; externalBytes: number; arrayBuffersBytes: number };
  readonly metrics: { rssBytes: number | null; heapUsedBytes: number | null; routes: number | null };
  readonly applied: number;
  readonly heapPerRouteBytes: number;
  readonly rssPerRouteBytes: number;
  readonly loadMs: number;
}

export async function memory(ctx: SuiteContext): Promise<SuiteResult> {
  const runs: MemoryRun[] = [];
  const routes = ROUTES;
  for (let run = 0; run < ctx.runs; run++) {
    const routesync = await startRoutesync({ peers: [], nodeFlags: ['--expose-gc'], forceTsx: ctx.forceTsx, name: 'routesync (memory)' });
    const api = new HttpTarget(`http://${routesync.api}`);
    const peerApi = new HttpTarget(`http://${routesync.peer}`);
    try {
      // Warm the code paths the load takes (parsing, validation, the table) with one small batch
      // of routes that are not counted, then take the baseline.
      const warm = distinctRoutes(10_000_000, 10);
      await api.call('POST', '/v1/routes/batch', JSON.stringify({ routes: warm }));
      await peerApi.call('GET', '/metrics');
      const before = await routesync.memory();
      const started = performance.now();
      let applied = 0;
      for (let start = 0; start < routes; start += CHUNK) {
        const chunk = distinctRoutes(start, Math.min(CHUNK, routes - start));
        const answer = await api.call('POST', '/v1/routes/batch', JSON.stringify({ routes: chunk }), 120_000);
        if (answer.status !== 200) throw new Error(`batch answered ${answer.status}: ${answer.text.slice(0, 300)}`);
        const results = (JSON.parse(answer.text) as { results: { outcome: string }[] }).results;
        applied += results.filter((result) => result.outcome === 'applied').length;
      }
      const loadMs = performance.now() - started;
      const after = await routesync.memory();
      const metricsText = (await peerApi.call('GET', '/metrics')).text;
      const result: MemoryRun = {
        baseline: { rssBytes: before.rss, heapUsedBytes: before.heapUsed },
        loaded: { rssBytes: after.rss, heapUsedBytes: after.heapUsed, heapTotalBytes: after.heapTotal, externalBytes: after.external, arrayBuffersBytes: after.arrayBuffers },
        metrics: {
          rssBytes: metricValue(metricsText, 'routesync_process_resident_memory_bytes'),
          heapUsedBytes: metricValue(metricsText, 'routesync_nodejs_heap_size_used_bytes'),
          routes: metricValue(metricsText, 'routesync_routes'),
        },
        applied,
        heapPerRouteBytes: round((after.heapUsed - before.heapUsed) / routes, 1),
        rssPerRouteBytes: round((after.rss - before.rss) / routes, 1),
        loadMs: round(loadMs, 0),
      };
      runs.push(result);
      ctx.log(
        `  run ${run + 1}/${ctx.runs}: ${applied} applied in ${(loadMs / 1000).toFixed(1)} s; RSS ${(after.rss / MB).toFixed(1)} MB ` +
          `(baseline ${(before.rss / MB).toFixed(1)}), heap ${(after.heapUsed / MB).toFixed(1)} MB (baseline ${(before.heapUsed / MB).toFixed(1)}); ` +
          `heap total ${(after.heapTotal / MB).toFixed(1)} MB; ${result.heapPerRouteBytes} B heap/route`,
      );
    } finally {
      await api.close();
      await peerApi.close();
      await routesync.stop();
    }
  }
  const summary: SuiteResult['summary'] = {
    rssMB: spread(runs.map((r) => r.loaded.rssBytes / MB)),
    baselineRssMB: spread(runs.map((r) => r.baseline.rssBytes / MB)),
    heapUsedMB: spread(runs.map((r) => r.loaded.heapUsedBytes / MB)),
    baselineHeapUsedMB: spread(runs.map((r) => r.baseline.heapUsedBytes / MB)),
    heapPerRouteBytes: spread(runs.map((r) => r.heapPerRouteBytes)),
    rssPerRouteBytes: spread(runs.map((r) => r.rssPerRouteBytes)),
    loadSeconds: spread(runs.map((r) => r.loadMs / 1000)),
  };
  const table: string[][] = [
    ['benchmark 5: 100,000 routes', 'baseline', 'loaded', 'per route'],
    ['RSS (MB; per route: bytes)', formatSpread(summary.baselineRssMB!, 1), formatSpread(summary.rssMB!, 1), formatSpread(summary.rssPerRouteBytes!, 0)],
    ['heap used (MB; per route: bytes)', formatSpread(summary.baselineHeapUsedMB!, 1), formatSpread(summary.heapUsedMB!, 1), formatSpread(summary.heapPerRouteBytes!, 0)],
    ['load time (s, batches of ' + CHUNK.toLocaleString('en') + ')', '', formatSpread(summary.loadSeconds!, 1), ''],
  ];
  const targets: TargetCheck[] = [
    { description: 'RSS holding 100,000 routes (MB, 10^6 bytes)', value: summary.rssMB!.median, target: '≤ 150', met: summary.rssMB!.median <= 150 },
    { description: 'heap per route (bytes)', value: summary.heapPerRouteBytes!.median, target: `≤ ${KB} (1 KB)`, met: summary.heapPerRouteBytes!.median <= KB },
  ];
  const incomplete = runs.filter((r) => r.applied !== routes).length;
  return {
    name: 'memory',
    number: 5,
    title: 'Memory holding 100,000 routes',
    method:
      `a fresh routesync without peers takes ${routes.toLocaleString('en')} distinct routes (realistic field lengths, tokens included) through ` +
      `POST /v1/routes/batch in chunks of ${CHUNK.toLocaleString('en')}; process.memoryUsage() after two forced full collections, before and after.`,
    config: { routes, chunk: CHUNK, runs: ctx.runs },
    runs,
    summary,
    targets,
    table,
    notes: incomplete > 0 ? [`${incomplete} run(s) did not apply every route`] : [],
  };
}
