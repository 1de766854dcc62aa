// Summarize a V8 CPU profile (node --cpu-prof, bench --profile): the functions with the most
// self time, and the same grouped by package or source file, as text. Also reads a sampling
// heap profile (.heapprofile, from cpu-per-call.ts --alloc): bytes allocated instead of time,
// per call with --per N (N calls in the profiled window).
//
//   node --import tsx bench/tools/profile-top.ts bench/results/profiles/lifecycle-....cpuprofile [--top 30]
//   node --import tsx bench/tools/profile-top.ts bench/results/profiles/alloc-....heapprofile --per 3500
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { frameName, groupOf, selfTimes, type CallFrame, type CpuProfile } from '../lib/cpuprofile.js';

/** A sampling heap profile: a tree of call frames, each with the bytes allocated in it. */
interface HeapNode {
  readonly callFrame: CallFrame;
  readonly selfSize: number;
  readonly children: readonly HeapNode[];
}

/** Self time or bytes summed by function and by package or source file. */
class Tally {
  readonly byFunction = new Map<string, number>();
  readonly byGroup = new Map<string, number>();
  total = 0;

  add(frame: CallFrame, amount: number): void {
    const name = frameName(frame);
    this.byFunction.set(name, (this.byFunction.get(name) ?? 0) + amount);
    const where = groupOf(frame);
    this.byGroup.set(where, (this.byGroup.get(where) ?? 0) + amount);
    this.total += amount;
  }
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { top: { type: 'string', default: '30' }, per: { type: 'string' } },
});
const top = Number(values.top) || 30;
if (positionals.length === 0) {
  process.stderr.write('usage: node --import tsx bench/tools/profile-top.ts FILE.cpuprofile|FILE.heapprofile [--top N] [--per CALLS]\n');
  process.exit(2);
}

for (const file of positionals) {
  if (file.endsWith('.heapprofile')) {
    summarizeAllocations(file, Number(values.per ?? 1));
    continue;
  }
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const selfUs = selfTimes(profile);
  const totalUs = profile.endTime - profile.startTime;

  const tally = new Tally();
  for (const [id, us] of selfUs) tally.add(byId.get(id)!.callFrame, us);
  const ms = (us: number) => `${(us / 1000).toFixed(0).padStart(8)} ms`;
  process.stdout.write(`${file}: ${(totalUs / 1e6).toFixed(1)} s profiled, ${profile.samples.length} samples\n`);
  printTop('self time by group', tally.byGroup, totalUs, ms);
  printTop('self time by function', tally.byFunction, totalUs, ms);
}

function summarizeAllocations(file: string, per: number): void {
  const head = (JSON.parse(readFileSync(file, 'utf8')) as { head: HeapNode }).head;
  const tally = new Tally();
  const walk = (node: HeapNode) => {
    tally.add(node.callFrame, node.selfSize);
    for (const child of node.children) walk(child);
  };
  walk(head);
  const unit = per > 1 ? ' per call' : '';
  const kb = (bytes: number) => `${(bytes / per / 1024).toFixed(2).padStart(10)} KB`;
  process.stdout.write(`${file}: ${(tally.total / 1024 / 1024).toFixed(1)} MB allocated, ${(tally.total / per / 1024).toFixed(1)} KB${unit}\n`);
  printTop(`allocated${unit} by group`, tally.byGroup, tally.total, kb);
  printTop(`allocated${unit} by function`, tally.byFunction, tally.total, kb);
}

/** The `top` largest entries, each formatted and as a share of `total`. */
function printTop(title: string, entries: Map<string, number>, total: number, format: (amount: number) => string): void {
  process.stdout.write(`\n${title}\n`);
  for (const [name, amount] of [...entries].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    process.stdout.write(`${format(amount)} ${((100 * amount) / total).toFixed(1).padStart(5)}%  ${name}\n`);
  }
}
