// The Route: its type, its validation and resourceVersion ordering.
//
// Field names are exactly openkruise's `sandboxroute.Route` JSON, so an openkruise manager
// can push to us unchanged. Validation builds a fresh object holding only the known fields:
// unknown fields (and keys such as `__proto__` or `constructor`) are never copied.
import { isIP } from 'node:net';

export interface Route {
  readonly namespace: string;
  readonly name: string;
  readonly id: string;
  readonly uid: string;
  /** A canonical positive decimal integer; compared numerically, any length up to MAX_RESOURCE_VERSION_DIGITS. */
  readonly resourceVersion: string;
  /** Empty while the sandbox is being created, else an IPv4 or IPv6 address. */
  readonly ip: string;
  /** creating | available | running | paused | dead (any case); any other string is stored, not routable. */
  readonly state: string;
  readonly owner?: string;
  /** A secret: never logged, never listed. */
  readonly accessToken?: string;
  readonly requireTrafficAuth?: boolean;
}

/** A deletion as it travels between replicas: the identity, the version it deletes at, and when its fence was first made. */
export interface RouteDeletion {
  readonly namespace: string;
  readonly name: string;
  readonly resourceVersion: string;
  /** Wall-clock ms of the fence's first creation anywhere; absent = now (an openkruise `dead` push). */
  readonly fencedAtMs?: number;
}

/** A change as the table and the wire see it. */
export type RouteChange = { readonly op: 'upsert'; readonly route: Route } | { readonly op: 'delete'; readonly deletion: RouteDeletion };

/**
 * A guard, not a protocol limit: etcd's resourceVersion is a uint64 (20 digits), so 128
 * digits is far beyond any real value while keeping comparison and storage bounded.
 */
export const MAX_RESOURCE_VERSION_DIGITS = 128;
/** Kubernetes names are at most 253 characters; the sandbox ID and owner get the same bound. */
export const MAX_NAME_LENGTH = 253;
/** A Kubernetes namespace is a DNS-1123 label: at most 63 characters. */
export const MAX_NAMESPACE_LENGTH = 63;
export const MAX_TOKEN_LENGTH = 4096;

export const KNOWN_STATES = ['creating', 'available', 'running', 'paused', 'dead'] as const;

/** Why an input is not a valid route; stable codes, surfaced in 400 bodies. */
export type RejectReason =
  | 'not_an_object'
  | 'missing_field'
  | 'wrong_type'
  | 'empty_field'
  | 'too_long'
  | 'control_character'
  | 'invalid_unicode'
  | 'invalid_kubernetes_name'
  | 'invalid_resource_version'
  | 'invalid_ip'
  | 'invalid_fenced_at';

export class RouteValidationError extends Error {
  readonly code = 'ROUTE_INVALID';
  constructor(
    readonly reason: RejectReason,
    readonly field: string | undefined,
    message: string,
  ) {
    super(message);
    this.name = 'RouteValidationError';
  }
}

const CANONICAL_RV = /^[1-9][0-9]*$/;
// The identity is a Kubernetes object's: its namespace is a DNS-1123 label and its name a
// DNS-1123 subdomain (what the API server itself enforces, apimachinery's IsDNS1123Label and
// IsDNS1123Subdomain). Neither can hold '/', which is what keeps identityKey's "namespace/name"
// unambiguous: without it {team/x, sb} and {team, x/sb} would share one key.
const DNS1123_LABEL = /^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$/;
const DNS1123_SUBDOMAIN = /^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$/;
// C0 controls, DEL and C1 controls: nothing a Kubernetes name or a sandbox ID contains, and
// everything that breaks a log line, a URL path or a header.
// eslint-disable-next-line no-control-regex
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
// A UTF-16 surrogate that is not half of a pair (with the u flag a pair is one code point, so
// only a lone half matches). JSON's \ud800 escape can carry one; no Kubernetes object can
// (the API server stores UTF-8), it has no UTF-8 form (Buffer writes U+FFFD, so "\ud800" and
// "\ufffd" would hash and log alike) and the invalid UTF-8 bytes it stands for are already a
// 400 invalid_json.
const LONE_SURROGATE = /\p{Cs}/u;

export function isCanonicalResourceVersion(value: string): boolean {
  return value.length <= MAX_RESOURCE_VERSION_DIGITS && CANONICAL_RV.test(value);
}

