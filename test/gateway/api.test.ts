// The OpenAI-compatible API against a real node on loopback: real gateway, real worker processes.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import OpenAI from 'openai';
import { Agent, fetch as undiciFetch } from 'undici';
import { startTestNode, parseSse, type TestNode } from './fixture.ts';
import { runPhantoma } from '../helpers.ts';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { verifyAuditLog, tailAuditLog } from '../../src/audit/audit-log.ts';

const n: TestNode = await startTestNode();
t.teardown(() => n.close());

const chat = (extra: Record<string, unknown> = {}) => ({ model: 'tiny', messages: [{ role: 'user', content: 'tell me about the world' }], max_tokens: 12, seed: 5, ...extra });

t.test('health, readiness and the model list', async (t) => {
  t.same(await (await fetch(n.url + '/healthz')).json(), { status: 'ok' });
  t.same(await (await fetch(n.url + '/readyz')).json(), { ready: true });
  const models = await fetch(n.url + '/v1/models', { headers: { authorization: `Bearer ${n.apiKey}` } });
  t.equal(models.status, 200);
  const body = (await models.json()) as { object: string; data: Array<{ id: string; context_length: number; object: string }> };
  t.equal(body.object, 'list');
  t.same(body.data.map((m) => [m.id, m.object, m.context_length]), [['tiny', 'model', 2048]]);
});

t.test('non-streamed chat: shape, usage that adds up, finish_reason length at max_tokens', async (t) => {
  const res = await n.post('/v1/chat/completions', chat());
  t.equal(res.status, 200);
  const body = (await res.json()) as any;
  t.match(body.id, /^chatcmpl-/);
  t.equal(body.object, 'chat.completion');
  t.equal(body.model, 'tiny');
  t.equal(body.choices.length, 1);
  t.equal(body.choices[0].message.role, 'assistant');
  t.type(body.choices[0].message.content, 'string');
  t.ok(body.choices[0].message.content.length > 0);
  t.equal(body.choices[0].finish_reason, 'length');
  t.equal(body.usage.completion_tokens, 12);
  t.ok(body.usage.prompt_tokens > 5);
  t.equal(body.usage.total_tokens, body.usage.prompt_tokens + body.usage.completion_tokens);
});

t.test('streamed chat: role first, content deltas, finish chunk, usage chunk, [DONE]; same text as non-streamed', async (t) => {
  const res = await n.post('/v1/chat/completions', chat({ stream: true, stream_options: { include_usage: true } }));
  t.equal(res.status, 200);
  t.match(res.headers.get('content-type'), /^text\/event-stream/);
  const { events, done } = parseSse(await res.text());
  t.ok(done, 'ends with data: [DONE]');
  t.same(events[0].choices[0].delta, { role: 'assistant', content: '' });
  const usage = events.at(-1);
  t.same(usage.choices, []);
  t.equal(usage.usage.completion_tokens, 12);
  const finish = events.at(-2);
  t.equal(finish.choices[0].finish_reason, 'length');
  const text = events.slice(1, -2).map((e) => e.choices[0].delta.content).join('');
  t.ok(events.every((e) => e.object === 'chat.completion.chunk' && e.id === events[0].id), 'one id, chunk objects');
  const whole = (await (await n.post('/v1/chat/completions', chat())).json()) as any;
  t.equal(text, whole.choices[0].message.content, 'same seed, same text, streamed or not');
});

t.test('completions, streamed and not', async (t) => {
  const res = await n.post('/v1/completions', { model: 'tiny', prompt: 'the world is', max_tokens: 8, seed: 2 });
  t.equal(res.status, 200);
  const body = (await res.json()) as any;
  t.equal(body.object, 'text_completion');
  t.equal(body.choices[0].finish_reason, 'length');
  t.equal(body.usage.completion_tokens, 8);
  const s = await n.post('/v1/completions', { model: 'tiny', prompt: 'the world is', max_tokens: 8, seed: 2, stream: true });
  const { events, done } = parseSse(await s.text());
  t.ok(done);
  t.equal(events.map((e) => e.choices[0].text).join(''), body.choices[0].text);
});

t.test('stop sequences end the answer before the stop text, with finish_reason stop', async (t) => {
  const free = (await (await n.post('/v1/chat/completions', chat({ max_tokens: 40, seed: 11 }))).json()) as any;
  const text: string = free.choices[0].message.content;
  const stopAt = Math.floor(text.length / 2);
  const stop = text.slice(stopAt, stopAt + 3);
  t.ok(stop.length === 3, `stop string ${JSON.stringify(stop)} from the free-running answer`);
  const stopped = (await (await n.post('/v1/chat/completions', chat({ max_tokens: 40, seed: 11, stop: [stop] }))).json()) as any;
  t.equal(stopped.choices[0].finish_reason, 'stop');
  t.equal(stopped.choices[0].message.content, text.slice(0, text.indexOf(stop)), 'the answer ends right before the first occurrence');
  t.ok(stopped.usage.completion_tokens < 40);
});

