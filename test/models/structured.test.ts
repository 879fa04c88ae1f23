// Structured output and forced tool calls on the generated tiny model, in-process through the same
// generateChat the workers run (issue 15): 50 seeds each must parse and validate with a real JSON-schema
// validator. The weights are random, so what is tested is the grammar's hold, never the content.
import t from 'tap';
import { Ajv } from 'ajv';
import { createLogger } from '../../src/logger.ts';
import { createLlamaRuntime, loadModelFile, createContext, generateChat, generateEmbeddings, prepareChatWrapper, generateWithLogprobs, generateCompletion } from '../../src/models/llama.ts';
import { grammarSchema, toolCallSchema } from '../../src/models/grammar.ts';
import { isPhantomaError } from '../../src/errors.ts';
import { tinyModelPath } from '../helpers.ts';
import { ORDER_SCHEMA_FOR_TESTS as ORDER } from './structured-schemas.ts';

const runtime = await createLlamaRuntime({ logger: createLogger({ level: 'silent' }) });
const { model } = await loadModelFile(runtime, await tinyModelPath());
const context = await createContext(model, { contextSize: 2048, threads: 1, batchSize: 512 });
const chatWrapper = prepareChatWrapper(model);
t.teardown(async () => {
  await context.dispose();
  await model.dispose();
  await runtime.dispose();
});
const ajv = new Ajv({ strict: false });

t.test('json_schema: 50 seeds, nested objects, enums and arrays, all parse and validate', async (t) => {
  const validate = ajv.compile(ORDER);
  const schema = grammarSchema(ORDER, 'response_format.json_schema.schema');
  const failures: string[] = [];
  const statuses = new Set<string>();
  let withItems = 0;
  let sized = 0;
  const started = performance.now();
  for (let seed = 1; seed <= 50; seed++) {
    const r = await generateChat(context, [{ role: 'user', content: 'an order please' }], { chatWrapper, maxTokens: 400, seed, temperature: 1, responseFormat: { type: 'json_schema', schema } });
    let value: any;
    try {
      value = JSON.parse(r.text);
    } catch {
      failures.push(`seed ${seed}: does not parse (${r.finishReason}): ${r.text.slice(0, 80)}`);
      continue;
    }
    if (!validate(value)) failures.push(`seed ${seed}: ${JSON.stringify(validate.errors)}`);
    statuses.add(value.status);
    if (value.items?.length > 0) withItems++;
    if (value.items?.some((i: { size: unknown }) => i.size !== null)) sized++;
  }
  t.comment(`50 json_schema generations in ${Math.round(performance.now() - started)} ms`);
  t.same(failures, [], 'every generation parses and validates');
  t.ok(statuses.size >= 2, `different seeds give different answers (statuses ${[...statuses]})`);
  t.ok(withItems >= 5, `the array schema is exercised: ${withItems} answers have items`);
  t.ok(sized >= 1, `the anyOf enum branch is exercised: ${sized} answers have a sized item`);
});

t.test('json_object: every answer is an object; each one that stops parses', async (t) => {
  const failures: string[] = [];
  let stopped = 0;
  let members = 0;
  for (let seed = 1; seed <= 25; seed++) {
    const r = await generateChat(context, [{ role: 'user', content: 'json please' }], { chatWrapper, maxTokens: 120, seed, temperature: 1, responseFormat: { type: 'json_object' } });
    if (!r.text.trimStart().startsWith('{')) failures.push(`seed ${seed}: not an object: ${r.text.slice(0, 40)}`);
    if (r.finishReason !== 'stop') continue;
    stopped++;
    try {
      const v = JSON.parse(r.text);
      if (typeof v !== 'object' || v === null || Array.isArray(v)) failures.push(`seed ${seed}: not an object: ${r.text}`);
      else if (Object.keys(v).length > 0) members++;
    } catch {
      failures.push(`seed ${seed}: does not parse: ${r.text.slice(0, 80)}`);
    }
  }
  t.same(failures, []);
  // Random weights mostly ramble inside one string until max_tokens; some seeds close the object.
  t.ok(stopped >= 3, `${stopped} of 25 finished`);
  t.ok(members >= 1, 'at least one finished object has members');
});

