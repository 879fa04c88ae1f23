// The worker's sealed job in-process: real envelopes sealed by the client code, real keys from the real
// decapsulation, the gateway's line and the model as functions. What a client can open, in what order, and
// when each chunk is sealed relative to the generation loop.
import t from 'tap';
import { generateKeyPairSync } from 'node:crypto';
import { serveSealedJob, warmSealedJob, WARM_JOB_ROUNDS, type SealedJobDeps } from '../../src/ephemeral/sealed-job.ts';
import type { FromWorker } from '../../src/ephemeral/worker-protocol.ts';
import type { GenerateOptions, GenerateResult } from '../../src/models/llama.ts';
import { generateRequestKeyPair } from '../../src/sealed/kem.ts';
import { sealRequest, requestKeyFor } from '../../src/sealed/request.ts';
import { parseEnvelope } from '../../src/sealed/envelope.ts';
import { createChunkOpener, deriveSessionKeys } from '../../src/sealed/seal.ts';
import { decodeEvent, type SealedEvent } from '../../src/sealed/inner.ts';

const node = generateRequestKeyPair();
const client = generateKeyPairSync('ed25519');

function sealed(body: unknown, stream = true): { envelope: Buffer; responseKey: Buffer; keys: () => ReturnType<typeof deriveSessionKeys> } {
  const s = sealRequest({ node: { keyId: '0011223344556677', publicKeys: node.publicKeys }, clientName: 'alice', clientKey: client.privateKey, model: 'tiny', stream, body, nowMs: Date.now() });
  const env = parseEnvelope(s.envelope, 1 << 20);
  // What keyd hands the worker: the one-way keys of the real decapsulation.
  return { envelope: s.envelope, responseKey: s.keys.responseKey, keys: () => deriveSessionKeys(requestKeyFor(node.privateKeys, env)) };
}

/** Runs one job; `pieces` is what the stand-in model says, one token each. */
async function run(body: unknown, pieces: string[], o: { stream?: boolean; keys?: SealedJobDeps['takeKeys']; responseKey?: Buffer } = {}) {
  const s = sealed(body, o.stream ?? true);
  const lines: FromWorker[] = [];
  const order: string[] = [];
  let given: ReturnType<typeof deriveSessionKeys> | undefined;
  await serveSealedJob(
    { type: 'job', kind: 'sealed', requestId: 'r1', envelope: s.envelope.toString('base64'), prepared: true },
    {
      maxEnvelopeBytes: 1 << 20,
      contextSize: 4096,
      signal: new AbortController().signal,
      takeKeys: o.keys ?? (async () => (given = s.keys())),
      send: async (m) => {
        lines.push(m);
        order.push(m.type === 'sealed' ? 'sealed' : m.type);
      },
      generate: async (_job, opts: GenerateOptions): Promise<GenerateResult> => {
        for (const [i, p] of pieces.entries()) {
          opts.onTokens?.([i]);
          const before = lines.length;
          opts.onText?.(p);
          order.push(lines.length > before ? `text ${i} sealed in onText` : `text ${i} deferred`);
          await new Promise((res) => setImmediate(res));
        }
        return { text: pieces.join(''), tokens: pieces.map((_, i) => i), promptTokens: 5, completionTokens: pieces.length, finishReason: 'length' };
      },
      embed: () => Promise.reject(new Error('not an embeddings job')),
    },
  );
  const opener = createChunkOpener(o.responseKey ?? s.responseKey);
  const events: SealedEvent[] = lines.filter((m) => m.type === 'sealed').map((m) => decodeEvent(opener.open(Buffer.from((m as { data: string }).data, 'base64'))));
  return { lines, events, order, finished: opener.finished, given };
}

const chat = (maxTokens: number) => ({ messages: [{ role: 'user', content: 'Hello' }], max_tokens: maxTokens });

t.test('a streamed chat: every piece opens with the client key, in order, ending in done', async (t) => {
  const r = await run(chat(3), ['Hel', 'lo ', 'there']);
  t.same(r.events.filter((e) => e.t === 'text').map((e) => (e as { text: string }).text).join(''), 'Hello there');
  t.same(r.events.at(-1), { t: 'done', finish_reason: 'length', usage: { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 } });
  t.ok(r.finished, 'the last sealed chunk is the final one');
  const done = r.lines.at(-1) as Extract<FromWorker, { type: 'done' }>;
  t.equal(done.type, 'done');
  t.equal(done.sealedOutcome, 'ok');
  t.same(done.usage, { promptTokens: 0, completionTokens: 0 }, 'the gateway learns no token counts');
  t.ok(r.given!.bodyKey.every((b) => b === 0), 'the body key is zero-filled once the body is open');
});

t.test('text is sealed after the generation loop moves on, except the token that spends max_tokens', async (t) => {
  const r = await run(chat(3), ['a', 'b', 'c']);
  t.same(r.order.filter((x) => x.startsWith('text')), ['text 0 deferred', 'text 1 deferred', 'text 2 sealed in onText']);
  // Stopped early (an end-of-text token): nothing spends the budget, so every piece waits for the loop.
  const early = await run(chat(16), ['a', 'b']);
  t.same(early.order.filter((x) => x.startsWith('text')), ['text 0 deferred', 'text 1 deferred']);
  t.same(early.events.filter((e) => e.t === 'text').map((e) => (e as { text: string }).text), ['a', 'b'], 'and each still goes out, in order');
});

t.test('not streamed: the text is gathered into one chunk before done', async (t) => {
  const r = await run(chat(3), ['a', 'b', 'c'], { stream: false });
  t.same(r.events.map((e) => e.t), ['text', 'done']);
  t.same((r.events[0] as { text: string }).text, 'abc');
});

t.test('a body that does not open comes back as a sealed sealed_open_failed', async (t) => {
  const other = sealed(chat(3));
  // keyd's keys for another envelope (the response key is that one's too, so the error opens with it).
  const r = await run(chat(3), ['x'], { keys: async () => other.keys(), responseKey: other.responseKey });
  t.equal(r.events.length, 1);
  t.match(r.events[0], { t: 'error', code: 'sealed_open_failed' });
  t.equal((r.lines.at(-1) as { sealedOutcome?: string }).sealedOutcome, 'error');
});

t.test('a body that opens but is not a valid request comes back sealed with its code', async (t) => {
  const r = await run({ messages: 'not a list' }, ['x']);
  t.equal(r.events.length, 1);
  t.match(r.events[0], { t: 'error', code: 'invalid_request' });
});

t.test('warm-up: the serving code runs on throwaway jobs and yields their sealed lines only', async (t) => {
  const lines = await warmSealedJob({ model: 'tiny', contextSize: 4096, maxEnvelopeBytes: 1 << 20 });
  // Per round: three text pieces and the final done.
  t.equal(lines, WARM_JOB_ROUNDS * 4);
  t.equal(await warmSealedJob({ model: 'tiny', contextSize: 4096, maxEnvelopeBytes: 1 << 20, rounds: 1 }), 4);
});
