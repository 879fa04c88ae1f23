// OpenAI request schemas and response shapes: pure functions from a validated body to a worker job, and
// from worker output to OpenAI's objects. Fastify validates every body against these schemas.
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { randomBytes } from 'node:crypto';
import { PhantomaError, ERRORS } from '../errors.ts';
import type { SamplingParams, JobMessage, Usage, ChatJobMessage, ToolSpec, ToolChoice, OutputFormat, FinishReason, TokenLogprob } from '../ephemeral/worker-protocol.ts';
import { grammarSchema, NO_PARAMETERS } from '../models/grammar.ts';

const Nullable = <T extends TSchema>(t: T) => Type.Union([t, Type.Null()]);

const TextPart = Type.Object({ type: Type.Literal('text'), text: Type.String() }, { additionalProperties: false });
const Content = Type.Union([Type.String(), Type.Array(TextPart, { minItems: 1 })]);

const FunctionName = Type.String({ pattern: '^[A-Za-z0-9_-]{1,64}$' });

const ToolCallIn = Type.Object(
  {
    id: Type.String({ minLength: 1, maxLength: 256 }),
    type: Type.Literal('function'),
    function: Type.Object({ name: FunctionName, arguments: Type.String() }, { additionalProperties: false }),
  },
  { additionalProperties: false },
);

// One object for every role (a union would make validation errors name no parameter); chatJob checks
// which fields each role needs.
const Message = Type.Object(
  {
    role: Type.Union([Type.Literal('system'), Type.Literal('developer'), Type.Literal('user'), Type.Literal('assistant'), Type.Literal('tool')]),
    content: Type.Optional(Nullable(Content)),
    name: Type.Optional(Type.String({ maxLength: 256 })),
    /** assistant turns that called tools */
    tool_calls: Type.Optional(Type.Array(ToolCallIn, { minItems: 1, maxItems: 128 })),
    /** role "tool": the call this message answers */
    tool_call_id: Type.Optional(Type.String({ minLength: 1, maxLength: 256 })),
    refusal: Type.Optional(Type.Null()),
  },
  { additionalProperties: false },
);

const Tool = Type.Object(
  {
    type: Type.Literal('function'),
    function: Type.Object(
      {
        name: FunctionName,
        description: Type.Optional(Type.String({ maxLength: 4096 })),
        parameters: Type.Optional(Type.Object({}, { additionalProperties: true })),
        strict: Type.Optional(Nullable(Type.Boolean())),
      },
      { additionalProperties: false },
    ),
  },
  { additionalProperties: false },
);

const ToolChoiceIn = Type.Union([
  Type.Literal('none'),
  Type.Literal('auto'),
  Type.Literal('required'),
  Type.Object({ type: Type.Literal('function'), function: Type.Object({ name: FunctionName }, { additionalProperties: false }) }, { additionalProperties: false }),
]);

const ResponseFormat = Type.Union([
  Type.Object({ type: Type.Literal('text') }, { additionalProperties: false }),
  Type.Object({ type: Type.Literal('json_object') }, { additionalProperties: false }),
  Type.Object(
    {
      type: Type.Literal('json_schema'),
      json_schema: Type.Object(
        {
          name: Type.String({ pattern: '^[A-Za-z0-9_-]{1,64}$' }),
          description: Type.Optional(Type.String({ maxLength: 4096 })),
          schema: Type.Optional(Type.Object({}, { additionalProperties: true })),
          strict: Type.Optional(Nullable(Type.Boolean())),
        },
        { additionalProperties: false },
      ),
    },
    { additionalProperties: false },
  ),
]);

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
    response_format: Type.Optional(Nullable(ResponseFormat)),
    tools: Type.Optional(Nullable(Type.Array(Tool, { minItems: 1, maxItems: 128 }))),
    tool_choice: Type.Optional(Nullable(ToolChoiceIn)),
    parallel_tool_calls: Type.Optional(Nullable(Type.Boolean())),
    logprobs: Type.Optional(Nullable(Type.Boolean())),
    top_logprobs: Type.Optional(Nullable(Type.Integer({ minimum: 0, maximum: 20 }))),
  },
  { additionalProperties: false },
);
export type ChatCompletionRequest = Static<typeof ChatCompletionRequest>;

export const CompletionRequest = Type.Object(
  {
    ...commonSampling,
    prompt: Type.Union([Type.String(), Type.Array(Type.String(), { minItems: 1, maxItems: 1 })]),
    logprobs: Type.Optional(Nullable(Type.Integer({ minimum: 0, maximum: 5 }))),
  },
  { additionalProperties: false },
);
export type CompletionRequest = Static<typeof CompletionRequest>;

/** OpenAI's default when max_tokens is absent is "up to the context"; a bound keeps a request finite. */
export const DEFAULT_MAX_TOKENS = 512;

function textOf(content: Static<typeof Content> | null | undefined): string {
  if (content === null || content === undefined) return '';
  return typeof content === 'string' ? content : content.map((p) => p.text).join('');
}