t.test('forced tool calls: 50 seeds, each a declared function with arguments that validate', async (t) => {
  const tools = [
    { name: 'get_weather', parameters: grammarSchema({ type: 'object', properties: { city: { type: 'string', maxLength: 16 }, days: { type: 'integer' } }, required: ['city', 'days'], additionalProperties: false }, 'p') },
    { name: 'list_items', parameters: grammarSchema({ type: 'object', properties: { tags: { type: 'array', items: { enum: ['a', 'b'] }, maxItems: 4 } }, required: ['tags'], additionalProperties: false }, 'p') },
  ];
  const names = new Set<string>();
  const failures: string[] = [];
  for (let seed = 1; seed <= 50; seed++) {
    const r = await generateChat(context, [{ role: 'user', content: 'call something' }], { chatWrapper, maxTokens: 300, seed, temperature: 1, tools, toolChoice: 'required' });
    const call = r.toolCalls?.[0];
    if (r.finishReason !== 'tool_calls' || !call) {
      failures.push(`seed ${seed}: no call (${r.finishReason})`);
      continue;
    }
    const tool = tools.find((x) => x.name === call.name);
    if (!tool || !ajv.validate(tool.parameters, JSON.parse(call.arguments))) failures.push(`seed ${seed}: ${call.name} ${call.arguments}`);
    names.add(call.name);
  }
  t.same(failures, []);
  t.same([...names].sort(), ['get_weather', 'list_items'], 'both declared functions get called across seeds');
  t.ok(toolCallSchema(tools).oneOf, 'several tools: one branch each');
});

t.test('grammarSchema refuses what it cannot enforce, naming the parameter', async (t) => {
  for (const [schema, why] of [
    [{ type: 'string', pattern: 'a+' }, /pattern/],
    [{ type: 'number', minimum: 1 }, /minimum/],
    [{ allOf: [{ type: 'string' }] }, /allOf/],
    [{ $ref: 'http://example.com/s' }, /\$defs/],
    [{ type: 'string', format: 'email' }, /format/],
    [{}, /constrains nothing/],
  ] as const) {
    try {
      grammarSchema(schema, 'response_format.json_schema.schema');
      t.fail(`accepted ${JSON.stringify(schema)}`);
    } catch (err) {
      t.ok(isPhantomaError(err) && err.code === 'unsupported_parameter' && err.details?.param === 'response_format.json_schema.schema', JSON.stringify(schema));
      t.match((err as Error).message, why);
    }
  }
  t.same(grammarSchema({ anyOf: [{ type: 'string', title: 'x' }, { type: 'null' }] }, 'p'), { oneOf: [{ type: 'string' }, { type: 'null' }] }, 'anyOf becomes oneOf, annotations go');
});

t.test('embeddings in-process: the model width, deterministic, unit length', async (t) => {
  const vectors: number[][] = [];
  const { promptTokens } = await generateEmbeddings(model, ['a b c', 'a b c', 'other'], { contextSize: 512, threads: 1, batchSize: 512, onEmbedding: (i, v) => void (vectors[i] = v) });
  t.equal(vectors.length, 3);
  t.ok(vectors.every((v) => v.length === model.embeddingVectorSize && v.length === 128));
  t.same(vectors[0], vectors[1]);
  t.ok(promptTokens > 3);
  const long: number[][] = [];
  await generateEmbeddings(model, ['word '.repeat(700)], { contextSize: 1024, threads: 1, batchSize: 128, onEmbedding: (i, v) => void (long[i] = v) });
  t.equal(long[0]?.length, 128, 'an input longer than the batch size is embedded whole');
  const err = await generateEmbeddings(model, ['word '.repeat(700)], { contextSize: 256, threads: 1, batchSize: 128 }).catch((e: unknown) => e);
  t.ok(isPhantomaError(err) && err.code === 'context_length_exceeded', 'longer than the context: refused with its code');
});

t.test('the logprobs loop: same text as the ordinary generators, stop strings, one entry per token', async (t) => {
  const plain = await generateCompletion(context, 'the world is', { maxTokens: 12, seed: 5, temperature: 0.9 });
  const pieces: string[] = [];
  let entries = 0;
  const lp = await generateWithLogprobs(context, { prompt: 'the world is' }, { maxTokens: 12, seed: 5, temperature: 0.9, topLogprobs: 2, onLogprobs: (text, e) => { pieces.push(text); entries += e.length; } });
  t.equal(lp.text, plain.text, 'same seed, same text');
  t.equal(pieces.join(''), lp.text, 'the pieces make the text');
  t.equal(entries, 12);
  t.equal(lp.finishReason, 'length');
  const stop = lp.text.slice(4, 6);
  const stopped = await generateWithLogprobs(context, { prompt: 'the world is' }, { maxTokens: 12, seed: 5, temperature: 0.9, topLogprobs: 0, stop: [stop] });
  t.equal(stopped.text, lp.text.slice(0, lp.text.indexOf(stop)));
  t.equal(stopped.finishReason, 'stop');
  const chat = await generateWithLogprobs(context, { messages: [{ role: 'user', content: 'hi' }], chatWrapper }, { maxTokens: 8, temperature: 0, topLogprobs: 1 });
  const same = await generateChat(context, [{ role: 'user', content: 'hi' }], { chatWrapper, maxTokens: 8, temperature: 0 });
  t.equal(chat.text, same.text, 'greedy chat: the same answer as LlamaChat');
});
