// The one module that imports node-llama-cpp. Everything else talks to these typed wrappers.
// The prebuilt CPU binary is used as shipped: never built, never downloaded, no GPU probing.
import { getLlama, LlamaChat, LlamaLogLevel, type Llama, type LlamaModel, type LlamaContext, type ChatHistoryItem } from 'node-llama-cpp';
import type { Logger } from '../logger.ts';
import { readGgufSummary, type GgufSummary } from './gguf-reader.ts';
import { sha256File } from './test-models.ts';
import { ModelError, ERRORS, isPhantomaError } from '../errors.ts';

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

/** One chat completion on a fresh context sequence; the sequence is disposed afterwards. */
export async function generateChat(context: LlamaContext, messages: readonly ChatMessage[], opts: GenerateOptions): Promise<GenerateResult> {
  const sequence = context.getSequence();
  const chat = new LlamaChat({ contextSequence: sequence, autoDisposeSequence: true });
  const tokens: number[] = [];
  try {
    const res = await chat.generateResponse(toHistory(messages), {
      maxTokens: opts.maxTokens,
      ...(opts.temperature === undefined ? {} : { temperature: opts.temperature }),
      ...(opts.topP === undefined ? {} : { topP: opts.topP }),
      ...(opts.seed === undefined ? {} : { seed: opts.seed }),
      ...(opts.stop && opts.stop.length > 0 ? { customStopTriggers: opts.stop } : {}),
      ...(opts.signal ? { signal: opts.signal, stopOnAbortSignal: true } : {}),
      onTextChunk: opts.onText,
      onToken: (t) => {
        for (const id of t) tokens.push(id);
        opts.onTokens?.(t.map(Number));
      },
    });
    const meter = sequence.tokenMeter;
    const reason = res.metadata.stopReason;
    return {
      text: res.response,
      tokens,
      promptTokens: meter.usedInputTokens,
      completionTokens: tokens.length,
      finishReason: reason === 'maxTokens' ? 'length' : reason === 'abort' ? 'abort' : 'stop',
    };
  } finally {
    chat.dispose();
  }
}
