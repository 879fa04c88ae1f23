// The sealed API end to end on a real node (warden-isolated workers, keyd from a real vault): the SDK's
// streamed and non-streamed chats with verified receipts, every gateway refusal with its code and no
// worker started, a buggy client's wrongly sealed body refused inside the worker (sealed), mutated
// envelopes through the real gateway, and the official `openai` client through `phantoma proxy`.
import t from 'tap';
import { generateKeyPairSync, sign as edSign } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { startTestNode, type TestNode } from './fixture.ts';
import { makeVaultContents, addClient, revokeClient, identityFingerprint, rawEd25519Public } from '../../src/vault/contents.ts';
import { createVault } from '../../src/vault/store.ts';
import { createSealedClient } from '../../src/client/sealed.ts';
import { buildProxy } from '../../src/client/proxy.ts';
import { sealRequest } from '../../src/sealed/request.ts';
import { parseEnvelope, SIGNATURE_BYTES, SIGNATURE_CONTEXT } from '../../src/sealed/envelope.ts';
import { SEALED_CONTENT_TYPE, SEALED_PATH } from '../../src/gateway/sealed-route.ts';
import { createLogger } from '../../src/logger.ts';
import type { KeyDocument } from '../../src/vault/signing.ts';
import { KEYD_IDLE_MS } from '../../src/vault/keyd.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-sealed-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
const alice = generateKeyPairSync('ed25519');
const bob = generateKeyPairSync('ed25519');
const now = new Date();
let contents = makeVaultContents({ now, requestKeyValidityMs: 86_400_000 });
contents = addClient(contents, 'alice', rawEd25519Public(alice.publicKey), now);
contents = revokeClient(addClient(contents, 'bob', rawEd25519Public(bob.publicKey), now), 'bob', now);
const vaultPath = join(tmp, 'vault.phv');
createVault(vaultPath, { kind: 'passphrase', secret: Buffer.from('sealed test') }, { log2N: 10, r: 8, p: 1 }, contents);
const identityPin = identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64'));
process.env.PHANTOMA_VAULT_PASSPHRASE = 'sealed test';

const n: TestNode = await startTestNode({ vault: { path: vaultPath, keydSocket: join(tmp, 'keyd', 'keyd.sock') }, gateway: { requestTimeoutMs: 20_000 }, inference: { contextSize: 4096 } });
t.teardown(() => n.close());
const pool = n.node.models[0]!.pool;
const client = createSealedClient({ url: n.url, identityPin, clientName: 'alice', clientKey: alice.privateKey });
const chat = { messages: [{ role: 'user', content: 'Say something sealed.' }], max_tokens: 8, temperature: 0, seed: 1 };

function auditEntries(): any[] {
  const dir = join(n.stateDir, 'audit');
  return readdirSync(dir).flatMap((f) => readFileSync(join(dir, f), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)));
}

t.test('a streamed sealed chat: text arrives in order, the receipt verifies and says the wipe was verified', async (t) => {
  const pieces: string[] = [];
  const a = await client.send('tiny', chat, { stream: true, onText: (x) => pieces.push(x) });
  t.ok(pieces.length > 0, 'text arrived in pieces');
  t.equal(a.text, pieces.join(''));
  t.equal(a.usage.completion_tokens, 8);
  t.equal(a.usage.total_tokens, a.usage.prompt_tokens + 8);
  t.equal(a.finishReason, 'length');
  t.equal(a.receipt.outcome, 'ok');
  t.equal(a.receipt.wipeVerified, true, 'the warden verified the worker end');
  t.ok(a.receipt.wipeMicros > 0);
  const doc: KeyDocument = await client.keyDocument();
  t.equal(a.receipt.egressPolicyHash, doc.egressPolicyHash, 'the receipt names the egress policy of the key document');
  const served = auditEntries().filter((e) => e.type === 'request_served' && e.outcome === 'ok');
  t.ok(served.length >= 1 && served.every((e: any) => e.promptTokens === 0), 'audited without token counts (they stay sealed)');
  // The request log line has the worker's timings (what the gateway sees pass anyway), not its counts.
  const line = n.logs.map((l) => JSON.parse(l)).find((l) => l.msg === 'request' && l.reqId === a.receipt.requestId);
  t.match(line, { sealed: true, workerTtftMs: Number, workerPromptEvalMs: Number, workerModelMs: Number }, 'the sealed request\'s log line carries the worker\'s timings');
  t.ok(line.workerPromptEvalMs > 0 && line.workerPromptEvalMs <= line.workerTtftMs + 0.05 && line.workerModelMs >= line.workerPromptEvalMs, `the model's share: prompt ${line.workerPromptEvalMs} ms, model ${line.workerModelMs} ms, first token ${line.workerTtftMs} ms`);
  t.notOk('promptTokens' in line, 'no token count in it');
  // The gateway had keyd decapsulate for the worker while the job travelled (keyd's prepare): the worker
  // got its key pushed instead of asking after it read the job.
  let decaps: any[] = [];
  for (let i = 0; i < 50 && decaps.length === 0; i++) {
    decaps = auditEntries().filter((e) => e.type === 'keyd_decapsulated');
    if (decaps.length === 0) await new Promise((r) => setTimeout(r, 100));
  }
  t.ok(decaps.length >= 1 && decaps.every((e) => e.op === 'prepare'), `every decapsulation was prepared by the gateway (${decaps.map((e) => e.op).join(',')})`);
});

