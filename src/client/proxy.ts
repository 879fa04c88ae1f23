// phantoma proxy: an OpenAI-compatible endpoint on the client's own loopback that seals every request to
// a pinned node and opens the answers, so existing tools (the official `openai` client, curl, editors)
// work unchanged while the network, the node's gateway and its operator see only ciphertext.
// Several nodes may be pinned: a node that cannot be reached is skipped for the next one, in order.
import Fastify, { type FastifyInstance } from 'fastify';
import { randomBytes, type KeyObject } from 'node:crypto';
import { ERRORS, PhantomaError, isPhantomaError } from '../errors.ts';
import { errorBody, toolCallsOut, embeddingObject, chatLogprobs, completionLogprobs } from '../gateway/openai.ts';
import { createSealedClient, type SealedClient, type SealedAnswer } from './sealed.ts';
import type { Logger } from '../logger.ts';

export interface PinnedNode {
  url: string;
  identityPin: string;
}

export interface ProxyOptions {
  nodes: readonly PinnedNode[];
  clientName: string;
  clientKey: KeyObject;
  /** Model names the proxy lists at /v1/models (requests may name any model the node serves). */
  models: readonly string[];
  logger: Logger;
  bodyLimitBytes?: number;
}

/** Errors that say "this node is not there", after which the next pinned node is tried. */
const FAILOVER_CODES = new Set([ERRORS.NODE_UNREACHABLE.code, ERRORS.NOT_READY.code, ERRORS.QUEUE_FULL.code]);

