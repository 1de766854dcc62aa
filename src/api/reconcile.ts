// The reconciliation endpoints of the peer API (registered through createPeerApp's `extend`,
// so they sit behind the peer token like every other peer endpoint):
//   GET  /v1/peer/digest[?root=1]  {"instance", "buckets", "root", "digests"?, "routes", "fences", "suspect", "seeded", "bootstrapping"}
//   POST /v1/peer/pull             {"buckets": [i, ...]} -> {"changes": [route | dead route, ...]}
// Routes travel whole (tokens included: this is the peer API) and fences as `dead` routes with
// `fencedAtMs`, exactly as a push carries them, so parseChange reads both.
import express, { type Router } from 'express';
import { DIGEST_PATH, PULL_PATH, type Reconciler } from '../peers/reconcile.js';
import { ApiError, methodNotAllowed, rejectInvalidUtf8 } from './errors.js';

/** A pull names bucket indexes only; 1 MiB holds far more than the 1024 buckets there are. */
export const PULL_BODY_LIMIT_BYTES = 1_048_576;

export function reconcileEndpoints(reconciler: Reconciler, digestBuckets: number): (router: Router) => void {
  return (router) => {
    router.get(DIGEST_PATH, (req, res) => {
      res.json(reconciler.digest(req.query.root !== '1'));
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
