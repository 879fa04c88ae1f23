// POST /v1/embeddings (issue 15): one one-shot worker embeds every input of a request (its generation
// context is disposed first, src/ephemeral/worker-main.ts), vectors come back one per input and leave
// in OpenAI's shape, float or base64 (little-endian float32, what the official clients decode).
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { PhantomaError, ERRORS } from '../errors.ts';
import { EmbeddingsRequest, embeddingsJob, embeddingObject } from './openai.ts';
import type { ServedModel } from './app.ts';

export interface EmbeddingsRouteDeps {
  modelFor(name: string): ServedModel;
  takeConcurrencySlot(request: FastifyRequest, reply: FastifyReply): void;
  disconnectSignal(reply: FastifyReply): AbortSignal;
  requestTimeoutMs: number;
}

export function registerEmbeddingsRoute(app: FastifyInstance, deps: EmbeddingsRouteDeps): void {
  app.post('/v1/embeddings', { schema: { body: EmbeddingsRequest } }, async (request, reply) => {
    const body = request.body as EmbeddingsRequest;
    const served = deps.modelFor(body.model);
    if (body.dimensions !== undefined && served.embeddingLength !== undefined && body.dimensions !== served.embeddingLength) {
      throw new PhantomaError(ERRORS.UNSUPPORTED_PARAMETER, `dimensions ${body.dimensions} is not supported: ${served.name} embeds into ${served.embeddingLength} dimensions`, { details: { param: 'dimensions' } });
    }
    const job = embeddingsJob(body, request.id);
    deps.takeConcurrencySlot(request, reply);
    const signal = deps.disconnectSignal(reply);
    const lease = await served.pool.acquire(signal);
    request.logFields = { ...request.logFields, model: served.name, workerId: lease.workerId };
    const vectors: number[][] = [];
    const result = await lease.run(job, { onChunk: () => undefined, onEmbedding: (i, v) => (vectors[i] = v), signal, timeoutMs: deps.requestTimeoutMs });
    const inputs = job.kind === 'embeddings' ? job.inputs.length : 0;
    if (vectors.length !== inputs || vectors.some((v) => v === undefined)) throw new PhantomaError(ERRORS.WORKER_FAILED, 'the worker returned fewer embeddings than inputs');
    const dimension = vectors[0]!.length;
    if (body.dimensions !== undefined && body.dimensions !== dimension) {
      // Checked after the fact: the width is the model's, known to the worker that loaded it.
      throw new PhantomaError(ERRORS.UNSUPPORTED_PARAMETER, `dimensions ${body.dimensions} is not supported: ${served.name} embeds into ${dimension} dimensions`, { details: { param: 'dimensions' } });
    }
    request.logFields = { ...request.logFields, promptTokens: result.usage.promptTokens, completionTokens: 0, inputs };
    return {
      object: 'list',
      data: vectors.map((v, i) => embeddingObject(i, v, body.encoding_format)),
      model: served.name,
      usage: { prompt_tokens: result.usage.promptTokens, total_tokens: result.usage.promptTokens },
    };
  });
}
