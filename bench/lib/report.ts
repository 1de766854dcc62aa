// What every benchmark returns, and how it is printed: a plain-text table on the terminal and
// the same table in Markdown for docs/benchmarks.md.
import type { Spread } from './stats.js';

export interface SuiteContext {
  /** Fewer calls, shorter windows: a smoke run, not figures to quote. */
  readonly quick: boolean;
  /** Repetitions of each measurement (median and spread are over these). */
  readonly runs: number;
  /** Start routesync with --cpu-prof (profiles under bench/results/profiles/). */
  readonly profile: boolean;
  /** Run routesync from src/ through tsx even when dist/ is up to date. */
  readonly forceTsx: boolean;
  readonly log: (line: string) => void;
}

export interface TargetCheck {
  readonly description: string;
  /** The measured figure (a median across runs), or null when it could not be measured. */
  readonly value: number | null;
  /** The target, as text ("≤ 1.25"). */
  readonly target: string;
  /** null: not evaluated (for example the data plane is not wired yet). */
  readonly met: boolean | null;
  readonly note?: string;
}

export interface SuiteResult {
  /** File name under bench/results/. */
  readonly name: string;
  readonly number: number;
  readonly title: string;
  readonly method: string;
  readonly config: Record<string, unknown>;
  /** Per-run raw figures. */
  readonly runs: readonly unknown[];
  /** Every headline figure: median and spread across runs. */
  readonly summary: Record<string, Spread>;
  readonly targets: readonly TargetCheck[];
  /** Header row first. */
  readonly table: readonly (readonly string[])[];
  readonly notes: readonly string[];
}

export function textTable(rows: readonly (readonly string[])[]): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  const line = (row: readonly string[]) => row.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ');
  const [header, ...body] = rows;
  if (!header) return '';
  return [line(header), widths.map((width) => '-'.repeat(width)).join('  '), ...body.map(line)].join('\n');
}

export function markdownTable(rows: readonly (readonly string[])[]): string {
  const [header, ...body] = rows;
  if (!header) return '';
  const line = (row: readonly string[]) => `| ${row.map((cell) => cell.replaceAll('|', '\\|')).join(' | ')} |`;
  return [line(header), `|${header.map((_, i) => (i === 0 ? ' --- ' : ' ---: ')).join('|')}|`, ...body.map(line)].join('\n');
}

export function targetLine(target: TargetCheck): string {
  const verdict = target.met === null ? 'NOT EVALUATED' : target.met ? 'met' : 'MISSED';
  const value = target.value === null ? 'n/a' : String(target.value);
  return `${verdict.padEnd(13)} ${target.description}: ${value} (target ${target.target})${target.note ? ` — ${target.note}` : ''}`;
}
