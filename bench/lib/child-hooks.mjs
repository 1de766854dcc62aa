/* global process */
// Preloaded (node --import) into every process the benchmark starts, routesync included.
// Plain JavaScript so that routesync can run from dist/ without the tsx loader (whose own
// memory would distort benchmark 5).
//
// - When the benchmark driver goes away (its IPC channel closes), the child exits: no process
//   outlives a crashed or killed run.
// - {type: 'memory'} answers process.memoryUsage(), after two full collections when the child
//   runs with --expose-gc, so that heap figures count live objects, not garbage.
if (typeof process.send === 'function') {
  process.on('disconnect', () => process.exit(0));
  process.on('message', (message) => {
    if (message === null || typeof message !== 'object' || message.type !== 'memory') return;
    if (typeof globalThis.gc === 'function') {
      globalThis.gc();
      globalThis.gc();
    }
    process.send?.({ type: 'memory', id: message.id, usage: process.memoryUsage() });
  });
}
