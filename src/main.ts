#!/usr/bin/env node
// routesync: wiring only. Config -> Replica -> signals.
import { ConfigError, loadConfig } from './config.js';
import { Replica } from './replica.js';

async function main(argv: readonly string[]): Promise<void> {
  let config;
  try {
    config = loadConfig(process.env, argv);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`routesync: ${error.message}\n`);
      process.exit(2);
    }
    throw error;
  }

  const replica = await Replica.start(config);
  let stopping = false;
  const stop = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    replica.logger.info({ signal }, 'signal received');
    replica.shutdown().then(
      () => process.exit(0),
      (error: unknown) => {
        replica.logger.fatal({ err: error }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main(process.argv.slice(2)).catch((error: unknown) => {
  const message = error instanceof Error ? error.message : String(error);
  process.stderr.write(`routesync: failed to start: ${message}\n`);
  process.exit(1);
});
