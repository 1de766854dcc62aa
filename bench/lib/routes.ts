// Route bodies as a sandbox manager sends them: realistic field lengths, a resourceVersion
// that only grows (one etcd counter), a bounded set of identities cycled through lifecycle
// states.
import { randomBytes, randomUUID } from 'node:crypto';

const STATES = ['running', 'paused', 'running', 'available'] as const;

export interface BenchRoute {
  namespace: string;
  name: string;
  id: string;
  uid: string;
  resourceVersion: string;
  ip: string;
  state: string;
  owner: string;
  accessToken: string;
  requireTrafficAuth: boolean;
}

export class RouteFactory {
  private resourceVersion = 1_000_000;
  private count = 0;
  private readonly identities: { name: string; id: string; uid: string; ip: string; token: string }[] = [];

  /** `identities` sandboxes, cycled; each call is the next lifecycle change of the next one. */
  constructor(readonly identityCount = 1_000) {
    for (let i = 0; i < identityCount; i++) this.identities.push(makeIdentity(i));
  }

  next(): BenchRoute {
    const identity = this.identities[this.count % this.identityCount]!;
    const state = STATES[Math.floor(this.count / this.identityCount) % STATES.length]!;
    this.count++;
    return route(identity, String(++this.resourceVersion), state);
  }

  nextBody(): string {
    return JSON.stringify(this.next());
  }
}

/** `count` distinct routes (benchmark 5), each a running sandbox. */
export function distinctRoutes(start: number, count: number): BenchRoute[] {
  const routes: BenchRoute[] = [];
  for (let i = start; i < start + count; i++) routes.push(route(makeIdentity(i), String(1_000_000 + i), 'running'));
  return routes;
}

function makeIdentity(i: number): { name: string; id: string; uid: string; ip: string; token: string } {
  return {
    name: `sbx-${i.toString(36).padStart(6, '0')}-${randomBytes(3).toString('hex')}`,
    // e2b-style sandbox IDs are 20 lower-case alphanumerics.
    id: `i${randomBytes(10).toString('hex').slice(0, 19)}`,
    uid: randomUUID(),
    ip: `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`,
    token: randomBytes(16).toString('hex'),
  };
}

function route(identity: { name: string; id: string; uid: string; ip: string; token: string }, resourceVersion: string, state: string): BenchRoute {
  return {
    namespace: 'sandbox-system',
    name: identity.name,
    id: identity.id,
    uid: identity.uid,
    resourceVersion,
    ip: identity.ip,
    state,
    owner: 'team-bench',
    accessToken: identity.token,
    requireTrafficAuth: true,
  };
}
