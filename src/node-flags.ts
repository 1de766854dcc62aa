// The V8 options routesync is launched with, everywhere it is launched for real: the container's
// ENTRYPOINT, `make run` and `npm start` use exactly these (test/unit/deploy.test.ts checks),
// and the benchmarks start routesync with them. They cannot be set from inside the process: V8
// sizes its heap when the isolate is created.
//
// --max-semi-space-size=8: V8's young generation may grow to two 16 MiB semi-spaces by default,
// and once grown it stays committed. Holding 100,000 routes (bench/ benchmark 5) RSS is
// ~148 MB with the default, ~132 MB with 8 and ~131 MB with 4 on Node 20 (~160, ~148 and ~142
// on Node 24, the container's); but a smaller young generation means more scavenges under load:
// with 4, benchmark 3's lifecycle rate was ~1.7 x the floor's, with 8 ~2.3 x and with the
// default ~2.3 x (3 runs each). 8 keeps both (docs/benchmarks.md, finding 5).
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=8'];
