// Issue 15 on the plaintext API, through a real node (warden-isolated one-shot workers, tiny model):
// structured output, tools with tool_calls (streamed too, and via the openai client's stream helper),
// role "tool" results, and /v1/embeddings (float, base64, the openai client's embeddings.create).
// The tiny model's weights are random: these tests check structure, never wisdom.
import t from 'tap';
import OpenAI from 'openai';
import { Ajv } from 'ajv';
import { startTestNode, parseSse, type TestNode } from './fixture.ts';
import { ORDER_SCHEMA_FOR_TESTS } from '../models/structured-schemas.ts';

const n: TestNode = await startTestNode({ gateway: { rateLimitPerMinute: 1000 } });
t.teardown(() => n.close());
const ajv = new Ajv({ strict: false });
const client = new OpenAI({ baseURL: n.url + '/v1', apiKey: n.apiKey, maxRetries: 0 });

const ORDER_SCHEMA = ORDER_SCHEMA_FOR_TESTS;

const WEATHER = {
  type: 'function' as const,
  function: {
    name: 'get_weather',
    description: 'the weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string', maxLength: 16 }, unit: { type: 'string', enum: ['c', 'f'] } }, required: ['city', 'unit'], additionalProperties: false },
    strict: true,
  },
};
const TIME = {
  type: 'function' as const,
  function: { name: 'get_time', parameters: { type: 'object', properties: { zone: { type: 'string', enum: ['utc', 'cet'] } }, required: ['zone'], additionalProperties: false } },
};
const TOOLS = [WEATHER, TIME];
const paramsOf: Record<string, object> = { get_weather: WEATHER.function.parameters, get_time: TIME.function.parameters };
const ask = [{ role: 'user', content: 'What is the weather in Paris?' }];

async function chat(body: Record<string, unknown>): Promise<{ status: number; body: any }> {
  const res = await n.post('/v1/chat/completions', { model: 'tiny', max_tokens: 300, ...body });
  return { status: res.status, body: await res.json() };
}

t.test('response_format json_schema: every answer parses and validates (non-streamed and streamed)', async (t) => {
  const validate = ajv.compile(ORDER_SCHEMA);
  for (const seed of [1, 2]) {
    const r = await chat({ messages: [{ role: 'user', content: 'an order' }], seed, temperature: 1, response_format: { type: 'json_schema', json_schema: { name: 'order', schema: ORDER_SCHEMA, strict: true } } });
    t.equal(r.status, 200);
    t.equal(r.body.choices[0].finish_reason, 'stop', `seed ${seed} finished`);
    const value = JSON.parse(r.body.choices[0].message.content);
    t.ok(validate(value), `seed ${seed} validates: ${JSON.stringify(validate.errors)}`);
  }
  const s = await n.post('/v1/chat/completions', { model: 'tiny', max_tokens: 300, seed: 9, stream: true, messages: [{ role: 'user', content: 'an order' }], response_format: { type: 'json_schema', json_schema: { name: 'order', schema: ORDER_SCHEMA } } });
  const { events, done } = parseSse(await s.text());
  t.ok(done);
  const text = events.map((e) => e.choices[0]?.delta?.content ?? '').join('');
  t.ok(validate(JSON.parse(text)), 'the streamed pieces join into valid JSON');
});

t.test('response_format json_object: the answer is a JSON object', async (t) => {
  // Free-form JSON from random weights often runs to max_tokens inside one long string (greedy always
  // does), and which seeds close their object depends on the CPU's float kernels (llama.cpp picks them
  // per machine): every answer opens an object, every one that stops is a JSON object, and one of a few
  // seeds must give a non-empty one.
  let r: Awaited<ReturnType<typeof chat>> | undefined;
  for (let seed = 1; seed <= 48; seed++) {
    r = await chat({ messages: [{ role: 'user', content: 'json please' }], seed, temperature: 1, max_tokens: 120, response_format: { type: 'json_object' } });
    t.equal(r.status, 200);
    const text: string = r.body.choices[0].message.content;
    t.ok(text.trimStart().startsWith('{'), `seed ${seed}: the answer opens an object`);
    if (r.body.choices[0].finish_reason !== 'stop') continue;
    const v = JSON.parse(text);
    t.ok(typeof v === 'object' && v !== null && !Array.isArray(v), `seed ${seed}: stopped with an object: ${text}`);
    if (Object.keys(v).length >= 1) break;
  }
  r = r!;
  t.equal(r.body.choices[0].finish_reason, 'stop', 'one of 48 seeds closed a non-empty object');
  const value = JSON.parse(r.body.choices[0].message.content);
  t.ok(typeof value === 'object' && value !== null && !Array.isArray(value), `an object: ${r.body.choices[0].message.content}`);
  t.ok(Object.keys(value).length >= 1, 'with at least one member');
});

