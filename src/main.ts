#!/usr/bin/env node
// routesync: wiring only. Config -> Replica -> signals.
import { ConfigError, flagName, loadConfig, readPeerTls, SETTINGS, unknownVariables } from './config.js';
import { Replica } from './replica.js';
import { VERSION } from './version.js';

const CTL_COMMANDS = new Set(['status', 'routes', 'peers', 'diff']);

function serverHelp(): string {
  const lines = [
    `routesync ${VERSION}: the route-sync sidecar. Configured by environment variables, each also a flag:`,
    '',
    '  routesync [--flag=value ...]     run the server (README, "Configuration", says what each does)',
    '  routesync ctl <command> ...      the operator CLI (routesync ctl --help)',
    '  routesync --version',
    '',
  ];
  for (const [variable, setting] of Object.entries(SETTINGS)) {
    lines.push(`  --${flagName(variable)}=VALUE`.padEnd(44) + `${variable} (default ${setting.fallback === '' ? 'empty' : setting.fallback})`);
  }
  return `${lines.join('\n')}\n`;
}

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

  // Handlers first: start-up can take seconds (the first peer DNS resolution waits for its
  // timeout when the resolver does not answer), and a SIGTERM then must not be lost: as a
  // container's PID 1, a process without a handler ignores it and runs on until SIGKILL.
  let replica: Replica | undefined = undefined;
  let stopSignal: NodeJS.Signals | undefined;
  const shutdown = (running: Replica, signal: NodeJS.Signals) => {
    running.logger.info({ signal }, 'signal received');
    running.shutdown().then(
      () => process.exit(0),
      (error: unknown) => {
        running.logger.fatal({ err: error }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  const stop = (signal: NodeJS.Signals) => {
    if (stopSignal) return;
    stopSignal = signal;
    // Before start-up ends there is no replica yet: it shuts down as soon as it exists.
    if (replica) shutdown(replica, signal);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);

  replica = await Replica.start(config, peerTls ? { peerTls } : {});
  for (const unknown of unknownVariables(process.env)) {
    replica.logger.warn(unknown, 'unknown ROUTESYNC_ variable ignored (is it misspelt?)');
  }
  if (stopSignal) shutdown(replica, stopSignal);
}

const argv = process.argv.slice(2);
if (argv[0] === '--version' || argv[0] === '-v') {
  process.stdout.write(`routesync ${VERSION}\n`);
} else if (argv[0] === '--help' || argv[0] === '-h') {
  process.stdout.write(serverHelp());
} else if (argv[0] !== undefined && CTL_COMMANDS.has(argv[0])) {
  // `routesync status` for `routesync ctl status`: the server takes flags only.
  process.stderr.write(`routesync: "${argv[0]}" is a ctl command: run \`routesync ctl ${argv[0]}\` (\`routesync --help\` lists the server's flags)\n`);
  process.exitCode = 2;
} else if (argv[0] === 'ctl') {
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
    // A listen address that cannot be bound is found only when listening (replica.ts).
    if (error instanceof ConfigError) {
      process.stderr.write(`routesync: ${error.message}\n`);
      process.exit(2);
    }
    const message = error instanceof Error ? error.message : String(error);
    process.stderr.write(`routesync: failed to start: ${message}\n`);
    process.exit(1);
  });
}
