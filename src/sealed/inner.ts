// What travels inside the seal (docs/protocol.md, "Inside the seal"): the request body the worker opens,
// and the events it seals back. Pure; shared by the worker (open the body, seal events) and the client SDK
// (seal the body, open events).
import { Value } from '@sinclair/typebox/value';
import { ChatCompletionRequest, CompletionRequest, EmbeddingsRequest, chatJob, completionJob, embeddingsJob } from '../gateway/openai.ts';
import { ERRORS, PhantomaError } from '../errors.ts';
import type { JobMessage, TokenLogprob } from '../ephemeral/worker-protocol.ts';

/** Events inside sealed chunks. `done` and `error` are final: exactly one of them ends every answer. */
export type SealedEvent =
  | { t: 'text'; text: string }
  /** Log-probabilities of the tokens of the text sent before it (requests with logprobs). */
  | { t: 'logprobs'; entries: TokenLogprob[] }
  /** A tool call: the first event of a call carries id and name, the arguments (JSON text) follow in pieces. */
  | { t: 'tool_call'; index: number; id?: string; name?: string; arguments: string }
  /** Part of input `index`'s embedding: float32 little-endian, base64, starting at float `offset` of `length`. */
  | { t: 'embedding'; index: number; offset: number; length: number; b64: string }
  | { t: 'done'; finish_reason: 'stop' | 'length' | 'tool_calls'; usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number } }
  | { t: 'error'; code: string; status: number; message: string };

/**
 * The worker's reading of an opened body: an OpenAI chat (`messages`) or completion (`prompt`) request
 * without `model` and `stream`, which are the envelope's authenticated clear fields. Everything the
 * plaintext routes' schemas refuse is refused here with the same codes, sealed back to the client.
 */
export function jobFromSealedBody(json: Uint8Array, clear: { model: string; stream: boolean }, requestId: string, contextSize: number): { shape: 'chat' | 'completion' | 'embeddings'; job: JobMessage } {
  let body: unknown;
  try {
    body = JSON.parse(Buffer.from(json.buffer, json.byteOffset, json.length).toString('utf8'));
  } catch {
    throw new PhantomaError(ERRORS.INVALID_JSON, 'the sealed body is not valid JSON');
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new PhantomaError(ERRORS.INVALID_REQUEST, 'the sealed body must be a JSON object');
  const b = body as Record<string, unknown>;
  if ('model' in b || 'stream' in b) throw new PhantomaError(ERRORS.INVALID_REQUEST, 'model and stream are clear fields of the envelope, not part of the sealed body');
  if ('input' in b) {
    // Embeddings (issue 15): the envelope's stream flag has no meaning for them and is not part of the body.
    const emb = { ...b, model: clear.model };
    if (!Value.Check(EmbeddingsRequest, emb)) {
      const first = Value.Errors(EmbeddingsRequest, emb).First();
      throw new PhantomaError(ERRORS.INVALID_REQUEST, `the sealed body is invalid${first ? ` at ${first.path || '/'}: ${first.message}` : ''}`);
    }
    return { shape: 'embeddings', job: embeddingsJob(emb as EmbeddingsRequest, requestId) };
  }
  const full = { ...b, model: clear.model, stream: clear.stream };
  const shape = 'messages' in b ? 'chat' : 'prompt' in b ? 'completion' : undefined;
  if (!shape) throw new PhantomaError(ERRORS.INVALID_REQUEST, 'the sealed body needs messages (chat), prompt (completion) or input (embeddings)');
  const schema = shape === 'chat' ? ChatCompletionRequest : CompletionRequest;
  if (!Value.Check(schema, full)) {
    const first = Value.Errors(schema, full).First();
    throw new PhantomaError(ERRORS.INVALID_REQUEST, `the sealed body is invalid${first ? ` at ${first.path || '/'}: ${first.message}` : ''}`);
  }
  return { shape, job: shape === 'chat' ? chatJob(full as ChatCompletionRequest, requestId, contextSize) : completionJob(full as CompletionRequest, requestId, contextSize) };
}

export function encodeEvent(e: SealedEvent): Buffer {
  return Buffer.from(JSON.stringify(e), 'utf8');
}

/** Client side: an opened chunk's event; anything else is a protocol error. */
export function decodeEvent(payload: Uint8Array): SealedEvent {
  let e: unknown;
  try {
    e = JSON.parse(Buffer.from(payload.buffer, payload.byteOffset, payload.length).toString('utf8'));
  } catch {
    throw new PhantomaError(ERRORS.SEALED_OPEN_FAILED, 'an opened chunk is not JSON');
  }
  const o = e as Record<string, unknown>;
  if (o?.t === 'text' && typeof o.text === 'string') return o as SealedEvent;
  if (o?.t === 'logprobs' && Array.isArray(o.entries) && o.entries.every((x: { token?: unknown; logprob?: unknown }) => typeof x?.token === 'string' && typeof x.logprob === 'number')) return o as SealedEvent;
  if (o?.t === 'tool_call' && Number.isInteger(o.index) && typeof o.arguments === 'string') return o as SealedEvent;
  if (o?.t === 'embedding' && Number.isInteger(o.index) && Number.isInteger(o.offset) && Number.isInteger(o.length) && typeof o.b64 === 'string') return o as SealedEvent;
  if (o?.t === 'done' && (o.finish_reason === 'stop' || o.finish_reason === 'length' || o.finish_reason === 'tool_calls') && typeof o.usage === 'object') return o as SealedEvent;
  if (o?.t === 'error' && typeof o.code === 'string' && typeof o.message === 'string' && typeof o.status === 'number') return o as SealedEvent;
  throw new PhantomaError(ERRORS.SEALED_OPEN_FAILED, 'an opened chunk is not a sealed event');
}
