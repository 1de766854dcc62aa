// Reading routesync's Prometheus text exposition (GET /metrics on the peer API) in benchmarks.

export interface MetricSample {
  /** The label set as written between the braces (`result="ok"`), '' for an unlabelled metric. */
  readonly labels: string;
  readonly value: number;
}

/** Every sample of metric `name` (exact name, any labels), in the order exposed. */
export function metricSamples(text: string, name: string): MetricSample[] {
  const pattern = new RegExp(`^${name}(?:\\{([^}]*)\\})? ([0-9.eE+-]+|NaN)$`, 'gm');
  return [...text.matchAll(pattern)].map((match) => ({ labels: match[1] ?? '', value: Number(match[2]) }));
}

/** The first sample's value (an unlabelled gauge or counter), or null when the metric is absent. */
export function metricValue(text: string, name: string): number | null {
  return metricSamples(text, name)[0]?.value ?? null;
}

/** The sum over every label set (a counter's total), 0 when the metric is absent. */
export function metricTotal(text: string, name: string): number {
  return metricSamples(text, name).reduce((sum, sample) => sum + sample.value, 0);
}
