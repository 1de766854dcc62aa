import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // After each file, every replica log line the file produced is scanned for secrets.
    setupFiles: ['test/helpers/secrets-setup.ts'],
    // Integration tests start real servers on loopback; the machines are slow and shared, so
    // each test waits for events with bounds of seconds rather than sleeping.
    testTimeout: 60_000,
    hookTimeout: 30_000,
    pool: 'forks',
    // Two cores: more workers only make the timing-sensitive integration tests noisier.
    maxWorkers: 2,
    reporters: ['default'],
  },
});
