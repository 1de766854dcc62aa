// The reconciliation endpoints of the peer API (registered through createPeerApp's `extend`,
// so they sit behind the peer token like every other peer endpoint):
//   GET  /v1/peer/digest[?root=1]  {"instance", "buckets", "root", "digests"?, "routes", "fences", "suspect", "seeded", "bootstrapping"}
//   POST /v1/peer/pull             {"buckets": [i, ...]} -> {"changes": [route | dead route, ...]}
// Routes travel whole (tokens included: this is the peer API) and fences as `dead` routes with
// `fencedAtMs`, exactly as a push carries them, so parseChange reads both.
import express, { type Request, type Router } from 'express';
import { INSTANCE_HEADER } from '../peers/client.js';
import { DIGEST_PATH, PULL_PATH, type CaughtUpReport, type Reconciler } from '../peers/reconcile.js';
import { ApiError, methodNotAllowed, rejectInvalidUtf8 } from './errors.js';

/** A pull names bucket indexes only; 1 MiB holds far more than the 1024 buckets there are. */
export const PULL_BODY_LIMIT_BYTES = 1_048_576;

export function reconcileEndpoints(reconciler: Reconciler, digestBuckets: number): (router: Router) => void {
  return (router) => {
    router.get(DIGEST_PATH, (req, res) => {
      res.json(reconciler.digest(req.query.root !== '1', caughtUpReport(req)));
    });
    router.all(DIGEST_PATH, methodNotAllowed('GET'));

    router.post(PULL_PATH, express.json({ limit: PULL_BODY_LIMIT_BYTES, type: () => true, verify: rejectInvalidUtf8 }), (req, res) => {
      const buckets = (req.body as { buckets?: unknown } | null)?.buckets;
      if (!Array.isArray(buckets)) throw new ApiError(400, 'invalid_pull', 'the body must be {"buckets": [bucket index, ...]}');
      const wanted = new Set<number>();
      for (const [index, bucket] of buckets.entries()) {
        if (typeof bucket !== 'number' || !Number.isInteger(bucket) || bucket < 0 || bucket >= digestBuckets) {
          throw new ApiError(400, 'invalid_bucket', `bucket ${index} must be an integer in [0, ${digestBuckets})`, { index });
        }
        wanted.add(bucket);
      }
      res.json({ changes: reconciler.pull([...wanted]) });
    });
    router.all(PULL_PATH, methodNotAllowed('POST'));
  };
}

/** An instance ID as replicas make them (a UUID), with room to spare. */
const INSTANCE_MAX_LENGTH = 128;

/**
 * `?caughtUpTo=<ms>&digestOf=<instance>`: the requester has caught up on the table of replica
 * `digestOf` as of that digest's asOfMs (Reconciler.caughtUpThrough; a report meant for another
 * instance, this address's replica before a restart, is ignored). The requester is named by its instance header, which
 * every routesync peer request carries. Malformed, it is a 400 and nothing is recorded.
 */
function caughtUpReport(req: Request): CaughtUpReport | undefined {
  const raw = req.query.caughtUpTo;
  if (raw === undefined) {
    if (req.query.digestOf === undefined) return undefined;
    throw new ApiError(400, 'invalid_query', 'digestOf is part of a caught-up report: give it with caughtUpTo, or neither', { field: 'digestOf' });
  }
  if (typeof raw !== 'string' || !/^(0|[1-9][0-9]{0,15})$/.test(raw) || !Number.isSafeInteger(Number(raw))) {
    throw new ApiError(400, 'invalid_query', 'caughtUpTo must be given once, as a time in ms (a non-negative integer)', { field: 'caughtUpTo' });
  }
  const instance = instanceId(req.get(INSTANCE_HEADER), INSTANCE_HEADER, `the ${INSTANCE_HEADER} header`, 'naming the replica that caught up');
  const digestOf = instanceId(req.query.digestOf, 'digestOf', 'digestOf, given once', 'naming the instance whose digest it was');
  return { instance, caughtUpToMs: Number(raw), digestOf };
}

/** An instance ID a caught-up report names (1 to INSTANCE_MAX_LENGTH characters), or a 400 saying which is wrong. */
function instanceId(value: unknown, field: string, what: string, role: string): string {
  if (typeof value === 'string' && value !== '' && value.length <= INSTANCE_MAX_LENGTH) return value;
  throw new ApiError(400, 'invalid_query', `caughtUpTo needs ${what} (1 to ${INSTANCE_MAX_LENGTH} characters) ${role}`, { field });
}
