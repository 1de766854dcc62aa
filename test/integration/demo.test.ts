// `make demo` runs to the end and exits 0: three replica processes on 127.0.0.1-3, routes
// synced, traffic routed, a paused sandbox refused, SIGTERM with exit 0 everywhere.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const DEMO = fileURLToPath(new URL('../../scripts/demo.ts', import.meta.url));

/** True when `port` is free on every one of `hosts` right now. */
async function freeOn(port: number, hosts: readonly string[]): Promise<boolean> {
  for (const host of hosts) {
    const server = createServer();
    const ok = await new Promise<boolean>((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(port, host, () => resolve(true));
    });
    if (ok) await new Promise((resolve) => server.close(resolve));
    if (!ok) return false;
  }
  return true;
}

/**
 * Three ports free on 127.0.0.1-3 (the demo binds each on all three addresses), below Linux's
 * ephemeral range (32768 and up): a port found free there could be taken meanwhile as the local
 * port of some other test's outgoing connection, and the replica then failed to bind it.
 */
async function demoPorts(): Promise<number[]> {
  const hosts = ['127.0.0.1', '127.0.0.2', '127.0.0.3'];
  const ports: number[] = [];
  for (let candidate = 20_000 + Math.floor(Math.random() * 12_000); ports.length < 3; candidate += 7) {
    if (await freeOn(candidate, hosts)) ports.push(candidate);
  }
  return ports;
}

describe('make demo', () => {
  it('runs every step as real processes and exits 0', async () => {
    const ports = await demoPorts();
    const child = spawn(process.execPath, ['--import', 'tsx', DEMO, '--ports', ports.join(',')], {
      env: { PATH: process.env.PATH ?? '' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const [code] = (await once(child, 'exit')) as [number | null];
    expect(code, output).toBe(0);
    // The narrative an operator reads: each route on replicas 2 and 3, traffic via all three,
    // the paused sandbox refused by all three, and three clean exits.
    expect(output.match(/^replica [23]\s+sb-(alpha|beta|gamma)\s+running\s+127\.0\.1\.\d\s+v10\d$/gm)).toHaveLength(6);
    expect(output.match(/^replica [123]\s+.*\s+200\s+hello from (alpha|beta|gamma) \(GET \/hello\)$/gm)).toHaveLength(9);
    expect(output.match(/^replica [123]\s+503\s+\{"error":\{"code":"sandbox_not_running".*"state":"paused"\}\}$/gm)).toHaveLength(3);
    expect(output.match(/^replica [123]\s+exit 0$/gm)).toHaveLength(3);
    expect(output).toContain('Demo complete');
  });
});
