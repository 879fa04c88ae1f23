// The one message protocol between the gateway and a one-shot worker, imported by both sides.
// Newline-delimited JSON over the worker's inherited stdin (to the worker) and stdout (from it): no
// TCP, no ports. Each side bounds line length, and any line that does not parse is a protocol error that
// ends the worker. Messages carry ids, counts and generated text — the worker's stdout goes only to the
// gateway, which never logs it.
import type { JobTimes } from './job-timing.ts';

export const MAX_MESSAGE_BYTES = 8 * 1024 * 1024;

export interface SamplingParams {
  maxTokens: number;
  temperature?: number;
  topP?: number;
  seed?: number;
  stop?: string[];
  /** Report log-probabilities with this many alternatives per token (0: the chosen token's only). */
  logprobs?: number;
}

/** A generated token's log-probability (OpenAI `logprobs`), with its most likely alternatives. */
export interface TokenLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  top: Array<{ token: string; logprob: number; bytes: number[] }>;
}

/** A tool call the model made, or one from the history with its result (issue 15). `arguments` is JSON text. */
export interface ToolCall {
  id: string;
  name: string;
  arguments: string;
  /** The `role: "tool"` message answering this call (history only). */
  result?: string;
}

export interface ChatJobMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
  /** Assistant turns that called tools, each call with its result. */
  toolCalls?: ToolCall[];
}

/** Structured output: any JSON, or JSON matching a schema in the grammar subset (src/models/grammar.ts). */
export type OutputFormat = { type: 'json_object' } | { type: 'json_schema'; schema: Record<string, unknown> };

export interface ToolSpec {
  name: string;
  description?: string;
  parameters: Record<string, unknown>;
}

/** auto: the model may call (the chat template's own call syntax); required/named: a grammar forces one call. */
export type ToolChoice = 'auto' | 'required' | { name: string };

export type JobMessage =
  | {
      type: 'job';
      kind: 'chat';
      requestId: string;
      messages: ChatJobMessage[];
      params: SamplingParams;
      responseFormat?: OutputFormat;
      /** Absent when tool_choice is "none" or no tools were declared. */
      tools?: ToolSpec[];
      toolChoice?: ToolChoice;
    }
  | { type: 'job'; kind: 'completion'; requestId: string; prompt: string; params: SamplingParams }
  /** Embeddings for every input, in one worker (issue 15). */
  | { type: 'job'; kind: 'embeddings'; requestId: string; inputs: string[] }
  /**
   * A sealed request (docs/protocol.md): the whole envelope, base64; only this worker can open it.
   * `prepared`: the gateway has asked keyd to push this worker's request key onto its held connection.
   */
  | { type: 'job'; kind: 'sealed'; requestId: string; envelope: string; prepared?: boolean };

export type FinishReason = 'stop' | 'length' | 'abort' | 'tool_calls';

export type ToWorker = JobMessage | { type: 'cancel' };

export interface Usage {
  promptTokens: number;
  completionTokens: number;
}

export type FromWorker =
  | { type: 'ready'; pid: number; model: string; contextSize: number; loadMs: number }
  | { type: 'chunk'; text: string; logprobs?: TokenLogprob[] }
  /** The model's tool calls, sent once before `done` (finishReason tool_calls). */
  | { type: 'tool_calls'; calls: ToolCall[] }
  /** One input's embedding (an embeddings job sends one per input, in order, before `done`). */
  | { type: 'embedding'; index: number; embedding: number[] }
  /** A sealed chunk for the client (base64 of `u8 final ‖ AES-256-GCM(...)`): the gateway relays it as is. */
  | { type: 'sealed'; data: string; final: boolean }
  | ({
      type: 'done';
      finishReason: FinishReason;
      usage: Usage;
      /** Sealed jobs only: the answer's last sealed event was `done` (ok) or `error`; usage is not reported. */
      sealedOutcome?: 'ok' | 'error';
    } & JobTimes)
  | { type: 'error'; code: string; message: string };

export function encodeMessage(m: ToWorker | FromWorker): string {
  return JSON.stringify(m) + '\n';
}

/** Splits a byte stream into messages; throws on an oversized or malformed line. */
export function createLineDecoder<T>(onMessage: (m: T) => void, maxBytes = MAX_MESSAGE_BYTES): (chunk: Buffer) => void {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  return (chunk) => {
    let start = 0;
    for (let nl = chunk.indexOf(10, start); nl !== -1; nl = chunk.indexOf(10, start)) {
      pending.push(chunk.subarray(start, nl));
      const line = Buffer.concat(pending).toString('utf8');
      pending = [];
      pendingBytes = 0;
      start = nl + 1;
      let parsed: unknown;
      try {
        parsed = JSON.parse(line);
      } catch {
        throw new Error('worker protocol: a line is not JSON');
      }
      if (typeof parsed !== 'object' || parsed === null || typeof (parsed as { type?: unknown }).type !== 'string') {
        throw new Error('worker protocol: a message has no type');
      }
      onMessage(parsed as T);
    }
    if (start < chunk.length) {
      pendingBytes += chunk.length - start;
      if (pendingBytes > maxBytes) throw new Error('worker protocol: message too large');
      pending.push(chunk.subarray(start));
    }
  };
}
