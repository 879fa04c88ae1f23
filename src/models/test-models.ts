// Test models Phantoma makes itself (no model can be downloaded): llama-architecture GGUF files with an
// instruct model's metadata and a ChatML chat template, random weights from a seed. Same spec + seed gives
// the same bytes, so a digest recorded at generation detects any later corruption of the cached file.
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, statSync, createReadStream } from 'node:fs';
import { join } from 'node:path';
import { GgmlType, GgufValueType } from './gguf-format.ts';
import { layoutGguf, meta, type GgufMetadataEntry, type GgufTensorSpec } from './gguf-writer.ts';
import { buildVocabulary } from './vocabulary.ts';
import { openAtomic, writeFileAtomic } from '../util/atomic-file.ts';
import { ModelError, ERRORS } from '../errors.ts';

export interface TestModelSpec {
  name: string;
  seed: number;
  vocabSize: number;
  embedding: number;
  layers: number;
  heads: number;
  kvHeads: number;
  feedForward: number;
  contextLength: number;
  matrixType: GgmlType;
  /** Tie the output projection to the token embeddings (as Llama 3.2 1B does). */
  tiedEmbeddings: boolean;
}

export const TEST_MODELS: Readonly<Record<string, TestModelSpec>> = Object.freeze({
  // A few MB: fast to make and load, for tests. GQA (4 heads, 2 KV heads) so that path is exercised.
  tiny: {
    name: 'tiny',
    seed: 1,
    vocabSize: 1024,
    embedding: 128,
    layers: 2,
    heads: 4,
    kvHeads: 2,
    feedForward: 352,
    contextLength: 4096,
    matrixType: GgmlType.F16,
    tiedEmbeddings: false,
  },
  // A second small model with its own widths (issue 15): several models at once are told apart by their
  // vocabulary and embedding sizes.
  'tiny-wide': {
    name: 'tiny-wide',
    seed: 3,
    vocabSize: 1536,
    embedding: 192,
    layers: 2,
    heads: 4,
    kvHeads: 2,
    feedForward: 512,
    contextLength: 2048,
    matrixType: GgmlType.F16,
    tiedEmbeddings: false,
  },
  // Realistic widths (Llama 3.2 1B's hidden size, heads and FFN) with fewer layers, F16 so the prebuilt
  // CPU backend maps weights from the page cache instead of repacking a private copy per process.
  bench: {
    name: 'bench',
    seed: 2,
    vocabSize: 32000,
    embedding: 2048,
    layers: 4,
    heads: 32,
    kvHeads: 8,
    feedForward: 8192,
    contextLength: 8192,
    matrixType: GgmlType.F16,
    tiedEmbeddings: true,
  },
});

export const CHATML_TEMPLATE =
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}" +
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

export function tensorSpecs(spec: TestModelSpec, vocabSize: number): GgufTensorSpec[] {
  const e = spec.embedding;
  const kv = (e / spec.heads) * spec.kvHeads;
  const m = spec.matrixType;
  const out: GgufTensorSpec[] = [{ name: 'token_embd.weight', dims: [e, vocabSize], type: m }];
  for (let i = 0; i < spec.layers; i++) {
    out.push(
      { name: `blk.${i}.attn_norm.weight`, dims: [e], type: GgmlType.F32 },
      { name: `blk.${i}.attn_q.weight`, dims: [e, e], type: m },
      { name: `blk.${i}.attn_k.weight`, dims: [e, kv], type: m },
      { name: `blk.${i}.attn_v.weight`, dims: [e, kv], type: m },
      { name: `blk.${i}.attn_output.weight`, dims: [e, e], type: m },
      { name: `blk.${i}.ffn_norm.weight`, dims: [e], type: GgmlType.F32 },
      { name: `blk.${i}.ffn_gate.weight`, dims: [e, spec.feedForward], type: m },
      { name: `blk.${i}.ffn_up.weight`, dims: [e, spec.feedForward], type: m },
      { name: `blk.${i}.ffn_down.weight`, dims: [spec.feedForward, e], type: m },
    );
  }
  out.push({ name: 'output_norm.weight', dims: [e], type: GgmlType.F32 });
  if (!spec.tiedEmbeddings) out.push({ name: 'output.weight', dims: [e, vocabSize], type: m });
  return out;
}

