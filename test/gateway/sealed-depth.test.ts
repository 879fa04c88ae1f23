// Issue 15 on the sealed path: structured output, forced tool calls (sealed tool_call events assembled by
// the SDK, then streamed as deltas by `phantoma proxy` to the official openai client) and embeddings
// (sealed float32 pieces), through a real node with keyd and warden-isolated workers.
import t from 'tap';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { Ajv } from 'ajv';
import { startTestNode, type TestNode } from './fixture.ts';
import { makeVaultContents, addClient, identityFingerprint, rawEd25519Public } from '../../src/vault/contents.ts';
import { createVault } from '../../src/vault/store.ts';
import { createSealedClient } from '../../src/client/sealed.ts';
import { buildProxy } from '../../src/client/proxy.ts';
import { createLogger } from '../../src/logger.ts';
import { isPhantomaError } from '../../src/errors.ts';
import { ORDER_SCHEMA_FOR_TESTS as ORDER } from '../models/structured-schemas.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-sealed-depth-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
const alice = generateKeyPairSync('ed25519');
const now = new Date();
const contents = addClient(makeVaultContents({ now, requestKeyValidityMs: 86_400_000 }), 'alice', rawEd25519Public(alice.publicKey), now);
const vaultPath = join(tmp, 'vault.phv');
createVault(vaultPath, { kind: 'passphrase', secret: Buffer.from('sealed depth') }, { log2N: 10, r: 8, p: 1 }, contents);
const identityPin = identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64'));
process.env.PHANTOMA_VAULT_PASSPHRASE = 'sealed depth';

// Two models: the second (tiny-wide, 192-wide embeddings) lazy, so it costs a worker only when its test runs.
const n: TestNode = await startTestNode({
  vault: { path: vaultPath, keydSocket: join(tmp, 'keyd', 'keyd.sock') },
  gateway: { requestTimeoutMs: 60_000, rateLimitPerMinute: 1000 },
  models: [
    { name: 'tiny', builtin: 'tiny' },
    { name: 'wide', builtin: 'tiny-wide', pool: { size: 1, load: 'lazy' } },
  ],
});
t.teardown(() => n.close());
const client = createSealedClient({ url: n.url, identityPin, clientName: 'alice', clientKey: alice.privateKey });
const ajv = new Ajv({ strict: false });
const WEATHER = {
  type: 'function',
  function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string', maxLength: 16 }, unit: { enum: ['c', 'f'] } }, required: ['city', 'unit'], additionalProperties: false } },
};

t.test('sealed json_schema: the opened answer parses and validates', async (t) => {
  const a = await client.send('tiny', { messages: [{ role: 'user', content: 'an order' }], max_tokens: 300, seed: 3, temperature: 1, response_format: { type: 'json_schema', json_schema: { name: 'order', schema: ORDER } } }, { stream: true });
  t.equal(a.finishReason, 'stop');
  t.ok(ajv.validate(ORDER, JSON.parse(a.text)), a.text);
  t.equal(a.receipt.outcome, 'ok');
});

t.test('sealed json_object: the opened answer is a JSON object', async (t) => {
  // Random weights often ramble inside one string; which seeds close their object depends on the CPU's
  // float kernels (see the plaintext test): the first of a few seeds that stops is checked.
  let a: Awaited<ReturnType<typeof client.send>> | undefined;
  for (let seed = 1; seed <= 48; seed++) {
    a = await client.send('tiny', { messages: [{ role: 'user', content: 'json please' }], max_tokens: 120, seed, temperature: 1, response_format: { type: 'json_object' } });
    t.ok(a.text.trimStart().startsWith('{'), `seed ${seed}: the answer opens an object`);
    if (a.finishReason === 'stop' && Object.keys(JSON.parse(a.text) as object).length >= 1) break;
  }
  a = a!;
  t.equal(a.finishReason, 'stop', 'one of 48 seeds closed a non-empty object');
  const v = JSON.parse(a.text);
  t.ok(typeof v === 'object' && v !== null && !Array.isArray(v) && Object.keys(v).length >= 1, a.text);
});

t.test('sealed refusal of an unenforceable schema comes back sealed, with its code', async (t) => {
  const err = await client.send('tiny', { messages: [{ role: 'user', content: 'x' }], response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'string', pattern: 'a' } } } }).catch((e: unknown) => e);
  t.ok(isPhantomaError(err) && err.code === 'unsupported_parameter', String(err));
});

