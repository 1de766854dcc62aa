// The local API: the local manager's loopback endpoint for route changes and inspection.
import { performance } from 'node:perf_hooks';
import express, { type Express, type Response } from 'express';
import type { Logger } from '../log.js';
import type { PeerSync } from '../peers/fanout.js';
import { isCanonicalResourceVersion, parseChange, parseChanges, parseDeletion, redactRoute, type ChangeParseOptions } from '../routes/route.js';
import type { RouteTable } from '../routes/table.js';
import type { RouteService } from '../service.js';
import { ApiError, errorHandler, methodNotAllowed, notFound, rejectInvalidUtf8, requireJson } from './errors.js';

/** One route is well under 1 MiB; a manager's informer resync of 100,000 routes is ~30 MiB. */
export const ROUTE_BODY_LIMIT_BYTES = 1_048_576;
export const BATCH_BODY_LIMIT_BYTES = 64 * 1_048_576;
export const BATCH_MAX_ROUTES = 200_000;
/** The local manager sends Routes: fencedAtMs is a peer-only field, ignored here like any unknown one. */
const LOCAL_CHANGE: ChangeParseOptions = { fencedAt: false };

export interface LocalApiDeps {
  readonly service: RouteService;
  readonly table: RouteTable;
  readonly sync: PeerSync;
  readonly logger: Logger;
}

export function createLocalApp(deps: LocalApiDeps): Express {
  const { service, table, sync, logger } = deps;
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  const routeJson = express.json({ limit: ROUTE_BODY_LIMIT_BYTES, type: 'application/json', verify: rejectInvalidUtf8 });
  const batchJson = express.json({ limit: BATCH_BODY_LIMIT_BYTES, type: 'application/json', verify: rejectInvalidUtf8 });
  // The sync deadline counts from the call's arrival, before its body is read and parsed.
  app.use((_req, res, next) => {
    res.locals.receivedAt = performance.now();
    next();
  });
  const receivedAt = (res: Response): number => res.locals.receivedAt as number;

  app.put('/v1/routes', requireJson, routeJson, async (req, res) => {
    const change = parseChange(req.body, LOCAL_CHANGE);
    res.json(await service.applyLocal(change, receivedAt(res)));
  });

  app.delete('/v1/routes/:namespace/:name', async (req, res) => {
    const { namespace, name } = req.params;
    // A delete without a version removes the route whatever its version: a misspelt parameter
    // (`resourceversion`, `resourceVersion[x]`) must not turn a conditional delete into that.
    const unknown = Object.keys(req.query).find((parameter) => parameter !== 'resourceVersion');
    if (unknown !== undefined) {
      throw new ApiError(400, 'invalid_query', `unknown query parameter ${JSON.stringify(unknown)}: a delete takes resourceVersion only`, { field: unknown });
    }
    const raw = req.query.resourceVersion;
    if (raw !== undefined && (typeof raw !== 'string' || !isCanonicalResourceVersion(raw))) {
      throw new ApiError(400, 'invalid_route', 'resourceVersion must be a positive decimal integer without sign or leading zero', {
        reason: 'invalid_resource_version',
        field: 'resourceVersion',
      });
    }
    // The identity gets the same checks as a route's (length, control characters): a fence
    // for a name no route can have would only be noise that spreads to every peer.
    parseDeletion({ namespace, name, resourceVersion: raw ?? '1' });
    res.json(await service.deleteLocal(namespace, name, raw, receivedAt(res)));
  });

  app.post('/v1/routes/batch', requireJson, batchJson, async (req, res) => {
    const body = req.body as unknown;
    const entries = Array.isArray(body) ? body : (body as { routes?: unknown } | null)?.routes;
    if (!Array.isArray(entries)) throw new ApiError(400, 'invalid_batch', 'the body must be {"routes": [...]} or an array of routes');
    if (entries.length > BATCH_MAX_ROUTES) throw new ApiError(413, 'batch_too_large', `a batch carries at most ${BATCH_MAX_ROUTES} routes`);
    // All or nothing: a batch with any invalid route changes nothing.
    const { changes, invalid } = parseChanges(entries, LOCAL_CHANGE);
    if (invalid.length > 0) {
      throw new ApiError(400, 'invalid_route', `${invalid.length} of ${entries.length} routes are invalid; nothing was applied`, {
        invalid: invalid.slice(0, 100),
      });
    }
    const { results, sync: outcome } = await service.applyLocalBatch(changes, receivedAt(res));
    res.json({ results, sync: outcome });
  });

  app.get('/v1/routes', (req, res) => {
    const namespace = req.query.namespace;
    // A repeated parameter is an array (Express 5's simple query parser): a filter that cannot
    // be honoured is refused, never dropped (which would list every namespace). So is any other
    // parameter, as on DELETE: a misspelt filter (`?ns=team-a`) would list every namespace too.
    if (namespace !== undefined && typeof namespace !== 'string') {
      throw new ApiError(400, 'invalid_query', 'namespace must be given once, as a plain value', { field: 'namespace' });
    }
    const unknown = Object.keys(req.query).find((name) => name !== 'namespace');
    if (unknown !== undefined) throw new ApiError(400, 'invalid_query', 'the only query parameter is namespace', { field: unknown });
    const routes = table
      .list()
      .filter((route) => namespace === undefined || route.namespace === namespace)
      .map(redactRoute);
    res.json({ count: routes.length, tombstones: table.fenceCount, routes });
  });

  // Sandbox IDs are opaque, so "batch" is one like any other: the lookup comes before the batch
  // path's 405, and a GET of /v1/routes/batch looks the sandbox up.
  app.get('/v1/routes/:id', (req, res) => {
    const route = table.getById(req.params.id);
    if (!route) throw new ApiError(404, 'route_not_found', `no route serves sandbox ID ${JSON.stringify(req.params.id)}`);
    res.json(redactRoute(route));
  });

  app.all('/v1/routes/batch', methodNotAllowed('GET, POST'));
  app.all('/v1/routes/:id', methodNotAllowed('GET'));
  app.all('/v1/routes/:namespace/:name', methodNotAllowed('DELETE'));

  app.get('/v1/peers', (_req, res) => {
    res.json({ peers: sync.status() });
  });

  app.all('/v1/routes', methodNotAllowed('GET, PUT'));
  app.all('/v1/peers', methodNotAllowed('GET'));
  app.use(notFound);
  app.use(errorHandler(logger));
  return app;
}