export function modelMetadata(spec: TestModelSpec): { metadata: GgufMetadataEntry[]; vocabSize: number } {
  const vocab = buildVocabulary(spec.vocabSize);
  const headDim = spec.embedding / spec.heads;
  const metadata: GgufMetadataEntry[] = [
    meta.str('general.architecture', 'llama'),
    meta.str('general.type', 'model'),
    meta.str('general.name', `Phantoma Test ${spec.name} Instruct`),
    meta.str('general.basename', `phantoma-test-${spec.name}`),
    meta.str('general.finetune', 'instruct'),
    meta.str('general.license', 'MIT'),
    meta.u32('general.file_type', spec.matrixType === GgmlType.F16 ? 1 : 0),
    meta.u32('llama.context_length', spec.contextLength),
    meta.u32('llama.embedding_length', spec.embedding),
    meta.u32('llama.block_count', spec.layers),
    meta.u32('llama.feed_forward_length', spec.feedForward),
    meta.u32('llama.attention.head_count', spec.heads),
    meta.u32('llama.attention.head_count_kv', spec.kvHeads),
    meta.u32('llama.rope.dimension_count', headDim),
    meta.f32('llama.rope.freq_base', 10000),
    meta.f32('llama.attention.layer_norm_rms_epsilon', 1e-5),
    meta.u32('llama.vocab_size', vocab.tokens.length),
    meta.str('tokenizer.ggml.model', 'llama'),
    meta.arr('tokenizer.ggml.tokens', GgufValueType.STRING, vocab.tokens),
    meta.arr('tokenizer.ggml.scores', GgufValueType.FLOAT32, vocab.scores),
    meta.arr('tokenizer.ggml.token_type', GgufValueType.INT32, vocab.types),
    meta.u32('tokenizer.ggml.bos_token_id', vocab.bos),
    meta.u32('tokenizer.ggml.eos_token_id', vocab.imEnd),
    meta.u32('tokenizer.ggml.unknown_token_id', vocab.unk),
    meta.u32('tokenizer.ggml.padding_token_id', vocab.eos),
    meta.bool('tokenizer.ggml.add_bos_token', false),
    meta.bool('tokenizer.ggml.add_eos_token', false),
    // Chat wrappers tokenize the template piece by piece; a space prefix would put "▁" after every
    // <|im_start|>, which the template does not contain.
    meta.bool('tokenizer.ggml.add_space_prefix', false),
    meta.str('tokenizer.chat_template', CHATML_TEMPLATE),
  ];
  return { metadata, vocabSize: vocab.tokens.length };
}

