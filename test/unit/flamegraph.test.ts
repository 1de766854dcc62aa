// The flame graph tool's reading of a CPU profile: what it merges, drops and sums, the folded
// stacks it writes, and that the SVG's frames are as wide as their share of busy time.
import { describe, expect, it } from 'vitest';
import { callTree, foldedStacks, skipStart, type CpuProfile, type ProfileNode } from '../../bench/lib/cpuprofile.js';
import { frameKind, kindShares, renderFlameGraph } from '../../bench/lib/flamegraph.js';

const frame = (functionName: string, url = '', lineNumber = 0) => ({ functionName, url, lineNumber });

/**
 * A profile of 1 ms at one sample per 100 µs: idle 400 µs; express's `handle` 100 µs of its own,
 * in two V8 nodes of the same frame, calling routesync's `send` (300 µs) and undici's `request`
 * (100 µs, and a second node of it never sampled); the garbage collector 100 µs.
 */
function profile(): CpuProfile {
  const express = 'file:///app/node_modules/express/lib/application.js';
  const nodes: ProfileNode[] = [
    { id: 1, callFrame: frame('(root)'), children: [2, 3, 7, 8] },
    { id: 2, callFrame: frame('(idle)') },
    { id: 3, callFrame: frame('handle', express, 152), children: [4, 5, 6] },
    { id: 4, callFrame: frame('send', 'file:///app/dist/peers/fanout.js', 330) },
    { id: 5, callFrame: frame('request', 'file:///app/node_modules/undici/lib/api/api-request.js', 190) },
    { id: 6, callFrame: frame('request', 'file:///app/node_modules/undici/lib/api/api-request.js', 190) },
    { id: 7, callFrame: frame('handle', express, 152) },
    { id: 8, callFrame: frame('(garbage collector)') },
  ];
  const samples = [2, 2, 2, 2, 4, 4, 4, 5, 7, 8];
  return { nodes, samples, timeDeltas: samples.map(() => 100), startTime: 0, endTime: 1000 };
}

describe('flame graph', () => {
  it('merges frames of the same name under one parent, leaves out idle time and sums totals from self times', () => {
    const tree = callTree(profile());
    expect(tree.totalUs).toBe(600);
    expect(tree.children.map((child) => [child.name, child.totalUs, child.selfUs])).toEqual([
      ['handle express/lib/application.js:153', 500, 100],
      ['(garbage collector)', 100, 100],
    ]);
    const handle = tree.children[0]!;
    expect(handle.group).toBe('express');
    expect(handle.children.map((child) => [child.name, child.group, child.totalUs])).toEqual([
      ['send dist/peers/fanout.js:331', 'dist/peers/fanout.js', 300],
      ['request undici/lib/api/api-request.js:191', 'undici', 100],
    ]);
  });

  it('writes one folded line per stack with self time, in µs', () => {
    expect(foldedStacks(callTree(profile()))).toEqual([
      'handle express/lib/application.js:153 100',
      'handle express/lib/application.js:153;send dist/peers/fanout.js:331 300',
      'handle express/lib/application.js:153;request undici/lib/api/api-request.js:191 100',
      '(garbage collector) 100',
    ]);
  });

  it('draws each frame as wide as its share of busy time, with its time in the tooltip and the kinds in the legend', () => {
    const tree = callTree(profile());
    const svg = renderFlameGraph(tree, { title: 'a <test> & more', widthPx: 1200 });
    const widthOf = (name: string): number => {
      const match = new RegExp(`<title>${name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} — [^<]*</title><rect [^>]*width="([\\d.]+)"`).exec(svg);
      if (!match) throw new Error(`no frame ${name} in the SVG`);
      return Number(match[1]);
    };
    // 1200 px for 600 µs: 2 px per µs (less the half-pixel gap between frames).
    expect(widthOf('all')).toBeCloseTo(1199.5, 1);
    expect(widthOf('handle express/lib/application.js:153')).toBeCloseTo(999.5, 1);
    expect(widthOf('send dist/peers/fanout.js:331')).toBeCloseTo(599.5, 1);
    expect(widthOf('(garbage collector)')).toBeCloseTo(199.5, 1);
    expect(svg).toContain('send dist/peers/fanout.js:331 — 0.3 ms, 50.00 % (self 0.3 ms)');
    expect(svg).toContain('a &lt;test&gt; &amp; more');
    expect(svg).not.toContain('(idle)');
    expect([...kindShares(tree)]).toEqual([
      ['framework', 100 / 600],
      ['own code', 300 / 600],
      ['undici', 100 / 600],
      ['gc', 100 / 600],
    ]);
    expect(svg).toContain('own code 50.0 %');
  });

  it('leaves out frames narrower than the minimum width, keeping their time in the parent', () => {
    const svg = renderFlameGraph(callTree(profile()), { title: 't', widthPx: 120, minWidthPx: 30 });
    // 0.2 px per µs: send (60 px) stays, request (20 px) and GC (20 px) go.
    expect(svg).toContain('<title>send dist/peers/fanout.js:331');
    expect(svg).not.toContain('<title>request undici');
    expect(svg).not.toContain('<title>(garbage collector)');
  });

  it('can leave out the start of a profile', () => {
    // Samples are taken at 100, 200, … 1000 µs: skipping 550 µs drops the four idle ones and
    // one of send's three, keeping the last five (send ×2, request, handle, GC).
    const tree = callTree(skipStart(profile(), 550));
    expect(tree.totalUs).toBe(500);
    expect(foldedStacks(tree)).toEqual([
      'handle express/lib/application.js:153 100',
      'handle express/lib/application.js:153;send dist/peers/fanout.js:331 200',
      'handle express/lib/application.js:153;request undici/lib/api/api-request.js:191 100',
      '(garbage collector) 100',
    ]);
  });

  it('colours frames by what they belong to', () => {
    expect(frameKind('dist/peers/fanout.js')).toBe('own code');
    expect(frameKind('src/api/local.ts')).toBe('own code');
    expect(frameKind('work/main/bench/floor.ts')).toBe('own code');
    expect(frameKind('body-parser')).toBe('framework');
    expect(frameKind('p-retry')).toBe('retry and cap');
    expect(frameKind('prom-client')).toBe('metrics and logs');
    expect(frameKind('http-proxy-3')).toBe('proxy');
    expect(frameKind('node:internal')).toBe('node');
    expect(frameKind('(garbage collector)')).toBe('gc');
    expect(frameKind('(program)')).toBe('v8');
    expect(frameKind('(native)')).toBe('native');
  });
});
