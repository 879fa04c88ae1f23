// The one-shot worker: loads the model and creates its context BEFORE any request arrives, says ready,
// serves exactly one job from stdin, streams the answer on stdout, and exits. It never serves a second
// request, never keeps a prompt cache, and holds nothing that outlives its process.
import { encodeMessage, createLineDecoder, type ToWorker, type FromWorker, type JobMessage } from './worker-protocol.ts';
import { createLogger } from '../logger.ts';
import { createLlamaRuntime, loadModelFile, createContext, prepareChatWrapper, generateChat, generateCompletion, generateEmbeddings, generateWithLogprobs, type GenerateOptions, type GenerateResult, type TokenLogprob } from '../models/llama.ts';
import { ERRORS, PhantomaError, isPhantomaError } from '../errors.ts';
import { setDumpable, mallocTrim } from '../native/addon.ts';
import { parseEnvelope, type Envelope } from '../sealed/envelope.ts';
import { deriveSessionKeys, openBody, createChunkSealer } from '../sealed/seal.ts';
import { jobFromSealedBody, encodeEvent, type SealedEvent } from '../sealed/inner.ts';
import { createKeydClient, openKeydConnection, type KeydConnection } from '../vault/keyd-client.ts';
import { KEYD_IDLE_MS } from '../vault/keyd.ts';
import { warmSealedPath } from '../sealed/warm.ts';
import type { LlamaContext, ChatWrapper } from 'node-llama-cpp';
import type { ToolCall } from './worker-protocol.ts';

export interface WorkerSpec {
  modelName: string;
  modelPath: string;
  sha256?: string;
  contextSize: number;
  threads: number;
  batchSize: number;
  logLevel: string;
  /** Run a fixed throwaway generation before ready (default true). */
  warmup?: boolean;
  /** keyd's socket as this worker sees it (the warden binds it at /run/phantoma/keyd.sock); sealed jobs need it. */
  keydSocket?: string;
  /** Largest sealed envelope the worker parses (the gateway's cap). */
  maxEnvelopeBytes?: number;
}

function send(m: FromWorker): Promise<void> {
  return new Promise((resolve) => process.stdout.write(encodeMessage(m), () => resolve()));
}

async function exit(code: number): Promise<never> {
  // Process death is the wipe: the kernel frees every page this process held.
  process.exit(code);
}

/** keyd, connected while warm (sealed jobs only); the decapsulation goes over it. */
let heldKeyd: { connection: KeydConnection; lastUsed: number } | undefined;