export const EmbeddingsRequest = Type.Object(
  {
    model: Type.String({ minLength: 1, maxLength: 256 }),
    input: Type.Union([Type.String({ minLength: 1 }), Type.Array(Type.String({ minLength: 1 }), { minItems: 1, maxItems: 2048 })]),
    encoding_format: Type.Optional(Type.Union([Type.Literal('float'), Type.Literal('base64')])),
    dimensions: Type.Optional(Type.Integer({ minimum: 1 })),
    user: Type.Optional(Type.String({ maxLength: 256 })),
  },
  { additionalProperties: false },
);
export type EmbeddingsRequest = Static<typeof EmbeddingsRequest>;

export function embeddingsJob(body: EmbeddingsRequest, requestId: string): JobMessage {
  return { type: 'job', kind: 'embeddings', requestId, inputs: typeof body.input === 'string' ? [body.input] : body.input };
}

/** OpenAI's embedding object; base64 is the little-endian float32 bytes (what the official clients decode). */
export function embeddingObject(index: number, vector: readonly number[], format: 'float' | 'base64' | undefined): { object: 'embedding'; index: number; embedding: number[] | string } {
  if (format !== 'base64') return { object: 'embedding', index, embedding: [...vector] };
  const bytes = Buffer.alloc(vector.length * 4);
  vector.forEach((x, i) => bytes.writeFloatLE(x, i * 4));
  return { object: 'embedding', index, embedding: bytes.toString('base64') };
}

/**
 * OpenAI's message list → the worker's: "developer" is the system role, and each `role: "tool"` message
 * is attached as the result of the assistant call it answers (the chat template renders call and result
 * together). Every call must be answered, and every answer must name an earlier call.
 */
function jobMessages(messages: ChatCompletionRequest['messages']): ChatJobMessage[] {
  const out: ChatJobMessage[] = [];
  const open = new Map<string, { call: NonNullable<ChatJobMessage['toolCalls']>[number]; at: number }>();
  messages.forEach((m, i) => {
    const param = `messages.${i}`;
    const bad = (why: string): never => {
      throw new PhantomaError(ERRORS.INVALID_REQUEST, `invalid request: ${param} ${why}`, { details: { param } });
    };
    if (m.role !== 'tool' && m.tool_call_id !== undefined) bad('has tool_call_id but is not a tool message');
    if (m.role !== 'assistant' && m.tool_calls !== undefined) bad('has tool_calls but is not an assistant message');
    if (m.role === 'tool') {
      if (m.tool_call_id === undefined) bad('is a tool message without tool_call_id');
      const pending = open.get(m.tool_call_id!);
      if (!pending) bad(`answers tool call "${m.tool_call_id!.slice(0, 64)}", which no earlier assistant message made (or which was already answered)`);
      pending!.call.result = textOf(m.content);
      open.delete(m.tool_call_id!);
      return;
    }
    if (open.size > 0) bad('follows an assistant tool call that has no tool message answering it');
    if (m.role === 'assistant') {
      if ((m.content === undefined || m.content === null) && !m.tool_calls) bad('needs content or tool_calls');
      const msg: ChatJobMessage = { role: 'assistant', content: textOf(m.content) };
      if (m.tool_calls) {
        msg.toolCalls = m.tool_calls.map((c) => ({ id: c.id, name: c.function.name, arguments: c.function.arguments }));
        for (const call of msg.toolCalls) open.set(call.id, { call, at: i });
      }
      out.push(msg);
      return;
    }
    if (m.content === undefined || m.content === null) bad('needs content');
    out.push({ role: m.role === 'developer' ? 'system' : m.role, content: textOf(m.content) });
  });
  if (open.size > 0) {
    const first = [...open.values()][0]!;
    throw new PhantomaError(ERRORS.INVALID_REQUEST, `invalid request: the tool calls of messages.${first.at} need tool messages answering them`, { details: { param: `messages.${first.at}` } });
  }
  return out;
}

/** tools/tool_choice → the worker's; "none" (or no tools) sends none. Each parameters schema is checked. */
function toolsOf(body: ChatCompletionRequest): { tools?: ToolSpec[]; toolChoice?: ToolChoice } {
  const choice = body.tool_choice ?? undefined;
  if (!body.tools) {
    if (choice !== undefined && choice !== 'none') throw new PhantomaError(ERRORS.INVALID_REQUEST, 'invalid request: tool_choice needs tools', { details: { param: 'tool_choice' } });
    return {};
  }
  const tools: ToolSpec[] = body.tools.map((t, i) => ({
    name: t.function.name,
    ...(t.function.description ? { description: t.function.description } : {}),
    parameters: t.function.parameters ? grammarSchema(t.function.parameters, `tools.${i}.function.parameters`) : NO_PARAMETERS,
  }));
  const names = new Set(tools.map((t) => t.name));
  if (names.size !== tools.length) throw new PhantomaError(ERRORS.INVALID_REQUEST, 'invalid request: two tools have the same name', { details: { param: 'tools' } });
  if (choice === 'none') return {};
  if (typeof choice === 'object') {
    if (!names.has(choice.function.name)) {
      throw new PhantomaError(ERRORS.INVALID_REQUEST, `invalid request: tool_choice names "${choice.function.name}", which is not among tools`, { details: { param: 'tool_choice' } });
    }
    return { tools, toolChoice: { name: choice.function.name } };
  }
  return { tools, toolChoice: choice ?? 'auto' };
}

