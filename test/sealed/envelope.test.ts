// The sealed-request protocol, version 1: round trip, every gateway refusal with its code in the design's
// order, chunk order and truncation, padding, the published test vector, and a fuzz run over validly
// signed envelopes.
import t from 'tap';
import { createHash, createPublicKey, generateKeyPairSync, sign as edSign, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkEnvelope, createNonceCache, parseEnvelope, SIGNATURE_CONTEXT, SIGNATURE_BYTES, type EnvelopeCheckContext, type KnownClient } from '../../src/sealed/envelope.ts';
import { sealRequest, requestKeyFor, openRequest } from '../../src/sealed/request.ts';
import { createChunkOpener, createChunkSealer, deriveSessionKeys, BODY_BUCKETS } from '../../src/sealed/seal.ts';
import { isPhantomaError } from '../../src/errors.ts';
import { ROOT } from '../helpers.ts';
import { vectorKeys, vectorKem, seed, VECTOR_BODY, VECTOR_TIMESTAMP_MS } from './fixtures.ts';

const K = vectorKeys();
const NOW = 1_800_000_000_000;
const WINDOW = 60_000;

function context(over: Partial<EnvelopeCheckContext> & { clients?: Record<string, KnownClient> } = {}): EnvelopeCheckContext {
  const clients = over.clients ?? { alice: { publicKey: K.clientPublic, revoked: false } };
  return {
    maxEnvelopeBytes: 1 << 20,
    lookupClient: (n) => clients[n],
    lookupKey: (id) => (id === K.keyId ? { notBeforeMs: NOW - 3_600_000, notAfterMs: NOW + 3_600_000 } : undefined),
    nowMs: NOW,
    processStartMs: NOW - 10_000,
    windowMs: WINDOW,
    nonces: createNonceCache({ windowMs: WINDOW, maxEntries: 1000 }),
    ...over,
  };
}

function seal(over: { clientName?: string; clientKey?: KeyObject; nowMs?: number; body?: unknown; keyId?: string; stream?: boolean } = {}) {
  return sealRequest({
    node: { keyId: over.keyId ?? K.keyId, publicKeys: K.nodePublic },
    clientName: over.clientName ?? 'alice',
    clientKey: over.clientKey ?? K.clientKey,
    model: 'tiny',
    stream: over.stream ?? true,
    body: over.body ?? { messages: [{ role: 'user', content: 'hi' }] },
    nowMs: over.nowMs ?? NOW,
  });
}

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    return isPhantomaError(err) ? err.code : `NOT A PHANTOMA ERROR: ${(err as Error).message}`;
  }
  return 'accepted';
}

t.test('round trip: client seals, the gateway checks, keyd derives the key, the worker opens and seals chunks', async (t) => {
  const body = { messages: [{ role: 'user', content: 'the canary 7f3a' }], max_tokens: 5 };
  const sealed = seal({ body });
  t.notOk(sealed.envelope.includes(Buffer.from('7f3a')), 'the wire bytes do not carry the prompt');
  const env = checkEnvelope(sealed.envelope, context());
  t.equal(env.clientName, 'alice');
  t.equal(env.model, 'tiny');
  t.equal(env.stream, true);
  const key = requestKeyFor(K.nodePrivate, env);
  const opened = openRequest(env, key);
  t.same(JSON.parse(opened.json.toString('utf8')), body);
  t.ok(opened.keys.responseKey.equals(sealed.keys.responseKey), 'both ends derive the same response key');

  const sealer = createChunkSealer(opened.keys.responseKey);
  const wire = ['Hel', 'lo', '{"done":true}'].map((s, i, a) => sealer.seal(Buffer.from(s), i === a.length - 1));
  const opener = createChunkOpener(sealed.keys.responseKey);
  t.same(wire.map((c) => opener.open(c).toString()), ['Hel', 'lo', '{"done":true}']);
  t.ok(opener.finished, 'the final chunk ends the stream');
  t.equal(codeOf(() => opener.open(wire[0]!)), 'sealed_open_failed', 'nothing after the final chunk');
});

