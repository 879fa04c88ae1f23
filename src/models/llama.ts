// The one module that imports node-llama-cpp. Everything else talks to these typed wrappers.
// The prebuilt CPU binary is used as shipped: never built, never downloaded, no GPU probing.
import { getLlama, LlamaChat, LlamaCompletion, LlamaLogLevel, resolveChatWrapper, type ChatWrapper, type Llama, type LlamaModel, type LlamaContext, type ChatHistoryItem, type ChatModelFunctions, type LlamaGrammar, type ChatModelResponse } from 'node-llama-cpp';
import type { OutputFormat, ToolCall, ToolChoice, ToolSpec, TokenLogprob } from '../ephemeral/worker-protocol.ts';
import { toolCallSchema } from './grammar.ts';
import { randomBytes } from 'node:crypto';
import type { Logger } from '../logger.ts';
import { readGgufSummary, type GgufSummary } from './gguf-reader.ts';
import { sha256File } from './test-models.ts';
import { ModelError, PhantomaError, ERRORS, isPhantomaError } from '../errors.ts';

export interface LlamaRuntime {
  readonly llama: Llama;
  dispose(): Promise<void>;
}

export async function createLlamaRuntime(deps: { logger: Logger }): Promise<LlamaRuntime> {
  const log = deps.logger.child({ component: 'llama.cpp' });
  const llama = await getLlama({
    build: 'never',
    gpu: false,
    usePrebuiltBinaries: true,
    progressLogs: false,
    logLevel: LlamaLogLevel.warn,
    // llama.cpp's own log lines describe tensors and buffers, never prompts; still only warnings and up.
    logger: (level, message) => {
      const line = message.trimEnd();
      if (line === '') return;
      if (level === LlamaLogLevel.error || level === LlamaLogLevel.fatal) log.error({ native: line }, 'llama.cpp error');
      else log.debug({ native: line }, 'llama.cpp');
    },
  });
  return { llama, dispose: () => llama.dispose() };
}

export interface LoadedModel {
  readonly model: LlamaModel;
  readonly summary: GgufSummary;
  readonly path: string;
}

/** Validates the file (bounds, optional digest) before llama.cpp maps it, so a bad file cannot crash us. */
export async function loadModelFile(runtime: LlamaRuntime, path: string, opts: { sha256?: string } = {}): Promise<LoadedModel> {
  const summary = readGgufSummary(path);
  if (opts.sha256) {
    const actual = await sha256File(path);
    if (actual !== opts.sha256) {
      throw new ModelError(ERRORS.MODEL_DIGEST_MISMATCH, `model file ${path} has digest ${actual}, expected ${opts.sha256}`, { details: { path } });
    }
  }
  try {
    const model = await runtime.llama.loadModel({ modelPath: path, useMmap: true, gpuLayers: 0 });
    return { model, summary, path };
  } catch (err) {
    if (isPhantomaError(err)) throw err;
    throw new ModelError(ERRORS.MODEL_LOAD_FAILED, `llama.cpp could not load ${path}: ${(err as Error).message}`, { cause: err, details: { path } });
  }
}

export interface ContextOptions {
  contextSize: number;
  threads: number;
  batchSize: number;
}

export function createContext(model: LlamaModel, opts: ContextOptions): Promise<LlamaContext> {
  return model.createContext({
    contextSize: opts.contextSize,
    batchSize: opts.batchSize,
    // Explicit: node-llama-cpp's default picks 4 threads on a 2-core machine, which collapses decoding.
    threads: opts.threads,
    sequences: 1,
  });
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
  /** An assistant turn's tool calls, each with the result the client sent back (role "tool"). */
  toolCalls?: ToolCall[];
}

export interface GenerateOptions {
  maxTokens: number;
  temperature?: number;
  topP?: number;
  seed?: number;
  stop?: string[];
  signal?: AbortSignal;
  onText?: (text: string) => void;
  onTokens?: (tokens: number[]) => void;
}

