// The generated tiny model through real node-llama-cpp: tokenizer, chat template, generation, golden ids.
import t from 'tap';
import { createLogger } from '../../src/logger.ts';
import { createLlamaRuntime, loadModelFile, createContext, generateChat } from '../../src/models/llama.ts';
import { buildVocabulary } from '../../src/models/vocabulary.ts';
import { TEST_MODELS } from '../../src/models/test-models.ts';
import { tinyModelPath, runPhantoma } from '../helpers.ts';

const logger = createLogger({ level: 'silent' });
const path = await tinyModelPath();
const runtime = await createLlamaRuntime({ logger });
const loaded = await loadModelFile(runtime, path);
const { model } = loaded;
t.teardown(async () => {
  await model.dispose();
  await runtime.dispose();
});
const vocab = buildVocabulary(TEST_MODELS.tiny!.vocabSize);
const byteToken = (b: number): number => vocab.tokens.indexOf(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);

t.test('tokenizer round-trips text, with byte fallback for what the vocabulary lacks', async (t) => {
  for (const text of ['hello world', 'the answer is 42.', 'héllo wörld', 'emoji 🚀 and 中文', 'tabs\tand\nnewlines', '{"json": [1, 2]}']) {
    const ids = model.tokenize(text);
    t.equal(model.detokenize(ids), text, `round-trip: ${JSON.stringify(text)}`);
  }
  const ids = [...model.tokenize('é')].map(Number);
  const utf8 = [...Buffer.from('é')];
  t.ok(utf8.every((b) => ids.includes(byteToken(b))), `"é" is spelled with byte tokens ${utf8.map(byteToken)} (got ${ids})`);
  t.ok(model.tokenize(' hello').length < ' hello'.length, 'known words merge into fewer tokens than characters');
});

t.test('the chat template is recognised and renders ChatML with control tokens', async (t) => {
  const context = await createContext(model, { contextSize: 512, threads: 2, batchSize: 128 });
  t.teardown(() => context.dispose());
  const { LlamaChatSession } = await import('node-llama-cpp');
  const session = new LlamaChatSession({ contextSequence: context.getSequence() });
  t.equal(session.chatWrapper.constructor.name, 'ChatMLChatWrapper');
  const state = session.chatWrapper.generateContextState({
    chatHistory: [
      { type: 'system', text: 'be brief' },
      { type: 'user', text: 'hi' },
      { type: 'model', response: [] },
    ],
  });
  const ids = [...state.contextText.tokenize(model.tokenizer)].map(Number);
  t.equal(ids.filter((id) => id === vocab.imStart).length, 3, 'three <|im_start|> control tokens (system, user, assistant)');
  t.equal(ids.filter((id) => id === vocab.imEnd).length, 2, 'two <|im_end|> control tokens');
  t.match(model.detokenize(state.contextText.tokenize(model.tokenizer), true), /<\|im_start\|>user\nhi<\|im_end\|>\n<\|im_start\|>assistant\n/);
  session.dispose();
});

t.test('generation honours max tokens and reports usage', async (t) => {
  const context = await createContext(model, { contextSize: 512, threads: 2, batchSize: 128 });
  t.teardown(() => context.dispose());
  let streamed = '';
  const r = await generateChat(context, [{ role: 'user', content: 'tell me about the world' }], { maxTokens: 16, seed: 3, temperature: 0.8, onText: (x) => (streamed += x) });
  t.equal(r.finishReason, 'length');
  t.equal(r.completionTokens, 16);
  t.equal(r.tokens.length, 16);
  t.equal(streamed, r.text, 'streamed text equals the final text');
  t.ok(r.promptTokens > 5, `prompt tokens counted (${r.promptTokens})`);
});

t.test('golden: same prompt, seed and sampling give identical token ids across independent loads', async (t) => {
  const args = ['local-chat', '--json', '--seed', '7', '--temperature', '0.9', '--max-tokens', '24', 'What is private inference?'];
  const [a, b, other] = await Promise.all([runPhantoma(args), runPhantoma(args), runPhantoma(args.map((x) => (x === '7' ? '8' : x)))]);
  for (const r of [a, b, other]) t.equal(r.code, 0, r.stderr);
  const ta = JSON.parse(a.stdout).tokens as number[];
  const tb = JSON.parse(b.stdout).tokens as number[];
  t.equal(ta.length, 24);
  t.same(tb, ta, 'a second process loading the model independently produces the same ids');
  t.notSame(JSON.parse(other.stdout).tokens, ta, 'a different seed produces different ids (the comparison can fail)');

  const context = await createContext(model, { contextSize: 2048, threads: 2, batchSize: 512 });
  t.teardown(() => context.dispose());
  const inProcess = await generateChat(context, [{ role: 'user', content: 'What is private inference?' }], { maxTokens: 24, seed: 7, temperature: 0.9 });
  t.same(inProcess.tokens, ta, 'and so does this process, through the library directly');
});