t.test('chunks: reordered, dropped, replayed or altered chunks fail to open; a stream without its final chunk is truncated', async (t) => {
  const keys = deriveSessionKeys(seed('chunk-test'));
  const mk = () => {
    const s = createChunkSealer(keys.responseKey);
    return [s.seal(Buffer.from('a'), false), s.seal(Buffer.from('b'), false), s.seal(Buffer.from('c'), true)];
  };
  const c = mk();
  const openAll = (chunks: Buffer[]) => {
    const o = createChunkOpener(keys.responseKey);
    for (const x of chunks) o.open(x);
    return o.finished;
  };
  t.equal(openAll(c), true, 'in order: opens and finishes');
  t.equal(codeOf(() => openAll([c[1]!, c[0]!, c[2]!])), 'sealed_open_failed', 'reordered');
  t.equal(codeOf(() => openAll([c[0]!, c[2]!])), 'sealed_open_failed', 'dropped');
  t.equal(codeOf(() => openAll([c[0]!, c[0]!])), 'sealed_open_failed', 'replayed');
  t.equal(openAll([c[0]!, c[1]!]), false, 'truncated: both open, but the stream never finished');
  const flipped = Buffer.from(c[2]!);
  flipped[0] = 0; // claim "not final" for the final chunk
  t.equal(codeOf(() => openAll([c[0]!, c[1]!, flipped])), 'sealed_open_failed', 'the final flag is authenticated');
  const bit = Buffer.from(c[1]!);
  bit[5]! ^= 1;
  t.equal(codeOf(() => openAll([c[0]!, bit])), 'sealed_open_failed', 'a flipped ciphertext bit');
});

t.test('padding: ciphertext sizes show only the bucket, not the length', async (t) => {
  const sizes = [1, 100, 900].map((n) => seal({ body: { messages: [{ role: 'user', content: 'x'.repeat(n) }] } }).envelope.length);
  t.equal(new Set(sizes).size, 1, `bodies of 1, 100 and 900 characters seal to one size (${sizes[0]})`);
  const big = seal({ body: { messages: [{ role: 'user', content: 'x'.repeat(1500) }] } }).envelope.length;
  t.equal(big - sizes[0]!, BODY_BUCKETS[1]! - BODY_BUCKETS[0]!, 'the next bucket up');
  const keys = deriveSessionKeys(seed('pad'));
  const s = createChunkSealer(keys.responseKey);
  t.equal(s.seal(Buffer.from('a'), false).length, s.seal(Buffer.from('a much longer token text'), false).length, 'chunks of different token lengths: one size');
});

t.test('the gateway refuses, each with its own code, in the design order', async (t) => {
  const good = seal().envelope;
  t.equal(codeOf(() => checkEnvelope(good, context({ maxEnvelopeBytes: good.length - 1 }))), 'sealed_envelope_too_large', 'size cap first');
  t.equal(codeOf(() => checkEnvelope(good.subarray(0, good.length - 1), context())), 'sealed_envelope_malformed', 'truncated');
  t.equal(codeOf(() => checkEnvelope(Buffer.concat([good, Buffer.from([0])]), context())), 'sealed_envelope_malformed', 'trailing byte');
  const v2 = Buffer.from(good);
  v2[4] = 2;
  t.equal(codeOf(() => checkEnvelope(v2, context())), 'sealed_version_unsupported', 'another version');
  t.equal(codeOf(() => checkEnvelope(seal({ clientName: 'mallory' }).envelope, context())), 'sealed_unknown_client');
  t.equal(codeOf(() => checkEnvelope(good, context({ clients: { alice: { publicKey: K.clientPublic, revoked: true } } }))), 'sealed_client_revoked');
  const other = generateKeyPairSync('ed25519');
  t.equal(codeOf(() => checkEnvelope(seal({ clientKey: other.privateKey }).envelope, context())), 'sealed_bad_signature', "signed by a key that is not alice's");
  t.equal(codeOf(() => checkEnvelope(seal({ keyId: '0123456789abcdef' }).envelope, context())), 'sealed_unknown_key', 'a key id the node does not have');
  t.equal(codeOf(() => checkEnvelope(good, context({ nowMs: NOW + 3_600_000 }))), 'sealed_unknown_key', 'a key past its validity');
  t.equal(codeOf(() => checkEnvelope(seal({ nowMs: NOW - WINDOW - 1 }).envelope, context())), 'sealed_timestamp_invalid', 'too old');
  t.equal(codeOf(() => checkEnvelope(seal({ nowMs: NOW + WINDOW + 1 }).envelope, context())), 'sealed_timestamp_invalid', 'from the future');
  t.equal(codeOf(() => checkEnvelope(seal({ nowMs: NOW - 40_000 }).envelope, context({ processStartMs: NOW - 5_000 }))), 'sealed_timestamp_invalid', 'stamped before this process started');
  const ctx = context();
  t.equal(codeOf(() => checkEnvelope(good, ctx)), 'accepted', 'positive control: the same envelope passes once');
  t.equal(codeOf(() => checkEnvelope(good, ctx)), 'sealed_replay', 'and is a replay the second time');
  const tiny = context({ nonces: createNonceCache({ windowMs: WINDOW, maxEntries: 1 }) });
  checkEnvelope(seal().envelope, tiny);
  t.equal(codeOf(() => checkEnvelope(seal().envelope, tiny)), 'sealed_replay_memory_full', 'a full replay memory refuses instead of forgetting');
});