t.test("a worker warm for longer than keyd's idle limit still gets its key prepared (its connection is kept alive)", async (t) => {
  await n.waitReady(60_000);
  await new Promise((r) => setTimeout(r, KEYD_IDLE_MS + 1500));
  const before = auditEntries().filter((e) => e.type === 'keyd_decapsulated').length;
  const a = await client.send('tiny', chat, { stream: true });
  t.equal(a.receipt.outcome, 'ok');
  let decaps: any[] = [];
  for (let i = 0; i < 50 && decaps.length === 0; i++) {
    decaps = auditEntries().filter((e) => e.type === 'keyd_decapsulated').slice(before);
    if (decaps.length === 0) await new Promise((r) => setTimeout(r, 100));
  }
  t.same(decaps.map((e) => e.op), ['prepare'], 'prepared, not asked for by the worker over a new connection');
});

t.test('a non-streamed sealed chat gives the same text for the same seed', async (t) => {
  const streamed = await client.send('tiny', chat, { stream: true });
  const whole = await client.send('tiny', chat, { stream: false });
  t.equal(whole.text, streamed.text, 'greedy, same seed: same text');
  t.equal(whole.receipt.wipeVerified, true);
  t.not(whole.receipt.envelopeSha256, streamed.receipt.envelopeSha256, 'each receipt names its own envelope');
});

async function postEnvelope(bytes: Uint8Array): Promise<{ status: number; code: string | undefined }> {
  const res = await fetch(n.url + SEALED_PATH, { method: 'POST', headers: { 'content-type': SEALED_CONTENT_TYPE }, body: bytes });
  const text = await res.text();
  let code: string | undefined;
  try {
    code = JSON.parse(text).error?.code;
  } catch {
    code = undefined;
  }
  return { status: res.status, code };
}

t.test('refused at the gateway, each with its code, and no worker started', async (t) => {
  await n.waitReady(60_000);
  const doc = await client.keyDocument();
  const key = { keyId: doc.requestKeys[0]!.id, publicKeys: { x25519: Buffer.from(doc.requestKeys[0]!.x25519, 'base64'), mlkem: Buffer.from(doc.requestKeys[0]!.mlkem768, 'base64') } };
  const seal = (o: { clientName?: string; clientKey?: typeof alice.privateKey; keyId?: string; nowMs?: number } = {}) =>
    sealRequest({ node: { ...key, keyId: o.keyId ?? key.keyId }, clientName: o.clientName ?? 'alice', clientKey: o.clientKey ?? alice.privateKey, model: 'tiny', stream: false, body: chat, nowMs: o.nowMs ?? Date.now() }).envelope;
  const before = pool.workers().map((w) => w.id).sort();
  const spawnedBefore = auditEntries().filter((e) => e.type === 'worker_spawned').length;

  const good = seal();
  const tampered = Buffer.from(good);
  tampered[200]! ^= 1;
  const cases: Array<[string, Uint8Array, number, string]> = [
    ['wrong key id', seal({ keyId: '0123456789abcdef' }), 400, 'sealed_unknown_key'],
    ['expired timestamp', seal({ nowMs: Date.now() - 10 * 60_000 }), 400, 'sealed_timestamp_invalid'],
    ['unknown client', seal({ clientName: 'mallory', clientKey: bob.privateKey }), 401, 'sealed_unknown_client'],
    ['revoked client', seal({ clientName: 'bob', clientKey: bob.privateKey }), 403, 'sealed_client_revoked'],
    ['bad signature (a tampered byte)', tampered, 401, 'sealed_bad_signature'],
    ['truncated envelope', good.subarray(0, good.length - 10), 400, 'sealed_envelope_malformed'],
    ['oversized envelope', Buffer.alloc(4 * 1024 * 1024 + 1), 413, 'sealed_envelope_too_large'],
  ];
  for (const [what, bytes, status, code] of cases) t.same(await postEnvelope(bytes), { status, code }, what);
  // A replay: the first use is served (positive control), the second refused.
  const once = seal();
  const first = await postEnvelope(once);
  t.equal(first.status, 200, 'the envelope is served once');
  await n.waitReady(60_000);
  const beforeReplay = pool.workers().map((w) => w.id).sort();
  t.same(await postEnvelope(once), { status: 409, code: 'sealed_replay' }, 'replay');
  t.same(pool.workers().map((w) => w.id).sort(), beforeReplay, 'the replay took no worker');
  t.equal(auditEntries().filter((e) => e.type === 'worker_spawned').length, spawnedBefore + 1, 'only the one served envelope cost a worker');
  t.notSame(before, beforeReplay, '(the served one did)');
  const refusals = auditEntries().filter((e) => e.type === 'refusal' && e.route === SEALED_PATH).map((e) => e.code);
  for (const code of ['sealed_unknown_key', 'sealed_timestamp_invalid', 'sealed_unknown_client', 'sealed_client_revoked', 'sealed_bad_signature', 'sealed_envelope_malformed', 'sealed_replay']) {
    t.ok(refusals.includes(code), `audited refusal ${code}`);
  }
});

