// The README's configuration and metric tables cannot drift from the code.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { SETTINGS } from '../../src/config.js';
import { Metrics } from '../../src/metrics.js';

const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');

describe('README', () => {
  it('documents every setting with its default', () => {
    for (const [variable, setting] of Object.entries(SETTINGS)) {
      const row = readme.split('\n').find((line) => line.startsWith('|') && (line.split('|')[1] ?? '').includes(`\`${variable}\``));
      expect(row, `${variable} has a row in the configuration table`).toBeDefined();
      if (setting.fallback !== '') expect(row, `${variable}'s default`).toContain(`\`${setting.fallback}\``);
    }
  });

  it('lists every metric', async () => {
    const metrics = await new Metrics({ processMetrics: false }).registry.getMetricsAsJSON();
    for (const { name } of metrics) expect(readme, name).toContain(`\`${name}`);
  });
});