t.test('golden: the gateway gives the same answer as node-llama-cpp in-process for the same seed', async (t) => {
  const direct = await runPhantoma(['local-chat', '--json', '--seed', '7', '--temperature', '0.9', '--max-tokens', '24', '--inference.threads=1', 'What is private inference?']);
  t.equal(direct.code, 0, direct.stderr);
  const expected = JSON.parse(direct.stdout);
  const res = (await (await n.post('/v1/chat/completions', { model: 'tiny', messages: [{ role: 'user', content: 'What is private inference?' }], max_tokens: 24, seed: 7, temperature: 0.9 })).json()) as any;
  t.equal(res.choices[0].message.content, expected.text, 'identical text');
  t.equal(res.usage.completion_tokens, expected.usage.completion_tokens);
  t.equal(res.usage.prompt_tokens, expected.usage.prompt_tokens);
  const other = (await (await n.post('/v1/chat/completions', { model: 'tiny', messages: [{ role: 'user', content: 'What is private inference?' }], max_tokens: 24, seed: 8, temperature: 0.9 })).json()) as any;
  t.not(other.choices[0].message.content, expected.text, 'another seed differs (the comparison can fail)');
});

const badInputs: Array<[string, string | Record<string, unknown>, number, string, string | null]> = [
  ['malformed JSON', '{"model": "tiny", "messages": [', 400, 'invalid_json', null],
  ['wrong type', { model: 'tiny', messages: 'hello' }, 400, 'invalid_request', 'messages'],
  ['missing messages', { model: 'tiny' }, 400, 'invalid_request', null],
  ['unknown parameter', { ...chat(), frobnicate: true }, 400, 'invalid_request', 'frobnicate'],
  ['temperature out of range', chat({ temperature: 5 }), 400, 'invalid_request', 'temperature'],
  ['n other than 1', chat({ n: 2 }), 400, 'unsupported_parameter', 'n'],
  ['unknown model', chat({ model: 'gpt-9' }), 404, 'model_not_found', 'model'],
  ['max_tokens beyond the context', chat({ max_tokens: 5000 }), 400, 'context_length_exceeded', 'max_tokens'],
  ['prompt plus max_tokens beyond the context', chat({ max_tokens: 2000, messages: [{ role: 'user', content: 'the '.repeat(200) }] }), 400, 'context_length_exceeded', 'messages'],
];

for (const [what, body, status, code, param] of badInputs) {
  t.test(`bad input: ${what} → ${status} ${code}`, async (t) => {
    const res = await n.post('/v1/chat/completions', body);
    t.equal(res.status, status);
    const err = ((await res.json()) as any).error;
    t.equal(err.code, code);
    t.type(err.message, 'string');
    t.equal(err.type, status === 404 ? 'not_found_error' : 'invalid_request_error');
    if (param !== null) t.equal(err.param, param);
  });
}

t.test('oversized body → 413 request_too_large; wrong content type → 415; unknown route → 404', async (t) => {
  const big = await n.post('/v1/chat/completions', JSON.stringify(chat({ messages: [{ role: 'user', content: 'x'.repeat(1_100_000) }] })));
  t.equal(big.status, 413);
  t.equal(((await big.json()) as any).error.code, 'request_too_large');
  const text = await fetch(n.url + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'text/plain', authorization: `Bearer ${n.apiKey}` }, body: 'hi' });
  t.equal(text.status, 415);
  t.equal(((await text.json()) as any).error.code, 'unsupported_media_type');
  const nf = await n.post('/v1/engines', {});
  t.equal(nf.status, 404);
  t.equal(((await nf.json()) as any).error.code, 'not_found');
});

t.test('after all the bad input, the gateway still serves and the pool is full', async (t) => {
  const res = await n.post('/v1/chat/completions', chat({ max_tokens: 3 }));
  t.equal(res.status, 200);
  await n.waitReady();
  t.same(n.node.models[0]!.pool.stats(), { starting: 0, ready: 2, busy: 0, queued: 0 });
});

t.test('the official openai client (v7) over HTTPS with a pinned self-signed certificate', async (t) => {
  const tlsNode = await startTestNode({ gateway: { tls: 'self-signed' }, pool: { size: 1 } });
  t.teardown(() => tlsNode.close());
  t.match(tlsNode.url, /^https:\/\/127\.0\.0\.1:\d+$/);
  const dispatcher = new Agent({ connect: { ca: tlsNode.node.tls!.cert } });
  t.teardown(() => dispatcher.close());
  const client = new OpenAI({ baseURL: `${tlsNode.url}/v1`, apiKey: tlsNode.apiKey, maxRetries: 0, fetch: ((url: string, init: object) => undiciFetch(url, { ...init, dispatcher })) as never });
  const whole = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'hello' }], max_tokens: 6, seed: 1 });
  t.equal(whole.choices[0]?.finish_reason, 'length');
  t.equal(whole.usage?.completion_tokens, 6);
  const stream = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'hello' }], max_tokens: 6, seed: 1, stream: true });
  let text = '';
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
  t.equal(text, whole.choices[0]?.message.content, 'streamed text equals the non-streamed text');
  const models = await client.models.list();
  t.same(models.data.map((m) => m.id), ['tiny']);
  await t.rejects(client.chat.completions.create({ model: 'nope', messages: [{ role: 'user', content: 'x' }] }), { status: 404, code: 'model_not_found' });
  const wrongKey = new OpenAI({ baseURL: `${tlsNode.url}/v1`, apiKey: 'phk_000000000000_' + 'A'.repeat(43), maxRetries: 0, fetch: ((url: string, init: object) => undiciFetch(url, { ...init, dispatcher })) as never });
  await t.rejects(wrongKey.models.list(), { status: 401, code: 'invalid_api_key' });
});

