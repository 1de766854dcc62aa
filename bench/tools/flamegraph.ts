// A flame graph of a V8 CPU profile (node --cpu-prof, `npm run bench -- --profile`,
// cpu-per-call.ts --profile, compare-builds.ts --profile) as a self-contained SVG, and
// optionally the same stacks in folded form for speedscope, inferno or flamegraph.pl.
// Time waiting in the event loop, `(idle)`, is left out: widths are shares of busy time.
//
//   node --import tsx bench/tools/flamegraph.ts FILE.cpuprofile [--out FILE.svg] [--folded FILE.txt]
//                                               [--title TEXT] [--subtitle TEXT] [--min-width PX] [--skip S]
//
// --out defaults to FILE.svg beside the profile. --skip leaves out the first S seconds (the
// server's start-up, when the profile began with the process).
import { readFileSync, writeFileSync } from 'node:fs';
import { basename } from 'node:path';
import { parseArgs } from 'node:util';
import { callTree, foldedStacks, skipStart, type CpuProfile } from '../lib/cpuprofile.js';
import { kindShares, renderFlameGraph } from '../lib/flamegraph.js';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    out: { type: 'string' },
    folded: { type: 'string' },
    title: { type: 'string' },
    subtitle: { type: 'string' },
    'min-width': { type: 'string', default: '0.5' },
    skip: { type: 'string', default: '0' },
  },
});
const file = positionals[0];
if (file === undefined || positionals.length > 1) {
  process.stderr.write('usage: node --import tsx bench/tools/flamegraph.ts FILE.cpuprofile [--out FILE.svg] [--folded FILE.txt] [--title TEXT]\n');
  process.exit(2);
}

const profile = skipStart(JSON.parse(readFileSync(file, 'utf8')) as CpuProfile, Number(values.skip) * 1e6);
const tree = callTree(profile);
const seconds = (profile.endTime - profile.startTime) / 1e6;
const out = values.out ?? file.replace(/\.cpuprofile$/, '') + '.svg';
writeFileSync(
  out,
  renderFlameGraph(tree, {
    title: values.title ?? basename(file),
    subtitle:
      values.subtitle ??
      `${(tree.totalUs / 1e6).toFixed(2)} s busy of ${seconds.toFixed(1)} s profiled (idle left out${Number(values.skip) > 0 ? `, the first ${values.skip} s skipped` : ''}); hover a frame for its time`,
    minWidthPx: Number(values['min-width']),
  }),
);
if (values.folded !== undefined) writeFileSync(values.folded, `${foldedStacks(tree).join('\n')}\n`);
const shares = [...kindShares(tree)]
  .sort((a, b) => b[1] - a[1])
  .map(([kind, share]) => `${kind} ${(100 * share).toFixed(1)} %`);
process.stdout.write(`${out}: ${(tree.totalUs / 1e6).toFixed(2)} s busy; ${shares.join(', ')}\n`);
if (values.folded !== undefined) process.stdout.write(`${values.folded}: folded stacks (µs)\n`);
