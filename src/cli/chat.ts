// phantoma chat: a terminal client for the node's plaintext API, streaming. One prompt as arguments, or
// an interactive conversation on a terminal (history kept in this process only, gone when it exits).
import { createInterface } from 'node:readline/promises';
import type { Command } from './main.ts';
import { ERRORS, UsageError, PhantomaError, definitionOf } from '../errors.ts';
import { request, readAll, sseData, type NodeEndpoint } from '../client/http.ts';
import { intOption } from './options.ts';

type Message = { role: 'system' | 'user' | 'assistant'; content: string };

async function streamChat(endpoint: NodeEndpoint, model: string, messages: Message[], maxTokens: number, write: (s: string) => void): Promise<string> {
  const res = await request(endpoint, 'POST', '/v1/chat/completions', { model, messages, stream: true, max_tokens: maxTokens });
  if (res.status !== 200) {
    const text = await readAll(res.body);
    let err: { code?: string; message?: string } = {};
    try {
      err = (JSON.parse(text) as { error: typeof err }).error;
    } catch {
      /* not our error shape */
    }
    const code = definitionOf(err.code, ERRORS.NODE_UNREACHABLE);
    throw new PhantomaError(code, `the node answered ${res.status}: ${err.message ?? text.slice(0, 200)}`);
  }
  let answer = '';
  for await (const data of sseData(res.body)) {
    const chunk = JSON.parse(data) as { choices?: Array<{ delta?: { content?: string } }>; error?: { code: string; message: string } };
    if (chunk.error) throw new PhantomaError(definitionOf(chunk.error.code, ERRORS.WORKER_FAILED), chunk.error.message);
    const text = chunk.choices?.[0]?.delta?.content;
    if (text) {
      answer += text;
      write(text);
    }
  }
  return answer;
}

export const chatCommand: Command = {
  summary: 'chat with a node over its OpenAI-compatible API, streaming (interactive without a prompt)',
  usage: 'phantoma chat --url URL [--pin SHA256] [--api-key KEY] [--model NAME] [--max-tokens N] [--system TEXT] [PROMPT]',
  options: {
    url: { type: 'string' },
    pin: { type: 'string' },
    'api-key': { type: 'string' },
    model: { type: 'string' },
    'max-tokens': { type: 'string' },
    system: { type: 'string' },
  },
  async run(ctx, { values, positionals }) {
    if (typeof values.url !== 'string') throw new UsageError(ERRORS.CLI_USAGE, `--url is required (usage: ${this.usage})`);
    const maxTokens = intOption(values['max-tokens'], 'max-tokens', 256, 1, 1_000_000);
    // The key may come from the environment so it stays out of shell history and process listings.
    const apiKey = typeof values['api-key'] === 'string' ? values['api-key'] : process.env.PHANTOMA_API_KEY;
    const endpoint: NodeEndpoint = { url: values.url, ...(typeof values.pin === 'string' ? { pin: values.pin } : {}), ...(apiKey ? { apiKey } : {}) };
    const model = typeof values.model === 'string' ? values.model : ctx.config().defaultModel;
    const history: Message[] = typeof values.system === 'string' ? [{ role: 'system', content: values.system }] : [];
    const write = (s: string): void => void process.stdout.write(s);
    const prompt = positionals.join(' ').trim();
    if (prompt !== '') {
      history.push({ role: 'user', content: prompt });
      await streamChat(endpoint, model, history, maxTokens, write);
      write('\n');
      return 0;
    }
    if (!process.stdin.isTTY) throw new UsageError(ERRORS.CLI_USAGE, 'give a PROMPT, or run on a terminal for an interactive chat');
    const rl = createInterface({ input: process.stdin, output: process.stdout });
    try {
      for (;;) {
        const line = (await rl.question('> ').catch(() => '/exit')).trim();
        if (line === '/exit' || line === '/quit') return 0;
        if (line === '') continue;
        history.push({ role: 'user', content: line });
        history.push({ role: 'assistant', content: await streamChat(endpoint, model, history, maxTokens, write) });
        write('\n');
      }
    } finally {
      rl.close();
    }
  },
};