/** Numeric comparison of two canonical resourceVersions of any length: -1, 0 or 1. */
export function compareResourceVersions(a: string, b: string): -1 | 0 | 1 {
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  if (a === b) return 0;
  return a < b ? -1 : 1;
}

export function identityKey(namespace: string, name: string): string {
  // Unambiguous because validation (identityOf) lets no '/' into a namespace or a name.
  return `${namespace}/${name}`;
}

/** The namespace and name of an identity key (the inverse of identityKey). */
export function splitIdentityKey(key: string): { namespace: string; name: string } {
  const slash = key.indexOf('/');
  return { namespace: key.slice(0, slash), name: key.slice(slash + 1) };
}

export function routeKey(route: Pick<Route, 'namespace' | 'name'>): string {
  return identityKey(route.namespace, route.name);
}

export function isRunning(route: Route): boolean {
  return route.state.toLowerCase() === 'running';
}

export function isDeadState(state: unknown): boolean {
  return typeof state === 'string' && state.toLowerCase() === 'dead';
}

function fail(reason: RejectReason, field: string | undefined, message: string): never {
  throw new RouteValidationError(reason, field, message);
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function own(input: Record<string, unknown>, field: string): unknown {
  return Object.prototype.hasOwnProperty.call(input, field) ? input[field] : undefined;
}

function requiredString(input: Record<string, unknown>, field: string, maxLength = MAX_NAME_LENGTH): string {
  const value = own(input, field);
  if (value === undefined || value === null) fail('missing_field', field, `${field} is required`);
  if (typeof value !== 'string') fail('wrong_type', field, `${field} must be a string`);
  if (value === '') fail('empty_field', field, `${field} must not be empty`);
  return checkText(field, value, maxLength);
}

function optionalString(input: Record<string, unknown>, field: string, maxLength = MAX_NAME_LENGTH): string | undefined {
  const value = own(input, field);
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'string') fail('wrong_type', field, `${field} must be a string`);
  return checkText(field, value, maxLength);
}

function checkText(field: string, value: string, maxLength: number): string {
  if (value.length > maxLength) fail('too_long', field, `${field} is longer than ${maxLength} characters`);
  if (CONTROL.test(value)) fail('control_character', field, `${field} contains a control character`);
  if (LONE_SURROGATE.test(value)) fail('invalid_unicode', field, `${field} contains a lone UTF-16 surrogate (not a Unicode character)`);
  return value;
}

/** The identity fields, checked as Kubernetes checks them (see DNS1123_LABEL). */
function identityOf(input: Record<string, unknown>): { namespace: string; name: string } {
  const namespace = requiredString(input, 'namespace', MAX_NAMESPACE_LENGTH);
  if (!DNS1123_LABEL.test(namespace)) {
    fail(
      'invalid_kubernetes_name',
      'namespace',
      "namespace must be a Kubernetes namespace name (DNS-1123 label): lowercase letters, digits and '-', starting and ending with a letter or digit",
    );
  }
  const name = requiredString(input, 'name');
  if (!DNS1123_SUBDOMAIN.test(name)) {
    fail(
      'invalid_kubernetes_name',
      'name',
      "name must be a Kubernetes object name (DNS-1123 subdomain): lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit",
    );
  }
  return { namespace, name };
}

function resourceVersionOf(input: Record<string, unknown>): string {
  const value = own(input, 'resourceVersion');
  if (value === undefined || value === null) fail('missing_field', 'resourceVersion', 'resourceVersion is required');
  if (typeof value !== 'string') fail('wrong_type', 'resourceVersion', 'resourceVersion must be a string');
  if (!isCanonicalResourceVersion(value)) {
    fail(
      'invalid_resource_version',
      'resourceVersion',
      `resourceVersion must be a positive decimal integer without sign or leading zero, at most ${MAX_RESOURCE_VERSION_DIGITS} digits`,
    );
  }
  return value;
}