t.test("a body its own client signed but sealed wrongly is refused inside the worker, sealed, and that worker is ended", async (t) => {
  await n.waitReady(60_000);
  const doc = await client.keyDocument();
  const k = doc.requestKeys[0]!;
  const sealed = sealRequest({ node: { keyId: k.id, publicKeys: { x25519: Buffer.from(k.x25519, 'base64'), mlkem: Buffer.from(k.mlkem768, 'base64') } }, clientName: 'alice', clientKey: alice.privateKey, model: 'tiny', stream: false, body: chat, nowMs: Date.now() });
  const env = parseEnvelope(sealed.envelope, 1 << 22);
  const signed = Buffer.from(sealed.envelope.subarray(0, sealed.envelope.length - SIGNATURE_BYTES));
  signed[signed.length - env.ciphertext.length + 5]! ^= 0x80; // inside the body ciphertext
  const resigned = Buffer.concat([signed, edSign(null, Buffer.concat([SIGNATURE_CONTEXT, signed]), alice.privateKey)]);
  const worker = pool.workers().find((w) => w.state === 'ready')!;
  const res = await fetch(n.url + SEALED_PATH, { method: 'POST', headers: { 'content-type': SEALED_CONTENT_TYPE }, body: resigned });
  t.equal(res.status, 200, 'the gateway relayed it: it could not know');
  const out = (await res.json()) as { chunks: string[]; receipt: { receipt: { outcome: string; wipeVerified: boolean } } };
  t.equal(out.chunks.length, 1, 'one sealed chunk: the error');
  const { createChunkOpener } = await import('../../src/sealed/seal.ts');
  const event = JSON.parse(createChunkOpener(sealed.keys.responseKey).open(Buffer.from(out.chunks[0]!, 'base64')).toString());
  t.equal(event.t, 'error');
  t.equal(event.code, 'sealed_open_failed');
  t.equal(out.receipt.receipt.outcome, 'error');
  t.equal(out.receipt.receipt.wipeVerified, true);
  t.notOk(pool.workers().some((w) => w.id === worker.id), 'the worker that refused it is gone');
  await n.waitReady(60_000);
  t.equal((await client.send('tiny', chat)).receipt.outcome, 'ok', 'and the node serves sealed requests as before');
});

