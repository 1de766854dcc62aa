// The peer API: what other replicas (and an unchanged openkruise manager) talk to.
//   POST /refresh          openkruise-compatible single-route push
//   POST /v1/peer/routes   batched push: {"routes": [...]} -> {"results": [...]}
//   GET  /healthz /readyz /metrics   probes and metrics, never behind the token
// Reconciliation adds its own endpoints through `extend` (digest, pull).
import { createHash, timingSafeEqual } from 'node:crypto';
import express, { type Express, type RequestHandler, type Router } from 'express';
import { PUSH_MAX_ROUTES } from '../config.js';
import type { Logger } from '../log.js';
import type { Metrics } from '../metrics.js';
import { INSTANCE_HEADER, PEER_PUSH_PATH } from '../peers/client.js';
import { parseChange, parseChanges } from '../routes/route.js';
import type { RouteService } from '../service.js';
import { ApiError, errorHandler, methodNotAllowed, notFound, rejectInvalidUtf8, sendError } from './errors.js';

/** openkruise's limit for /refresh: 1 MiB, inclusive. */
export const REFRESH_BODY_LIMIT_BYTES = 1_048_576;
/** A peer batch carries at most batchMaxRoutes routes; this bounds the bytes. */
export const PEER_BATCH_BODY_LIMIT_BYTES = 64 * 1_048_576;

export interface PeerApiDeps {
  readonly service: RouteService;
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly token: string;
  readonly instanceId: string;
  readonly isReady: () => boolean;
  /** Shutdown has begun: /readyz says so rather than "not bootstrapped". */
  readonly isShuttingDown?: () => boolean;
  /** Called before /metrics is rendered, to refresh gauges. */
  readonly beforeMetrics?: () => void;
  /** Extra authenticated peer endpoints (reconciliation). */
  readonly extend?: (router: Router) => void;
}

/** The auth scheme and the one space after it; matched without regard to case (RFC 9110 §11.1). */
const BEARER_PREFIX = 'bearer ';

/** `Authorization: Bearer <token>`, the token compared in constant time over equal-length digests. */
export function bearerAuth(token: string): RequestHandler {
  const expected = createHash('sha256').update(token).digest();
  return (req, res, next) => {
    const header = req.headers.authorization ?? '';
    const scheme = header.slice(0, BEARER_PREFIX.length).toLowerCase() === BEARER_PREFIX;
    const given = createHash('sha256').update(scheme ? header.slice(BEARER_PREFIX.length) : '').digest();
    // The token is never empty here (no token, no bearerAuth), so a header without the scheme cannot match.
    if (!scheme || !timingSafeEqual(given, expected)) {
      res.setHeader('WWW-Authenticate', 'Bearer realm="routesync-peer"');
      sendError(res, 401, 'unauthorized', 'a valid peer token is required');
      return;
    }
    next();
  };
}

export function createPeerApp(deps: PeerApiDeps): Express {
  const { service, metrics, logger } = deps;
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  app.use((_req, res, next) => {
    res.setHeader(INSTANCE_HEADER, deps.instanceId);
    next();
  });

  // Probes and metrics are open: kubelet and Prometheus carry no token.
  app.get('/healthz', (_req, res) => {
    res.json({ status: 'ok' });
  });
  app.get('/readyz', (_req, res) => {
    if (deps.isReady()) res.json({ status: 'ready' });
    else if (deps.isShuttingDown?.()) sendError(res, 503, 'shutting_down', 'this replica is shutting down');
    else sendError(res, 503, 'not_ready', 'the route table is not bootstrapped yet');
  });
  app.get('/metrics', async (_req, res) => {
    deps.beforeMetrics?.();
    res.setHeader('Content-Type', metrics.registry.contentType);
    res.send(await metrics.registry.metrics());
  });

  // Another method on a probe is 405, as on every known path, and never asks for the token.
  for (const path of ['/healthz', '/readyz', '/metrics']) app.all(path, methodNotAllowed('GET'));

  const peer = express.Router();
  if (deps.token !== '') peer.use(bearerAuth(deps.token));

  // openkruise sends no reliable Content-Type, so any type is parsed as JSON here, and as UTF-8
  // (RFC 8259 §8.1) whatever charset the type names: openkruise's handler never reads the
  // header, and body-parser would answer a charset such as ISO-8859-1 with a 415.
  const refreshJson = express.json({ limit: REFRESH_BODY_LIMIT_BYTES, type: () => true, verify: rejectInvalidUtf8 });
  const ignoreContentType: RequestHandler = (req, _res, next) => {
    delete req.headers['content-type'];
    next();
  };
  peer.post('/refresh', ignoreContentType, refreshJson, (req, res) => {
    const body = req.body as unknown;
    if (isLegacyIdOnly(body)) {
      // An old manager's ID-only push carries no identity or version to order it by.
      res.status(204).end();
      return;
    }
    service.applyRemote([parseChange(body)], 'peer');
    res.status(204).end();
  });
  peer.all('/refresh', methodNotAllowed('POST'));

  const batchJson = express.json({ limit: PEER_BATCH_BODY_LIMIT_BYTES, type: () => true, verify: rejectInvalidUtf8 });
  peer.post(PEER_PUSH_PATH, batchJson, (req, res) => {
    const entries = (req.body as { routes?: unknown } | null)?.routes;
    if (!Array.isArray(entries)) throw new ApiError(400, 'invalid_batch', 'the body must be {"routes": [...]}');
    // No sender pushes more (ROUTESYNC_BATCH_MAX_ROUTES's maximum). It also bounds the answer
    // below, which lists each refused entry: unbounded, 2 MB of [0,0,...] was an 84 MB answer.
    if (entries.length > PUSH_MAX_ROUTES) throw new ApiError(413, 'batch_too_large', `a push carries at most ${PUSH_MAX_ROUTES} routes`);
    // All or nothing, as on the local API. Every refused entry is listed by index: the sender
    // validated them all, so these come from a replica of another version, and it sends the rest
    // again without them (PeerClient.push) instead of losing the whole batch. The first is also
    // named at the top, as before.
    const { changes, invalid } = parseChanges(entries);
    const [first] = invalid;
    if (first) {
      throw new ApiError(400, 'invalid_route', `${invalid.length} of ${entries.length} routes are invalid (route ${first.index}: ${first.message}); nothing was applied`, {
        index: first.index,
        reason: first.reason,
        ...(first.field ? { field: first.field } : {}),
        invalid,
      });
    }
    const results = service.applyRemote(changes, 'peer');
    res.json({ results: results.map(({ outcome, reason }) => ({ outcome, reason })) });
  });
  peer.all(PEER_PUSH_PATH, methodNotAllowed('POST'));

  deps.extend?.(peer);
  app.use(peer);
  app.use(notFound);
  app.use(errorHandler(logger));
  return app;
}

/** openkruise's legacy payload: an ID with no namespace and name. */
function isLegacyIdOnly(body: unknown): boolean {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return false;
  const { namespace, name, id } = body as Record<string, unknown>;
  const absent = (value: unknown) => value === undefined || value === null || value === '';
  return absent(namespace) && absent(name) && typeof id === 'string' && id !== '';
}
