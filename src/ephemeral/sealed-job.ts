// A worker's sealed job: one decapsulation at keyd → open the body → run → seal every event. Its I/O comes
// in as functions (the key from keyd, the line to the gateway, the model), so the worker can run this very
// code on a throwaway job while warm (warmSealedJob) — a one-shot process otherwise runs it for the first
// time, compiling and filling caches, while a client waits.
import { randomBytes } from 'node:crypto';
import type { FromWorker, JobMessage, ToolCall } from './worker-protocol.ts';
import type { GenerateOptions, GenerateResult, TokenLogprob } from '../models/llama.ts';
import { ERRORS, PhantomaError, isPhantomaError } from '../errors.ts';
import { ENVELOPE_VERSION, SIGNATURE_BYTES, encodeHeader, parseEnvelope, transcriptHashOf, type Envelope } from '../sealed/envelope.ts';
import { MLKEM768_CIPHERTEXT_BYTES, X25519_PUBLIC_BYTES } from '../sealed/kem.ts';
import { createChunkSealer, deriveSessionKeys, openBody, sealBody, type SessionKeys } from '../sealed/seal.ts';
import { encodeEvent, jobFromSealedBody, type SealedEvent } from '../sealed/inner.ts';
import { startJobTiming } from './job-timing.ts';

export type SealedJobMessage = Extract<JobMessage, { kind: 'sealed' }>;
type OpenedJob = Exclude<JobMessage, SealedJobMessage>;

export interface SealedJobDeps {
  maxEnvelopeBytes: number;
  contextSize: number;
  signal: AbortSignal;
  /** This worker's keys for `env`, from its one decapsulation (keyd's push when `prepared`, else asked for). */
  takeKeys(env: Envelope, prepared: boolean): Promise<SessionKeys>;
  /** One line to the gateway. */
  send(m: FromWorker): Promise<void>;
  /** A chat or completion on the worker's context; entries with log-probabilities through onLogprobs. */
  generate(job: Extract<OpenedJob, { kind: 'chat' | 'completion' }>, opts: GenerateOptions, onLogprobs: (text: string, entries: TokenLogprob[]) => void): Promise<GenerateResult>;
  /** An embeddings job, each vector as it is made. */
  embed(inputs: readonly string[], onEmbedding: (index: number, v: number[]) => Promise<void>): Promise<{ promptTokens: number }>;
}

/** Token entries per sealed logprobs event (each at most 21 short tokens with numbers). */
const SEALED_LOGPROBS_PIECE = 4;

/** Floats per sealed embedding event: base64 of 2048 float32 stays far below the largest chunk bucket. */
const SEALED_EMBEDDING_PIECE = 2048;

/** Text is sealed in pieces that stay far below the largest chunk bucket, even fully JSON-escaped. */
export const SEALED_TEXT_PIECE = 2048;

/**
 * Serves one sealed job. Once the response key exists, every failure (a body that does not open or
 * validate, a context overflow) goes back sealed; the gateway learns only that the answer ended in an error.
 */