t.test('mutated envelopes through the real gateway: each refused or failed cleanly; the node keeps serving', async (t) => {
  const doc = await client.keyDocument();
  const k = doc.requestKeys[0]!;
  const codes = new Map<string, number>();
  let rng = 0x1234567;
  const rand = (m: number) => {
    rng ^= rng << 13;
    rng ^= rng >>> 17;
    rng ^= rng << 5;
    return (rng >>> 0) % m;
  };
  for (let i = 0; i < 36; i++) {
    const e = sealRequest({ node: { keyId: k.id, publicKeys: { x25519: Buffer.from(k.x25519, 'base64'), mlkem: Buffer.from(k.mlkem768, 'base64') } }, clientName: 'alice', clientKey: alice.privateKey, model: 'tiny', stream: false, body: chat, nowMs: Date.now() }).envelope;
    let b = Buffer.from(e);
    if (i % 3 === 0) b[rand(b.length)]! ^= 1 << rand(8);
    else if (i % 3 === 1) b = b.subarray(0, rand(b.length));
    else {
      // re-signed flip in the header: passes the signature, fails deeper (key id, names, timestamp, KEM)
      const body = Buffer.from(b.subarray(0, b.length - SIGNATURE_BYTES));
      body[6 + rand(30)]! ^= 1 << rand(8);
      b = Buffer.concat([body, edSign(null, Buffer.concat([SIGNATURE_CONTEXT, body]), alice.privateKey)]);
    }
    const r = await postEnvelope(b);
    const code = r.code ?? `http_${r.status}`;
    codes.set(code, (codes.get(code) ?? 0) + 1);
    if (r.status === 200) await n.waitReady(60_000);
  }
  const summary = JSON.stringify(Object.fromEntries(codes));
  t.ok([...codes.keys()].every((c) => c.startsWith('sealed_') || c === 'model_not_found' || c === 'http_200'), `only sealed refusals, an unknown model, or a relayed (then sealed-error) request: ${summary}`);
  t.ok((codes.get('sealed_bad_signature') ?? 0) > 0 && (codes.get('sealed_envelope_malformed') ?? 0) > 0, summary);
  await n.waitReady(60_000);
  t.equal((await client.send('tiny', chat)).receipt.outcome, 'ok', 'the node still serves');
});

t.test('the official openai client through phantoma proxy: streamed, non-streamed, and an error', async (t) => {
  const proxy = buildProxy({ nodes: [{ url: 'http://127.0.0.1:1', identityPin }, { url: n.url, identityPin }], clientName: 'alice', clientKey: alice.privateKey, models: ['tiny'], logger: createLogger({ level: 'silent' }) });
  const address = await proxy.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => proxy.close());
  const openai = new OpenAI({ baseURL: `${address}/v1`, apiKey: 'unused-by-the-proxy', maxRetries: 0 });
  const whole = await openai.chat.completions.create({ model: 'tiny', messages: chat.messages as any, max_tokens: 6, seed: 1, temperature: 0 });
  t.equal(whole.object, 'chat.completion');
  t.equal(whole.usage?.completion_tokens, 6);
  t.equal(whole.choices[0]!.finish_reason, 'length');
  const stream = await openai.chat.completions.create({ model: 'tiny', messages: chat.messages as any, max_tokens: 6, seed: 1, temperature: 0, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let usage: unknown;
  for await (const c of stream) {
    text += c.choices[0]?.delta?.content ?? '';
    if (c.usage) usage = c.usage;
  }
  t.equal(text, whole.choices[0]!.message.content, 'streamed and whole agree (same seed), via the second pinned node after the first was unreachable');
  t.match(usage, { completion_tokens: 6 });
  const err = await openai.chat.completions.create({ model: 'tiny', messages: chat.messages as any, n: 2 }).catch((e: unknown) => e);
  t.ok(err instanceof OpenAI.BadRequestError, 'a refused parameter comes back as a 400');
  t.equal((err as InstanceType<typeof OpenAI.BadRequestError>).code, 'unsupported_parameter', 'with the code the worker sealed');
});

// Last: it kills this node's warden. A worker whose end cannot be verified gets a receipt that says so.
t.test('a failed wipe (the warden killed mid-request) yields a receipt that says the wipe was not verified', async (t) => {
  await n.waitReady(60_000);
  const sock = join(n.stateDir, 'warden.sock');
  const wardenPid = Number(
    readdirSync('/proc').find((p) => {
      if (!/^\d+$/.test(p)) return false;
      try {
        const argv = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
        return argv[0]!.endsWith('phantoma-warden') && argv.includes(sock);
      } catch {
        return false;
      }
    }),
  );
  t.ok(wardenPid > 0, 'found the warden');
  let killed = false;
  const outcome = await client
    .send('tiny', { messages: chat.messages, max_tokens: 3000, temperature: 0 }, {
      stream: true,
      onText: () => {
        if (!killed) {
          killed = true;
          process.kill(wardenPid, 'SIGKILL');
        }
      },
    })
    .then((a) => a.receipt, (e: { receipt?: { wipeVerified: boolean } }) => e.receipt);
  t.ok(killed, 'the warden was killed while the worker generated');
  t.ok(outcome, 'a verified receipt arrived all the same (keyd signs it, not the warden)');
  t.equal(outcome!.wipeVerified, false, 'and it says the wipe was not verified');
});
