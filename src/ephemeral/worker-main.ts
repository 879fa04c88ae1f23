// The one-shot worker: loads the model and creates its context BEFORE any request arrives, says ready,
// serves exactly one job from stdin, streams the answer on stdout, and exits. It never serves a second
// request, never keeps a prompt cache, and holds nothing that outlives its process.
import { randomBytes } from 'node:crypto';
import { encodeMessage, createLineDecoder, type ToWorker, type FromWorker, type JobMessage } from './worker-protocol.ts';
import { createLogger } from '../logger.ts';
import { createLlamaRuntime, loadModelFile, createContext, prepareChatWrapper, generateChat, generateCompletion, generateEmbeddings, generateWithLogprobs, type GenerateOptions, type GenerateResult, type TokenLogprob } from '../models/llama.ts';
import { ERRORS, PhantomaError, isPhantomaError } from '../errors.ts';
import { setDumpable, mallocTrim } from '../native/addon.ts';
import { createKeydClient, keepAlive, openKeydConnection, sessionKeysOf, type DecapsulateRequest, type KeydConnection } from '../vault/keyd-client.ts';
import type { SessionKeys } from '../sealed/seal.ts';
import { KEYD_IDLE_MS } from '../vault/keyd.ts';
import { serveSealedJob, warmSealedJob } from './sealed-job.ts';
import { startJobTiming } from './job-timing.ts';
import type { LlamaContext, ChatWrapper } from 'node-llama-cpp';

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

const maxEnvelopeBytesOf = (spec: WorkerSpec): number => spec.maxEnvelopeBytes ?? 8 * 1024 * 1024;

/** keyd, connected while warm (sealed jobs only); the decapsulation goes over it. */
type HeldKeyd = { connection: KeydConnection; lastUsed: number };
let heldKeyd: HeldKeyd | undefined;

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

  // A worker that may get a sealed job warms that path too: the serving code itself, on throwaway jobs
  // (src/ephemeral/sealed-job.ts) that reach neither keyd, the gateway nor the model.
  if (spec.keydSocket && spec.warmup !== false) {
    await warmSealedJob({ model: spec.modelName, contextSize: context.contextSize, maxEnvelopeBytes: maxEnvelopeBytesOf(spec) });
    await warmTakeSessionKeys();
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
  const held = heldKeyd;
  const stopKeepAlive = held
    ? keepAlive(held.connection, KEYD_IDLE_MS / 2, {
        pinged: () => void (held.lastUsed = Date.now()),
        failed: () => {
          if (heldKeyd === held) heldKeyd = undefined;
          held.connection.close();
        },
      })
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
      stopKeepAlive?.();
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
    const socketPath = spec.keydSocket;
    if (!socketPath) throw new PhantomaError(ERRORS.KEYD_UNAVAILABLE, 'this worker has no keyd socket: sealed requests are not configured');
    await serveSealedJob(request, {
      maxEnvelopeBytes: maxEnvelopeBytesOf(spec),
      contextSize: context.contextSize,
      signal: abort.signal,
      takeKeys: (env, prepared) => {
        const held = heldKeyd;
        heldKeyd = undefined;
        return takeSessionKeys(held, env, prepared, socketPath);
      },
      send,
      generate: (job, opts, onLogprobs) => runGeneration(context, chatWrapper, job, opts, onLogprobs),
      embed: (inputs, onEmbedding) => embed(context, inputs, spec, onEmbedding),
    });
    return exit(0);
  }
  const timing = startJobTiming();
  if (request.kind === 'embeddings') {
    const { promptTokens } = await embed(context, request.inputs, spec, (index, embedding) => send({ type: 'embedding', index, embedding }));
    await send({ type: 'done', finishReason: 'stop', usage: { promptTokens, completionTokens: 0 }, ...timing.times() });
    return exit(0);
  }
  const opts: GenerateOptions = {
    ...request.params,
    signal: abort.signal,
    onText: (text) => {
      timing.token();
      void send({ type: 'chunk', text });
    },
  };
  timing.modelStarts();
  const result = await runGeneration(context, chatWrapper, request, opts, (text, logprobs) => {
    timing.token();
    void send({ type: 'chunk', text, logprobs });
  });
  if (result.toolCalls) await send({ type: 'tool_calls', calls: result.toolCalls });
  await send({
    type: 'done',
    finishReason: result.finishReason,
    usage: { promptTokens: result.promptTokens, completionTokens: result.completionTokens },
    ...timing.times(),
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

/**
 * This worker's keys for its request (the two one-way keys keyd derives from the per-request key).
 * Prepared by the gateway: keyd pushes them onto the connection held since warm-up (usually they are there
 * before the envelope is parsed, so no round trip waits). Not prepared, or that connection closed before
 * keyd pushed anything (keyd closed it as idle, and then refused the prepare without counting it): the
 * worker asks keyd itself, as its one decapsulation.
 */
async function takeSessionKeys(held: HeldKeyd | undefined, env: DecapsulateRequest, prepared: boolean, socketPath: string): Promise<SessionKeys> {
  try {
    if (prepared && held?.connection.alive()) {
      try {
        const pushed = await held.connection.pushed();
        // The key is for the envelope the gateway named; a different one would not open this body anyway.
        if (pushed.transcriptHash !== Buffer.from(env.transcriptHash).toString('base64')) throw new PhantomaError(ERRORS.KEYD_REFUSED, 'keyd pushed a key for another request');
        return sessionKeysOf(pushed);
      } catch (err) {
        // A pushed refusal is this worker's answer; only a connection that ended without one falls through.
        if (!isPhantomaError(err) || err.code !== ERRORS.KEYD_UNAVAILABLE.code) throw err;
      }
    }
    // The held connection unless keyd may be about to close it as idle (then a fresh one: nothing was sent).
    const usable = held && held.connection.alive() && Date.now() - held.lastUsed < KEYD_IDLE_MS - 1000 ? held.connection : undefined;
    return await createKeydClient({ socketPath, ...(usable ? { connection: usable } : {}) }).decapsulate(env);
  } finally {
    // Closed once the job is under way: closing a socket is cold code too, and the key is what waits.
    if (held) setImmediate(() => held.connection.close());
  }
}

/**
 * Runs takeSessionKeys on a stand-in connection with a push waiting (random keys for a random transcript),
 * so the way a prepared worker takes its keys is compiled before a request needs it (≈ 0.2 ms otherwise).
 */
async function warmTakeSessionKeys(): Promise<void> {
  const transcriptHash = randomBytes(32);
  const push = { push: 'request-key', transcriptHash: transcriptHash.toString('base64'), ok: true, bodyKey: randomBytes(32).toString('base64'), responseKey: randomBytes(32).toString('base64') };
  const standIn: KeydConnection = { alive: () => true, call: () => Promise.reject(new Error('a stand-in connection')), pushed: async () => push, close: () => undefined };
  const env = { keyId: '0000000000000000', ephemeralPublicKey: Buffer.alloc(32), kemCiphertext: Buffer.alloc(1088), transcriptHash };
  for (let i = 0; i < WARM_KEY_ROUNDS; i++) await takeSessionKeys({ connection: standIn, lastUsed: Date.now() }, env, true, '');
}
const WARM_KEY_ROUNDS = 8;

main().catch(async (err: unknown) => {
  const code = isPhantomaError(err) ? err.code : 'worker_failed';
  const message = isPhantomaError(err) ? err.message : 'the worker failed';
  await send({ type: 'error', code, message }).catch(() => undefined);
  process.exit(isPhantomaError(err) ? 3 : 1);
});