export async function serveSealedJob(request: SealedJobMessage, d: SealedJobDeps): Promise<void> {
  const timing = startJobTiming();
  const env = parseEnvelope(Buffer.from(request.envelope, 'base64'), d.maxEnvelopeBytes);
  const keys = await d.takeKeys(env, request.prepared === true);
  const sealer = createChunkSealer(keys.responseKey);
  const sendSealed = (e: SealedEvent, final: boolean): Promise<void> => d.send({ type: 'sealed', data: sealer.seal(encodeEvent(e), final).toString('base64'), final });
  try {
    let json: Buffer;
    try {
      json = openBody(keys.bodyKey, env.transcriptHash, env.ciphertext);
    } finally {
      keys.bodyKey.fill(0);
    }
    let job: JobMessage;
    try {
      job = jobFromSealedBody(json, env, request.requestId, d.contextSize).job;
    } finally {
      json.fill(0);
    }
    if (job.kind === 'sealed') throw new Error('unreachable');
    if (job.kind === 'embeddings') {
      const { promptTokens } = await d.embed(job.inputs, async (index, v) => {
        const bytes = Buffer.alloc(v.length * 4);
        v.forEach((x, i) => bytes.writeFloatLE(x, i * 4));
        for (let at = 0; at < v.length; at += SEALED_EMBEDDING_PIECE) {
          const piece = bytes.subarray(at * 4, Math.min(v.length, at + SEALED_EMBEDDING_PIECE) * 4).toString('base64');
          await sendSealed({ t: 'embedding', index, offset: at, length: v.length, b64: piece }, false);
        }
      });
      await sendSealed({ t: 'done', finish_reason: 'stop', usage: { prompt_tokens: promptTokens, completion_tokens: 0, total_tokens: promptTokens } }, true);
      await d.send({ type: 'done', finishReason: 'stop', usage: { promptTokens: 0, completionTokens: 0 }, ...timing.times(), sealedOutcome: 'ok' });
      return;
    }
    let pending = '';
    const flush = async (): Promise<void> => {
      while (pending.length > 0) {
        const piece = pending.slice(0, SEALED_TEXT_PIECE);
        pending = pending.slice(SEALED_TEXT_PIECE);
        await sendSealed({ t: 'text', text: piece }, false);
      }
    };
    // Sealing a chunk costs ≈ 0.1-0.2 ms here: the generation loop calls onText between two tokens, and the
    // cache-cold crypto would delay the next token by that much, every token. So onText only gathers the
    // text and the sealing runs once the loop has handed the next token's evaluation to llama.cpp's thread:
    // it overlaps that evaluation instead of preceding it (text arriving meanwhile joins the same chunk).
    // The token that spends max_tokens has no next evaluation to overlap (the loop goes on to wind the
    // generation up), so its text is sealed at once.
    let generated = 0;
    let flushQueued = false;
    const queueFlush = (): void => {
      if (flushQueued) return;
      flushQueued = true;
      setImmediate(() => {
        flushQueued = false;
        void flush();
      });
    };
    const maxTokens = job.params.maxTokens;
    const opts: GenerateOptions = {
      ...job.params,
      signal: d.signal,
      onTokens: (ids) => {
        generated += ids.length;
      },
      onText: (text) => {
        timing.token();
        pending += text;
        // Streamed: each piece of text goes as soon as the next token is under way. Not streamed: gathered
        // into few large chunks.
        if (!env.stream && pending.length < SEALED_TEXT_PIECE) return;
        if (generated >= maxTokens) void flush();
        else queueFlush();
      },
    };
    let logprobsSent = Promise.resolve();
    timing.modelStarts();
    const result = await d.generate(job, opts, (text, entries) => {
      opts.onText?.(text);
      // Entries follow their text, in groups that stay far below the largest chunk bucket.
      logprobsSent = logprobsSent.then(async () => {
        await flush();
        for (let at = 0; at < entries.length; at += SEALED_LOGPROBS_PIECE) await sendSealed({ t: 'logprobs', entries: entries.slice(at, at + SEALED_LOGPROBS_PIECE) }, false);
      });
    });
    await flush();
    await logprobsSent;
    for (const [index, call] of (result.toolCalls ?? []).entries()) await sealToolCall(index, call, sendSealed);
    const usage = { prompt_tokens: result.promptTokens, completion_tokens: result.completionTokens, total_tokens: result.promptTokens + result.completionTokens };
    await sendSealed({ t: 'done', finish_reason: result.finishReason === 'length' ? 'length' : result.finishReason === 'tool_calls' ? 'tool_calls' : 'stop', usage }, true);
    await d.send({ type: 'done', finishReason: result.finishReason, usage: { promptTokens: 0, completionTokens: 0 }, ...timing.times(), sealedOutcome: 'ok' });
  } catch (err) {
    const code = isPhantomaError(err) ? err.code : ERRORS.WORKER_FAILED.code;
    const status = isPhantomaError(err) ? err.status : ERRORS.WORKER_FAILED.status;
    const message = isPhantomaError(err) ? err.message : 'the worker failed';
    await sendSealed({ t: 'error', code, status, message }, true);
    await d.send({ type: 'done', finishReason: 'stop', usage: { promptTokens: 0, completionTokens: 0 }, ...timing.times(), sealedOutcome: 'error' });
  }
}

