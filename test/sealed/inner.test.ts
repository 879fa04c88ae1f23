// Inside the seal (issue 15 additions): the worker reads embeddings, tools and structured-output bodies
// with the plaintext routes' schemas and job builders, and the client accepts the new events only when
// well-formed.
import t from 'tap';
import { jobFromSealedBody, decodeEvent, encodeEvent } from '../../src/sealed/inner.ts';
import { isPhantomaError } from '../../src/errors.ts';

const clear = { model: 'tiny', stream: false };
const open = (body: unknown) => jobFromSealedBody(Buffer.from(JSON.stringify(body)), clear, 'r1', 2048);
const codeOf = (f: () => unknown): string | undefined => {
  try {
    f();
  } catch (err) {
    return isPhantomaError(err) ? err.code : 'not-phantoma';
  }
  return undefined;
};

t.test('bodies become the same jobs as on the plaintext routes', async (t) => {
  t.match(open({ input: ['a', 'b'] }), { shape: 'embeddings', job: { kind: 'embeddings', inputs: ['a', 'b'] } });
  t.match(open({ input: 'a', encoding_format: 'base64' }), { shape: 'embeddings', job: { inputs: ['a'] } });
  const tools = [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { x: { type: 'integer' } } } } }];
  const chat = open({
    messages: [
      { role: 'user', content: 'q' },
      { role: 'assistant', content: null, tool_calls: [{ id: 'c1', type: 'function', function: { name: 'f', arguments: '{"x":1}' } }] },
      { role: 'tool', tool_call_id: 'c1', content: '{"y":2}' },
    ],
    tools,
    tool_choice: 'required',
  });
  t.match(chat.job, { kind: 'chat', toolChoice: 'required', tools: [{ name: 'f' }], messages: [{ role: 'user' }, { role: 'assistant', content: '', toolCalls: [{ id: 'c1', name: 'f', arguments: '{"x":1}', result: '{"y":2}' }] }] });
  t.match(open({ messages: [{ role: 'user', content: 'q' }], response_format: { type: 'json_schema', json_schema: { name: 'n', schema: { type: 'object', properties: { a: { enum: [1, 2] } } } } } }).job, {
    responseFormat: { type: 'json_schema', schema: { type: 'object' } },
  });
});

t.test('refusals carry the plaintext codes', async (t) => {
  t.equal(codeOf(() => open({ input: [] })), 'invalid_request');
  t.equal(codeOf(() => open({ input: 'a', stream: true })), 'invalid_request', 'stream is a clear field');
  t.equal(codeOf(() => open({ messages: [{ role: 'tool', tool_call_id: 'x', content: 'r' }] })), 'invalid_request');
  t.equal(codeOf(() => open({ messages: [{ role: 'user', content: 'q' }], response_format: { type: 'json_schema', json_schema: { name: 'n', schema: { type: 'string', pattern: 'x' } } } })), 'unsupported_parameter');
  t.equal(codeOf(() => open({ messages: [{ role: 'user', content: 'q' }], top_logprobs: 2 })), 'invalid_request', 'top_logprobs without logprobs');
  t.match(open({ messages: [{ role: 'user', content: 'q' }], logprobs: true, top_logprobs: 2 }).job, { params: { logprobs: 2 } });
  t.match(open({ prompt: 'p', logprobs: 0 }).job, { params: { logprobs: 0 } });
});

t.test('the new events decode; malformed ones are refused', async (t) => {
  for (const e of [
    { t: 'tool_call', index: 0, id: 'call_1', name: 'f', arguments: '{"x"' },
    { t: 'tool_call', index: 0, arguments: ':1}' },
    { t: 'logprobs', entries: [{ token: 'a', logprob: -0.5, bytes: [97], top: [] }] },
    { t: 'embedding', index: 1, offset: 0, length: 2, b64: Buffer.alloc(8).toString('base64') },
    { t: 'done', finish_reason: 'tool_calls', usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 } },
  ] as const) {
    t.same(decodeEvent(encodeEvent(e as never)), e);
  }
  for (const bad of [{ t: 'tool_call', index: 'x', arguments: '' }, { t: 'embedding', index: 0, offset: 0, b64: 'AA==' }, { t: 'done', finish_reason: 'abort', usage: {} }]) {
    t.equal(codeOf(() => decodeEvent(Buffer.from(JSON.stringify(bad)))), 'sealed_open_failed', JSON.stringify(bad));
  }
});