t.test('any flipped byte of a signed envelope is refused before a worker could see it', async (t) => {
  const good = seal().envelope;
  const codes = new Map<string, number>();
  const positions = new Set<number>();
  for (let i = 0; i < 160; i++) positions.add(i); // every header byte up to the KEM ciphertext's start
  for (let i = 0; i < 300; i++) positions.add(Math.floor((i * good.length) / 300));
  for (const p of positions) {
    const b = Buffer.from(good);
    b[p]! ^= 0x01;
    const code = codeOf(() => checkEnvelope(b, context()));
    codes.set(code, (codes.get(code) ?? 0) + 1);
  }
  t.notOk(codes.has('accepted'), `no flip is accepted: ${JSON.stringify(Object.fromEntries(codes))}`);
  t.ok([...codes.keys()].every((c) => c.startsWith('sealed_')), 'every refusal is a sealed_* code');
  t.ok((codes.get('sealed_bad_signature') ?? 0) > 200, 'most flips end at the signature');
});

t.test('the worker refuses a body its own client signed but sealed wrongly (a buggy client)', async (t) => {
  const sealed = seal();
  const env = parseEnvelope(sealed.envelope, 1 << 20);
  const ct = Buffer.from(env.ciphertext);
  ct[3]! ^= 0xff;
  // Re-sign the mutated envelope as the client would: it passes every gateway check.
  const signed = Buffer.from(sealed.envelope.subarray(0, sealed.envelope.length - SIGNATURE_BYTES));
  ct.copy(signed, signed.length - ct.length);
  const resigned = Buffer.concat([signed, edSign(null, Buffer.concat([SIGNATURE_CONTEXT, signed]), K.clientKey)]);
  const checked = checkEnvelope(resigned, context());
  t.equal(codeOf(() => openRequest(checked, requestKeyFor(K.nodePrivate, checked))), 'sealed_open_failed');
});