/** A tool call as sealed events: the first names it, the arguments follow in pieces (as OpenAI's deltas). */
async function sealToolCall(index: number, call: ToolCall, sendSealed: (e: SealedEvent, final: boolean) => Promise<void>): Promise<void> {
  let rest = call.arguments;
  let first = true;
  do {
    const piece = rest.slice(0, SEALED_TEXT_PIECE);
    rest = rest.slice(SEALED_TEXT_PIECE);
    await sendSealed(first ? { t: 'tool_call', index, id: call.id, name: call.name, arguments: piece } : { t: 'tool_call', index, arguments: piece }, false);
    first = false;
  } while (rest.length > 0);
}

/**
 * Rounds of warmSealedJob: enough that the request's own run finds its functions compiled and their ICs
 * filled (≈ 0.3 ms each here; 16 rather than 4 took ≈ 0.05 ms more off the job's start).
 */
export const WARM_JOB_ROUNDS = 16;

/**
 * Runs serveSealedJob on throwaway jobs: a streamed chat of about a typical prompt's size, sealed to a
 * random key that exists only here. Nothing reaches keyd (takeKeys answers with that key's two keys), the gateway (the
 * lines are dropped) or the model (a stand-in generation yields three pieces of text, the last one
 * spending max_tokens). Never client data; returns the number of sealed lines the rounds made.
 */
export async function warmSealedJob(o: { model: string; contextSize: number; maxEnvelopeBytes: number; rounds?: number }): Promise<number> {
  let lines = 0;
  for (let round = 0; round < (o.rounds ?? WARM_JOB_ROUNDS); round++) {
    const { envelope, requestKey } = throwawayEnvelope(o.model);
    await serveSealedJob(
      { type: 'job', kind: 'sealed', requestId: 'warm-up', envelope: envelope.toString('base64'), prepared: true },
      {
        maxEnvelopeBytes: o.maxEnvelopeBytes,
        contextSize: o.contextSize,
        signal: new AbortController().signal,
        takeKeys: async () => deriveSessionKeys(requestKey),
        send: async (m) => void (m.type === 'sealed' && lines++),
        generate: async (_job, opts) => {
          for (let i = 0; i < WARM_TEXT_PIECES; i++) {
            opts.onTokens?.([i]);
            opts.onText?.('warm-up ');
            await new Promise((res) => setImmediate(res));
          }
          return { text: '', tokens: [], promptTokens: 1, completionTokens: WARM_TEXT_PIECES, finishReason: 'length' };
        },
        embed: () => Promise.reject(new Error('a warm-up job is a chat')),
      },
    );
  }
  return lines;
}

const WARM_TEXT_PIECES = 3;

/** A sealed chat envelope (unsigned: a worker does not check signatures) and the request key that opens it. */
function throwawayEnvelope(model: string): { envelope: Buffer; requestKey: Buffer } {
  const header = encodeHeader({
    version: ENVELOPE_VERSION,
    stream: true,
    keyId: '0000000000000000',
    clientName: 'warm-up',
    model,
    timestampMs: Date.now(),
    nonce: randomBytes(16),
    ephemeralPublicKey: Buffer.alloc(X25519_PUBLIC_BYTES),
    kemCiphertext: Buffer.alloc(MLKEM768_CIPHERTEXT_BYTES),
  });
  const requestKey = randomBytes(32);
  const keys = deriveSessionKeys(requestKey);
  const body = { messages: [{ role: 'user', content: 'warm-up '.repeat(512) }], max_tokens: WARM_TEXT_PIECES };
  const ciphertext = sealBody(keys.bodyKey, transcriptHashOf(header), Buffer.from(JSON.stringify(body)));
  const len = Buffer.alloc(4);
  len.writeUInt32BE(ciphertext.length);
  const envelope = Buffer.concat([header, len, ciphertext, Buffer.alloc(SIGNATURE_BYTES)]);
  return { envelope, requestKey };
}
