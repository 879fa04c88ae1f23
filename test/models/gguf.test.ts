import t from 'tap';
import { mkdtempSync, rmSync, readFileSync, writeFileSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { layoutGguf, meta } from '../../src/models/gguf-writer.ts';
import { GgmlType, GgufValueType, GGUF_MAGIC } from '../../src/models/gguf-format.ts';
import { readGgufSummary } from '../../src/models/gguf-reader.ts';
import { writeTestModel, ensureTestModel, TEST_MODELS, modelMetadata, tensorSpecs } from '../../src/models/test-models.ts';
import { isPhantomaError } from '../../src/errors.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-gguf-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));

t.test('layout: header fields, aligned tensor offsets', async (t) => {
  const layout = layoutGguf(
    [meta.str('general.architecture', 'llama'), meta.arr('a', GgufValueType.INT32, [1, 2, 3])],
    [
      { name: 'x', dims: [3], type: GgmlType.F32 },
      { name: 'y', dims: [5, 2], type: GgmlType.F16 },
    ],
  );
  t.equal(layout.header.readUInt32LE(0), GGUF_MAGIC);
  t.equal(layout.header.readUInt32LE(4), 3, 'version 3');
  t.equal(layout.header.readBigUInt64LE(8), 2n, 'two tensors');
  t.equal(layout.header.readBigUInt64LE(16), 2n, 'two metadata entries');
  t.equal(layout.header.length % 32, 0, 'data section starts aligned');
  t.same(layout.tensorOffsets, [0, 32], 'second tensor starts at the next 32-byte boundary');
  t.same(layout.tensorBytes, [12, 20]);
  t.equal(layout.totalBytes, layout.header.length + 64);
});

t.test('a header far larger than the initial write buffer round-trips (large vocabularies)', async (t) => {
  const words = Array.from({ length: 30_000 }, (_, i) => `w${i}`);
  const layout = layoutGguf(
    [meta.str('general.architecture', 'llama'), meta.arr('tokenizer.ggml.tokens', GgufValueType.STRING, words), meta.u32('after', 7)],
    [{ name: 'x', dims: [4], type: GgmlType.F32 }],
  );
  t.ok(layout.header.length > 300_000, `header is ${layout.header.length} bytes`);
  const p = join(tmp, 'big-header.gguf');
  writeFileSync(p, Buffer.concat([layout.header, Buffer.alloc(layout.totalBytes - layout.header.length)]));
  const s = readGgufSummary(p);
  t.same(s.metadata.get('tokenizer.ggml.tokens'), { arrayLength: 30_000, itemType: GgufValueType.STRING });
  t.equal(s.metadata.get('after'), 7, 'the value after the big array is intact');
  t.same(s.tensors[0], { name: 'x', dims: [4], type: GgmlType.F32, offset: 0 });
});

const tinyPath = join(tmp, 'tiny.gguf');
const tiny = writeTestModel(TEST_MODELS.tiny!, tinyPath);

t.test('the generator is deterministic and the reader reads back what was written', async (t) => {
  const again = writeTestModel(TEST_MODELS.tiny!, join(tmp, 'tiny-again.gguf'));
  t.equal(again.sha256, tiny.sha256, 'same spec and seed give the same bytes');
  const other = writeTestModel({ ...TEST_MODELS.tiny!, seed: 99 }, join(tmp, 'tiny-seed99.gguf'));
  t.not(other.sha256, tiny.sha256, 'a different seed gives different weights');

  const s = readGgufSummary(tinyPath);
  const { metadata, vocabSize } = modelMetadata(TEST_MODELS.tiny!);
  t.equal(s.version, 3);
  t.equal(s.metadata.size, metadata.length);
  t.equal(s.metadata.get('general.architecture'), 'llama');
  t.equal(s.metadata.get('tokenizer.ggml.model'), 'llama');
  t.equal(s.metadata.get('llama.attention.head_count_kv'), 2);
  t.match(String(s.metadata.get('tokenizer.chat_template')), /<\|im_start\|>/);
  t.same(s.metadata.get('tokenizer.ggml.tokens'), { arrayLength: vocabSize, itemType: GgufValueType.STRING });
  t.same(s.tensors.map((x) => x.name), tensorSpecs(TEST_MODELS.tiny!, vocabSize).map((x) => x.name));
  t.equal(s.fileBytes, tiny.bytes);
});

function codeOf(fn: () => unknown): string {
  try {
    fn();
    return 'ok';
  } catch (err) {
    return isPhantomaError(err) ? err.code : `UNEXPECTED ${(err as Error).name}: ${(err as Error).message}`;
  }
}

t.test('corrupted files are refused with model_file_invalid and a reason', async (t) => {
  const bytes = readFileSync(tinyPath);
  const variant = (name: string, mutate: (b: Buffer) => Buffer): string => {
    const p = join(tmp, name);
    writeFileSync(p, mutate(Buffer.from(bytes)));
    return p;
  };
  t.throws(() => readGgufSummary(variant('truncated.gguf', (b) => b.subarray(0, Math.floor(b.length / 2)))), {
    code: 'model_file_invalid',
    message: /extends past the end of the file/,
  });
  t.throws(() => readGgufSummary(variant('header-only.gguf', (b) => b.subarray(0, 100))), { code: 'model_file_invalid', message: /file ends/ });
  t.throws(() => readGgufSummary(variant('magic.gguf', (b) => (b.write('GGML', 0), b))), { code: 'model_file_invalid', message: /bad magic/ });
  t.throws(() => readGgufSummary(variant('version.gguf', (b) => (b.writeUInt32LE(99, 4), b))), { code: 'model_file_invalid', message: /version 99/ });
  t.throws(() => readGgufSummary(variant('count.gguf', (b) => (b.writeBigUInt64LE(1n << 40n, 8), b))), { code: 'model_file_invalid', message: /tensor count/ });
  t.throws(() => readGgufSummary(variant('keylen.gguf', (b) => (b.writeBigUInt64LE(1n << 33n, 24), b))), { code: 'model_file_invalid', message: /exceeds/ });
  t.throws(() => readGgufSummary(variant('empty.gguf', () => Buffer.alloc(0))), { code: 'model_file_invalid', message: /only 0 bytes/ });
  t.throws(() => readGgufSummary(join(tmp, 'does-not-exist.gguf')), { code: 'model_not_found' });
});

t.test('semantically impossible hyperparameters are refused before llama.cpp divides by them', async (t) => {
  const p = join(tmp, 'heads.gguf');
  const spec = { ...TEST_MODELS.tiny!, kvHeads: 3 };
  writeTestModel(spec, p);
  t.throws(() => readGgufSummary(p), { code: 'model_file_invalid', message: /head_count_kv = 3 does not divide/ });
});

t.test('every single-byte flip in the header and tensor table is either valid GGUF or model_file_invalid', async (t) => {
  const bytes = readFileSync(tinyPath);
  const s = readGgufSummary(tinyPath);
  const p = join(tmp, 'flip.gguf');
  const counts: Record<string, number> = {};
  // Every byte of the fixed header and first metadata entries, then a stride through the rest up to the data.
  const positions = [...Array(256).keys(), ...Array.from({ length: 400 }, (_, i) => 256 + Math.floor((i * (s.dataStart - 256)) / 400))];
  for (const pos of positions) {
    const b = Buffer.from(bytes);
    b[pos] = b[pos]! ^ 0xff;
    writeFileSync(p, b);
    const code = codeOf(() => readGgufSummary(p));
    counts[code] = (counts[code] ?? 0) + 1;
  }
  t.same(Object.keys(counts).filter((c) => c !== 'ok' && c !== 'model_file_invalid'), [], `no other outcome (${JSON.stringify(counts)})`);
  t.ok((counts.model_file_invalid ?? 0) > 100, 'most header flips are detected');
});

t.test('a cached model whose bytes changed is refused with model_digest_mismatch, never used', async (t) => {
  const cache = join(tmp, 'cache');
  const first = await ensureTestModel('tiny', { cacheDir: cache });
  t.equal(first.generated, true);
  const second = await ensureTestModel('tiny', { cacheDir: cache });
  t.equal(second.generated, false, 'second call is a cache hit');
  t.equal(second.sha256, first.sha256);
  const b = readFileSync(first.path);
  b[b.length - 10] = b[b.length - 10]! ^ 1; // a weight, not the header: only the digest can see it
  writeFileSync(first.path, b);
  await t.rejects(ensureTestModel('tiny', { cacheDir: cache }), { code: 'model_digest_mismatch' });
  await t.rejects(ensureTestModel('huge', { cacheDir: cache }), { code: 'model_not_found' });
  copyFileSync(tinyPath, first.path);
  t.equal((await ensureTestModel('tiny', { cacheDir: cache })).generated, false, 'restored bytes verify again');
});