t.test('the published test vector (docs/protocol.md) is what this code produces', async (t) => {
  const doc = readFileSync(join(ROOT, 'docs', 'protocol.md'), 'utf8');
  const block = /```json test-vector\n([\s\S]*?)\n```/.exec(doc);
  t.ok(block, 'docs/protocol.md has a test-vector block');
  const published = JSON.parse(block![1]!);
  const kem = vectorKem(K.nodePublic);
  const sealed = sealRequest({ node: { keyId: K.keyId, publicKeys: K.nodePublic }, clientName: 'alice', clientKey: K.clientKey, model: 'tiny', stream: false, body: VECTOR_BODY, nowMs: VECTOR_TIMESTAMP_MS, nonce: seed('nonce', 16), kem });
  const env = parseEnvelope(sealed.envelope, 1 << 20);
  const key = requestKeyFor(K.nodePrivate, env);
  const chunk = createChunkSealer(sealed.keys.responseKey).seal(Buffer.from('{"text":"Hi"}'), true);
  const computed = {
    keyId: K.keyId,
    clientPublicKey: Buffer.from(createPublicKey(K.clientKey).export({ format: 'jwk' }).x!, 'base64url').toString('hex'),
    envelopeBytes: sealed.envelope.length,
    envelopeSha256: createHash('sha256').update(sealed.envelope).digest('hex'),
    transcriptHash: Buffer.from(env.transcriptHash).toString('hex'),
    requestKey: Buffer.from(key).toString('hex'),
    bodyKey: sealed.keys.bodyKey.toString('hex'),
    responseKey: sealed.keys.responseKey.toString('hex'),
    firstChunk: chunk.toString('hex'),
  };
  t.same(computed, published.outputs, 'every published output matches');
});

t.test('fuzz: mutated validly signed envelopes never crash and always get an expected code', async (t) => {
  const CASES = Number(process.env.PHANTOMA_FUZZ_CASES ?? 3000);
  const expected = new Set(['accepted', 'sealed_envelope_too_large', 'sealed_envelope_malformed', 'sealed_version_unsupported', 'sealed_unknown_client', 'sealed_client_revoked', 'sealed_bad_signature', 'sealed_unknown_key', 'sealed_timestamp_invalid', 'sealed_replay', 'sealed_open_failed']);
  const dist = new Map<string, number>();
  let acceptedChanged = 0;
  let rng = 0x2545f491;
  const rand = (n: number) => {
    rng ^= rng << 13;
    rng ^= rng >>> 17;
    rng ^= rng << 5;
    return (rng >>> 0) % n;
  };
  const base = seal().envelope;
  const resign = (b: Buffer): Buffer => {
    if (b.length < SIGNATURE_BYTES) return b;
    const body = b.subarray(0, b.length - SIGNATURE_BYTES);
    return Buffer.concat([body, edSign(null, Buffer.concat([SIGNATURE_CONTEXT, body]), K.clientKey)]);
  };
  const ctx = context();
  for (let i = 0; i < CASES; i++) {
    let b: Buffer = Buffer.from(base);
    const kind = rand(5);
    if (kind === 0) b[rand(b.length)]! ^= 1 << rand(8); // bit flip
    else if (kind === 1) b = b.subarray(0, rand(b.length)); // truncation
    else if (kind === 2) {
      // swap two bytes
      const a = rand(b.length);
      const c = rand(b.length);
      const tmp = b[a]!;
      b[a] = b[c]!;
      b[c] = tmp;
    } else if (kind === 3) {
      b[rand(b.length - SIGNATURE_BYTES)]! ^= 1 << rand(8);
      b = resign(b); // a re-signed flip passes the signature and reaches the deeper checks
    }
    else b = resign(Buffer.concat([b.subarray(0, b.length - SIGNATURE_BYTES - rand(40)), b.subarray(b.length - SIGNATURE_BYTES)])); // re-signed, shortened body
    const code = codeOf(() => {
      const env = checkEnvelope(b, { ...ctx, nonces: createNonceCache({ windowMs: WINDOW, maxEntries: 10 }) });
      openRequest(env, requestKeyFor(K.nodePrivate, env));
    });
    dist.set(code, (dist.get(code) ?? 0) + 1);
    if (code === 'accepted' && !b.equals(base)) acceptedChanged++;
  }
  t.equal(acceptedChanged, 0, 'only unchanged envelopes (a swap of two equal bytes) are accepted');
  const summary = JSON.stringify(Object.fromEntries([...dist].sort()));
  t.ok([...dist.keys()].every((c) => expected.has(c)), `only expected codes: ${summary}`);
  t.ok((dist.get('sealed_open_failed') ?? 0) > 0, 'some mutations reached the worker-side open');
  t.ok((dist.get('sealed_bad_signature') ?? 0) > 0, 'some stopped at the signature');
  t.ok((dist.get('sealed_envelope_malformed') ?? 0) > 0, 'some stopped at the layout');
});