function outputFormatOf(body: ChatCompletionRequest): OutputFormat | undefined {
  const f = body.response_format;
  if (!f || f.type === 'text') return undefined;
  if (f.type === 'json_object') return { type: 'json_object' };
  if (!f.json_schema.schema) throw new PhantomaError(ERRORS.INVALID_REQUEST, 'invalid request: response_format.json_schema needs a schema', { details: { param: 'response_format.json_schema.schema' } });
  return { type: 'json_schema', schema: grammarSchema(f.json_schema.schema, 'response_format.json_schema.schema') };
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
  // logprobs: chat says `logprobs: true` (+ `top_logprobs`), completions `logprobs: <alternatives>`.
  const b = body as { logprobs?: boolean | number | null; top_logprobs?: number | null; messages?: unknown };
  const isChat = b.messages !== undefined;
  if (isChat && (b.top_logprobs ?? null) !== null && b.logprobs !== true) {
    throw new PhantomaError(ERRORS.INVALID_REQUEST, 'invalid request: top_logprobs needs logprobs: true', { details: { param: 'top_logprobs' } });
  }
  const logprobs = isChat ? (b.logprobs === true ? (b.top_logprobs ?? 0) : undefined) : typeof b.logprobs === 'number' ? b.logprobs : undefined;
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
    ...(logprobs !== undefined ? { logprobs } : {}),
  };
}

export function chatJob(body: ChatCompletionRequest, requestId: string, contextSize: number): JobMessage {
  const responseFormat = outputFormatOf(body);
  const tools = toolsOf(body);
  if (body.logprobs === true && (responseFormat || tools.tools)) {
    throw new PhantomaError(ERRORS.UNSUPPORTED_PARAMETER, 'logprobs together with response_format or tools is not supported', { details: { param: 'logprobs' } });
  }
  if (responseFormat && tools.tools) {
    throw new PhantomaError(ERRORS.UNSUPPORTED_PARAMETER, 'response_format json_object/json_schema together with tools is not supported (use tool_choice "none" or no response_format)', {
      details: { param: 'response_format' },
    });
  }
  return {
    type: 'job',
    kind: 'chat',
    requestId,
    messages: jobMessages(body.messages),
    params: samplingFrom(body, body.max_completion_tokens ?? body.max_tokens, contextSize),
    ...(responseFormat ? { responseFormat } : {}),
    ...tools,
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

export type OpenAIFinishReason = 'stop' | 'length' | 'tool_calls';

/** A generation the client aborted never reaches a response, so only stop/length/tool_calls remain. */
export function finishReason(r: FinishReason): OpenAIFinishReason {
  return r === 'length' ? 'length' : r === 'tool_calls' ? 'tool_calls' : 'stop';
}

/** Chat's `logprobs.content` entries. */
export function chatLogprobs(entries: readonly TokenLogprob[]): Array<{ token: string; logprob: number; bytes: number[]; top_logprobs: Array<{ token: string; logprob: number; bytes: number[] }> }> {
  return entries.map((e) => ({ token: e.token, logprob: e.logprob, bytes: e.bytes, top_logprobs: e.top }));
}

/** Completions' `logprobs` object; `offset` is where the first entry's text starts in the answer. */
export function completionLogprobs(entries: readonly TokenLogprob[], offset = 0): { tokens: string[]; token_logprobs: number[]; top_logprobs: Array<Record<string, number>>; text_offset: number[] } {
  const text_offset: number[] = [];
  let at = offset;
  for (const e of entries) {
    text_offset.push(at);
    at += e.token.length;
  }
  return { tokens: entries.map((e) => e.token), token_logprobs: entries.map((e) => e.logprob), top_logprobs: entries.map((e) => Object.fromEntries(e.top.map((x) => [x.token, x.logprob]))), text_offset };
}

/** OpenAI's tool_calls array of an assistant message. */
export function toolCallsOut(calls: ReadonlyArray<{ id: string; name: string; arguments: string }>): Array<{ id: string; type: 'function'; function: { name: string; arguments: string } }> {
  return calls.map((c) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.arguments } }));
}

export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string };
}

export function errorBody(e: PhantomaError): OpenAIErrorBody {
  const param = typeof e.details?.param === 'string' ? e.details.param : null;
  return { error: { message: e.message, type: e.type, param, code: e.code } };
}
