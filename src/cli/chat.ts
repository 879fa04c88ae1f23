// phantoma chat: a terminal client for the node's plaintext API, streaming. One prompt as arguments, or
// an interactive conversation on a terminal (history kept in this process only, gone when it exits).
import { createInterface } from 'node:readline/promises';
import type { Command } from './main.ts';
import { ERRORS, UsageError, PhantomaError, definitionOf } from '../errors.ts';
import { request, readAll, sseData, type NodeEndpoint } from '../client/http.ts';
import { intOption } from './options.ts';
import { createSealedClient, type SealedClient } from '../client/sealed.ts';
import { loadClientKey } from '../client/client-key.ts';

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

/** Sealed: encrypted on this machine to the node's request keys; only the worker that serves it can read it. */
async function sealedChat(client: SealedClient, model: string, messages: Message[], maxTokens: number, write: (s: string) => void, receipt: ((r: unknown) => void) | undefined): Promise<string> {
  const a = await client.send(model, { messages, max_tokens: maxTokens }, { stream: true, onText: write });
  receipt?.(a.receipt);
  return a.text;
}

export const chatCommand: Command = {
  summary: 'chat with a node, streaming: plaintext API (--url) or sealed end to end (--node, pinned by identity)',
  usage:
    'phantoma chat --url URL [--pin SHA256] [--api-key KEY] | --node URL --pin IDENTITY --client-name NAME --client-key FILE [--receipt]  [--model NAME] [--max-tokens N] [--system TEXT] [PROMPT]',
  options: {
    node: { type: 'string' },
    'client-name': { type: 'string' },
    'client-key': { type: 'string' },
    receipt: { type: 'boolean' },
    url: { type: 'string' },
    pin: { type: 'string' },
    'api-key': { type: 'string' },
    model: { type: 'string' },
    'max-tokens': { type: 'string' },
    system: { type: 'string' },
  },
  async run(ctx, { values, positionals }) {
    const sealed = typeof values.node === 'string';
    if (!sealed && typeof values.url !== 'string') throw new UsageError(ERRORS.CLI_USAGE, `--url or --node is required (usage: ${this.usage})`);
    if (sealed && (typeof values.pin !== 'string' || typeof values['client-name'] !== 'string' || typeof values['client-key'] !== 'string')) {
      throw new UsageError(ERRORS.CLI_USAGE, `--node needs --pin IDENTITY (from 'phantoma keys show'), --client-name and --client-key (usage: ${this.usage})`);
    }
    const maxTokens = intOption(values['max-tokens'], 'max-tokens', 256, 1, 1_000_000);
    // The key may come from the environment so it stays out of shell history and process listings.
    const apiKey = typeof values['api-key'] === 'string' ? values['api-key'] : process.env.PHANTOMA_API_KEY;
    const model = typeof values.model === 'string' ? values.model : ctx.config().defaultModel;
    const history: Message[] = typeof values.system === 'string' ? [{ role: 'system', content: values.system }] : [];
    const write = (s: string): void => void process.stdout.write(s);
    const printReceipt = values.receipt === true ? (r: unknown): void => ctx.err(`\nverified receipt: ${JSON.stringify(r)}`) : undefined;
    const client = sealed
      ? createSealedClient({ url: values.node as string, identityPin: values.pin as string, clientName: values['client-name'] as string, clientKey: loadClientKey(values['client-key'] as string), prepareAhead: false })
      : undefined;
    const endpoint: NodeEndpoint = { url: (values.url as string | undefined) ?? '', ...(typeof values.pin === 'string' ? { pin: values.pin } : {}), ...(apiKey ? { apiKey } : {}) };
    const ask = (messages: Message[]): Promise<string> => (client ? sealedChat(client, model, messages, maxTokens, write, printReceipt) : streamChat(endpoint, model, messages, maxTokens, write));
    const prompt = positionals.join(' ').trim();
    if (prompt !== '') {
      history.push({ role: 'user', content: prompt });
      await ask(history);
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
        history.push({ role: 'assistant', content: await ask(history) });
        write('\n');
      }
    } finally {
      rl.close();
    }
  },
};