/** A fast seeded PRNG (SplitMix32 seeding xoshiro128**): the weights must be reproducible, not secret. */
function createRng(seed: number): () => number {
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  let x = seed >>> 0;
  const splitmix = (): number => {
    x = (x + 0x9e3779b9) >>> 0;
    let z = x;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  s0 = splitmix(); s1 = splitmix(); s2 = splitmix(); s3 = splitmix();
  return () => {
    const result = Math.imul(((Math.imul(s1, 5) << 7) | (Math.imul(s1, 5) >>> 25)), 9) >>> 0;
    const t = s1 << 9;
    s2 ^= s0; s3 ^= s1; s1 ^= s2; s0 ^= s3; s2 ^= t;
    s3 = (s3 << 11) | (s3 >>> 21);
    return result / 4294967296;
  };
}

function seedFor(modelSeed: number, tensorName: string): number {
  return createHash('sha256').update(`${modelSeed}:${tensorName}`).digest().readUInt32LE(0);
}

const CHUNK_ELEMENTS = 1 << 20;

/** Yields a tensor's bytes in chunks: norms are ones, matrices uniform with the variance of 1/fan_in. */
function* tensorChunks(spec: TestModelSpec, t: GgufTensorSpec): Generator<Uint8Array> {
  const count = t.dims.reduce((a, d) => a * d, 1);
  if (t.type === GgmlType.F32) {
    const ones = new Float32Array(count).fill(1);
    yield new Uint8Array(ones.buffer);
    return;
  }
  const rng = createRng(seedFor(spec.seed, t.name));
  // Uniform(-a, a) has variance a²/3; a = sqrt(3 / fan_in) gives 1/fan_in. Embeddings get unit-ish scale.
  const fanIn = t.name === 'token_embd.weight' ? 1 : t.dims[0]!;
  const amplitude = Math.sqrt(3 / fanIn);
  const buf = new Float16Array(Math.min(CHUNK_ELEMENTS, count));
  for (let done = 0; done < count; done += buf.length) {
    const n = Math.min(buf.length, count - done);
    for (let i = 0; i < n; i++) buf[i] = (rng() * 2 - 1) * amplitude;
    yield new Uint8Array(buf.buffer, 0, n * 2);
  }
}

export interface GeneratedModel {
  path: string;
  sha256: string;
  bytes: number;
}

export type ProgressFn = (done: number, total: number) => void;

/** Writes the model atomically; the returned digest covers every byte written. */
export function writeTestModel(spec: TestModelSpec, path: string, onProgress?: ProgressFn): GeneratedModel {
  const { metadata, vocabSize } = modelMetadata(spec);
  const tensors = tensorSpecs(spec, vocabSize);
  const layout = layoutGguf(metadata, tensors);
  const hash = createHash('sha256');
  const writer = openAtomic(path);
  let written = 0;
  const emit = (chunk: Uint8Array): void => {
    writer.write(chunk);
    hash.update(chunk);
    written += chunk.length;
  };
  try {
    emit(layout.header);
    tensors.forEach((t, i) => {
      const start = layout.dataStart + layout.tensorOffsets[i]!;
      if (written < start) emit(new Uint8Array(start - written)); // alignment padding
      for (const chunk of tensorChunks(spec, t)) {
        emit(chunk);
        onProgress?.(written, layout.totalBytes);
      }
    });
    if (written < layout.totalBytes) emit(new Uint8Array(layout.totalBytes - written));
    writer.commit();
  } catch (err) {
    writer.abort();
    throw err;
  }
  return { path, sha256: hash.digest('hex'), bytes: written };
}

/** Identifies a spec's content: a changed generator or spec gets a new file name, never a stale cache hit. */
export function specDigest(spec: TestModelSpec): string {
  return createHash('sha256').update(JSON.stringify(spec)).update('gguf-writer-v3').digest('hex').slice(0, 16);
}

interface CacheManifest {
  spec: string;
  sha256: string;
  bytes: number;
}

export function sha256File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(path, { highWaterMark: 1 << 22 })
      .on('data', (c) => hash.update(c))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}

export interface EnsureOptions {
  cacheDir: string;
  onProgress?: ProgressFn;
  /** Skip re-hashing a cached file when its manifest matches (size is still checked). */
  trustCache?: boolean;
}

/**
 * Returns the cached model file for `name`, generating it first if absent. A cached file whose size or
 * digest no longer matches its manifest is refused with model_digest_mismatch, never silently used.
 */
export async function ensureTestModel(name: string, opts: EnsureOptions): Promise<GeneratedModel & { generated: boolean }> {
  const spec = TEST_MODELS[name];
  if (!spec) {
    throw new ModelError(ERRORS.MODEL_NOT_FOUND, `no built-in test model named "${name}" (known: ${Object.keys(TEST_MODELS).join(', ')})`);
  }
  const base = `phantoma-${name}-${specDigest(spec)}`;
  const path = join(opts.cacheDir, `${base}.gguf`);
  const manifestPath = join(opts.cacheDir, `${base}.json`);
  if (existsSync(path) && existsSync(manifestPath)) {
    const manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as CacheManifest;
    const size = statSync(path).size;
    const digest = opts.trustCache && size === manifest.bytes ? manifest.sha256 : await sha256File(path);
    if (size !== manifest.bytes || digest !== manifest.sha256) {
      throw new ModelError(ERRORS.MODEL_DIGEST_MISMATCH, `cached model ${path} does not match its recorded digest; delete it to regenerate`, {
        details: { path, expectedBytes: manifest.bytes, actualBytes: size },
      });
    }
    return { path, sha256: manifest.sha256, bytes: size, generated: false };
  }
  const made = writeTestModel(spec, path, opts.onProgress);
  writeFileAtomic(manifestPath, JSON.stringify({ spec: specDigest(spec), sha256: made.sha256, bytes: made.bytes } satisfies CacheManifest) + '\n');
  return { ...made, generated: true };
}
