// Summarize a V8 CPU profile (node --cpu-prof, bench --profile): the functions with the most
// self time, and the same grouped by package or source file, as text. Also reads a sampling
// heap profile (.heapprofile, from cpu-per-call.ts --alloc): bytes allocated instead of time,
// per call with --per N (N calls in the profiled window).
//
//   node --import tsx bench/tools/profile-top.ts bench/results/profiles/lifecycle-....cpuprofile [--top 30]
//   node --import tsx bench/tools/profile-top.ts bench/results/profiles/alloc-....heapprofile --per 3500
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

interface ProfileNode {
  readonly id: number;
  readonly callFrame: { readonly functionName: string; readonly url: string; readonly lineNumber: number };
  readonly children?: readonly number[];
}

/** A sampling heap profile: a tree of call frames, each with the bytes allocated in it. */
interface HeapNode {
  readonly callFrame: ProfileNode['callFrame'];
  readonly selfSize: number;
  readonly children: readonly HeapNode[];
}

interface Profile {
  readonly nodes: readonly ProfileNode[];
  readonly samples: readonly number[];
  readonly timeDeltas: readonly number[];
  readonly startTime: number;
  readonly endTime: number;
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
  const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const selfUs = new Map<number, number>();
  profile.samples.forEach((id, i) => selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0)));
  const totalUs = profile.endTime - profile.startTime;

  const byFunction = new Map<string, number>();
  const byGroup = new Map<string, number>();
  for (const [id, us] of selfUs) {
    const frame = byId.get(id)!.callFrame;
    const where = shorten(frame.url);
    const name = `${frame.functionName || '(anonymous)'} ${where}${frame.url ? `:${frame.lineNumber + 1}` : ''}`;
    byFunction.set(name, (byFunction.get(name) ?? 0) + us);
    byGroup.set(group(frame.url, frame.functionName), (byGroup.get(group(frame.url, frame.functionName)) ?? 0) + us);
  }
  const print = (title: string, entries: Map<string, number>) => {
    process.stdout.write(`\n${title}\n`);
    for (const [name, us] of [...entries].sort((a, b) => b[1] - a[1]).slice(0, top)) {
      process.stdout.write(`${(us / 1000).toFixed(0).padStart(8)} ms ${((100 * us) / totalUs).toFixed(1).padStart(5)}%  ${name}\n`);
    }
  };
  process.stdout.write(`${file}: ${(totalUs / 1e6).toFixed(1)} s profiled, ${profile.samples.length} samples\n`);
  print('self time by group', byGroup);
  print('self time by function', byFunction);
}

function summarizeAllocations(file: string, per: number): void {
  const head = (JSON.parse(readFileSync(file, 'utf8')) as { head: HeapNode }).head;
  const byFunction = new Map<string, number>();
  const byGroup = new Map<string, number>();
  let total = 0;
  const walk = (node: HeapNode) => {
    const frame = node.callFrame;
    const name = `${frame.functionName || '(anonymous)'} ${shorten(frame.url)}${frame.url ? `:${frame.lineNumber + 1}` : ''}`;
    byFunction.set(name, (byFunction.get(name) ?? 0) + node.selfSize);
    const where = group(frame.url, frame.functionName);
    byGroup.set(where, (byGroup.get(where) ?? 0) + node.selfSize);
    total += node.selfSize;
    for (const child of node.children) walk(child);
  };
  walk(head);
  const unit = per > 1 ? ' per call' : '';
  const print = (title: string, entries: Map<string, number>) => {
    process.stdout.write(`\n${title}\n`);
    for (const [name, bytes] of [...entries].sort((a, b) => b[1] - a[1]).slice(0, top)) {
      process.stdout.write(`${(bytes / per / 1024).toFixed(2).padStart(10)} KB ${((100 * bytes) / total).toFixed(1).padStart(5)}%  ${name}\n`);
    }
  };
  process.stdout.write(`${file}: ${(total / 1024 / 1024).toFixed(1)} MB allocated, ${(total / per / 1024).toFixed(1)} KB${unit}\n`);
  print(`allocated${unit} by group`, byGroup);
  print(`allocated${unit} by function`, byFunction);
}

function shorten(url: string): string {
  const nm = url.lastIndexOf('node_modules/');
  if (nm >= 0) return url.slice(nm + 'node_modules/'.length);
  const src = url.search(/\/(src|dist)\//);
  return src >= 0 ? url.slice(src + 1) : url.replace(/^file:\/\//, '');
}

function group(url: string, functionName: string): string {
  if (url === '') return functionName.startsWith('(') ? functionName : '(native)';
  const nm = url.lastIndexOf('node_modules/');
  if (nm >= 0) {
    const rest = url.slice(nm + 'node_modules/'.length).split('/');
    return rest[0]!.startsWith('@') ? `${rest[0]}/${rest[1]}` : rest[0]!;
  }
  if (url.startsWith('node:')) return url.split('/')[0]!.replace(/^node:internal.*/, 'node:internal');
  return shorten(url);
}
