// Statistics shared by the benchmarks: quantiles, a bootstrap interval for the median, a trimmed mean.
export const quantile = (xs: readonly number[], f: number): number => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(f * xs.length))]!;

/** A 95 % interval for the median of `xs`: resampled with a fixed seed, so a run's report is reproducible. */
export function bootstrapMedian(xs: readonly number[], rounds = 4000): [number, number] {
  let seed = 0x9e3779b9;
  const rand = (): number => (seed = (Math.imul(seed ^ (seed >>> 15), 0x2c1b3c6d) + 0x6d2b79f5) >>> 0) / 2 ** 32;
  const medians = Array.from({ length: rounds }, () => quantile(Array.from({ length: xs.length }, () => xs[Math.floor(rand() * xs.length)]!), 0.5));
  return [quantile(medians, 0.025), quantile(medians, 0.975)];
}

/** The mean of what is left after cutting `cut` of the values off each end. */
export function trimmedMean(xs: readonly number[], cut: number): number {
  const kept = [...xs].sort((a, b) => a - b).slice(Math.floor(xs.length * cut), Math.ceil(xs.length * (1 - cut)));
  return kept.reduce((a, b) => a + b, 0) / kept.length;
}

/** What sealed-e2e reports for a set of (plain, sealed) pairs. */
export function pairedReport(plain: readonly number[], sealed: readonly number[]) {
  const diffs = sealed.map((s, i) => s - plain[i]!);
  return {
    pairCount: diffs.length,
    plainP50Ms: quantile(plain, 0.5),
    sealedP50Ms: quantile(sealed, 0.5),
    /** The figure read literally: sealed p50 minus plain p50. */
    p50DifferenceMs: quantile(sealed, 0.5) - quantile(plain, 0.5),
    /** Per pair (sealed minus the plain request just before it). */
    addedP50Ms: quantile(diffs, 0.5),
    addedP50Ci95Ms: bootstrapMedian(diffs),
    addedTrimmedMeanMs: trimmedMean(diffs, 0.25),
    addedP95Ms: quantile(diffs, 0.95),
  };
}
