// A flame graph of a call tree (bench/lib/cpuprofile.ts) as one self-contained SVG: no script,
// each frame's name, time and share in its tooltip. Frames are coloured by what they belong to
// (the profiled server's own code, the HTTP framework, undici, p-retry/p-limit, Node.js, GC), and a legend
// gives each colour's share of the busy time, so the picture answers "where does a call's time
// go" at a glance; a frame narrower than `minWidthPx` is left out (its time stays in its parent).
import type { StackNode } from './cpuprofile.js';

export interface FlameGraphOptions {
  readonly title: string;
  /** A second line under the title (what was profiled). */
  readonly subtitle?: string;
  readonly widthPx?: number;
  readonly minWidthPx?: number;
}

/** What a frame is coloured as, from its group (`groupOf`). */
export type FrameKind = 'own code' | 'framework' | 'undici' | 'retry and cap' | 'metrics and logs' | 'proxy' | 'node' | 'native' | 'gc' | 'v8';

const FRAMEWORK = new Set([
  'express',
  'router',
  'body-parser',
  'raw-body',
  'type-is',
  'content-type',
  'finalhandler',
  'parseurl',
  'mime-types',
  'mime-db',
  'on-finished',
  'iconv-lite',
  'debug',
  'path-to-regexp',
  'send',
  'serve-static',
  'qs',
  'statuses',
  'http-errors',
  'depd',
  'media-typer',
  'negotiator',
  'accepts',
  'encodeurl',
  'escape-html',
  'fresh',
  'cookie',
  'vary',
  'merge-descriptors',
  'utils-merge',
  'etag',
  'range-parser',
]);

const HUES: Record<FrameKind, [number, number]> = {
  'own code': [120, 50],
  framework: [30, 80],
  undici: [210, 60],
  'retry and cap': [275, 45],
  'metrics and logs': [330, 50],
  proxy: [175, 55],
  node: [50, 65],
  native: [20, 30],
  gc: [0, 75],
  v8: [0, 0],
};