t.test('logs carry ids, counts and durations, never a prompt, an answer or a key (with a positive control)', async (t) => {
  const canary = `CANARY-${randomBytes(8).toString('hex')}`;
  const planted = `PLANTED-${randomBytes(8).toString('hex')}`;
  n.logger.info({ note: planted }, 'positive control');
  const res = (await (await n.post('/v1/chat/completions', { model: 'tiny', messages: [{ role: 'system', content: canary }, { role: 'user', content: `say ${canary}` }], max_tokens: 8 })).json()) as any;
  const answer: string = res.choices[0].message.content;
  const s = await n.post('/v1/chat/completions', { model: 'tiny', messages: [{ role: 'user', content: canary }], max_tokens: 4, stream: true });
  await s.text();
  await n.post('/v1/chat/completions', { model: `model-${canary}`, messages: [{ role: 'user', content: canary }] });
  await n.post('/v1/chat/completions', `{"model": "${canary}`);
  const all = n.logs.join('\n');
  t.ok(all.includes(planted), 'the scan sees what is planted in the log stream');
  t.notOk(all.includes(canary), 'no canary from prompts, model names or bodies');
  t.notOk(all.includes(n.apiKey), 'no API key');
  t.notOk(all.includes(n.apiKey.slice('phk_'.length + 13)), 'no part of the key secret');
  if (answer.trim().length >= 6) t.notOk(all.includes(answer.trim()), 'no generated answer');
  const lines = n.logs.map((l) => JSON.parse(l)).filter((l) => l.msg === 'request' && l.route === '/v1/chat/completions' && l.status === 200);
  t.ok(lines.length > 0);
  t.match(lines.at(-1), { reqId: String, model: 'tiny', workerId: String, ms: Number, promptTokens: Number, completionTokens: Number });
  // The worker splits its time: the model's own share (prompt evaluation, then up to the last token) of the
  // job's first-token and whole time; the rest is the node's.
  const last = lines.at(-1) as { workerTtftMs: number; workerPromptEvalMs: number; workerModelMs: number; workerGenerateMs: number };
  // (The log rounds first-token and job times to 0.1 ms, the model's to 0.01 ms.)
  t.ok(last.workerPromptEvalMs > 0 && last.workerPromptEvalMs <= last.workerTtftMs + 0.05, `prompt evaluation ${last.workerPromptEvalMs} ms within the first token's ${last.workerTtftMs} ms`);
  t.ok(last.workerModelMs >= last.workerPromptEvalMs && last.workerModelMs <= last.workerGenerateMs + 0.05, `model time ${last.workerModelMs} ms between the prompt's evaluation and the job's ${last.workerGenerateMs} ms`);

  const auditDir = join(n.stateDir, 'audit');
  const auditText = readdirSync(auditDir).map((f) => readFileSync(join(auditDir, f), 'utf8')).join('');
  t.ok(auditText.includes('"type":"request_served"'), 'the audit scan sees the audit entries');
  t.notOk(auditText.includes(canary), 'no canary in the audit log');
  t.equal(verifyAuditLog(auditDir).ok, true, 'the audit chain verifies');
  const types = new Set(tailAuditLog(auditDir, 500).map((e) => e.type));
  for (const type of ['node_started', 'worker_spawned', 'worker_ended', 'request_served', 'refusal']) t.ok(types.has(type as never), `audit has ${type}`);

  const metrics = await (await fetch(n.node.metricsUrl)).text();
  t.notOk(metrics.includes(canary), 'no client-supplied string became a metric label');
  t.match(metrics, /phantoma_http_requests_total\{route="\/v1\/chat\/completions",status="200"\} \d+/);
  t.match(metrics, /phantoma_errors_total\{code="model_not_found"\} \d+/);
  t.match(metrics, /phantoma_pool_workers\{model="tiny",state="ready"\} \d/);
  t.match(metrics, /phantoma_time_to_first_token_seconds_count\{model="tiny"\} \d+/);
  t.match(metrics, /phantoma_prompt_eval_seconds_count\{model="tiny"\} [1-9]\d*/);
  t.match(metrics, /phantoma_worker_start_seconds_count\{model="tiny"\} \d+/);
});
