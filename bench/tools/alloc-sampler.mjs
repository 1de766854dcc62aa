// Preloaded into a routesync process (`node --import bench/tools/alloc-sampler.mjs`) by
// bench/tools/cpu-per-call.ts --alloc: V8's sampling heap profiler with the objects that minor
// and major collections freed kept in, so the profile is of everything allocated (not only of
// what is still alive, which is what --heap-prof reports). Written as JSON to
// $ROUTESYNC_ALLOC_PROFILE when the process exits. Plain JavaScript: the build runs without tsx.
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector';
import process from 'node:process';

const target = process.env.ROUTESYNC_ALLOC_PROFILE;
if (target) {
  const session = new Session();
  session.connect();
  session.post('HeapProfiler.enable');
  session.post('HeapProfiler.startSampling', {
    samplingInterval: 4096,
    includeObjectsCollectedByMinorGC: true,
    includeObjectsCollectedByMajorGC: true,
  });
  // A same-thread inspector session answers synchronously, so this completes before exit.
  process.on('exit', () => {
    session.post('HeapProfiler.stopSampling', (error, result) => {
      if (!error) writeFileSync(target, JSON.stringify(result.profile));
    });
  });
}
