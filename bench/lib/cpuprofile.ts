// V8 CPU profiles (node --cpu-prof) read as a call tree: the shapes of the file, the names the
// tools print frames under (package or source file), and a tree of total and self time per
// stack for flame graphs (bench/tools/flamegraph.ts) and summaries (bench/tools/profile-top.ts).

export interface CallFrame {
  readonly functionName: string;
  readonly url: string;
  readonly lineNumber: number;
}

export interface ProfileNode {
  readonly id: number;
  readonly callFrame: CallFrame;
  readonly children?: readonly number[];
}

export interface CpuProfile {
  readonly nodes: readonly ProfileNode[];
  readonly samples: readonly number[];
  readonly timeDeltas: readonly number[];
  readonly startTime: number;
  readonly endTime: number;
}

/** A frame of the call tree: time in it and below it (`totalUs`), and in it alone (`selfUs`). */
export interface StackNode {
  readonly name: string;
  /** Package, Node.js module group or source file (`groupOf`); the flame graph colours by it. */
  readonly group: string;
  selfUs: number;
  totalUs: number;
  readonly children: StackNode[];
}

/** `src/peers/fanout.ts`, `undici/lib/core/util.js`, `node:events`: a URL without the machine's paths. */
export function shortenUrl(url: string): string {
  const nm = url.lastIndexOf('node_modules/');
  if (nm >= 0) return url.slice(nm + 'node_modules/'.length);
  const src = url.search(/\/(src|dist)\//);
  return src >= 0 ? url.slice(src + 1) : url.replace(/^file:\/\//, '');
}

/** The package (`undici`, `@scope/name`), `node:internal`, another `node:` module, a source file, or V8's own `(garbage collector)` etc. */
export function groupOf(frame: CallFrame): string {
  const { url, functionName } = frame;
  if (url === '') return functionName.startsWith('(') ? functionName : '(native)';
  const nm = url.lastIndexOf('node_modules/');
  if (nm >= 0) {
    const rest = url.slice(nm + 'node_modules/'.length).split('/');
    return rest[0]!.startsWith('@') ? `${rest[0]}/${rest[1]}` : rest[0]!;
  }
  if (url.startsWith('node:')) return url.split('/')[0]!.replace(/^node:internal.*/, 'node:internal');
  return shortenUrl(url);
}

/** `send src/peers/fanout.ts:330`: what a frame is printed as. */
export function frameName(frame: CallFrame): string {
  return `${frame.functionName || '(anonymous)'} ${shortenUrl(frame.url)}${frame.url ? `:${frame.lineNumber + 1}` : ''}`.trim();
}

/** Self time per profile node id, summed from the samples. */
export function selfTimes(profile: CpuProfile): Map<number, number> {
  const selfUs = new Map<number, number>();
  profile.samples.forEach((id, i) => selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0)));
  return selfUs;
}

/** The profile without its samples of the first `skipUs` (start-up: module loading, compilation). */
export function skipStart(profile: CpuProfile, skipUs: number): CpuProfile {
  let at = 0;
  let first = profile.samples.length;
  for (let i = 0; i < profile.samples.length; i++) {
    at += profile.timeDeltas[i] ?? 0;
    if (at >= skipUs) {
      first = i;
      break;
    }
  }
  return { ...profile, samples: profile.samples.slice(first), timeDeltas: profile.timeDeltas.slice(first), startTime: profile.startTime + Math.min(at, skipUs) };
}

/**
 * The profile as a call tree rooted at one `all` node, siblings with the same name merged.
 * Top-level frames named in `drop` (`(idle)` by default: time spent waiting in the event loop)
 * are left out, so widths are shares of the time the thread was busy.
 */
export function callTree(profile: CpuProfile, drop: ReadonlySet<string> = new Set(['(idle)'])): StackNode {
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const selfUs = selfTimes(profile);
  const root: StackNode = { name: 'all', group: 'all', selfUs: 0, totalUs: 0, children: [] };
  // V8's own root node is `(root)`: its children are the top-level frames.
  const v8Root = profile.nodes.find((node) => node.callFrame.functionName === '(root)') ?? profile.nodes[0];
  if (!v8Root) return root;
  const visit = (id: number, parent: StackNode, depth: number): void => {
    const node = byId.get(id);
    if (!node) return;
    const name = frameName(node.callFrame);
    if (depth === 0 && drop.has(name)) return;
    let child = parent.children.find((candidate) => candidate.name === name);
    if (!child) {
      child = { name, group: groupOf(node.callFrame), selfUs: 0, totalUs: 0, children: [] };
      parent.children.push(child);
    }
    child.selfUs += selfUs.get(id) ?? 0;
    for (const next of node.children ?? []) visit(next, child, depth + 1);
  };
  for (const id of v8Root.children ?? []) visit(id, root, 0);
  sumTotals(root);
  return root;
}

function sumTotals(node: StackNode): number {
  let total = node.selfUs;
  for (const child of node.children) total += sumTotals(child);
  node.totalUs = total;
  return total;
}

/**
 * Brendan Gregg's folded-stack format, one line per stack with self time: `a;b;c 1234` (µs).
 * speedscope, inferno and flamegraph.pl all read it.
 */
export function foldedStacks(root: StackNode): string[] {
  const lines: string[] = [];
  const walk = (node: StackNode, path: string): void => {
    // Frame names never contain ';' in practice; a URL could, so it is replaced.
    const here = path === '' ? node.name.replaceAll(';', ',') : `${path};${node.name.replaceAll(';', ',')}`;
    if (node.selfUs > 0) lines.push(`${here} ${Math.round(node.selfUs)}`);
    for (const child of node.children) walk(child, here);
  };
  for (const child of root.children) walk(child, '');
  return lines;
}