async function main(): Promise<void> {
  // First thing: no core dump of, and no same-uid ptrace or /proc/<pid>/mem access to, what this process
  // will hold. (dumpable resets on execve, so the worker sets it itself.)
  setDumpable(false);
  const spec = JSON.parse(process.argv[2] ?? '{}') as WorkerSpec;
  const logger = createLogger({ level: spec.logLevel });
  const started = performance.now();
  const runtime = await createLlamaRuntime({ logger });
  const loaded = await loadModelFile(runtime, spec.modelPath, spec.sha256 ? { sha256: spec.sha256 } : {});
  const context = await createContext(loaded.model, spec);
  const chatWrapper = prepareChatWrapper(loaded.model);
  // A one-shot worker would otherwise run node-llama-cpp's generation path cold (unoptimised JS, first
  // native calls) while a client waits. Warm it on a fixed throwaway prompt — never client data — whose
  // sequence and KV cache are released before the worker says ready.
  if (spec.warmup !== false) {
    await generateChat(context, [{ role: 'user', content: 'warm-up' }], { chatWrapper, maxTokens: 2, seed: 0, temperature: 0 });
    await generateCompletion(context, 'warm-up', { maxTokens: 1, seed: 0, temperature: 0 });
  }

  // A worker that may get a sealed job warms that path too (src/sealed/warm.ts), on throwaway bytes.
  if (spec.keydSocket && spec.warmup !== false) {
    warmSealedPath(spec.modelName, context.contextSize);
    // And the way to keyd: a connection held from now on (connecting and keyd's identification of this
    // worker by its cgroup happen before any request exists), warmed with a `ping`, which keyd answers
    // anyone and which is not this worker's one decapsulation. keyd not answering now is not this worker's
    // failure: its sealed job will connect again, and report it.
    try {
      heldKeyd = { connection: await openKeydConnection({ socketPath: spec.keydSocket, timeoutMs: 1000 }), lastUsed: Date.now() };
      await heldKeyd.connection.call({ op: 'ping' });
      heldKeyd.lastUsed = Date.now();
    } catch {
      heldKeyd?.connection.close();
      heldKeyd = undefined;
    }
  }
  // keyd closes a connection idle for KEYD_IDLE_MS, and a warm worker may wait in its pool far longer; the
  // held connection is where the gateway's prepared key arrives, so a ping every half of that keeps it.
  const keepAlive = heldKeyd
    ? setInterval(() => {
        const held = heldKeyd;
        if (!held) return;
        held.connection.call({ op: 'ping' }).then(
          () => void (held.lastUsed = Date.now()),
          () => {
            if (heldKeyd === held) heldKeyd = undefined;
            held.connection.close();
          },
        );
      }, KEYD_IDLE_MS / 2)
    : undefined;
  // An idle warm worker should hold only what serving needs: collect the garbage of loading and warm-up,
  // then hand glibc's freed arena pages back (≈10 MiB per worker on the bench model; the pool holds several).
  (globalThis as { gc?: () => void }).gc?.();
  mallocTrim();

  const abort = new AbortController();
  let job: JobMessage | undefined;
  const jobArrived = Promise.withResolvers<JobMessage>();
  const decode = createLineDecoder<ToWorker>((m) => {
    if (m.type === 'job' && !job) {
      clearInterval(keepAlive);
      job = m;
      jobArrived.resolve(m);
    } else if (m.type === 'cancel') {
      abort.abort();
    } else {
      throw new Error(`unexpected ${m.type} message`);
    }
  });
  process.stdin.on('data', (c: Buffer) => {
    try {
      decode(c);
    } catch (err) {
      logger.error({ err: (err as Error).message }, 'worker protocol error');
      void exit(70);
    }
  });
  // The gateway closing our stdin means it no longer wants us, whatever we were doing.
  process.stdin.on('end', () => {
    abort.abort();
    if (!job) void exit(0);
  });

  await send({ type: 'ready', pid: process.pid, model: spec.modelName, contextSize: context.contextSize, loadMs: Math.round(performance.now() - started) });
  const request = await jobArrived.promise;
  if (request.kind === 'sealed') {
    await serveSealed(request, { spec, context, chatWrapper, signal: abort.signal });
    return exit(0);
  }
  const jobStart = performance.now();
  if (request.kind === 'embeddings') {
    const { promptTokens } = await embed(context, request.inputs, spec, (index, embedding) => send({ type: 'embedding', index, embedding }));
    await send({ type: 'done', finishReason: 'stop', usage: { promptTokens, completionTokens: 0 }, firstTokenMs: null, generateMs: performance.now() - jobStart });
    return exit(0);
  }
  let firstTokenMs: number | null = null;
  const opts: GenerateOptions = {
    ...request.params,
    signal: abort.signal,
    onText: (text) => {
      firstTokenMs ??= performance.now() - jobStart;
      void send({ type: 'chunk', text });
    },
  };
  const result = await runGeneration(context, chatWrapper, request, opts, (text, logprobs) => {
    firstTokenMs ??= performance.now() - jobStart;
    void send({ type: 'chunk', text, logprobs });
  });
  if (result.toolCalls) await send({ type: 'tool_calls', calls: result.toolCalls });
  await send({
    type: 'done',
    finishReason: result.finishReason,
    usage: { promptTokens: result.promptTokens, completionTokens: result.completionTokens },
    firstTokenMs,
    generateMs: performance.now() - jobStart,
  });
  await exit(0);
}

