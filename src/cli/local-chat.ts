// phantoma local-chat: answers one prompt in this process with node-llama-cpp, streaming tokens to
// stdout. A diagnostic and the baseline the gateway path is compared against; it serves no one.
import type { Command } from './main.ts';
import { resolveFromRoot } from '../paths.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { createLogger } from '../logger.ts';
import { createModelRegistry } from '../models/registry.ts';
import { createLlamaRuntime, loadModelFile, createContext, prepareChatWrapper, generateChat } from '../models/llama.ts';
import { createProgressBar } from './progress.ts';
import { readGgufSummary } from '../models/gguf-reader.ts';
import { intOption } from './options.ts';

export const localChatCommand: Command = {
  summary: 'answer one prompt in-process with node-llama-cpp, streaming the tokens (no gateway)',
  usage: 'phantoma local-chat [--model NAME] [--max-tokens N] [--seed N] [--temperature T] [--system TEXT] PROMPT',
  options: {
    model: { type: 'string' },
    'max-tokens': { type: 'string' },
    seed: { type: 'string' },
    temperature: { type: 'string' },
    system: { type: 'string' },
  },
  async run(ctx, { values, positionals }) {
    const prompt = positionals.join(' ').trim();
    if (prompt === '') throw new UsageError(ERRORS.CLI_USAGE, `a prompt is required (usage: ${this.usage})`);
    const config = ctx.config();
    const maxTokens = intOption(values['max-tokens'], 'max-tokens', 48, 1, config.inference.contextSize);
    const seed = intOption(values.seed, 'seed', 1, 0, 2 ** 31 - 1);
    const temperature = values.temperature === undefined ? 0.8 : Number(values.temperature);
    if (!(temperature >= 0 && temperature <= 2)) throw new UsageError(ERRORS.CLI_USAGE, '--temperature must be a number from 0 to 2');
    const logger = createLogger({ level: config.logLevel === 'info' ? 'warn' : config.logLevel });
    const registry = createModelRegistry({ models: config.models, cacheDir: resolveFromRoot(config.cacheDir) });
    const name = typeof values.model === 'string' ? values.model : config.defaultModel;
    const resolved = await registry.resolve(name, (n) => {
      const bar = createProgressBar(`generating ${n} model`);
      return (d, t) => {
        bar.update(d, t);
        if (d >= t) bar.finish();
      };
    });
    // The file's header is checked before llama.cpp starts (seconds of binary self-test): a bad file fails fast.
    readGgufSummary(resolved.path);
    const runtime = await createLlamaRuntime({ logger });
    try {
      const loaded = await loadModelFile(runtime, resolved.path, resolved.sha256 ? { sha256: resolved.sha256 } : {});
      const context = await createContext(loaded.model, config.inference);
      const messages = [
        ...(typeof values.system === 'string' ? [{ role: 'system' as const, content: values.system }] : []),
        { role: 'user' as const, content: prompt },
      ];
      const chatWrapper = prepareChatWrapper(loaded.model);
      const started = performance.now();
      const result = await generateChat(context, messages, {
        chatWrapper,
        maxTokens,
        seed,
        temperature,
        onText: ctx.json ? undefined : (t) => process.stdout.write(t),
      });
      const seconds = (performance.now() - started) / 1000;
      if (ctx.json) {
        ctx.out(JSON.stringify({ model: name, text: result.text, tokens: result.tokens, usage: { prompt_tokens: result.promptTokens, completion_tokens: result.completionTokens }, finish_reason: result.finishReason }));
      } else {
        process.stdout.write('\n');
        ctx.err(`[${name}: ${result.completionTokens} tokens in ${seconds.toFixed(2)} s, finish_reason ${result.finishReason}]`);
      }
      await context.dispose();
      await loaded.model.dispose();
      return 0;
    } finally {
      await runtime.dispose();
    }
  },
};
