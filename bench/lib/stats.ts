// Small statistics helpers: percentiles of one sample, and the median and spread of a figure
// across repeated runs.

/** Nearest-rank percentile (p in [0, 100]) of an unsorted sample; NaN for an empty one. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length, Math.max(1, Math.ceil((p / 100) * sorted.length)));
  return sorted[rank - 1]!;
}

export interface LatencySummary {
  readonly n: number;
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
  readonly max: number;
  readonly mean: number;
}

export function summarize(values: readonly number[]): LatencySummary {
  const mean = values.length === 0 ? Number.NaN : values.reduce((sum, value) => sum + value, 0) / values.length;
  return {
    n: values.length,
    p50: round(percentile(values, 50)),
    p90: round(percentile(values, 90)),
    p99: round(percentile(values, 99)),
    // reduce, not Math.max(...values): a sample can be larger than the call stack allows.
    max: round(values.length === 0 ? Number.NaN : values.reduce((most, value) => (value > most ? value : most), -Infinity)),
    mean: round(mean),
  };
}

/** A figure measured once per run: its median, and the spread (min and max) across runs. */
export interface Spread {
  readonly median: number;
  readonly min: number;
  readonly max: number;
  readonly runs: readonly number[];
}

export function spread(values: readonly number[]): Spread {
  const finite = values.filter((value) => Number.isFinite(value));
  if (finite.length === 0) return { median: Number.NaN, min: Number.NaN, max: Number.NaN, runs: values.map((value) => round(value)) };
  const sorted = [...finite].sort((a, b) => a - b);
  const middle = sorted.length >> 1;
  const median = sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
  return { median: round(median), min: round(sorted[0]!), max: round(sorted.at(-1)!), runs: values.map((value) => round(value)) };
}

/** Three significant decimals are plenty for milliseconds and ratios measured on a noisy machine. */
export function round(value: number, digits = 3): number {
  if (!Number.isFinite(value)) return value;
  const factor = 10 ** digits;
  return Math.round(value * factor) / factor;
}

/** `1.23 (1.10–1.40)`: a median with its spread across runs. */
export function formatSpread(value: Spread, digits = 2): string {
  if (!Number.isFinite(value.median)) return 'n/a';
  if (value.runs.length <= 1) return value.median.toFixed(digits);
  return `${value.median.toFixed(digits)} (${value.min.toFixed(digits)}–${value.max.toFixed(digits)})`;
}
