// Benchmark: what sealing costs, in-process, against plain JSON handling of the same 4 KiB prompt in the
// same run. Client seal (ML-KEM encapsulation, X25519, HKDF, AES-256-GCM, Ed25519 signature), the
// gateway's checks (parse, signature, replay memory), keyd's decapsulation, the worker's open, and the
// sealing/opening of a 48-chunk answer; the ML-KEM share of the total. Then a fuzz run of 100,000 mutated
// validly signed envelopes through the gateway's checks and the worker's open (no crash, expected codes).
//   . scripts/env.sh && node bench/sealed.bench.ts [--iterations 300] [--fuzz 100000]
import { parseArgs } from 'node:util';
import { decapsulate as kemDecapsulate, encapsulate as kemEncapsulate, generateKeyPairSync, sign as edSign } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ml_kem768 } from '@noble/post-quantum/ml-kem.js';
import { checkEnvelope, createNonceCache, SIGNATURE_CONTEXT, SIGNATURE_BYTES, type EnvelopeCheckContext } from '../src/sealed/envelope.ts';
import { sealRequest, requestKeyFor, openRequest } from '../src/sealed/request.ts';
import { createChunkOpener, createChunkSealer } from '../src/sealed/seal.ts';
import { generateRequestKeyPair, mlkemPublicKeyObject, prepareRequestPrivateKeys } from '../src/sealed/kem.ts';
import { isPhantomaError } from '../src/errors.ts';
import { projectRoot } from '../src/paths.ts';

const { values } = parseArgs({ options: { iterations: { type: 'string', default: '300' }, fuzz: { type: 'string', default: '100000' } } });
const N = Number(values.iterations);
const FUZZ = Number(values.fuzz);

const node = generateRequestKeyPair();
const keyId = '0123456789abcdef';
const client = generateKeyPairSync('ed25519');
const prompt = 'lorem ipsum dolor sit amet '.repeat(152).slice(0, 4096);
const body = { messages: [{ role: 'user', content: prompt }], max_tokens: 48 };
const ctx = (): EnvelopeCheckContext => ({
  maxEnvelopeBytes: 1 << 20,
  lookupClient: (n) => (n === 'bench' ? { publicKey: client.publicKey, revoked: false } : undefined),
  lookupKey: (id) => (id === keyId ? { notBeforeMs: 0, notAfterMs: Number.MAX_SAFE_INTEGER } : undefined),
  nowMs: Date.now(),
  processStartMs: Date.now() - 1000,
  windowMs: 60_000,
  nonces: createNonceCache({ windowMs: 60_000, maxEntries: 1 << 20 }),
});

function timeIt(fn: () => void): number {
  const t = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t) / 1e6;
}
const p50 = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const stages: Record<string, number[]> = { 'plain: JSON stringify + parse (baseline)': [], 'client: seal': [], 'gateway: checks': [], 'keyd: decapsulate': [], 'worker: open': [], 'answer: seal + open 48 chunks': [], 'ML-KEM-768 encaps + decaps alone': [], 'ML-KEM-768 encaps + decaps, @noble/post-quantum (before)': [] };
// keyd imports each request key once and keeps the key objects (src/vault/keyd.ts); so does this bench.
const prepared = prepareRequestPrivateKeys(node.privateKeys);
const mlkemPublic = mlkemPublicKeyObject(node.publicKeys.mlkem);
const checkCtx = ctx();
for (let i = 0; i < N + 20; i++) {
  let sealed!: ReturnType<typeof sealRequest>;
  let env!: ReturnType<typeof checkEnvelope>;
  let key!: Uint8Array;
  const row: Record<string, number> = {
    'plain: JSON stringify + parse (baseline)': timeIt(() => JSON.parse(JSON.stringify(body))),
    'client: seal': timeIt(() => (sealed = sealRequest({ node: { keyId, publicKeys: node.publicKeys }, clientName: 'bench', clientKey: client.privateKey, model: 'm', stream: true, body, nowMs: Date.now() }))),
    'gateway: checks': timeIt(() => (env = checkEnvelope(sealed.envelope, { ...checkCtx, nowMs: Date.now() }))),
    'keyd: decapsulate': timeIt(() => (key = requestKeyFor(prepared, env))),
    'worker: open': timeIt(() => openRequest(env, key)),
    'answer: seal + open 48 chunks': timeIt(() => {
      const s = createChunkSealer(sealed.keys.responseKey);
      const o = createChunkOpener(sealed.keys.responseKey);
      for (let c = 0; c < 48; c++) o.open(s.seal(Buffer.from(`{"t":"text","text":" token${c}"}`), c === 47));
    }),
    'ML-KEM-768 encaps + decaps alone': timeIt(() => {
      const { ciphertext } = kemEncapsulate(mlkemPublic);
      kemDecapsulate(prepared.mlkem, ciphertext);
    }),
    'ML-KEM-768 encaps + decaps, @noble/post-quantum (before)': timeIt(() => {
      const { cipherText } = ml_kem768.encapsulate(node.publicKeys.mlkem);
      ml_kem768.decapsulate(cipherText, node.privateKeys.mlkem);
    }),
  };
  if (i >= 20) for (const [k, v] of Object.entries(row)) stages[k]!.push(v); // 20 warm-up rounds
}
const medians = Object.fromEntries(Object.entries(stages).map(([k, v]) => [k, p50(v)]));
const sealedTotal = ['client: seal', 'gateway: checks', 'keyd: decapsulate', 'worker: open', 'answer: seal + open 48 chunks'].reduce((a, k) => a + medians[k]!, 0);
const plain = medians['plain: JSON stringify + parse (baseline)']!;

