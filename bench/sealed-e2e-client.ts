// The client side of bench/sealed-e2e.bench.ts, in its own process as a real client is (in the node's
// process it would share one event loop with the gateway). Told over IPC which arm to run next; answers
// with the time from sending to the last content chunk and the node's request id (to find the worker's
// model time in the node's log).
import { createPrivateKey } from 'node:crypto';
import { createSealedClient } from '../src/client/sealed.ts';

interface Setup {
  url: string;
  apiKey: string;
  identityPin: string;
  clientKeyPem: string;
}
const setup = JSON.parse(process.env.PHANTOMA_BENCH_CLIENT ?? '{}') as Setup;
const prompt = 'lorem ipsum dolor sit amet '.repeat(152).slice(0, 4096);
const body = { messages: [{ role: 'user', content: prompt }], max_tokens: 8, temperature: 0 };
const client = createSealedClient({ url: setup.url, identityPin: setup.identityPin, clientName: 'alice', clientKey: createPrivateKey(setup.clientKeyPem) });
await client.keyDocument(); // fetched once, as a real client would

interface Timed {
  ms: number;
  requestId: string;
}
async function plain(): Promise<Timed> {
  const t0 = performance.now();
  const res = await fetch(setup.url + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${setup.apiKey}` }, body: JSON.stringify({ model: 'tiny', stream: true, ...body }) });
  let last = t0;
  const dec = new TextDecoder();
  for await (const c of res.body!) if (dec.decode(c as Uint8Array).includes('"content"')) last = performance.now();
  return { ms: last - t0, requestId: res.headers.get('x-request-id') ?? '' };
}
async function sealed(): Promise<Timed> {
  const t0 = performance.now();
  let last = t0;
  const answer = await client.send('tiny', body, { stream: true, onText: () => (last = performance.now()) });
  return { ms: last - t0, requestId: answer.receipt.requestId };
}

process.on('message', (m: { arm: 'plain' | 'sealed' | 'exit' }) => {
  if (m.arm === 'exit') process.exit(0);
  (m.arm === 'plain' ? plain() : sealed()).then(
    (timed) => process.send!(timed),
    (err: unknown) => process.send!({ error: (err as Error).message }),
  );
});
process.send!({ ready: true });