t.test('sealed forced tool call: assembled by the SDK, then via phantoma proxy to the openai client (streamed and not)', async (t) => {
  const body = { messages: [{ role: 'user', content: 'weather?' }], max_tokens: 200, seed: 4, tools: [WEATHER], tool_choice: 'required' };
  const a = await client.send('tiny', body, { stream: false });
  t.equal(a.finishReason, 'tool_calls');
  t.equal(a.toolCalls?.length, 1);
  t.equal(a.toolCalls![0]!.name, 'get_weather');
  t.match(a.toolCalls![0]!.id, /^call_/);
  t.ok(ajv.validate(WEATHER.function.parameters, JSON.parse(a.toolCalls![0]!.arguments)));

  const proxy = buildProxy({ nodes: [{ url: n.url, identityPin }], clientName: 'alice', clientKey: alice.privateKey, models: ['tiny'], logger: createLogger({ level: 'silent' }) });
  const address = await proxy.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => proxy.close());
  const openai = new OpenAI({ baseURL: `${address}/v1`, apiKey: 'unused', maxRetries: 0 });
  const whole = await openai.chat.completions.create({ model: 'tiny', ...(body as any) });
  const call = whole.choices[0]!.message.tool_calls![0]! as { function: { name: string; arguments: string } };
  t.equal(whole.choices[0]!.finish_reason, 'tool_calls');
  t.equal(call.function.arguments, a.toolCalls![0]!.arguments, 'same seed, same call');
  const stream = openai.chat.completions.stream({ model: 'tiny', ...(body as any) });
  const final = await stream.finalChatCompletion();
  t.equal((final.choices[0]!.message.tool_calls![0] as { function: { arguments: string } }).function.arguments, a.toolCalls![0]!.arguments, 'the stream helper assembles it');

  // The result goes back sealed and the conversation continues.
  const next = await client.send('tiny', {
    messages: [...body.messages, { role: 'assistant', content: null, tool_calls: [{ id: a.toolCalls![0]!.id, type: 'function', function: { name: 'get_weather', arguments: a.toolCalls![0]!.arguments } }] }, { role: 'tool', tool_call_id: a.toolCalls![0]!.id, content: '{"t": 20}' }],
    tools: [WEATHER],
    tool_choice: 'none',
    max_tokens: 8,
    seed: 4,
  });
  t.equal(next.finishReason, 'length');
  t.equal(next.toolCalls, undefined);

  // Embeddings through the proxy: the openai client's embeddings.create (base64 on the wire).
  const emb = await openai.embeddings.create({ model: 'tiny', input: ['sealed words', 'sealed words'] });
  t.equal(emb.data.length, 2);
  t.equal(emb.data[0]!.embedding.length, 128);
  t.same(emb.data[0]!.embedding, emb.data[1]!.embedding);
});

t.test('sealed named tool_choice: the named function is called, streamed through the SDK', async (t) => {
  const TIME = { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: { zone: { enum: ['utc', 'cet'] } }, required: ['zone'], additionalProperties: false } } };
  const a = await client.send('tiny', { messages: [{ role: 'user', content: 'time?' }], max_tokens: 60, seed: 5, tools: [WEATHER, TIME], tool_choice: { type: 'function', function: { name: 'get_time' } } }, { stream: true });
  t.equal(a.finishReason, 'tool_calls');
  t.equal(a.toolCalls?.length, 1);
  t.equal(a.toolCalls![0]!.name, 'get_time');
  t.ok(ajv.validate(TIME.function.parameters, JSON.parse(a.toolCalls![0]!.arguments)), a.toolCalls![0]!.arguments);
});

t.test('sealed requests to two models: each served by its own (embedding width 128 vs 192)', async (t) => {
  const wide = n.node.models.find((m) => m.name === 'wide')!.pool;
  t.equal(wide.workers().length, 0, 'the lazy pool has no worker before its first request');
  const a = await client.send('wide', { input: ['which model'] });
  t.equal(a.embeddings?.[0]?.length, 192, 'tiny-wide embeds into 192 dimensions');
  const b = await client.send('tiny', { input: ['which model'] });
  t.equal(b.embeddings?.[0]?.length, 128, 'tiny into 128');
});

t.test('sealed logprobs: one entry per token, opened by the SDK', async (t) => {
  const a = await client.send('tiny', { messages: [{ role: 'user', content: 'hi' }], max_tokens: 6, seed: 2, temperature: 0.8, logprobs: true, top_logprobs: 2 }, { stream: true });
  t.equal(a.logprobs?.length, 6);
  t.ok(a.logprobs!.every((e) => e.logprob <= 0 && e.top.length === 2));
});

t.test('sealed embeddings: the SDK opens one vector per input, identical to the plaintext route', async (t) => {
  const a = await client.send('tiny', { input: ['alpha beta', 'gamma'] });
  t.equal(a.embeddings?.length, 2);
  t.ok(a.embeddings!.every((v) => v.length === 128));
  t.ok(a.usage.prompt_tokens > 0);
  const plain = (await (await n.post('/v1/embeddings', { model: 'tiny', input: ['alpha beta', 'gamma'] })).json()) as any;
  t.same(a.embeddings![0], plain.data[0].embedding.map((x: number) => Math.fround(x)), 'same vector as the plaintext route (float32)');
});