/** Validate an untrusted value as a Route; returns a fresh object with only the known fields. */
export function parseRoute(input: unknown): Route {
  if (!isPlainObject(input)) fail('not_an_object', undefined, 'a route must be a JSON object');
  const { namespace, name } = identityOf(input);
  const id = requiredString(input, 'id');
  const uid = requiredString(input, 'uid');
  const resourceVersion = resourceVersionOf(input);
  const ip = optionalString(input, 'ip', 64) ?? '';
  // Zone IDs (fe80::1%eth0) name an interface of the sender's host, not a pod: refuse them.
  if (ip !== '' && (isIP(ip) === 0 || ip.includes('%'))) fail('invalid_ip', 'ip', 'ip must be empty or an IPv4/IPv6 address');
  const state = optionalString(input, 'state', 64) ?? '';
  const owner = optionalString(input, 'owner');
  const accessToken = optionalString(input, 'accessToken', MAX_TOKEN_LENGTH);
  const requireTrafficAuth = own(input, 'requireTrafficAuth');
  if (requireTrafficAuth !== undefined && requireTrafficAuth !== null && typeof requireTrafficAuth !== 'boolean') {
    fail('wrong_type', 'requireTrafficAuth', 'requireTrafficAuth must be a boolean');
  }
  return new StoredRoute(
    sharedValues.namespace.get(namespace),
    name,
    id,
    uid,
    resourceVersion,
    ip,
    sharedValues.state.get(state),
    owner === undefined || owner === '' ? undefined : sharedValues.owner.get(owner),
    accessToken === undefined || accessToken === '' ? undefined : accessToken,
    requireTrafficAuth === true,
  );
}

/**
 * A route as parseRoute makes it and the table keeps it. A class rather than an object literal
 * for its memory: an optional field added to a literal goes to a separate property array
 * (~40 B a route here), while V8 sizes a constructor's objects for every field its constructor
 * can set. A field without a value is absent, not undefined, exactly as in the JSON.
 */
class StoredRoute implements Route {
  readonly namespace: string;
  readonly name: string;
  readonly id: string;
  readonly uid: string;
  readonly resourceVersion: string;
  readonly ip: string;
  readonly state: string;
  declare readonly owner?: string;
  declare readonly accessToken?: string;
  declare readonly requireTrafficAuth?: boolean;
  /**
   * See markLocalChange: private, so no listing, wire body or comparison ever sees it. Starts as
   * undefined, not a number, so that V8 keeps the slot tagged: a small integer stamp is stored
   * in place, and a large one as a number of its own, never as a box in every route.
   */
  #localChangeAt: number | undefined = undefined;

  static mark(route: Route, at: number): void {
    if (route instanceof StoredRoute) route.#localChangeAt = at;
  }

  static localChangeAt(route: Route): number | undefined {
    return route instanceof StoredRoute ? route.#localChangeAt : undefined;
  }

  constructor(
    namespace: string,
    name: string,
    id: string,
    uid: string,
    resourceVersion: string,
    ip: string,
    state: string,
    owner: string | undefined,
    accessToken: string | undefined,
    requireTrafficAuth: boolean,
  ) {
    this.namespace = namespace;
    this.name = name;
    this.id = id;
    this.uid = uid;
    this.resourceVersion = resourceVersion;
    this.ip = ip;
    this.state = state;
    if (owner !== undefined) this.owner = owner;
    if (accessToken !== undefined) this.accessToken = accessToken;
    if (requireTrafficAuth) this.requireTrafficAuth = true;
  }
}

/**
 * Stamp a stored route as changed by the local manager at `at`: a time of the caller's clock,
 * best a small integer (the reconciler's, which spares such routes in a suspect rebuild). Only
 * routes made by parseRoute carry a stamp; any other is left as it is.
 */
export function markLocalChange(route: Route, at: number): void {
  StoredRoute.mark(route, at);
}

/** The stamp markLocalChange left on a route, if any. */
export function localChangeAt(route: Route): number | undefined {
  return StoredRoute.localChangeAt(route);
}

/**
 * One copy of a value that many routes repeat. JSON.parse makes a fresh string for every value of
 * every body, so 100,000 routes in one namespace held 100,000 copies of its name (~32 B each).
 * A fleet has few namespaces, owners and states, so each field has a pool of the values seen;
 * the pool is bounded (at most ~1.5 MB of strings, kept after their routes are gone), and once
 * full a new value is kept as it came (correct, merely unshared).
 */
class SharedValues {
  private readonly values = new Map<string, string>();
  constructor(private readonly limit: number) {}

