// The one module that imports node-llama-cpp. Everything else talks to these typed wrappers.
// The prebuilt CPU binary is used as shipped: never built, never downloaded, no GPU probing.
import { getLlama, LlamaChat, LlamaCompletion, LlamaLogLevel, resolveChatWrapper, type ChatWrapper, type Llama, type LlamaModel, type LlamaContext, type ChatHistoryItem } from 'node-llama-cpp';
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

export type FinishReason = 'stop' | 'length' | 'abort';

export interface GenerateResult {
  text: string;
  tokens: number[];
  promptTokens: number;
  completionTokens: number;
  finishReason: FinishReason;
}

function toHistory(messages: readonly ChatMessage[]): ChatHistoryItem[] {
  const history: ChatHistoryItem[] = messages.map((m) =>
    m.role === 'system' ? { type: 'system', text: m.content } : m.role === 'user' ? { type: 'user', text: m.content } : { type: 'model', response: [m.content] },
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

/** One chat completion on a fresh context sequence; the sequence is disposed afterwards. */
export async function generateChat(context: LlamaContext, messages: readonly ChatMessage[], opts: GenerateOptions & { chatWrapper?: ChatWrapper }): Promise<GenerateResult> {
  const sequence = context.getSequence();
  const chat = new LlamaChat({ contextSequence: sequence, autoDisposeSequence: true, ...(opts.chatWrapper ? { chatWrapper: opts.chatWrapper } : {}) });
  const tokens: number[] = [];
  try {
    const history = toHistory(messages);
    const promptTokens = chat.chatWrapper.generateContextState({ chatHistory: history }).contextText.tokenize(context.model.tokenizer).length;
    assertFits(promptTokens, opts.maxTokens, context.contextSize);
    const res = await chat.generateResponse(history, samplingOptions(opts, tokens));
    return resultOf(res.response, res.metadata.stopReason, tokens, sequence.tokenMeter.usedInputTokens);
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