t.test('schemas the grammar cannot enforce are refused before any worker runs', async (t) => {
  const cases: Array<[Record<string, unknown>, string, string]> = [
    [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'string', pattern: '^a' } } } }, 'unsupported_parameter', 'response_format.json_schema.schema'],
    [{ response_format: { type: 'json_schema', json_schema: { name: 'x' } } }, 'invalid_request', 'response_format.json_schema.schema'],
    [{ tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { a: { type: 'number', minimum: 0 } } } } }] }, 'unsupported_parameter', 'tools.0.function.parameters'],
    [{ tools: TOOLS, tool_choice: { type: 'function', function: { name: 'nope' } } }, 'invalid_request', 'tool_choice'],
    [{ tool_choice: 'required' }, 'invalid_request', 'tool_choice'],
    [{ logprobs: true, tools: TOOLS }, 'unsupported_parameter', 'logprobs'],
    [{ top_logprobs: 3 }, 'invalid_request', 'top_logprobs'],
    [{ tools: TOOLS, response_format: { type: 'json_object' } }, 'unsupported_parameter', 'response_format'],
    [{ messages: [...ask, { role: 'tool', tool_call_id: 'call_x', content: '{}' }] }, 'invalid_request', 'messages.1'],
    [{ messages: [...ask, { role: 'assistant', tool_calls: [{ id: 'c1', type: 'function', function: { name: 'get_time', arguments: '{}' } }] }] }, 'invalid_request', 'messages.1'],
  ];
  const before = n.node.models[0]!.pool.stats();
  for (const [extra, code, param] of cases) {
    const r = await chat({ messages: ask, ...extra });
    t.equal(r.status, 400, JSON.stringify(extra).slice(0, 80));
    t.equal(r.body.error.code, code);
    t.equal(r.body.error.param, param);
  }
  t.same(n.node.models[0]!.pool.stats().busy, before.busy, 'no worker was used');
});

let assistantCall: any;
t.test('tool_choice required: every answer is a well-formed call to a declared function with valid arguments', async (t) => {
  const seen = new Set<string>();
  for (const seed of [1, 2]) {
    const r = await chat({ messages: ask, tools: TOOLS, tool_choice: 'required', seed, temperature: 1 });
    t.equal(r.status, 200);
    const choice = r.body.choices[0];
    t.equal(choice.finish_reason, 'tool_calls');
    t.equal(choice.message.content, null);
    t.equal(choice.message.tool_calls.length, 1);
    const call = choice.message.tool_calls[0];
    t.match(call.id, /^call_/);
    t.equal(call.type, 'function');
    t.ok(call.function.name in paramsOf, `declared: ${call.function.name}`);
    seen.add(call.function.name);
    t.ok(ajv.validate(paramsOf[call.function.name]!, JSON.parse(call.function.arguments)), `arguments validate: ${call.function.arguments}`);
    assistantCall = choice.message;
  }
  t.ok(seen.size >= 1);
});

t.test('a named tool_choice calls that function', async (t) => {
  const r = await chat({ messages: ask, tools: TOOLS, tool_choice: { type: 'function', function: { name: 'get_time' } }, seed: 5 });
  const call = r.body.choices[0].message.tool_calls[0];
  t.equal(call.function.name, 'get_time');
  t.ok(ajv.validate(TIME.function.parameters, JSON.parse(call.function.arguments)));
});

let nonePromptTokens = 0;
t.test('tool_choice auto and none answer (text or a call), in the right shape', async (t) => {
  const auto = await chat({ messages: ask, tools: TOOLS, tool_choice: 'auto', seed: 6, max_tokens: 24 });
  t.equal(auto.status, 200);
  const c = auto.body.choices[0];
  if (c.finish_reason === 'tool_calls') t.ok(c.message.tool_calls.every((x: any) => x.function.name in paramsOf && ajv.validate(paramsOf[x.function.name]!, JSON.parse(x.function.arguments))));
  else t.type(c.message.content, 'string');
  const none = await chat({ messages: ask, tools: TOOLS, tool_choice: 'none', seed: 6, max_tokens: 12 });
  t.equal(none.status, 200);
  t.equal(none.body.choices[0].message.tool_calls, undefined);
  t.equal(none.body.choices[0].finish_reason, 'length');
  nonePromptTokens = none.body.usage.prompt_tokens;
});