/** A chat or completion job on the worker's context (tools and structured output for chat). */
function runGeneration(
  context: LlamaContext,
  chatWrapper: ChatWrapper,
  job: Extract<JobMessage, { kind: 'chat' | 'completion' }>,
  opts: GenerateOptions,
  onLogprobs: (text: string, entries: TokenLogprob[]) => void,
): Promise<GenerateResult> {
  if (job.params.logprobs !== undefined) {
    // Text and its tokens' log-probabilities go out together (onLogprobs), not through onText.
    const input = job.kind === 'chat' ? { messages: job.messages, chatWrapper } : { prompt: job.prompt };
    return generateWithLogprobs(context, input, { ...opts, onText: undefined, topLogprobs: job.params.logprobs, onLogprobs });
  }
  if (job.kind === 'completion') return generateCompletion(context, job.prompt, opts);
  return generateChat(context, job.messages, {
    ...opts,
    chatWrapper,
    ...(job.responseFormat ? { responseFormat: job.responseFormat } : {}),
    ...(job.tools ? { tools: job.tools } : {}),
    ...(job.toolChoice ? { toolChoice: job.toolChoice } : {}),
  });
}

/** An embeddings job: the generation context goes first, then one embedding context serves every input. */
async function embed(context: LlamaContext, inputs: readonly string[], spec: WorkerSpec, onEmbedding: (index: number, v: number[]) => Promise<void>): Promise<{ promptTokens: number }> {
  const model = context.model;
  await context.dispose();
  return generateEmbeddings(model, inputs, { contextSize: spec.contextSize, threads: spec.threads, batchSize: spec.batchSize, onEmbedding });
}

/** Token entries per sealed logprobs event (each at most 21 short tokens with numbers). */
const SEALED_LOGPROBS_PIECE = 4;

/** Floats per sealed embedding event: base64 of 2048 float32 stays far below the largest chunk bucket. */
const SEALED_EMBEDDING_PIECE = 2048;

/** Text is sealed in pieces that stay far below the largest chunk bucket, even fully JSON-escaped. */
const SEALED_TEXT_PIECE = 2048;

/**
 * A sealed job: one decapsulation at keyd → open the body → run → seal every event. Once the response key
 * exists, every failure (a body that does not open or validate, a context overflow) goes back sealed; the
 * gateway learns only that the answer ended in an error.
 */