export function buildProxy(opts: ProxyOptions): FastifyInstance {
  const clients: SealedClient[] = opts.nodes.map((n) => createSealedClient({ url: n.url, identityPin: n.identityPin, clientName: opts.clientName, clientKey: opts.clientKey }));
  const app = Fastify({ logger: false, bodyLimit: opts.bodyLimitBytes ?? 4 * 1024 * 1024 }) as unknown as FastifyInstance;

  async function send(model: string, body: Record<string, unknown>, o: { stream: boolean; onText?: (t: string) => void; signal?: AbortSignal }): Promise<SealedAnswer> {
    let last: unknown;
    for (const [i, c] of clients.entries()) {
      try {
        return await c.send(model, body, o);
      } catch (err) {
        last = err;
        if (!(isPhantomaError(err) && FAILOVER_CODES.has(err.code))) throw err;
        opts.logger.warn({ node: i, code: err.code }, 'proxy: node unavailable, trying the next pinned node');
      }
    }
    throw last;
  }

  app.setErrorHandler((err, _request, reply) => {
    const e = isPhantomaError(err) ? err : (err as { statusCode?: number }).statusCode === 400 ? new PhantomaError(ERRORS.INVALID_JSON, 'the request body is not valid JSON') : new PhantomaError(ERRORS.INTERNAL, 'internal error');
    if (!reply.sent) void reply.code(e.status).send(errorBody(e));
  });

  app.get('/v1/models', async () => ({ object: 'list', data: opts.models.map((id) => ({ id, object: 'model', created: 0, owned_by: 'phantoma' })) }));

  app.post('/v1/embeddings', async (request) => {
    const raw = request.body;
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new PhantomaError(ERRORS.INVALID_REQUEST, 'the body must be a JSON object');
    const { model, encoding_format: format, ...rest } = raw as Record<string, unknown>;
    if (typeof model !== 'string' || model === '') throw new PhantomaError(ERRORS.INVALID_REQUEST, 'model is required');
    if (format !== undefined && format !== 'float' && format !== 'base64') throw new PhantomaError(ERRORS.INVALID_REQUEST, 'encoding_format must be float or base64', { details: { param: 'encoding_format' } });
    const a = await send(model, rest, { stream: false });
    const data = (a.embeddings ?? []).map((v, i) => embeddingObject(i, v, format as 'float' | 'base64' | undefined));
    return { object: 'list', data, model, usage: { prompt_tokens: a.usage.prompt_tokens, total_tokens: a.usage.prompt_tokens } };
  });

  for (const shape of ['chat', 'completion'] as const) {
    app.post(shape === 'chat' ? '/v1/chat/completions' : '/v1/completions', async (request, reply) => {
      const raw = request.body;
      if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new PhantomaError(ERRORS.INVALID_REQUEST, 'the body must be a JSON object');
      const { model, stream, stream_options: streamOptions, ...rest } = raw as Record<string, unknown>;
      if (typeof model !== 'string' || model === '') throw new PhantomaError(ERRORS.INVALID_REQUEST, 'model is required');
      const includeUsage = (streamOptions as { include_usage?: unknown } | undefined)?.include_usage === true;
      const id = `${shape === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomBytes(12).toString('base64url')}`;
      const created = Math.floor(Date.now() / 1000);
      if (stream !== true) {
        const a = await send(model, rest, { stream: false });
        const message = a.toolCalls ? { role: 'assistant', content: a.text === '' ? null : a.text, refusal: null, tool_calls: toolCallsOut(a.toolCalls) } : { role: 'assistant', content: a.text, refusal: null };
        return shape === 'chat'
          ? { id, object: 'chat.completion', created, model, choices: [{ index: 0, message, logprobs: a.logprobs ? { content: chatLogprobs(a.logprobs), refusal: null } : null, finish_reason: a.finishReason }], usage: a.usage }
          : { id, object: 'text_completion', created, model, choices: [{ index: 0, text: a.text, logprobs: a.logprobs ? completionLogprobs(a.logprobs) : null, finish_reason: a.finishReason }], usage: a.usage };
      }
      // Streamed: the SSE response starts with the first opened text, so a refusal can still be a status.
      const ac = new AbortController();
      reply.raw.once('close', () => {
        if (!reply.raw.writableFinished) ac.abort();
      });
      const object = shape === 'chat' ? 'chat.completion.chunk' : 'text_completion';
      const chunk = (delta: string | null, finish: string | null, usage?: unknown): string => {
        const choice = shape === 'chat' ? { index: 0, delta: delta === null ? {} : { role: 'assistant', content: delta }, logprobs: null, finish_reason: finish } : { index: 0, text: delta ?? '', logprobs: null, finish_reason: finish };
        return `data: ${JSON.stringify({ id, object, created, model, choices: usage ? [] : [choice], ...(usage ? { usage } : {}) })}\n\n`;
      };
      let started = false;
      const begin = (): void => {
        if (started) return;
        started = true;
        reply.hijack();
        reply.raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive' });
      };
      try {
        const a = await send(model, rest, {
          stream: true,
          signal: ac.signal,
          onText: (t) => {
            begin();
            reply.raw.write(chunk(t, null));
          },
        });
        begin();
        // Tool calls open only with the final chunk (the SDK assembles them), so they go out as deltas here.
        for (const [index, c] of (a.toolCalls ?? []).entries()) {
          const delta = { role: 'assistant', content: null, tool_calls: [{ index, id: c.id, type: 'function', function: { name: c.name, arguments: c.arguments } }] };
          reply.raw.write(`data: ${JSON.stringify({ id, object, created, model, choices: [{ index: 0, delta, logprobs: null, finish_reason: null }] })}\n\n`);
        }
        reply.raw.write(chunk(null, a.finishReason));
        if (includeUsage) reply.raw.write(chunk(null, null, a.usage));
        reply.raw.end('data: [DONE]\n\n');
      } catch (err) {
        if (!started) throw err;
        const e = isPhantomaError(err) ? err : new PhantomaError(ERRORS.INTERNAL, 'internal error');
        reply.raw.end(`data: ${JSON.stringify(errorBody(e))}\n\ndata: [DONE]\n\n`);
      }
      return reply;
    });
  }
  return app;
}