t.test('a tool result message is accepted and the conversation continues', async (t) => {
  // The assistant message of the last forced call above, sent back as the client got it.
  const assistant = assistantCall;
  const call = assistant.tool_calls[0];
  const follow = await chat({
    messages: [...ask, assistant, { role: 'tool', tool_call_id: call.id, content: JSON.stringify({ temperature: 21, unit: 'c' }) }],
    tools: TOOLS,
    seed: 7,
    max_tokens: 16,
    tool_choice: 'none',
  });
  t.equal(follow.status, 200);
  t.equal(follow.body.choices[0].message.role, 'assistant');
  t.type(follow.body.choices[0].message.content, 'string');
  t.ok(nonePromptTokens > 0 && follow.body.usage.prompt_tokens > nonePromptTokens + 10, 'the call and its result are part of the prompt');
});

t.test('streamed tool calls: deltas over SSE, and the openai client stream helper assembles the call', async (t) => {
  const res = await n.post('/v1/chat/completions', { model: 'tiny', max_tokens: 300, seed: 8, stream: true, messages: ask, tools: TOOLS, tool_choice: 'required' });
  const { events, done } = parseSse(await res.text());
  t.ok(done);
  const deltas = events.flatMap((e) => e.choices[0]?.delta?.tool_calls ?? []);
  t.ok(deltas.length >= 2, 'the call arrives as several deltas');
  t.match(deltas[0], { index: 0, id: /^call_/, type: 'function', function: { arguments: '' } });
  const args = deltas.map((d: any) => d.function.arguments).join('');
  t.ok(ajv.validate(paramsOf[deltas[0].function.name]!, JSON.parse(args)));
  t.equal(events.at(-1).choices[0].finish_reason, 'tool_calls');

  const doneArgs: string[] = [];
  const stream = client.chat.completions.stream({ model: 'tiny', max_tokens: 300, seed: 8, messages: ask as never, tools: TOOLS as never, tool_choice: 'required' });
  stream.on('tool_calls.function.arguments.done', (e) => doneArgs.push(e.arguments));
  const final = await stream.finalChatCompletion();
  const call = final.choices[0]!.message.tool_calls![0]! as { id: string; function: { name: string; arguments: string } };
  t.equal(final.choices[0]!.finish_reason, 'tool_calls');
  t.equal(call.function.arguments, args, 'the helper assembled the same arguments (same seed)');
  t.same(doneArgs, [args]);
});

t.test('the openai client runTools helper (streamed): assembles each call, runs it, feeds the result back', async (t) => {
  const called: Array<{ name: string; args: unknown }> = [];
  const runnable = (def: typeof WEATHER | typeof TIME) => ({
    type: 'function' as const,
    function: {
      name: def.function.name,
      description: `the ${def.function.name} function`,
      parameters: def.function.parameters,
      parse: JSON.parse,
      function: (args: unknown) => {
        called.push({ name: def.function.name, args });
        return { ok: true, answer: 21 };
      },
    },
  });
  const runner = client.chat.completions.runTools(
    { model: 'tiny', max_tokens: 120, seed: 11, stream: true, messages: ask as never, tools: [runnable(WEATHER), runnable(TIME)], tool_choice: 'required' },
    { maxChatCompletions: 2 },
  );
  await runner.done();
  t.equal(called.length, 2, 'one call per completion, each run by the helper');
  for (const c of called) t.ok(ajv.validate(paramsOf[c.name]!, c.args), `${c.name} got arguments that validate: ${JSON.stringify(c.args)}`);
  const roles = runner.messages.map((m) => m.role);
  t.same(roles, ['user', 'assistant', 'tool', 'assistant', 'tool'], 'the second request carried the first call and its tool result');
  const completions = runner.allChatCompletions();
  t.equal(completions.length, 2);
  t.ok(completions.every((c) => c.choices[0]!.finish_reason === 'tool_calls'));
});