async function serveSealed(request: Extract<JobMessage, { kind: 'sealed' }>, d: { spec: WorkerSpec; context: LlamaContext; chatWrapper: ChatWrapper; signal: AbortSignal }): Promise<void> {
  const jobStart = performance.now();
  const envelopeBytes = Buffer.from(request.envelope, 'base64');
  const env = parseEnvelope(envelopeBytes, d.spec.maxEnvelopeBytes ?? 8 * 1024 * 1024);
  if (!d.spec.keydSocket) throw new PhantomaError(ERRORS.KEYD_UNAVAILABLE, 'this worker has no keyd socket: sealed requests are not configured');
  const requestKey = await takeRequestKey(env, request.prepared === true, d.spec.keydSocket);
  const keys = deriveSessionKeys(requestKey);
  requestKey.fill(0);
  const sealer = createChunkSealer(keys.responseKey);
  const sendSealed = (e: SealedEvent, final: boolean): Promise<void> => send({ type: 'sealed', data: sealer.seal(encodeEvent(e), final).toString('base64'), final });
  let firstTokenMs: number | null = null;
  try {
    const json = openBody(keys.bodyKey, env.transcriptHash, env.ciphertext);
    let job: JobMessage;
    try {
      job = jobFromSealedBody(json, env, request.requestId, d.context.contextSize).job;
    } finally {
      json.fill(0);
    }
    if (job.kind === 'sealed') throw new Error('unreachable');
    if (job.kind === 'embeddings') {
      const { promptTokens } = await embed(d.context, job.inputs, d.spec, async (index, v) => {
        const bytes = Buffer.alloc(v.length * 4);
        v.forEach((x, i) => bytes.writeFloatLE(x, i * 4));
        for (let at = 0; at < v.length; at += SEALED_EMBEDDING_PIECE) {
          const piece = bytes.subarray(at * 4, Math.min(v.length, at + SEALED_EMBEDDING_PIECE) * 4).toString('base64');
          await sendSealed({ t: 'embedding', index, offset: at, length: v.length, b64: piece }, false);
        }
      });
      await sendSealed({ t: 'done', finish_reason: 'stop', usage: { prompt_tokens: promptTokens, completion_tokens: 0, total_tokens: promptTokens } }, true);
      await send({ type: 'done', finishReason: 'stop', usage: { promptTokens: 0, completionTokens: 0 }, firstTokenMs: null, generateMs: performance.now() - jobStart, sealedOutcome: 'ok' });
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
    const opts: GenerateOptions = {
      ...job.params,
      signal: d.signal,
      onText: (text) => {
        firstTokenMs ??= performance.now() - jobStart;
        pending += text;
        // Streamed: each piece of text goes at once. Not streamed: gathered into few large chunks.
        if (env.stream || pending.length >= SEALED_TEXT_PIECE) void flush();
      },
    };
    let logprobsSent = Promise.resolve();
    const result = await runGeneration(d.context, d.chatWrapper, job, opts, (text, entries) => {
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
    await send({ type: 'done', finishReason: result.finishReason, usage: { promptTokens: 0, completionTokens: 0 }, firstTokenMs, generateMs: performance.now() - jobStart, sealedOutcome: 'ok' });
  } catch (err) {
    const code = isPhantomaError(err) ? err.code : ERRORS.WORKER_FAILED.code;
    const status = isPhantomaError(err) ? err.status : ERRORS.WORKER_FAILED.status;
    const message = isPhantomaError(err) ? err.message : 'the worker failed';
    await sendSealed({ t: 'error', code, status, message }, true);
    await send({ type: 'done', finishReason: 'stop', usage: { promptTokens: 0, completionTokens: 0 }, firstTokenMs, generateMs: performance.now() - jobStart, sealedOutcome: 'error' });
  }
}

/**
 * This worker's per-request key. Prepared by the gateway: keyd pushes it onto the connection held since
 * warm-up (usually it is there before the envelope is parsed, so no round trip waits). Not prepared, or that
 * connection closed before keyd pushed anything (keyd closed it as idle, and then refused the prepare
 * without counting it): the worker asks keyd itself, as its one decapsulation.
 */
async function takeRequestKey(env: Envelope, prepared: boolean, socketPath: string): Promise<Buffer> {
  const held = heldKeyd;
  heldKeyd = undefined;
  try {
    if (prepared && held?.connection.alive()) {
      try {
        const pushed = await held.connection.pushed();
        // The key is for the envelope the gateway named; a different one would not open this body anyway.
        if (pushed.transcriptHash !== Buffer.from(env.transcriptHash).toString('base64')) throw new PhantomaError(ERRORS.KEYD_REFUSED, 'keyd pushed a key for another request');
        return Buffer.from(String(pushed.requestKey), 'base64');
      } catch (err) {
        // A pushed refusal is this worker's answer; only a connection that ended without one falls through.
        if (!isPhantomaError(err) || err.code !== ERRORS.KEYD_UNAVAILABLE.code) throw err;
      }
    }
    // The held connection unless keyd may be about to close it as idle (then a fresh one: nothing was sent).
    const usable = held && held.connection.alive() && Date.now() - held.lastUsed < KEYD_IDLE_MS - 1000 ? held.connection : undefined;
    return await createKeydClient({ socketPath, ...(usable ? { connection: usable } : {}) }).decapsulate(env);
  } finally {
    held?.connection.close();
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

main().catch(async (err: unknown) => {
  const code = isPhantomaError(err) ? err.code : 'worker_failed';
  const message = isPhantomaError(err) ? err.message : 'the worker failed';
  await send({ type: 'error', code, message }).catch(() => undefined);
  process.exit(isPhantomaError(err) ? 3 : 1);
});
