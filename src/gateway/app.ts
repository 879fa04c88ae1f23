// buildGateway(deps): the fastify app for the OpenAI-compatible API, and a separate metrics app. Neither
// listens here; the composition root (src/main.ts) and tests decide where. Every route validates its
// body by schema; every error leaves in OpenAI's shape with a stable code; no log line carries content.
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyError } from 'fastify';
import rateLimit from '@fastify/rate-limit';
import secureJson from 'secure-json-parse';
import { randomBytes } from 'node:crypto';
import type { Logger } from '../logger.ts';
import type { Config } from '../config/schema.ts';
import { PhantomaError, ERRORS, isPhantomaError } from '../errors.ts';
import type { WorkerPool, JobResult } from '../ephemeral/pool.ts';
import type { JobMessage } from '../ephemeral/worker-protocol.ts';
import type { ApiKeyStore } from './api-keys.ts';
import { workerTimingFields, type GatewayMetrics } from './metrics.ts';
import type { AuditEvent } from '../audit/audit-events.ts';
import { KEY_DOCUMENT_PATH, type KeyDocumentSource } from './key-document.ts';
import { registerSealedRoute, type SealedApiDeps } from './sealed-route.ts';
import {
  ChatCompletionRequest,
  CompletionRequest,
  chatJob,
  completionJob,
  newCompletionId,
  usageObject,
  finishReason,
  errorBody,
  toolCallsOut,
  chatLogprobs,
  completionLogprobs,
} from './openai.ts';
import { registerEmbeddingsRoute } from './embeddings.ts';
import type { ToolCall, TokenLogprob } from '../ephemeral/worker-protocol.ts';

export interface ServedModel {
  name: string;
  contextLength: number;
  pool: WorkerPool;
  /** The model's embedding width (GGUF embedding_length), what /v1/embeddings returns. */
  embeddingLength?: number;
}

export interface GatewayDeps {
  config: Readonly<Config['gateway']>;
  models: readonly ServedModel[];
  apiKeys: ApiKeyStore | undefined;
  logger: Logger;
  metrics: GatewayMetrics;
  tls?: { key: string; cert: string };
  /** Appends to the node's audit log (ids, counts, outcomes; never content). */
  audit?: (event: AuditEvent) => void;
  clock?: () => number;
  /** Licensing (issue 11, src/control/license.ts): while it refuses, new inference gets its code and /readyz says why. */
  license?: () => { refusal?: PhantomaError; reason?: string };
  /** The signed key document (issue 7), served when the node has a vault and keyd. */
  keyDocument?: KeyDocumentSource;
  /** The sealed API (issue 8, docs/protocol.md), when the node has a vault and keyd. */
  sealed?: SealedApiDeps;
}

declare module 'fastify' {
  interface FastifyRequest {
    apiKeyId?: string;
    logFields?: Record<string, unknown>;
  }
}

/** Characters of tool-call arguments per streamed delta. */
const TOOL_ARGUMENTS_PIECE = 32;

const RETRY_AFTER_SECONDS: Partial<Record<string, number>> = {
  [ERRORS.QUEUE_FULL.code]: 2,
  [ERRORS.NOT_READY.code]: 5,
  [ERRORS.CONCURRENCY_LIMITED.code]: 1,
};