t.test('logprobs: chat (non-streamed and streamed) and completions, one entry per generated token', async (t) => {
  const r = await chat({ messages: ask, max_tokens: 10, seed: 3, temperature: 0.8, logprobs: true, top_logprobs: 3 });
  t.equal(r.status, 200);
  const content = r.body.choices[0].logprobs.content;
  t.equal(content.length, r.body.usage.completion_tokens, 'one entry per token');
  for (const e of content) {
    t.ok(e.logprob <= 0 && Array.isArray(e.bytes), 'a log-probability and the bytes');
    t.equal(e.top_logprobs.length, 3);
    t.ok(e.top_logprobs[0].logprob >= e.top_logprobs[2].logprob && e.top_logprobs[0].logprob >= e.logprob - 1e-9, 'alternatives sorted, the first the likeliest');
  }
  const s = await n.post('/v1/chat/completions', { model: 'tiny', messages: ask, max_tokens: 10, seed: 3, temperature: 0.8, logprobs: true, stream: true });
  const { events } = parseSse(await s.text());
  const streamed = events.flatMap((e) => e.choices[0]?.logprobs?.content ?? []);
  t.equal(streamed.length, 10, 'streamed: entries arrive with their deltas');
  t.same(streamed.map((e: any) => e.logprob), content.map((e: any) => e.logprob), 'same seed, same tokens and log-probabilities');
  t.equal(events.map((e) => e.choices[0]?.delta?.content ?? '').join(''), r.body.choices[0].message.content);

  const c = (await (await n.post('/v1/completions', { model: 'tiny', prompt: 'the world is', max_tokens: 8, seed: 2, temperature: 0.8, logprobs: 2 })).json()) as any;
  const lp = c.choices[0].logprobs;
  t.equal(lp.tokens.length, 8);
  t.equal(lp.token_logprobs.length, 8);
  t.ok(lp.top_logprobs.every((m: Record<string, number>) => Object.keys(m).length >= 1 && Object.keys(m).length <= 2));
  t.same(lp.text_offset[0], 0);
  const plain = (await (await n.post('/v1/completions', { model: 'tiny', prompt: 'the world is', max_tokens: 8, seed: 2, temperature: 0.8 })).json()) as any;
  t.equal(c.choices[0].text, plain.choices[0].text, 'the logprobs loop samples as the ordinary one does (same seed, same text)');
  t.equal(plain.choices[0].logprobs, null);
});

t.test('embeddings: count, dimension, determinism, base64, usage', async (t) => {
  const inputs = ['private inference', 'the world', 'private inference'];
  const res = await n.post('/v1/embeddings', { model: 'tiny', input: inputs });
  t.equal(res.status, 200);
  const body = (await res.json()) as any;
  t.equal(body.object, 'list');
  t.equal(body.model, 'tiny');
  t.equal(body.data.length, 3);
  t.same(body.data.map((d: any) => [d.object, d.index]), [['embedding', 0], ['embedding', 1], ['embedding', 2]]);
  t.ok(body.data.every((d: any) => d.embedding.length === 128), 'the tiny model embeds into 128 dimensions');
  t.same(body.data[0].embedding, body.data[2].embedding, 'identical input, identical vector');
  t.notSame(body.data[0].embedding, body.data[1].embedding);
  t.ok(Math.abs(Math.hypot(...body.data[0].embedding) - 1) < 1e-4, 'unit length');
  t.ok(body.usage.prompt_tokens > 0);
  t.equal(body.usage.total_tokens, body.usage.prompt_tokens);

  const b64 = (await (await n.post('/v1/embeddings', { model: 'tiny', input: 'private inference', encoding_format: 'base64' })).json()) as any;
  const bytes = Buffer.from(b64.data[0].embedding, 'base64');
  const floats = Array.from({ length: bytes.length / 4 }, (_, i) => bytes.readFloatLE(i * 4));
  t.same(floats, body.data[0].embedding.map((x: number) => Math.fround(x)), 'base64 decodes to the same floats');

  const viaClient = await client.embeddings.create({ model: 'tiny', input: ['private inference', 'the world'] });
  t.equal(viaClient.data.length, 2);
  t.same(viaClient.data[0]!.embedding, floats, 'the openai client (base64 on the wire) gets the same vector');
  t.ok(viaClient.usage.prompt_tokens > 0);
});

t.test('embeddings refusals', async (t) => {
  const cases: Array<[unknown, number, string, string | null]> = [
    [{ model: 'tiny', input: [] }, 400, 'invalid_request', 'input'],
    [{ model: 'tiny', input: '' }, 400, 'invalid_request', 'input'],
    [{ model: 'tiny', input: 'x', encoding_format: 'int8' }, 400, 'invalid_request', 'encoding_format'],
    [{ model: 'nope', input: 'x' }, 404, 'model_not_found', 'model'],
    [{ model: 'tiny', input: 'x', dimensions: 64 }, 400, 'unsupported_parameter', 'dimensions'],
  ];
  for (const [body, status, code, param] of cases) {
    const res = await n.post('/v1/embeddings', body);
    t.equal(res.status, status, JSON.stringify(body));
    const err = ((await res.json()) as any).error;
    t.equal(err.code, code);
    if (param) t.equal(err.param, param);
  }
});