export function frameKind(group: string): FrameKind {
  if (group === '(garbage collector)') return 'gc';
  // `(native)`: C++ called from JavaScript, syscalls such as a socket's writev among them.
  if (group === '(native)') return 'native';
  if (group.startsWith('(')) return 'v8';
  if (group.startsWith('node:') || group.startsWith('wasm:')) return 'node';
  if (group === 'undici') return 'undici';
  if (group === 'p-retry' || group === 'p-limit' || group === 'yocto-queue' || group === 'is-network-error') return 'retry and cap';
  if (group === 'prom-client' || group.startsWith('pino') || group === '@pinojs/redact' || group === 'sonic-boom' || group === 'tdigest' || group === 'bintrees') {
    return 'metrics and logs';
  }
  if (group === 'http-proxy-3') return 'proxy';
  if (FRAMEWORK.has(group)) return 'framework';
  // routesync's src/ or dist/, or a contender's file under bench/.
  if (/(^|\/)(src|dist|bench)\//.test(group)) return 'own code';
  return 'v8';
}

const FRAME_HEIGHT = 16;
const TOP = 58;

export function renderFlameGraph(root: StackNode, options: FlameGraphOptions): string {
  const width = options.widthPx ?? 1200;
  const minWidth = options.minWidthPx ?? 0.5;
  const scale = root.totalUs > 0 ? width / root.totalUs : 0;
  const depth = maxDepth(root, scale, minWidth);
  const height = TOP + (depth + 1) * FRAME_HEIGHT + 8;
  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="Verdana, sans-serif" font-size="11">`,
    `<rect width="${width}" height="${height}" fill="#fdfdf8"/>`,
    `<text x="4" y="16" font-size="14">${escapeXml(options.title)}</text>`,
  );
  if (options.subtitle) out.push(`<text x="4" y="32" fill="#555">${escapeXml(options.subtitle)}</text>`);
  out.push(legend(root, 44));
  // Classic orientation: the root at the bottom, callees stacked above their callers.
  const place = (node: StackNode, x: number, level: number): void => {
    const w = node.totalUs * scale;
    if (w < minWidth) return;
    const y = height - 8 - (level + 1) * FRAME_HEIGHT;
    const share = root.totalUs > 0 ? (100 * node.totalUs) / root.totalUs : 0;
    const label = fitLabel(node.name, w);
    out.push(
      `<g><title>${escapeXml(`${node.name} — ${(node.totalUs / 1000).toFixed(1)} ms, ${share.toFixed(2)} % (self ${(node.selfUs / 1000).toFixed(1)} ms)`)}</title>` +
        `<rect x="${x.toFixed(2)}" y="${y}" width="${Math.max(w - 0.5, 0.1).toFixed(2)}" height="${FRAME_HEIGHT - 1}" fill="${colour(node)}"/>` +
        (label ? `<text x="${(x + 3).toFixed(2)}" y="${y + 11.5}">${escapeXml(label)}</text>` : '') +
        '</g>',
    );
    let childX = x;
    for (const child of [...node.children].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))) {
      place(child, childX, level + 1);
      childX += child.totalUs * scale;
    }
  };
  place(root, 0, 0);
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}

/** Self time per frame kind, as a share of everything under `root`; kinds under 0.05 % are left out. */
export function kindShares(root: StackNode): Map<FrameKind, number> {
  const shares = new Map<FrameKind, number>();
  const walk = (node: StackNode): void => {
    if (node !== root) {
      const kind = frameKind(node.group);
      shares.set(kind, (shares.get(kind) ?? 0) + node.selfUs);
    }
    for (const child of node.children) walk(child);
  };
  walk(root);
  if (root.totalUs > 0) for (const [kind, us] of shares) shares.set(kind, us / root.totalUs);
  for (const [kind, share] of shares) if (!(share >= 0.0005)) shares.delete(kind);
  return shares;
}

function legend(root: StackNode, y: number): string {
  const parts: string[] = [];
  let x = 4;
  for (const [kind, share] of [...kindShares(root)].sort((a, b) => b[1] - a[1])) {
    const [hue, saturation] = HUES[kind];
    const text = `${kind} ${(100 * share).toFixed(1)} %`;
    parts.push(`<rect x="${x}" y="${y - 9}" width="10" height="10" fill="hsl(${hue}, ${saturation}%, 60%)"/><text x="${x + 14}" y="${y}">${escapeXml(text)}</text>`);
    x += 24 + text.length * 6.6;
  }
  return parts.join('');
}

function maxDepth(node: StackNode, scale: number, minWidth: number): number {
  let deepest = 0;
  for (const child of node.children) {
    if (child.totalUs * scale >= minWidth) deepest = Math.max(deepest, 1 + maxDepth(child, scale, minWidth));
  }
  return deepest;
}

/** Hue by kind, lightness varied by name so neighbours of one kind stay apart. */
function colour(node: StackNode): string {
  if (node.group === 'all') return 'hsl(0, 0%, 82%)';
  const [hue, saturation] = HUES[frameKind(node.group)];
  let hash = 0;
  for (let i = 0; i < node.name.length; i++) hash = (hash * 31 + node.name.charCodeAt(i)) >>> 0;
  return `hsl(${hue}, ${saturation}%, ${52 + (hash % 20)}%)`;
}

/** As much of the name as fits in `widthPx` at ~6.6 px a character, with '..' when cut; '' below three characters. */
function fitLabel(name: string, widthPx: number): string {
  const chars = Math.floor((widthPx - 6) / 6.6);
  if (chars < 3) return '';
  return name.length <= chars ? name : `${name.slice(0, chars - 2)}..`;
}

function escapeXml(text: string): string {
  return text.replace(/[<>&"']/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', '"': '&quot;', "'": '&apos;' })[c]!);
}
