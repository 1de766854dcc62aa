// Child processes of a benchmark run: started with the hooks preloaded, tracked, and killed
// when the run ends, fails or is interrupted. Every wait is bounded.
import { fork, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const BENCH_DIR = fileURLToPath(new URL('..', import.meta.url));
export const ROOT_DIR = fileURLToPath(new URL('../..', import.meta.url));
const HOOKS = pathToFileURL(fileURLToPath(new URL('./child-hooks.mjs', import.meta.url))).href;

const children = new Set<ChildProcess>();

function killAll(): void {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
  children.clear();
}

process.on('exit', killAll);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(signal, () => {
    killAll();
    process.exit(130);
  });
}

export interface StartOptions {
  /** Script path (absolute). */
  readonly script: string;
  readonly args?: readonly string[];
  readonly env?: Record<string, string>;
  /** Run through the tsx loader (TypeScript sources). */
  readonly tsx?: boolean;
  /** Extra node flags (--expose-gc, --cpu-prof ...). */
  readonly nodeFlags?: readonly string[];
  /** A label for error messages. */
  readonly name: string;
}

/** A child with an IPC channel; its output is kept (last lines) for error reports. */
export class Child {
  private readonly output: string[] = [];
  private nextId = 1;
  readonly exited: Promise<void>;

  constructor(
    readonly name: string,
    readonly process: ChildProcess,
  ) {
    const keep = (chunk: Buffer) => {
      for (const line of chunk.toString('utf8').split('\n')) if (line !== '') this.output.push(line);
      if (this.output.length > 200) this.output.splice(0, this.output.length - 200);
    };
    process.stdout?.on('data', keep);
    process.stderr?.on('data', keep);
    this.exited = once(process, 'exit').then(
      () => {
        children.delete(process);
      },
      () => {
        children.delete(process);
      },
    );
  }

  /** The last lines the child printed. */
  tail(lines = 20): string {
    return this.output.slice(-lines).join('\n');
  }

  /** Lines printed so far (routesync logs at warn: ejections, failures). */
  lines(): readonly string[] {
    return this.output;
  }

  /**
   * CPU time (user + system, ms) the process has used so far, from /proc/<pid>/stat (Linux; NaN
   * elsewhere). The difference over a window is what the window cost that process, whatever the
   * machine's speed did to latency: a ratio of two such figures compares the work done.
   */
  cpuMs(): number {
    return processCpuMs(this.process.pid);
  }

  get alive(): boolean {
    return this.process.exitCode === null && this.process.signalCode === null;
  }

  /** Send a message and wait for the reply carrying the same id. */
  request<T>(message: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.process.off('message', onMessage);
        reject(new Error(`${this.name}: no answer to ${String(message.type)} within ${timeoutMs} ms\n${this.tail()}`));
      }, timeoutMs);
      const onMessage = (reply: unknown) => {
        if (typeof reply !== 'object' || reply === null || (reply as { id?: unknown }).id !== id) return;
        clearTimeout(timer);
        this.process.off('message', onMessage);
        resolve(reply as T);
      };
      this.process.on('message', onMessage);
      this.process.send({ ...message, id });
    });
  }

  /** Wait for a message of `type` (a child announcing it listens). */
  waitFor<T>(type: string, timeoutMs = 30_000): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`${this.name}: no ${type} message within ${timeoutMs} ms\n${this.tail()}`));
      }, timeoutMs);
      const onMessage = (message: unknown) => {
        if (typeof message !== 'object' || message === null || (message as { type?: unknown }).type !== type) return;
        cleanup();
        resolve(message as T);
      };
      const onExit = (code: number | null, signal: string | null) => {
        cleanup();
        reject(new Error(`${this.name} exited (${code ?? signal}) before ${type}\n${this.tail()}`));
      };
      const cleanup = () => {
        clearTimeout(timer);
        this.process.off('message', onMessage);
        this.process.off('exit', onExit);
      };
      this.process.on('message', onMessage);
      this.process.on('exit', onExit);
    });
  }

  /** SIGTERM, then SIGKILL after `graceMs`. */
  async stop(graceMs = 5_000): Promise<void> {
    if (!this.alive) return;
    this.process.kill('SIGTERM');
    const timer = setTimeout(() => this.process.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(timer);
  }
}

export function start(options: StartOptions): Child {
  const execArgv = [...(options.tsx ? ['--import', 'tsx'] : []), '--import', HOOKS, ...(options.nodeFlags ?? [])];
  const child = fork(options.script, [...(options.args ?? [])], {
    execArgv,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    cwd: ROOT_DIR,
  });
  children.add(child);
  return new Child(options.name, child);
}

/** User + system CPU time of a process in ms (clock ticks of 10 ms), NaN when unknown. */
export function processCpuMs(pid: number | undefined): number {
  const times = processCpuTimes(pid);
  return times.userMs + times.systemMs;
}

/** User and kernel CPU time of a process so far, from /proc (NaN once it is gone). */
export function processCpuTimes(pid: number | undefined): { userMs: number; systemMs: number } {
  if (pid === undefined) return { userMs: Number.NaN, systemMs: Number.NaN };
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces), from field 3 on: utime is 14, stime 15.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { userMs: Number(fields[11]) * 10, systemMs: Number(fields[12]) * 10 };
  } catch {
    return { userMs: Number.NaN, systemMs: Number.NaN };
  }
}

/**
 * Time the process's main thread (where JavaScript runs) has spent on a CPU and runnable but
 * waiting for one, in ms, from /proc/<pid>/schedstat (Linux with schedstats; NaN otherwise).
 * The wait is what the machine's other processes (here: the peers and the load generator on the
 * same two cores) cost a call on top of its own CPU time.
 */
export function processSchedMs(pid: number | undefined): { onCpuMs: number; waitingMs: number } {
  if (pid === undefined) return { onCpuMs: Number.NaN, waitingMs: Number.NaN };
  try {
    const [onCpuNs, waitingNs] = readFileSync(`/proc/${pid}/schedstat`, 'utf8').trim().split(' ').map(Number);
    return { onCpuMs: (onCpuNs ?? Number.NaN) / 1e6, waitingMs: (waitingNs ?? Number.NaN) / 1e6 };
  } catch {
    return { onCpuMs: Number.NaN, waitingMs: Number.NaN };
  }
}

/** A port free right now on `host` (the OS picks it; a tiny race with other programs remains). */
export async function freePort(host: string): Promise<number> {
  const server = createServer();
  server.listen(0, host);
  await once(server, 'listening');
  const address = server.address();
  const port = typeof address === 'object' && address !== null ? address.port : 0;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Thrown by a `waitUntil` check to stop waiting at once (the child died). */
export class GiveUp extends Error {}

/** Poll `check` every `everyMs` until it returns true or `timeoutMs` passes. */
export async function waitUntil(what: string, check: () => Promise<boolean>, timeoutMs = 30_000, everyMs = 50): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (await check()) return;
    } catch (error) {
      if (error instanceof GiveUp) throw error;
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}