// ---- fuzz ----
const base = sealRequest({ node: { keyId, publicKeys: node.publicKeys }, clientName: 'bench', clientKey: client.privateKey, model: 'm', stream: false, body: { messages: [{ role: 'user', content: 'fuzz' }] }, nowMs: Date.now() }).envelope;
const resign = (b: Buffer): Buffer => (b.length < SIGNATURE_BYTES ? b : Buffer.concat([b.subarray(0, b.length - SIGNATURE_BYTES), edSign(null, Buffer.concat([SIGNATURE_CONTEXT, b.subarray(0, b.length - SIGNATURE_BYTES)]), client.privateKey)]));
let rng = 0x9e3779b9;
const rand = (n: number): number => {
  rng ^= rng << 13;
  rng ^= rng >>> 17;
  rng ^= rng << 5;
  return (rng >>> 0) % n;
};
const codes = new Map<string, number>();
let crashes = 0;
const fuzzStart = performance.now();
for (let i = 0; i < FUZZ; i++) {
  let b: Buffer = Buffer.from(base);
  switch (rand(5)) {
    case 0:
      b[rand(b.length)]! ^= 1 << rand(8);
      break;
    case 1:
      b = b.subarray(0, rand(b.length));
      break;
    case 2: {
      const a = rand(b.length);
      const c = rand(b.length);
      [b[a], b[c]] = [b[c]!, b[a]!];
      break;
    }
    case 3:
      b[rand(b.length - SIGNATURE_BYTES)]! ^= 1 << rand(8);
      b = resign(b);
      break;
    default:
      b = resign(Buffer.concat([b.subarray(0, b.length - SIGNATURE_BYTES - 1 - rand(64)), b.subarray(b.length - SIGNATURE_BYTES)]));
  }
  let code = 'accepted';
  try {
    const env = checkEnvelope(b, { ...ctx(), nonces: createNonceCache({ windowMs: 60_000, maxEntries: 4 }) });
    openRequest(env, requestKeyFor(node.privateKeys, env));
  } catch (err) {
    if (isPhantomaError(err)) code = err.code;
    else {
      crashes++;
      code = `CRASH ${(err as Error).message}`;
    }
  }
  codes.set(code, (codes.get(code) ?? 0) + 1);
}
const fuzzMs = performance.now() - fuzzStart;

const report = {
  date: new Date().toISOString(),
  iterations: N,
  promptBytes: prompt.length,
  medianMs: medians,
  sealedPathAddedMs: sealedTotal - plain,
  mlkemShareOfSealedPath: medians['ML-KEM-768 encaps + decaps alone']! / sealedTotal,
  envelopeBytes: sealRequest({ node: { keyId, publicKeys: node.publicKeys }, clientName: 'bench', clientKey: client.privateKey, model: 'm', stream: true, body, nowMs: Date.now() }).envelope.length,
  fuzz: { cases: FUZZ, crashes, ms: Math.round(fuzzMs), codes: Object.fromEntries([...codes].sort()) },
};
console.log(JSON.stringify(report, null, 2));
console.log('\n| stage (4 KiB prompt) | p50 ms |\n|---|---|');
for (const [k, v] of Object.entries(medians)) console.log(`| ${k} | ${v.toFixed(3)} |`);
console.log(`\nsealed path adds ${report.sealedPathAddedMs.toFixed(2)} ms of CPU per request over plain JSON handling; ML-KEM is ${(report.mlkemShareOfSealedPath * 100).toFixed(0)} % of it`);
console.log(`fuzz: ${FUZZ} cases, ${crashes} crashes, ${report.fuzz.ms} ms, codes ${JSON.stringify(report.fuzz.codes)}`);
mkdirSync(join(projectRoot(), 'bench', 'results'), { recursive: true });
writeFileSync(join(projectRoot(), 'bench', 'results', 'sealed.json'), JSON.stringify(report, null, 2) + '\n');
if (crashes > 0) process.exitCode = 1;
