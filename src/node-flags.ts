// The V8 options routesync is launched with, everywhere it is launched for real: the container's
// ENTRYPOINT, `make run` and `npm start` use exactly these (test/unit/deploy.test.ts checks),
// and the benchmarks start routesync with them. They cannot be set from inside the process: V8
// sizes its heap when the isolate is created.
//
// --max-semi-space-size=4: V8's young generation may grow to two 16 MiB semi-spaces by default,
// and once grown it stays committed. routesync's allocation is short-lived and small (a change,
// a request), so a 4 MiB semi-space costs little: holding 100,000 routes RSS went from 162.7 MB
// to 136.8 MB in one measurement (bench/ benchmark 5; docs/benchmarks.md has the runs).
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=4'];
