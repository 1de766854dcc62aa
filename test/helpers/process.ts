// Run routesync as a real process (the way it is shipped) and read its log lines.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { registerLogSource, registerSecret } from './secrets.js';

const MAIN = fileURLToPath(new URL('../../src/main.ts', import.meta.url));

export interface ProcessReplica {
  readonly child: ChildProcess;
  readonly lines: string[];
  readonly stderr: string[];
  /** Set once the replica logged that it listens. */
  readonly addresses: Promise<{ api: string; peer: string; proxy?: string }>;
  readonly exited: Promise<number | null>;
}

/** Start `src/main.ts` under tsx with the given environment (plus PATH). */
export function spawnReplica(env: Record<string, string>, args: string[] = []): ProcessReplica {
  const child = spawn(process.execPath, ['--import', 'tsx', MAIN, ...args], {
    env: { PATH: process.env.PATH ?? '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: string[] = [];
  const stderr: string[] = [];
  // The process's standard output and error are scanned for secrets after the test file.
  registerLogSource({ name: 'process stdout', lines });
  registerLogSource({ name: 'process stderr', lines: stderr });
  registerSecret(env.ROUTESYNC_PEER_TOKEN);
  const addresses = new Promise<{ api: string; peer: string; proxy?: string }>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      lines.push(line);
      if (line.includes('"routesync listening"')) resolve(JSON.parse(line));
    });
    child.once('exit', (code) => reject(new Error(`routesync exited with ${code} before listening: ${stderr.join('\n')}`)));
  });
  addresses.catch(() => undefined);
  createInterface({ input: child.stderr! }).on('line', (line) => stderr.push(line));
  const exited = once(child, 'exit').then(([code]) => code as number | null);
  return { child, lines, stderr, addresses, exited };
}
