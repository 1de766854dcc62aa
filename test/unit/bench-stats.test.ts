// The statistics every benchmark result is written with (bench/lib/stats.ts).
import { describe, expect, it } from 'vitest';
import { spread } from '../../bench/lib/stats.js';

describe('spread', () => {
  it('keeps every run at three decimals, the first runs included', () => {
    // Each run was once rounded to its own index's digits (map passes the index): 2, 1.6, 1.52.
    const result = spread([1.56312, 1.56634, 1.52291, 1.51449, 1.54321]);
    expect(result.runs).toEqual([1.563, 1.566, 1.523, 1.514, 1.543]);
    expect(result).toMatchObject({ median: 1.543, min: 1.514, max: 1.566 });
  });
});
