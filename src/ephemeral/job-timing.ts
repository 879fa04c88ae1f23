// A job's clock inside the worker: from the job's arrival, when the input went to the model, its first
// and last token. The done message reports the job's times and the model's own share of them (the rest is
// the node's: reading the job, a sealed body's opening), which the gateway logs and observes.

export interface JobTimes {
  /** Job read to first generated text. */
  firstTokenMs: number | null;
  /** Input handed to the model to its first generated text (the prompt's evaluation). */
  promptEvalMs: number | null;
  /** Input handed to the model to its last generated text. */
  modelMs: number | null;
  /** Job read to now. */
  generateMs: number;
}

export interface JobTiming {
  /** The input goes to the model now. */
  modelStarts(): void;
  /** The model produced text now. */
  token(): void;
  times(): JobTimes;
}

export function startJobTiming(now: () => number = () => performance.now()): JobTiming {
  const jobStart = now();
  let modelStart: number | undefined;
  let first: number | undefined;
  let last: number | undefined;
  return {
    modelStarts: () => void (modelStart = now()),
    token: () => {
      last = now();
      first ??= last;
    },
    times: () => ({
      firstTokenMs: first === undefined ? null : first - jobStart,
      promptEvalMs: first === undefined || modelStart === undefined ? null : first - modelStart,
      modelMs: last === undefined || modelStart === undefined ? null : last - modelStart,
      generateMs: now() - jobStart,
    }),
  };
}
