// Several models at once (issue 15): each configured model has its own pool and settings, requests go to
// the right one (its id, and its embedding width: tiny 128, tiny-wide 192), a lazy pool starts on its
// first request, an idle pool scales to zero and restarts on demand, /v1/models reports context length
// and state, and a config whose warm pools cannot fit the memory budget is refused before anything starts.
import t from 'tap';
import { startTestNode, until, type TestNode } from './fixture.ts';
import { isPhantomaError } from '../../src/errors.ts';

const n: TestNode = await startTestNode({
  models: [
    { name: 'tiny', builtin: 'tiny', pool: { size: 1 } },
    { name: 'wide', builtin: 'tiny-wide', pool: { size: 1, contextSize: 1024, load: 'lazy', idleSeconds: 2 } },
  ],
});
t.teardown(() => n.close());
const wide = n.node.models.find((m) => m.name === 'wide')!.pool;

async function models(): Promise<Record<string, any>> {
  const res = await fetch(n.url + '/v1/models', { headers: { authorization: `Bearer ${n.apiKey}` } });
  const body = (await res.json()) as { data: any[] };
  return Object.fromEntries(body.data.map((m) => [m.id, m]));
}

async function embed(model: string): Promise<{ model: string; width: number }> {
  const res = await n.post('/v1/embeddings', { model, input: 'which model am I' });
  const body = (await res.json()) as any;
  if (res.status !== 200) throw new Error(JSON.stringify(body));
  return { model: body.model, width: body.data[0].embedding.length };
}

t.test('/v1/models lists both with their context length, width and state; the lazy one has no worker yet', async (t) => {
  const m = await models();
  t.match(m.tiny, { object: 'model', context_length: 2048, embedding_length: 128, state: 'ready' });
  t.match(m.wide, { object: 'model', context_length: 1024, embedding_length: 192, state: 'idle' });
  t.equal(wide.workers().length, 0, 'lazy: no worker before the first request');
  t.same(await (await fetch(n.url + '/readyz')).json(), { ready: true }, 'an idle pool does not make the node unready');
});

t.test('requests go to the right model: its id and its embedding width', async (t) => {
  t.same(await embed('tiny'), { model: 'tiny', width: 128 });
  t.same(await embed('wide'), { model: 'wide', width: 192 }, 'the lazy pool started on demand');
  const chat = (await (await n.post('/v1/chat/completions', { model: 'wide', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, seed: 1 })).json()) as any;
  t.equal(chat.model, 'wide');
  t.equal(chat.usage.completion_tokens, 4);
  const tooLong = await n.post('/v1/chat/completions', { model: 'wide', messages: [{ role: 'user', content: 'hi' }], max_tokens: 1500 });
  t.equal(tooLong.status, 400, "wide's own context (1024) applies");
  t.equal(((await tooLong.json()) as any).error.code, 'context_length_exceeded');
});

t.test('an idle pool scales to zero and restarts on demand', async (t) => {
  await until(() => wide.workers().length === 0 && wide.state() === 'idle', 30_000, 'the wide pool to scale to zero');
  t.equal((await models()).wide.state, 'idle');
  t.same(await embed('wide'), { model: 'wide', width: 192 }, 'served again after scaling to zero');
  t.ok(['ready', 'starting'].includes(wide.state()));
});

t.test('a config whose warm pools do not fit the memory budget is refused, with each model in the message', async (t) => {
  const err = await startTestNode({ inference: { threads: 1, contextSize: 2048, memoryBudgetBytes: 64 << 20 } }).catch((e: unknown) => e);
  t.ok(isPhantomaError(err), String(err));
  t.equal((err as { code: string }).code, 'memory_budget_exceeded');
  t.match((err as Error).message, /tiny: \d+ MiB weights \+ 2 × \d+ MiB per worker/);
  const threads = await startTestNode({ models: [{ name: 'tiny', builtin: 'tiny', pool: { threads: 64 } }] }).catch((e: unknown) => e);
  t.equal((threads as { code: string }).code, 'config_invalid', 'more threads than cores is refused');
});