export type FinishReason = 'stop' | 'length' | 'abort' | 'tool_calls';

export interface GenerateResult {
  text: string;
  tokens: number[];
  promptTokens: number;
  completionTokens: number;
  finishReason: FinishReason;
  /** The model's tool calls (chat with tools); the text is then what it said besides them, if anything. */
  toolCalls?: ToolCall[];
}

function parseJsonOr(text: string | undefined): unknown {
  if (text === undefined) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** An assistant turn; its tool calls render in the chat template's own call/result syntax. */
function modelItem(m: ChatMessage): ChatHistoryItem {
  const response: ChatModelResponse['response'] = [];
  if (m.content !== '') response.push(m.content);
  for (const c of m.toolCalls ?? []) {
    response.push({ type: 'functionCall', name: c.name, params: parseJsonOr(c.arguments), result: parseJsonOr(c.result) });
  }
  return { type: 'model', response };
}

function toHistory(messages: readonly ChatMessage[]): ChatHistoryItem[] {
  const history: ChatHistoryItem[] = messages.map((m) =>
    m.role === 'system' ? { type: 'system', text: m.content } : m.role === 'user' ? { type: 'user', text: m.content } : modelItem(m),
  );
  history.push({ type: 'model', response: [] });
  return history;
}

function samplingOptions(opts: GenerateOptions, tokens: number[]) {
  return {
    maxTokens: opts.maxTokens,
    ...(opts.temperature === undefined ? {} : { temperature: opts.temperature }),
    ...(opts.topP === undefined ? {} : { topP: opts.topP }),
    ...(opts.seed === undefined ? {} : { seed: opts.seed }),
    ...(opts.stop && opts.stop.length > 0 ? { customStopTriggers: opts.stop } : {}),
    ...(opts.signal ? { signal: opts.signal, stopOnAbortSignal: true } : {}),
    ...(opts.onText ? { onTextChunk: opts.onText } : {}),
    onToken: (t: readonly unknown[]) => {
      const ids = t.map(Number);
      for (const id of ids) tokens.push(id);
      opts.onTokens?.(ids);
    },
  };
}

/** Refuses rather than silently dropping the start of a conversation to make room. */
function assertFits(promptTokens: number, maxTokens: number, contextSize: number): void {
  if (promptTokens + maxTokens > contextSize) {
    throw new PhantomaError(ERRORS.CONTEXT_LENGTH_EXCEEDED, `the prompt (${promptTokens} tokens) plus max_tokens (${maxTokens}) exceed the context of ${contextSize} tokens`, {
      details: { param: 'messages' },
    });
  }
}

function finishReasonOf(stopReason: string): FinishReason {
  return stopReason === 'maxTokens' ? 'length' : stopReason === 'abort' ? 'abort' : 'stop';
}

function resultOf(text: string, stopReason: string, tokens: number[], promptTokens: number): GenerateResult {
  return { text, tokens, promptTokens, completionTokens: tokens.length, finishReason: finishReasonOf(stopReason) };
}

/**
 * Resolves the model's chat wrapper once. node-llama-cpp does this on every LlamaChat by default, which
 * costs 300-450 ms here (it renders the Jinja template against its known formats): a worker does it while
 * warming up, not while a client waits. Rendering a throwaway history also warms the template code path.
 */
export function prepareChatWrapper(model: LlamaModel): ChatWrapper {
  const wrapper = resolveChatWrapper(model);
  if (!wrapper) throw new ModelError(ERRORS.MODEL_LOAD_FAILED, 'the model has no usable chat template');
  wrapper.generateContextState({ chatHistory: toHistory([{ role: 'user', content: 'warm-up' }]) }).contextText.tokenize(model.tokenizer);
  return wrapper;
}

export interface ChatStructure {
  /** Structured output: the whole answer is grammar-constrained JSON. */
  responseFormat?: OutputFormat;
  /** Declared tools and how the model may use them (absent: no tools). */
  tools?: ToolSpec[];
  toolChoice?: ToolChoice;
}

export function newToolCallId(): string {
  return `call_${randomBytes(12).toString('base64url')}`;
}

/**
 * The instruction a forced call (tool_choice required or named) adds as the first system message. The
 * grammar makes the answer a call whatever the model would have said; this tells it which and how.
 */
function forcedCallInstruction(tools: readonly ToolSpec[]): string {
  const list = tools.map((t) => ({ name: t.name, ...(t.description ? { description: t.description } : {}), parameters: t.parameters }));
  return (
    `You must call ${tools.length === 1 ? 'the function below' : 'exactly one of the functions below'}. ` +
    'Reply with only a JSON object {"name": <function name>, "arguments": <arguments object>}.\n' +
    `Functions: ${JSON.stringify(list)}`
  );
}

async function grammarFor(context: LlamaContext, s: ChatStructure): Promise<LlamaGrammar | undefined> {
  const llama = context.model.llama;
  if (s.tools && s.toolChoice && s.toolChoice !== 'auto') {
    const choice = s.toolChoice;
    const chosen = choice === 'required' ? s.tools : s.tools.filter((t) => t.name === choice.name);
    return tightenJsonGrammar(llama, await llama.createGrammarForJsonSchema(toolCallSchema(chosen) as never));
  }
  if (s.responseFormat?.type === 'json_object') return llama.getGrammarFor('json');
  if (s.responseFormat?.type === 'json_schema') return tightenJsonGrammar(llama, await llama.createGrammarForJsonSchema(s.responseFormat.schema as never));
  return undefined;
}

/**
 * Tightens node-llama-cpp's JSON-schema grammar where it admits text that parses but does not validate:
 * - length-bounded strings (minLength/maxLength) take printable ASCII and JSON escapes only: the grammar
 *   admits byte tokens that leave a character's UTF-8 incomplete, which detokenise to several U+FFFD and
 *   outgrow the bound (an escape such as \u00e9 still gives any character, counted once);
 * - integers have no exponent (5e-3 is not an integer), and exponents have at most two digits (1e9999
 *   parses as Infinity).
 */
async function tightenJsonGrammar(llama: Llama, g: LlamaGrammar): Promise<LlamaGrammar> {
  const exponent = '([eE] [-+]? [0-9] [0-9]?)?';
  const grammar =
    g.grammar
      .replaceAll('( string-char-rule ){', '( string-ascii-char-rule ){')
      .replace(/^integer-number-rule ::= .*$/m, 'integer-number-rule ::= "-"? ("0" | [1-9] [0-9]{0,15})')
      .replace(/^fractional-number-rule ::= .*$/m, `fractional-number-rule ::= "-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ${exponent}`) +
    '\nstring-ascii-char-rule ::= [ !#-\\[\\]-~] | "\\\\" ["\\\\/bfnrt] | "\\\\u" [0-9a-fA-F]{4}\n';
  return llama.createGrammar({ grammar, stopGenerationTriggers: g.stopGenerationTriggers, trimWhitespaceSuffix: g.trimWhitespaceSuffix });
}

/** One chat completion on a fresh context sequence; the sequence is disposed afterwards. */
export async function generateChat(context: LlamaContext, messages: readonly ChatMessage[], opts: GenerateOptions & ChatStructure & { chatWrapper?: ChatWrapper }): Promise<GenerateResult> {
  const forced = opts.tools !== undefined && opts.toolChoice !== undefined && opts.toolChoice !== 'auto';
  const native = opts.tools !== undefined && !forced;
  const grammar = await grammarFor(context, opts);
  const sequence = context.getSequence();
  const chat = new LlamaChat({ contextSequence: sequence, autoDisposeSequence: true, ...(opts.chatWrapper ? { chatWrapper: opts.chatWrapper } : {}) });
  const tokens: number[] = [];
  try {
    const history = toHistory(forced ? [{ role: 'system', content: forcedCallInstruction(opts.tools!) }, ...messages] : messages);
    // tool_choice auto: the tools are documented and called in the chat template's own syntax, which
    // node-llama-cpp parses (and constrains by each function's parameter grammar once a call starts).
    const functions: ChatModelFunctions | undefined = native
      ? Object.fromEntries(opts.tools!.map((t) => [t.name, { ...(t.description ? { description: t.description } : {}), params: t.parameters as never }]))
      : undefined;
    const promptTokens = chat.chatWrapper
      .generateContextState({ chatHistory: history, ...(functions ? { availableFunctions: functions, documentFunctionParams: true } : {}) })
      .contextText.tokenize(context.model.tokenizer).length;
    assertFits(promptTokens, opts.maxTokens, context.contextSize);
    const sampling = samplingOptions(forced ? { ...opts, onText: undefined } : opts, tokens);
    const res = functions
      ? await chat.generateResponse(history, { ...sampling, functions, documentFunctionParams: true })
      : await chat.generateResponse(history, { ...sampling, ...(grammar ? { grammar } : {}) });
    const result = resultOf(res.response, res.metadata.stopReason, tokens, sequence.tokenMeter.usedInputTokens);
    if (native && res.functionCalls && res.functionCalls.length > 0) {
      result.toolCalls = res.functionCalls.map((c) => ({ id: newToolCallId(), name: c.functionName, arguments: JSON.stringify(c.params ?? {}) }));
      result.finishReason = 'tool_calls';
    } else if (forced && result.finishReason === 'stop') {
      // The grammar admits only a complete call; cut short (max_tokens) it stays text with finish "length".
      const call = JSON.parse(res.response) as { name: string; arguments: unknown };
      result.toolCalls = [{ id: newToolCallId(), name: call.name, arguments: JSON.stringify(call.arguments) }];
      result.text = '';
      result.finishReason = 'tool_calls';
    }
    return result;
  } finally {
    chat.dispose();
  }
}

/** A raw text completion (no chat template), for /v1/completions. */
export async function generateCompletion(context: LlamaContext, prompt: string, opts: GenerateOptions): Promise<GenerateResult> {
  const sequence = context.getSequence();
  const completion = new LlamaCompletion({ contextSequence: sequence, autoDisposeSequence: true });
  const tokens: number[] = [];
  try {
    assertFits(context.model.tokenize(prompt).length, opts.maxTokens, context.contextSize);
    const res = await completion.generateCompletionWithMeta(prompt, samplingOptions(opts, tokens));
    return resultOf(res.response, res.metadata.stopReason, tokens, sequence.tokenMeter.usedInputTokens);
  } finally {
    completion.dispose();
  }
}

/** The model's embedding width. */
export function embeddingLength(model: LlamaModel): number {
  return model.embeddingVectorSize;
}

/**
 * Embeddings for each input on an embedding context made for this one job (a one-shot worker disposes its
 * generation context first, so the two are never held together). Vectors are L2-normalised, as OpenAI's are.
 */
export async function generateEmbeddings(
  model: LlamaModel,
  inputs: readonly string[],
  opts: ContextOptions & { onEmbedding?: (index: number, vector: number[]) => void | Promise<void> },
): Promise<{ promptTokens: number }> {
  // One batch holds a whole input (an embedding is pooled over every token of it at once).
  const ctx = await model.createEmbeddingContext({ contextSize: opts.contextSize, batchSize: Math.max(opts.batchSize, opts.contextSize), threads: opts.threads });
  let promptTokens = 0;
  try {
    for (let i = 0; i < inputs.length; i++) {
      const tokens = model.tokenize(inputs[i]!);
      if (tokens.length > opts.contextSize) {
        throw new PhantomaError(ERRORS.CONTEXT_LENGTH_EXCEEDED, `input ${i} has ${tokens.length} tokens; this model embeds at most ${opts.contextSize}`, { details: { param: 'input' } });
      }
      promptTokens += tokens.length;
      const e = await ctx.getEmbeddingFor(tokens);
      const v = [...e.vector];
      const norm = Math.hypot(...v);
      await opts.onEmbedding?.(i, norm > 0 ? v.map((x) => x / norm) : v);
    }
  } finally {
    await ctx.dispose();
  }
  return { promptTokens };
}

export type { TokenLogprob };

/**
 * A generation that reports log-probabilities. node-llama-cpp gives token probabilities only to its
 * low-level evaluate loop, so this runs that loop itself: the prompt's tokens (the chat template's
 * rendering, or the raw prompt), sampling with the same temperature/top-p/seed options, and its own ends
 * (an end-of-generation token, max tokens, a stop string, held back until it cannot be one).
 * Text goes out with the entries of the tokens it came from.
 */
export async function generateWithLogprobs(
  context: LlamaContext,
  input: { messages: readonly ChatMessage[]; chatWrapper: ChatWrapper } | { prompt: string },
  opts: GenerateOptions & { topLogprobs: number; onLogprobs?: (text: string, entries: TokenLogprob[]) => void },
): Promise<GenerateResult> {
  const model = context.model;
  const promptTokens =
    'prompt' in input
      ? [...(model.tokens.shouldPrependBosToken && model.tokens.bos !== null ? [model.tokens.bos] : []), ...model.tokenize(input.prompt)]
      : input.chatWrapper.generateContextState({ chatHistory: toHistory(input.messages) }).contextText.tokenize(model.tokenizer);
  assertFits(promptTokens.length, opts.maxTokens, context.contextSize);
  const sequence = context.getSequence();
  const generated: number[] = [];
  const stops = opts.stop ?? [];
  const holdBack = Math.max(0, ...stops.map((s) => s.length - 1));
  let sent = 0;
  let pending: TokenLogprob[] = [];
  let finishReason: FinishReason = 'length';
  const piece = (t: number): { token: string; bytes: number[] } => {
    const token = model.detokenize([t as never], false);
    return { token, bytes: [...Buffer.from(token, 'utf8')] };
  };
  const emit = (text: string): void => {
    if (text === '' && pending.length === 0) return;
    opts.onText?.(text);
    opts.onLogprobs?.(text, pending);
    pending = [];
  };
  let text = '';
  try {
    const out = sequence.evaluateWithMetadata(promptTokens, { confidence: true, probabilities: true }, {
      ...(opts.temperature === undefined ? {} : { temperature: opts.temperature }),
      ...(opts.topP === undefined ? {} : { topP: opts.topP }),
      ...(opts.seed === undefined ? {} : { seed: opts.seed }),
    });
    for await (const step of out) {
      if (opts.signal?.aborted) {
        finishReason = 'abort';
        break;
      }
      const token = Number(step.token);
      if (model.isEogToken(step.token)) {
        finishReason = 'stop';
        break;
      }
      generated.push(token);
      opts.onTokens?.([token]);
      const top = [...step.probabilities.entries()]
        .sort((a, b) => b[1] - a[1])
        .slice(0, opts.topLogprobs)
        .map(([t, p]) => ({ ...piece(Number(t)), logprob: Math.log(p) }));
      pending.push({ ...piece(token), logprob: Math.log(step.confidence), top });
      text = model.detokenize(generated as never[]);
      const hit = stops.map((s) => text.indexOf(s, Math.max(0, sent - holdBack))).filter((i) => i !== -1);
      if (hit.length > 0) {
        text = text.slice(0, Math.min(...hit));
        finishReason = 'stop';
        break;
      }
      if (generated.length >= opts.maxTokens) break;
      // Held back: the end of a possible stop string, or a character whose UTF-8 is not complete yet.
      let ready = text.length - holdBack;
      while (ready > sent && text.charCodeAt(ready - 1) === 0xfffd) ready--;
      if (ready > sent) {
        emit(text.slice(sent, ready));
        sent = ready;
      }
    }
  } finally {
    sequence.dispose();
  }
  emit(text.length > sent ? text.slice(sent) : '');
  return { text, tokens: generated, promptTokens: promptTokens.length, completionTokens: generated.length, finishReason };
}
