// vitest setupFiles entry: after each test file, scan every log line its replicas wrote
// (test/helpers/secrets.ts) and fail the file if one holds a secret.
import { appendFileSync } from 'node:fs';
import { afterAll, expect } from 'vitest';
import { scanRegisteredLogs } from './secrets.js';

afterAll(() => {
  // Registered first, so with vitest's stacked hooks this runs after the file's own afterAll
  // hooks have closed its replicas: their last lines ("stopped") are scanned too.
  const { leaks, lines, sources } = scanRegisteredLogs();
  // ROUTESYNC_SECRETS_REPORT=<file> records what was scanned, one JSON line per test file.
  const report = process.env.ROUTESYNC_SECRETS_REPORT;
  if (report) appendFileSync(report, `${JSON.stringify({ file: expect.getState().testPath, sources, lines, leaks: leaks.length })}\n`);
  if (leaks.length > 0) {
    const shown = leaks.slice(0, 10).map((leak) => `  [${leak.source}] ${leak.why}: ${leak.line}`);
    throw new Error(`secrets scan: ${leaks.length} log line(s) leak a secret:\n${shown.join('\n')}`);
  }
});
