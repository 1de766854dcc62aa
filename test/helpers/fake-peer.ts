// A fake peer: a real HTTP server on loopback that speaks the peer push protocol, with fault
// switches (hang, reset, answer a status) and counters a test can assert on.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { parseChange } from '../../src/routes/route.js';
import { RouteTable } from '../../src/routes/table.js';

/** `gated`: pushes are answered (and applied) only when the test calls openGate(). */
export type PeerMode = { kind: 'ok'; delayMs?: number; gated?: boolean } | { kind: 'hang' } | { kind: 'reset' } | { kind: 'status'; status: number; headers?: Record<string, string> };

/** Shared across fake peers in one process: requests in flight right now, and the peak. */
export class InFlightGauge {
  current = 0;
  peak = 0;
  enter(): void {
    this.current++;
    if (this.current > this.peak) this.peak = this.current;
  }
  leave(): void {
    this.current--;
  }
}

export class FakePeer {
  readonly table = new RouteTable({ tombstoneTtlMs: 600_000 });
  mode: PeerMode = { kind: 'ok' };
  /** Fail this many pushes (then behave as `mode`), with a reset or a status. */
  failNext = 0;
  failWith: 'reset' | number = 503;
  /** Sockets accepted, ever. */
  connections = 0;
  /** Most sockets open at the same time. */
  peakOpen = 0;
  /** Push requests received (any outcome). */
  pushes = 0;
  /** Route names answered `rejected` (and not applied), as a peer of an incompatible version would. */
  readonly rejectNames = new Set<string>();
  /** /healthz requests received. */
  probes = 0;
  /** Answer /healthz with a 200 whose body is cut off (headers promise more, then the socket is reset). */
  cutProbeAnswers = false;
  /** Routes received in pushes. */
  routesReceived = 0;
  /** Answer 401 to every request but /healthz (open, as a replica's is) without `Bearer <this>`. */
  requireToken: string | undefined;
  /** Authorization headers seen (for token tests). */
  readonly authorizations: (string | undefined)[] = [];
  private readonly sockets = new Set<Socket>();
  private readonly hung = new Set<ServerResponse>();
  private readonly gated: (() => void)[] = [];
  private readonly server: Server;
  private listeners: (() => void)[] = [];
  address = '';

  constructor(private readonly gauge?: InFlightGauge) {
    this.server = createServer((req, res) => this.handle(req, res));
    this.server.keepAliveTimeout = 65_000;
    this.server.on('connection', (socket) => {
      this.connections++;
      this.sockets.add(socket);
      this.peakOpen = Math.max(this.peakOpen, this.sockets.size);
      socket.on('close', () => this.sockets.delete(socket));
    });
  }

  /** Sockets open right now. */
  get openSockets(): number {
    return this.sockets.size;
  }

  static async start(options: { host?: string; gauge?: InFlightGauge } = {}): Promise<FakePeer> {
    const peer = new FakePeer(options.gauge);
    await new Promise<void>((resolve) => peer.server.listen(0, options.host ?? '127.0.0.1', resolve));
    const { address, port } = peer.server.address() as AddressInfo;
    peer.address = `${address}:${port}`;
    return peer;
  }

  /** Resolve once `predicate` holds, checked after every push; reject after `timeoutMs`. */
  waitFor(predicate: () => boolean, timeoutMs = 10_000, what = 'condition'): Promise<void> {
    if (predicate()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.listeners = this.listeners.filter((listener) => listener !== check);
        reject(new Error(`fake peer ${this.address}: timed out waiting for ${what}`));
      }, timeoutMs);
      const check = () => {
        if (!predicate()) return;
        clearTimeout(timer);
        this.listeners = this.listeners.filter((listener) => listener !== check);
        resolve();
      };
      this.listeners.push(check);
    });
  }

  /** Answer every push held by a gated mode, in order. */
  openGate(): void {
    for (const answer of this.gated.splice(0)) answer();
  }

  /** Pushes held by a gated mode, not answered yet. */
  get gatedPushes(): number {
    return this.gated.length;
  }

  /** Release hung requests by destroying their sockets. */
  releaseHung(): void {
    for (const res of this.hung) res.destroy();
    this.hung.clear();
  }

  /** Close every connection to this peer (its clients have to connect again). */
  dropConnections(): number {
    const count = this.sockets.size;
    for (const socket of this.sockets) socket.destroy();
    return count;
  }

  async close(): Promise<void> {
    this.releaseHung();
    this.dropConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private notify(): void {
    for (const listener of [...this.listeners]) listener();
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    this.authorizations.push(req.headers.authorization);
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      if (req.url === '/healthz') {
        this.probes++;
        if (this.cutProbeAnswers) {
          res.writeHead(200, { 'content-type': 'application/json', 'content-length': '100' });
          res.write('{"sta', () => req.socket.destroy());
        } else if (this.mode.kind === 'ok') res.end('{"status":"ok"}');
        else if (this.mode.kind === 'hang') this.hung.add(res);
        else if (this.mode.kind === 'reset') res.socket?.destroy();
        else res.writeHead(this.mode.status).end();
        return;
      }
      if (this.requireToken !== undefined && req.headers.authorization !== `Bearer ${this.requireToken}`) {
        res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":{"code":"unauthorized"}}');
        this.notify();
        return;
      }
      if (req.url !== '/v1/peer/routes' || req.method !== 'POST') {
        res.writeHead(404).end();
        return;
      }
      this.pushes++;
      this.gauge?.enter();
      let left = false;
      const leave = () => {
        if (left) return;
        left = true;
        this.gauge?.leave();
      };
      res.on('close', leave);
      let mode = this.mode;
      if (this.failNext > 0) {
        this.failNext--;
        mode = this.failWith === 'reset' ? { kind: 'reset' } : { kind: 'status', status: this.failWith };
      }
      switch (mode.kind) {
        case 'hang':
          this.hung.add(res);
          this.notify();
          return;
        case 'reset':
          leave();
          req.socket.destroy();
          this.notify();
          return;
        case 'status':
          res.writeHead(mode.status, { 'content-type': 'application/json', ...mode.headers }).end('{"error":{"code":"fault"}}');
          this.notify();
          return;
        case 'ok': {
          const answer = () => {
            const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { routes: unknown[] };
            const results = body.routes.map((entry) => {
              if (this.rejectNames.has((entry as { name?: string }).name ?? '')) return { outcome: 'rejected', reason: 'invalid_route' };
              const result = this.table.apply(parseChange(entry));
              return { outcome: result.outcome, reason: result.reason };
            });
            this.routesReceived += body.routes.length;
            res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ results }));
            this.notify();
          };
          if (mode.gated) {
            this.gated.push(answer);
            this.notify();
          } else if (mode.delayMs) setTimeout(answer, mode.delayMs);
          else answer();
        }
      }
    });
  }
}