/** Maps anything thrown in a route to one of our coded errors. */
export function toPhantomaError(err: unknown): PhantomaError {
  if (isPhantomaError(err)) return err;
  const e = err as FastifyError & { validation?: Array<{ instancePath?: string; message?: string; params?: Record<string, unknown> }> };
  if (e?.validation) {
    const first = e.validation[0];
    const extra = first?.params?.additionalProperty;
    const path = (first?.instancePath ?? '').replace(/^\//, '').replaceAll('/', '.');
    const param = typeof extra === 'string' ? (path ? `${path}.${extra}` : extra) : path || null;
    const why = typeof extra === 'string' ? `unrecognized parameter "${extra}"` : `${path || 'body'} ${first?.message ?? 'is invalid'}`;
    return new PhantomaError(ERRORS.INVALID_REQUEST, `invalid request: ${why}`, { details: { param } });
  }
  switch (e?.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new PhantomaError(ERRORS.REQUEST_TOO_LARGE, 'the request body is too large');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return new PhantomaError(ERRORS.UNSUPPORTED_MEDIA_TYPE, 'the request body must be application/json');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return new PhantomaError(ERRORS.INVALID_JSON, 'the request body is not valid JSON');
  }
  if (err instanceof SyntaxError || e?.statusCode === 400) return new PhantomaError(ERRORS.INVALID_JSON, 'the request body is not valid JSON');
  if (typeof e?.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
    return new PhantomaError(ERRORS.INVALID_REQUEST, `invalid request (${e.code ?? e.statusCode})`);
  }
  return new PhantomaError(ERRORS.INTERNAL, 'internal error', { cause: err });
}

export async function buildGateway(deps: GatewayDeps): Promise<{ app: FastifyInstance; metricsApp: FastifyInstance }> {
  // (FastifyInstance is typed with the base logger: pino's Logger is a superset of it.)
  const { config, logger, metrics } = deps;
  const now = deps.clock ?? Date.now;
  const modelsByName = new Map(deps.models.map((m) => [m.name, m]));
  const inFlightByKey = new Map<string, number>();

  const app = Fastify({
    loggerInstance: logger.child({ component: 'gateway' }),
    // Our own one line per request (onResponse) carries ids, sizes and durations only.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: config.bodyLimitBytes,
    requestIdHeader: false,
    genReqId: () => randomBytes(8).toString('hex'),
    return503OnClosing: true,
    // Strict validation: no type coercion ("hello" is not an array) and unknown parameters are errors,
    // not silently dropped (OpenAI refuses them too).
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: true, allErrors: false } },
    ...(deps.tls ? { https: { key: deps.tls.key, cert: deps.tls.cert, minVersion: 'TLSv1.2' as const } } : {}),
  });

  // The API speaks JSON only; anything else is a 415, not a string that then fails validation.
  app.removeContentTypeParser('text/plain');
  // Our own JSON parser so the request body buffer, which holds the prompt, is zero-filled as soon as it
  // is parsed. (V8 strings made from it cannot be wiped; process death and init_on_free are the real
  // shred, see docs/threat-model.md.) Prototype poisoning is refused as fastify's parser does.
  // The body is collected chunk by chunk (Node's HTTP parser hands over a fresh Buffer per chunk) so
  // every chunk, and the joined copy, can be zero-filled.
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', (request, payload, done) => {
    const limit = config.bodyLimitBytes;
    const tooLarge = (): PhantomaError => new PhantomaError(ERRORS.REQUEST_TOO_LARGE, 'the request body is too large');
    if (Number(request.headers['content-length'] ?? 0) > limit) {
      payload.resume();
      done(tooLarge(), undefined);
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let failed = false;
    const wipe = (): void => {
      for (const c of chunks) c.fill(0);
      chunks.length = 0;
    };
    payload.on('data', (chunk: Buffer) => {
      if (failed) return void chunk.fill(0);
      size += chunk.length;
      chunks.push(chunk);
      if (size > limit) {
        failed = true;
        wipe();
        done(tooLarge(), undefined);
      }
    });
    payload.on('error', (err) => {
      wipe();
      if (!failed) done(err, undefined);
      failed = true;
    });
    payload.on('end', () => {
      if (failed) return;
      const joined = Buffer.concat(chunks, size);
      wipe();
      try {
        if (joined.length === 0) throw new SyntaxError('empty body');
        done(null, secureJson.parse(joined.toString('utf8'), undefined, { protoAction: 'error', constructorAction: 'error' }));
      } catch {
        done(new PhantomaError(ERRORS.INVALID_JSON, 'the request body is not valid JSON'), undefined);
      } finally {
        joined.fill(0);
      }
    });
  });

  app.setErrorHandler((err, request, reply) => {
    const e = toPhantomaError(err);
    metrics.errors.inc({ code: e.code });
    request.logFields = { ...request.logFields, code: e.code };
    if (e.status >= 500 && e.code !== ERRORS.QUEUE_FULL.code && e.code !== ERRORS.NOT_READY.code) {
      request.log.error({ code: e.code, err: e.cause instanceof Error ? { type: e.cause.name, stack: e.cause.stack } : undefined }, 'request failed');
    }
    const retry = RETRY_AFTER_SECONDS[e.code];
    if (retry !== undefined) void reply.header('retry-after', String(retry));
    if (reply.sent || reply.raw.headersSent) return;
    void reply.code(e.status).send(errorBody(e));
  });
  app.setNotFoundHandler((request, reply) => {
    metrics.errors.inc({ code: ERRORS.ROUTE_NOT_FOUND.code });
    void reply.code(404).send(errorBody(new PhantomaError(ERRORS.ROUTE_NOT_FOUND, `no route ${request.method} ${request.routeOptions.url ?? 'for this path'}`)));
  });

  app.addHook('onResponse', async (request, reply) => {
    const route = request.routeOptions.url ?? 'unmatched';
    metrics.requests.inc({ route, status: String(reply.statusCode) });
    request.log.info({ method: request.method, route, status: reply.statusCode, ms: Math.round(reply.elapsedTime), ...request.logFields }, 'request');
  });

  // Authentication: every /v1 route needs a valid, unrevoked API key unless auth is explicitly off.
  app.addHook('onRequest', async (request, reply) => {
    // Audited when the connection closes, which also covers clients that went away mid-stream (then no
    // onResponse runs).
    if (deps.audit && request.url.startsWith('/v1/')) {
      reply.raw.once('close', () => {
        // Closed before the response was complete: the client went away, whatever else is known yet.
        if (!reply.raw.writableFinished && request.logFields?.code === undefined) request.logFields = { ...request.logFields, code: ERRORS.CLIENT_CLOSED.code };
        const event = auditEventFor(request, request.routeOptions.url ?? 'unmatched', reply.statusCode, reply.elapsedTime);
        if (event) deps.audit!(event);
      });
    }
    if (request.url.startsWith('/v1/') && !config.plaintextApi) {
      throw new PhantomaError(ERRORS.PLAINTEXT_API_DISABLED, 'this node accepts sealed requests only (docs/protocol.md; phantoma proxy gives existing tools a local OpenAI endpoint)');
    }
    if (!request.url.startsWith('/v1/') || config.auth === 'none') return;
    const header = request.headers.authorization;
    const presented = header?.startsWith('Bearer ') ? header.slice(7).trim() : undefined;
    const rec = presented ? deps.apiKeys?.verify(presented) : undefined;
    if (!rec) throw new PhantomaError(ERRORS.INVALID_API_KEY, presented ? 'the API key is invalid or revoked' : 'missing API key: send Authorization: Bearer <key>');
    request.apiKeyId = rec.id;
    request.logFields = { keyId: rec.id };
  });

  await app.register(rateLimit, {
    global: true,
    hook: 'preHandler',
    max: config.rateLimitPerMinute,
    timeWindow: 60_000,
    keyGenerator: (request) => request.apiKeyId ?? request.ip,
    allowList: (request) => !request.url.startsWith('/v1/'),
    errorResponseBuilder: (_request, ctx) =>
      new PhantomaError(ERRORS.RATE_LIMITED, `rate limit of ${ctx.max} requests per minute exceeded; retry in ${ctx.after}`),
  });

  app.get('/healthz', async () => ({ status: 'ok' }));
  if (deps.keyDocument) {
    const source = deps.keyDocument;
    // The exact signed bytes, not re-serialised: clients verify the canonical JSON (src/vault/signing.ts).
    app.get(KEY_DOCUMENT_PATH, async (_request, reply) => reply.type('application/json').header('cache-control', 'no-cache').send(await source.get()));
  }
  // Every inference route is a POST under /v1/; a license refusal stops new ones (running ones finish).
  if (deps.license) {
    const license = deps.license;
    app.addHook('preHandler', async (request) => {
      if (request.method !== 'POST' || !request.url.startsWith('/v1/')) return;
      const refusal = license().refusal;
      if (refusal) throw refusal;
    });
  }
  app.get('/readyz', async (_request, reply) => {
    const reasons = deps.models.map((m) => m.pool.notReadyReason()).filter((r): r is string => r !== undefined);
    const licensed = deps.license?.();
    if (licensed?.refusal) reasons.push(`${licensed.refusal.code}: ${licensed.reason ?? licensed.refusal.message}`);
    if (reasons.length > 0) return reply.code(503).send({ ready: false, reasons });
    return { ready: true };
  });

  app.get('/v1/models', async () => ({
    object: 'list',
    data: deps.models.map((m) => ({
      id: m.name,
      object: 'model',
      created: 0,
      owned_by: 'phantoma',
      context_length: m.contextLength,
      ...(m.embeddingLength ? { embedding_length: m.embeddingLength } : {}),
      // ready, starting, idle (scaled to zero or lazy: starts on the next request) or unavailable
      state: m.pool.state(),
    })),
  }));

  function modelFor(name: string): ServedModel {
    // deps.models is live: a model pulled while the gateway runs is appended to it (issue 10)
    const m = modelsByName.get(name) ?? deps.models.find((x) => x.name === name);
    if (!m) throw new PhantomaError(ERRORS.MODEL_NOT_FOUND, `the model "${name.slice(0, 64)}" does not exist on this node`, { details: { param: 'model' } });
    return m;
  }

  /** Holds one of the key's concurrency slots for the life of the response. */
  function takeConcurrencySlot(request: FastifyRequest, reply: FastifyReply): void {
    const key = request.apiKeyId ?? 'anonymous';
    const n = inFlightByKey.get(key) ?? 0;
    if (n >= config.maxConcurrentPerKey) {
      throw new PhantomaError(ERRORS.CONCURRENCY_LIMITED, `this key already has ${n} requests in flight (limit ${config.maxConcurrentPerKey})`);
    }
    inFlightByKey.set(key, n + 1);
    reply.raw.once('close', () => {
      const left = (inFlightByKey.get(key) ?? 1) - 1;
      if (left <= 0) inFlightByKey.delete(key);
      else inFlightByKey.set(key, left);
    });
  }

  /** Aborts when the client goes away before the response is complete. */
  function disconnectSignal(reply: FastifyReply): AbortSignal {
    const ac = new AbortController();
    reply.raw.once('close', () => {
      if (!reply.raw.writableFinished) ac.abort();
    });
    return ac.signal;
  }

  function observe(model: string, r: JobResult): void {
    if (r.firstTokenMs !== null) metrics.timeToFirstToken.observe({ model }, r.firstTokenMs / 1000);
    if (r.promptEvalMs !== null) metrics.promptEval.observe({ model }, r.promptEvalMs / 1000);
    const decodeSeconds = (r.generateMs - (r.firstTokenMs ?? 0)) / 1000;
    if (r.usage.completionTokens > 1 && decodeSeconds > 0) metrics.tokensPerSecond.observe({ model }, (r.usage.completionTokens - 1) / decodeSeconds);
  }

  /** Counts and worker-side timings for the request log line (no content). */
  function resultFields(r: JobResult): Record<string, number> {
    return { promptTokens: r.usage.promptTokens, completionTokens: r.usage.completionTokens, ...workerTimingFields(r) };
  }

  /** A served request (a worker ran) or a refusal (none did), with the stable code when it failed. */
  function auditEventFor(request: FastifyRequest, route: string, status: number, ms: number): AuditEvent | undefined {
    const f = request.logFields ?? {};
    const code = typeof f.code === 'string' ? f.code : undefined;
    if (typeof f.workerId === 'string' && typeof f.model === 'string') {
      return {
        type: 'request_served',
        requestId: request.id,
        model: f.model,
        durationMs: Math.round(ms * 10) / 10,
        promptTokens: typeof f.promptTokens === 'number' ? f.promptTokens : 0,
        completionTokens: typeof f.completionTokens === 'number' ? f.completionTokens : 0,
        outcome: code ? 'error' : 'ok',
        ...(code ? { code } : {}),
      };
    }
    if (status < 400) return undefined;
    return { type: 'refusal', requestId: request.id, code: code ?? `http_${status}`, route };
  }

  type Shape = 'chat' | 'completion';

  async function serve(request: FastifyRequest, reply: FastifyReply, shape: Shape, body: ChatCompletionRequest | CompletionRequest): Promise<unknown> {
    const served = modelFor(body.model);
    const job: JobMessage =
      shape === 'chat' ? chatJob(body as ChatCompletionRequest, request.id, served.contextLength) : completionJob(body as CompletionRequest, request.id, served.contextLength);
    takeConcurrencySlot(request, reply);
    const signal = disconnectSignal(reply);
    const lease = await served.pool.acquire(signal);
    request.logFields = { ...request.logFields, model: served.name, workerId: lease.workerId };
    const id = newCompletionId(shape === 'chat' ? 'chatcmpl' : 'cmpl');
    const created = Math.floor(now() / 1000);
    const base = { id, object: shape === 'chat' ? 'chat.completion.chunk' : 'text_completion', created, model: served.name };
    const timeoutMs = config.requestTimeoutMs;

    if (!body.stream) {
      const parts: string[] = [];
      let calls: ToolCall[] | undefined;
      const entries: TokenLogprob[] = [];
      const onChunk = (t: string, lp?: TokenLogprob[]): void => {
        parts.push(t);
        if (lp) entries.push(...lp);
      };
      const result = await lease.run(job, { onChunk, onToolCalls: (c) => (calls = c), signal, timeoutMs });
      const wantsLogprobs = job.kind !== 'sealed' && job.kind !== 'embeddings' && job.params.logprobs !== undefined;
      observe(served.name, result);
      request.logFields = { ...request.logFields, ...resultFields(result) };
      const text = parts.join('');
      parts.length = 0;
      const usage = usageObject(result.usage);
      const fr = finishReason(result.finishReason);
      const message = calls ? { role: 'assistant', content: text === '' ? null : text, refusal: null, tool_calls: toolCallsOut(calls) } : { role: 'assistant', content: text, refusal: null };
      return shape === 'chat'
        ? { id, object: 'chat.completion', created, model: served.name, choices: [{ index: 0, message, logprobs: wantsLogprobs ? { content: chatLogprobs(entries), refusal: null } : null, finish_reason: fr }], usage }
        : { id, object: 'text_completion', created, model: served.name, choices: [{ index: 0, text, logprobs: wantsLogprobs ? completionLogprobs(entries) : null, finish_reason: fr }], usage };
    }

    // Streaming: from here the response is ours to write as Server-Sent Events.
    reply.hijack();
    const raw = reply.raw;
    raw.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
      'x-request-id': request.id,
    });
    const event = (data: unknown): void => {
      if (!raw.writableEnded && !raw.destroyed) raw.write(`data: ${JSON.stringify(data)}\n\n`);
    };
    let textOffset = 0;
    const delta = (text: string | undefined, fr: string | null, first = false, lp?: TokenLogprob[]): unknown => {
      const logprobs = lp === undefined ? null : shape === 'chat' ? { content: chatLogprobs(lp), refusal: null } : completionLogprobs(lp, textOffset);
      textOffset += text?.length ?? 0;
      return shape === 'chat'
        ? { ...base, choices: [{ index: 0, delta: first ? { role: 'assistant', content: '' } : text === undefined ? {} : { content: text }, logprobs, finish_reason: fr }] }
        : { ...base, choices: [{ index: 0, text: text ?? '', logprobs, finish_reason: fr }] };
    };
    if (shape === 'chat') event(delta(undefined, null, true));
    let status = 200;
    try {
      // Tool calls stream as OpenAI's deltas: the first names the call, the arguments follow in pieces.
      const onToolCalls = (calls: ToolCall[]): void => {
        calls.forEach((c, index) => {
          const call = (f: Record<string, unknown>): unknown => ({ ...base, choices: [{ index: 0, delta: { tool_calls: [{ index, ...f }] }, logprobs: null, finish_reason: null }] });
          event(call({ id: c.id, type: 'function', function: { name: c.name, arguments: '' } }));
          for (let at = 0; at < c.arguments.length; at += TOOL_ARGUMENTS_PIECE) event(call({ function: { arguments: c.arguments.slice(at, at + TOOL_ARGUMENTS_PIECE) } }));
        });
      };
      const onChunk = (t: string, lp?: TokenLogprob[]): void => {
        if (t !== '' || (lp && lp.length > 0)) event(delta(t, null, false, lp));
      };
      const result = await lease.run(job, { onChunk, onToolCalls, signal, timeoutMs });
      observe(served.name, result);
      request.logFields = { ...request.logFields, ...resultFields(result) };
      event(delta(undefined, finishReason(result.finishReason)));
      if (body.stream_options?.include_usage) event({ ...base, choices: [], usage: usageObject(result.usage) });
    } catch (err) {
      const e = toPhantomaError(err);
      status = e.status;
      metrics.errors.inc({ code: e.code });
      request.logFields = { ...request.logFields, code: e.code };
      // Headers are gone; OpenAI's streams carry a late error as an event with the same shape.
      event(errorBody(e));
    }
    if (!raw.writableEnded && !raw.destroyed) raw.end('data: [DONE]\n\n');
    // onResponse still runs for this hijacked reply; it logs the HTTP status (200), this the outcome.
    request.logFields = { ...request.logFields, stream: true, outcomeStatus: status };
    return reply;
  }

  registerEmbeddingsRoute(app as unknown as FastifyInstance, { modelFor, takeConcurrencySlot, disconnectSignal, requestTimeoutMs: config.requestTimeoutMs });
  app.post('/v1/chat/completions', { schema: { body: ChatCompletionRequest } }, (request, reply) => serve(request, reply, 'chat', request.body as ChatCompletionRequest));
  app.post('/v1/completions', { schema: { body: CompletionRequest } }, (request, reply) => serve(request, reply, 'completion', request.body as CompletionRequest));

  if (deps.sealed) {
    registerSealedRoute(app as unknown as FastifyInstance, { ...deps.sealed, modelFor, now, requestTimeoutMs: config.requestTimeoutMs, observe, ...(deps.audit ? { audit: deps.audit } : {}) });
  }

  const metricsApp = Fastify({ logger: false });
  metricsApp.get('/metrics', async (_request, reply) => {
    void reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });

  return { app: app as unknown as FastifyInstance, metricsApp };
}
