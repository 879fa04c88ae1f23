// The worker's job clock on a stepped clock: the model's share of the first-token and whole-job times.
import t from 'tap';
import { startJobTiming } from '../../src/ephemeral/job-timing.ts';

t.test('splits first-token and job time into the node\'s share and the model\'s', async (t) => {
  let now = 1000;
  const timing = startJobTiming(() => now);
  now += 2; // reading the job (a sealed body's opening)
  timing.modelStarts();
  now += 50; // the prompt's evaluation
  timing.token();
  now += 5;
  timing.token();
  now += 5;
  timing.token();
  now += 1; // the answer's end
  t.same(timing.times(), { firstTokenMs: 52, promptEvalMs: 50, modelMs: 60, generateMs: 63 });
});

t.test('a job that produced no text (embeddings, a failure before the model) has no model times', async (t) => {
  let now = 0;
  const none = startJobTiming(() => now);
  now = 7;
  t.same(none.times(), { firstTokenMs: null, promptEvalMs: null, modelMs: null, generateMs: 7 });
  const failed = startJobTiming(() => now);
  failed.modelStarts();
  now = 9;
  t.same(failed.times(), { firstTokenMs: null, promptEvalMs: null, modelMs: null, generateMs: 2 });
});
