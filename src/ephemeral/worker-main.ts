// The one-shot worker: loads the model and creates its context BEFORE any request arrives, says ready,
// serves exactly one job from stdin, streams the answer on stdout, and exits. It never serves a second
// request, never keeps a prompt cache, and holds nothing that outlives its process.
import { encodeMessage, createLineDecoder, type ToWorker, type FromWorker, type JobMessage } from './worker-protocol.ts';
import { createLogger } from '../logger.ts';
import { createLlamaRuntime, loadModelFile, createContext, prepareChatWrapper, generateChat, generateCompletion, type GenerateOptions } from '../models/llama.ts';
import { isPhantomaError } from '../errors.ts';
import { setDumpable, mallocTrim } from '../native/addon.ts';

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
}

function send(m: FromWorker): Promise<void> {
  return new Promise((resolve) => process.stdout.write(encodeMessage(m), () => resolve()));
}

async function exit(code: number): Promise<never> {
  // Process death is the wipe: the kernel frees every page this process held.
  process.exit(code);
}

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

  // An idle warm worker should hold only what serving needs: collect the garbage of loading and warm-up,
  // then hand glibc's freed arena pages back (≈10 MiB per worker on the bench model; the pool holds several).
  (globalThis as { gc?: () => void }).gc?.();
  mallocTrim();

  const abort = new AbortController();
  let job: JobMessage | undefined;
  const jobArrived = Promise.withResolvers<JobMessage>();
  const decode = createLineDecoder<ToWorker>((m) => {
    if (m.type === 'job' && !job) {
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
  const jobStart = performance.now();
  let firstTokenMs: number | null = null;
  const opts: GenerateOptions = {
    ...request.params,
    signal: abort.signal,
    onText: (text) => {
      firstTokenMs ??= performance.now() - jobStart;
      void send({ type: 'chunk', text });
    },
  };
  const result = request.kind === 'chat' ? await generateChat(context, request.messages, { ...opts, chatWrapper }) : await generateCompletion(context, request.prompt, opts);
  await send({
    type: 'done',
    finishReason: result.finishReason,
    usage: { promptTokens: result.promptTokens, completionTokens: result.completionTokens },
    firstTokenMs,
    generateMs: performance.now() - jobStart,
  });
  await exit(0);
}

main().catch(async (err: unknown) => {
  const code = isPhantomaError(err) ? err.code : 'worker_failed';
  const message = isPhantomaError(err) ? err.message : 'the worker failed';
  await send({ type: 'error', code, message }).catch(() => undefined);
  process.exit(isPhantomaError(err) ? 3 : 1);
});
