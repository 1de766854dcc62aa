#!/usr/bin/env node
// routesync: wiring only. Config -> Replica -> signals.
import { ConfigError, loadConfig, readPeerTls } from './config.js';
import { Replica } from './replica.js';

async function main(argv: readonly string[]): Promise<void> {
  let config;
  let peerTls;
  try {
    config = loadConfig(process.env, argv);
    peerTls = readPeerTls(config);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`routesync: ${error.message}\n`);
      process.exit(2);
    }
    throw error;
  }

  const replica = await Replica.start(config, peerTls ? { peerTls } : {});
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

const argv = process.argv.slice(2);
if (argv[0] === 'ctl') {
  // The operator CLI: same binary, no listeners. Loaded on demand so the server never pays for it.
  import('./ctl.js')
    .then(({ runCtl }) => runCtl(argv.slice(1)))
    .then(
      (code) => {
        process.exitCode = code;
      },
      (error: unknown) => {
        // Not a usage error and not a difference: the command could not complete.
        process.stderr.write(`routesync ctl: ${error instanceof Error ? error.message : String(error)}\n`);
        process.exitCode = 3;
      },
    );
} else {
  startServer(argv);
}

function startServer(args: readonly string[]): void {
  main(args).catch((error: unknown) => {
    const message = error instanceof Error ? error.message : String(error);
    process.stderr.write(`routesync: failed to start: ${message}\n`);
    process.exit(1);
  });
}