  get(value: string): string {
    const known = this.values.get(value);
    if (known !== undefined) return known;
    if (this.values.size < this.limit) this.values.set(value, value);
    return value;
  }
}

const SHARED_VALUES_PER_FIELD = 4096;
const sharedValues = {
  namespace: new SharedValues(SHARED_VALUES_PER_FIELD),
  owner: new SharedValues(SHARED_VALUES_PER_FIELD),
  state: new SharedValues(SHARED_VALUES_PER_FIELD),
};

/** How a change is read: which fields its sender may set. */
export interface ChangeParseOptions {
  /**
   * Read `fencedAtMs` (default true): replicas carry a fence's first creation on the peer API
   * and in pulls. The local API passes false: fencedAtMs is not a Route field (SPEC §2), so
   * there it is an unknown field and ignored, and the manager's deletion is fenced now. Read
   * there, an old value would make the delete "already expired": removed locally, no fence,
   * nothing synced.
   */
  readonly fencedAt?: boolean;
}

/** Validate an untrusted deletion (namespace, name, resourceVersion; optional fencedAtMs). */
export function parseDeletion(input: unknown, options: ChangeParseOptions = {}): RouteDeletion {
  if (!isPlainObject(input)) fail('not_an_object', undefined, 'a deletion must be a JSON object');
  const { namespace, name } = identityOf(input);
  const resourceVersion = resourceVersionOf(input);
  const fencedAt = options.fencedAt === false ? undefined : own(input, 'fencedAtMs');
  if (fencedAt === undefined || fencedAt === null) return { namespace, name, resourceVersion };
  if (typeof fencedAt !== 'number' || !Number.isSafeInteger(fencedAt) || fencedAt < 0) {
    fail('invalid_fenced_at', 'fencedAtMs', 'fencedAtMs must be a non-negative integer');
  }
  return { namespace, name, resourceVersion, fencedAtMs: fencedAt };
}

/**
 * One entry of a push (openkruise /refresh or our batch): a route whose state is `dead` is a
 * deletion and needs only namespace, name and resourceVersion; anything else is an upsert.
 */
export function parseChange(input: unknown, options: ChangeParseOptions = {}): RouteChange {
  if (isPlainObject(input) && isDeadState(own(input, 'state'))) return { op: 'delete', deletion: parseDeletion(input, options) };
  return { op: 'upsert', route: parseRoute(input) };
}

/** A batch entry that failed validation, as the 400 of a batch endpoint lists it. */
export interface InvalidEntry {
  readonly index: number;
  readonly reason: RejectReason;
  readonly field?: string;
  readonly message: string;
}

/**
 * Every entry of a batch (the local API's or a peer's push) through parseChange: the valid
 * changes in order, and each invalid entry with its index. Batches are all or nothing, so a
 * caller refuses the whole batch when `invalid` is not empty.
 */
export function parseChanges(entries: readonly unknown[], options: ChangeParseOptions = {}): { changes: RouteChange[]; invalid: InvalidEntry[] } {
  const changes: RouteChange[] = [];
  const invalid: InvalidEntry[] = [];
  entries.forEach((entry, index) => {
    try {
      changes.push(parseChange(entry, options));
    } catch (error) {
      if (!(error instanceof RouteValidationError)) throw error;
      invalid.push({ index, reason: error.reason, message: error.message, ...(error.field ? { field: error.field } : {}) });
    }
  });
  return { changes, invalid };
}

/** The route as listing endpoints show it: the access token never leaves. */
export function redactRoute(route: Route): Omit<Route, 'accessToken'> & { hasAccessToken: boolean } {
  const { accessToken, ...visible } = route;
  return { ...visible, hasAccessToken: accessToken !== undefined };
}

/** A change as it travels on the wire to peers (deletions as openkruise `dead` routes). */
export function changeToWire(change: RouteChange): Record<string, unknown> {
  if (change.op === 'upsert') return change.route as unknown as Record<string, unknown>;
  const { deletion } = change;
  return { ...deletion, state: 'dead' };
}

export function changeKey(change: RouteChange): string {
  return change.op === 'upsert' ? routeKey(change.route) : routeKey(change.deletion);
}

export function changeVersion(change: RouteChange): string {
  return change.op === 'upsert' ? change.route.resourceVersion : change.deletion.resourceVersion;
}
