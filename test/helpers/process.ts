// Run routesync as a real process (the way it is shipped) and read its log lines.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFile, writeFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { NODE_FLAGS } from '../../src/node-flags.js';
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

/** Start `src/main.ts` under tsx, with the V8 flags it ships with, and the given environment (plus PATH). */
export function spawnReplica(env: Record<string, string>, args: string[] = []): ProcessReplica {
  const child = spawn(process.execPath, [...NODE_FLAGS, '--import', 'tsx', MAIN, ...args], {
    // The tests' sandboxes are servers on loopback.
    env: { PATH: process.env.PATH ?? '', ROUTESYNC_PROXY_ALLOW_LOOPBACK: 'true', ...env },
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

async function procStatusBytes(pid: number, field: 'VmRSS' | 'VmHWM'): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const match = new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(status);
  if (!match) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(match[1]) * 1024;
}

/**
 * How far a process's resident memory rose above where it stood when `work` began, at its
 * highest while `work` ran: the kernel's own high-water mark (VmHWM), reset to the current
 * RSS first (`clear_refs` 5), so no peak between samples is missed. Linux only.
 */
export async function peakRssGrowth<T>(pid: number, work: () => Promise<T>): Promise<{ result: T; bytes: number }> {
  await writeFile(`/proc/${pid}/clear_refs`, '5');
  const before = await procStatusBytes(pid, 'VmRSS');
  const result = await work();
  return { result, bytes: (await procStatusBytes(pid, 'VmHWM')) - before };
}
