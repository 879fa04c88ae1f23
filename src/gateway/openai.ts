// OpenAI request schemas and response shapes: pure functions from a validated body to a worker job, and
// from worker output to OpenAI's objects. Fastify validates every body against these schemas.
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { randomBytes } from 'node:crypto';
import { PhantomaError, ERRORS } from '../errors.ts';
import type { SamplingParams, JobMessage, Usage } from '../ephemeral/worker-protocol.ts';

const Nullable = <T extends TSchema>(t: T) => Type.Union([t, Type.Null()]);

const TextPart = Type.Object({ type: Type.Literal('text'), text: Type.String() }, { additionalProperties: false });
const Content = Type.Union([Type.String(), Type.Array(TextPart, { minItems: 1 })]);

const Message = Type.Object(
  {
    role: Type.Union([Type.Literal('system'), Type.Literal('developer'), Type.Literal('user'), Type.Literal('assistant')]),
    content: Content,
    name: Type.Optional(Type.String({ maxLength: 256 })),
  },
  { additionalProperties: false },
);

const Stop = Type.Union([Type.String({ minLength: 1 }), Type.Array(Type.String({ minLength: 1 }), { maxItems: 4 }), Type.Null()]);

const commonSampling = {
  model: Type.String({ minLength: 1, maxLength: 256 }),
  stream: Type.Optional(Type.Union([Type.Boolean(), Type.Null()])),
  stream_options: Type.Optional(Type.Union([Type.Object({ include_usage: Type.Optional(Type.Boolean()) }, { additionalProperties: false }), Type.Null()])),
  max_tokens: Type.Optional(Nullable(Type.Integer({ minimum: 1 }))),
  temperature: Type.Optional(Nullable(Type.Number({ minimum: 0, maximum: 2 }))),
  top_p: Type.Optional(Nullable(Type.Number({ minimum: 0, maximum: 1 }))),
  seed: Type.Optional(Nullable(Type.Integer({ minimum: -(2 ** 63), maximum: 2 ** 64 }))),
  stop: Type.Optional(Stop),
  n: Type.Optional(Nullable(Type.Integer({ minimum: 1, maximum: 128 }))),
  presence_penalty: Type.Optional(Nullable(Type.Number({ minimum: -2, maximum: 2 }))),
  frequency_penalty: Type.Optional(Nullable(Type.Number({ minimum: -2, maximum: 2 }))),
  user: Type.Optional(Type.String({ maxLength: 256 })),
};

export const ChatCompletionRequest = Type.Object(
  {
    ...commonSampling,
    messages: Type.Array(Message, { minItems: 1, maxItems: 1024 }),
    max_completion_tokens: Type.Optional(Nullable(Type.Integer({ minimum: 1 }))),
  },
  { additionalProperties: false },
);
export type ChatCompletionRequest = Static<typeof ChatCompletionRequest>;

export const CompletionRequest = Type.Object(
  {
    ...commonSampling,
    prompt: Type.Union([Type.String(), Type.Array(Type.String(), { minItems: 1, maxItems: 1 })]),
  },
  { additionalProperties: false },
);
export type CompletionRequest = Static<typeof CompletionRequest>;

/** OpenAI's default when max_tokens is absent is "up to the context"; a bound keeps a request finite. */
export const DEFAULT_MAX_TOKENS = 512;

function textOf(content: Static<typeof Content>): string {
  return typeof content === 'string' ? content : content.map((p) => p.text).join('');
}

function samplingFrom(body: ChatCompletionRequest | CompletionRequest, maxTokens: number | null | undefined, contextSize: number): SamplingParams {
  if (body.n !== undefined && body.n !== null && body.n !== 1) {
    throw new PhantomaError(ERRORS.UNSUPPORTED_PARAMETER, `n=${body.n} is not supported: each request runs in its own one-shot worker; send n separate requests`, { details: { param: 'n' } });
  }
  for (const p of ['presence_penalty', 'frequency_penalty'] as const) {
    const v = body[p];
    if (v !== undefined && v !== null && v !== 0) {
      throw new PhantomaError(ERRORS.UNSUPPORTED_PARAMETER, `${p} is not supported yet (only 0)`, { details: { param: p } });
    }
  }
  const max = maxTokens ?? Math.min(DEFAULT_MAX_TOKENS, contextSize);
  if (max >= contextSize) {
    throw new PhantomaError(ERRORS.CONTEXT_LENGTH_EXCEEDED, `max_tokens ${max} does not fit this model's context of ${contextSize} tokens`, { details: { param: 'max_tokens' } });
  }
  const stop = body.stop === undefined || body.stop === null ? undefined : typeof body.stop === 'string' ? [body.stop] : body.stop;
  return {
    maxTokens: max,
    ...(body.temperature === undefined || body.temperature === null ? {} : { temperature: body.temperature }),
    ...(body.top_p === undefined || body.top_p === null ? {} : { topP: body.top_p }),
    // llama.cpp seeds are 32-bit; fold a 64-bit OpenAI seed deterministically.
    ...(body.seed === undefined || body.seed === null ? {} : { seed: Number(BigInt.asUintN(32, BigInt(body.seed))) }),
    ...(stop && stop.length > 0 ? { stop } : {}),
  };
}

export function chatJob(body: ChatCompletionRequest, requestId: string, contextSize: number): JobMessage {
  return {
    type: 'job',
    kind: 'chat',
    requestId,
    // "developer" is OpenAI's newer name for the system role.
    messages: body.messages.map((m) => ({ role: m.role === 'developer' ? 'system' : m.role, content: textOf(m.content) })),
    params: samplingFrom(body, body.max_completion_tokens ?? body.max_tokens, contextSize),
  };
}

export function completionJob(body: CompletionRequest, requestId: string, contextSize: number): JobMessage {
  return {
    type: 'job',
    kind: 'completion',
    requestId,
    prompt: typeof body.prompt === 'string' ? body.prompt : body.prompt[0]!,
    params: samplingFrom(body, body.max_tokens, contextSize),
  };
}

export function newCompletionId(prefix: 'chatcmpl' | 'cmpl'): string {
  return `${prefix}-${randomBytes(12).toString('base64url')}`;
}

export function usageObject(u: Usage): { prompt_tokens: number; completion_tokens: number; total_tokens: number } {
  return { prompt_tokens: u.promptTokens, completion_tokens: u.completionTokens, total_tokens: u.promptTokens + u.completionTokens };
}

export type OpenAIFinishReason = 'stop' | 'length';

/** A generation the client aborted never reaches a response, so only stop/length remain. */
export function finishReason(r: 'stop' | 'length' | 'abort'): OpenAIFinishReason {
  return r === 'length' ? 'length' : 'stop';
}

export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string };
}

export function errorBody(e: PhantomaError): OpenAIErrorBody {
  const param = typeof e.details?.param === 'string' ? e.details.param : null;
  return { error: { message: e.message, type: e.type, param, code: e.code } };
}
