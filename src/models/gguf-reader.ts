// Validates a GGUF file before llama.cpp sees it. llama.cpp aborts the whole process on some malformed
// inputs (GGML_ASSERT, a division by a zero head count), so every count, length, type and tensor extent
// is bounds-checked here first and a bad file becomes a model_file_invalid error instead of a crash.
import { openSync, readSync, fstatSync, closeSync } from 'node:fs';
import { GGUF_MAGIC, GGUF_DEFAULT_ALIGNMENT, GgufValueType, GGUF_SCALAR_SIZE, alignUp } from './gguf-format.ts';
import { ModelError, ERRORS } from '../errors.ts';

/** [elements per block, bytes per block] for ggml tensor types (ggml.c's type_traits). */
const GGML_BLOCK: Readonly<Record<number, readonly [number, number]>> = {
  0: [1, 4], 1: [1, 2], 2: [32, 18], 3: [32, 20], 6: [32, 22], 7: [32, 24], 8: [32, 34], 9: [32, 36],
  10: [256, 84], 11: [256, 110], 12: [256, 144], 13: [256, 176], 14: [256, 210], 15: [256, 292],
  16: [256, 66], 17: [256, 74], 18: [256, 98], 19: [256, 50], 20: [32, 18], 21: [256, 110], 22: [256, 82],
  23: [256, 136], 24: [1, 1], 25: [1, 2], 26: [1, 4], 27: [1, 8], 28: [1, 8], 29: [256, 56], 30: [1, 2],
  34: [256, 54], 35: [256, 66], 39: [32, 17],
};

const LIMITS = {
  tensors: 1_000_000,
  metadataEntries: 1_000_000,
  keyBytes: 65_536,
  stringBytes: 16 << 20,
  arrayItems: 16_000_000,
  dims: 4,
};

export type GgufScalar = number | bigint | boolean | string;
export interface GgufTensorInfo {
  name: string;
  dims: number[];
  type: number;
  offset: number;
}
export interface GgufSummary {
  version: number;
  /** Scalar metadata values; arrays are summarised by their length to keep this small. */
  metadata: Map<string, GgufScalar | { arrayLength: number; itemType: number }>;
  tensors: GgufTensorInfo[];
  alignment: number;
  dataStart: number;
  fileBytes: number;
}

function invalid(path: string, why: string, at?: number): ModelError {
  return new ModelError(ERRORS.MODEL_FILE_INVALID, `${path} is not a valid GGUF model: ${why}${at === undefined ? '' : ` (at byte ${at})`}`, {
    details: { path, reason: why, ...(at === undefined ? {} : { offset: at }) },
  });
}

/** Reads forward through a file in windows, so a multi-GB model's header is parsed without loading it. */
class FileCursor {
  #fd: number;
  #buf = Buffer.alloc(0);
  #bufStart = 0;
  pos = 0;
  readonly size: number;
  readonly path: string;
  constructor(fd: number, size: number, path: string) {
    this.#fd = fd;
    this.size = size;
    this.path = path;
  }
  #window(n: number): number {
    if (this.pos + n > this.size) throw invalid(this.path, `needs ${n} more bytes but the file ends`, this.pos);
    const rel = this.pos - this.#bufStart;
    if (rel >= 0 && rel + n <= this.#buf.length) return rel;
    const len = Math.min(Math.max(n, 1 << 20), this.size - this.pos);
    this.#buf = Buffer.alloc(len);
    let got = 0;
    while (got < len) {
      const r = readSync(this.#fd, this.#buf, got, len - got, this.pos + got);
      if (r === 0) throw invalid(this.path, 'unexpected end of file', this.pos + got);
      got += r;
    }
    this.#bufStart = this.pos;
    return 0;
  }
  u32(): number {
    const at = this.#window(4);
    this.pos += 4;
    return this.#buf.readUInt32LE(at);
  }
  u64(): number {
    const at = this.#window(8);
    this.pos += 8;
    const v = this.#buf.readBigUInt64LE(at);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw invalid(this.path, 'a 64-bit count or size is implausibly large', this.pos - 8);
    return Number(v);
  }
  string(max: number): string {
    const len = this.u64();
    if (len > max) throw invalid(this.path, `a string of ${len} bytes exceeds the ${max}-byte limit`, this.pos - 8);
    const at = this.#window(len);
    this.pos += len;
    return this.#buf.toString('utf8', at, at + len);
  }
  scalar(type: number): GgufScalar {
    if (type === GgufValueType.STRING) return this.string(LIMITS.stringBytes);
    const size = GGUF_SCALAR_SIZE[type];
    if (size === undefined) throw invalid(this.path, `unknown metadata value type ${type}`, this.pos);
    const at = this.#window(size);
    this.pos += size;
    const b = this.#buf;
    switch (type) {
      case GgufValueType.UINT8: return b.readUInt8(at);
      case GgufValueType.INT8: return b.readInt8(at);
      case GgufValueType.UINT16: return b.readUInt16LE(at);
      case GgufValueType.INT16: return b.readInt16LE(at);
      case GgufValueType.UINT32: return b.readUInt32LE(at);
      case GgufValueType.INT32: return b.readInt32LE(at);
      case GgufValueType.FLOAT32: return b.readFloatLE(at);
      case GgufValueType.BOOL: return b.readUInt8(at) !== 0;
      case GgufValueType.UINT64: return b.readBigUInt64LE(at);
      case GgufValueType.INT64: return b.readBigInt64LE(at);
      default: return b.readDoubleLE(at);
    }
  }
  skipArray(itemType: number, count: number): void {
    const size = GGUF_SCALAR_SIZE[itemType];
    if (itemType === GgufValueType.STRING) {
      for (let i = 0; i < count; i++) {
        const len = this.u64();
        if (len > LIMITS.stringBytes) throw invalid(this.path, `array string of ${len} bytes is too long`, this.pos - 8);
        if (this.pos + len > this.size) throw invalid(this.path, 'array string runs past the end of the file', this.pos);
        this.pos += len;
      }
    } else if (size !== undefined) {
      if (this.pos + size * count > this.size) throw invalid(this.path, 'array runs past the end of the file', this.pos);
      this.pos += size * count;
    } else {
      throw invalid(this.path, `unsupported array item type ${itemType}`, this.pos);
    }
  }
}

/** Parses and validates the header and tensor table; throws model_file_invalid on anything out of bounds. */
export function readGgufSummary(path: string): GgufSummary {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (err) {
    throw new ModelError(ERRORS.MODEL_NOT_FOUND, `cannot open model file ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`, {
      cause: err,
      details: { path },
    });
  }
  try {
    const size = fstatSync(fd).size;
    const c = new FileCursor(fd, size, path);
    if (size < 24) throw invalid(path, `file is only ${size} bytes`);
    if (c.u32() !== GGUF_MAGIC) throw invalid(path, 'bad magic (not a GGUF file)', 0);
    const version = c.u32();
    if (version !== 2 && version !== 3) throw invalid(path, `unsupported GGUF version ${version}`, 4);
    const tensorCount = c.u64();
    const kvCount = c.u64();
    if (tensorCount > LIMITS.tensors) throw invalid(path, `tensor count ${tensorCount} is implausible`, 8);
    if (kvCount > LIMITS.metadataEntries) throw invalid(path, `metadata count ${kvCount} is implausible`, 16);
    const metadata: GgufSummary['metadata'] = new Map();
    for (let i = 0; i < kvCount; i++) {
      const keyAt = c.pos;
      const key = c.string(LIMITS.keyBytes);
      if (metadata.has(key)) throw invalid(path, `duplicate metadata key "${key}"`, keyAt);
      const type = c.u32();
      if (type === GgufValueType.ARRAY) {
        const itemType = c.u32();
        const count = c.u64();
        if (count > LIMITS.arrayItems) throw invalid(path, `array "${key}" has ${count} items`, c.pos - 8);
        c.skipArray(itemType, count);
        metadata.set(key, { arrayLength: count, itemType });
      } else {
        metadata.set(key, c.scalar(type));
      }
    }
    const alignmentValue = metadata.get('general.alignment') ?? GGUF_DEFAULT_ALIGNMENT;
    const alignment = Number(alignmentValue);
    if (!Number.isInteger(alignment) || alignment <= 0 || alignment > 1 << 20 || (alignment & (alignment - 1)) !== 0) {
      throw invalid(path, `general.alignment ${String(alignmentValue)} is not a power of two`);
    }
    const tensors: GgufTensorInfo[] = [];
    const names = new Set<string>();
    for (let i = 0; i < tensorCount; i++) {
      const at = c.pos;
      const name = c.string(LIMITS.keyBytes);
      if (names.has(name)) throw invalid(path, `duplicate tensor "${name}"`, at);
      names.add(name);
      const nDims = c.u32();
      if (nDims < 1 || nDims > LIMITS.dims) throw invalid(path, `tensor "${name}" has ${nDims} dimensions`, c.pos - 4);
      const dims: number[] = [];
      for (let d = 0; d < nDims; d++) {
        const n = c.u64();
        if (n < 1) throw invalid(path, `tensor "${name}" has an empty dimension`, c.pos - 8);
        dims.push(n);
      }
      const type = c.u32();
      const offset = c.u64();
      if (offset % alignment !== 0) throw invalid(path, `tensor "${name}" data offset ${offset} is not aligned`, c.pos - 8);
      tensors.push({ name, dims, type, offset });
    }
    const dataStart = alignUp(c.pos, alignment);
    const dataBytes = size - dataStart;
    if (dataBytes < 0) throw invalid(path, 'file ends before the tensor data section');
    for (const t of tensors) {
      const block = GGML_BLOCK[t.type];
      if (!block) throw invalid(path, `tensor "${t.name}" has unknown ggml type ${t.type}`);
      const elements = t.dims.reduce((a, d) => a * d, 1);
      if (!Number.isSafeInteger(elements) || t.dims[0]! % block[0] !== 0) {
        throw invalid(path, `tensor "${t.name}" shape ${t.dims.join('x')} does not fit its type`);
      }
      const bytes = (elements / block[0]) * block[1];
      if (t.offset + bytes > dataBytes) {
        throw invalid(path, `tensor "${t.name}" data (${bytes} bytes at ${t.offset}) extends past the end of the file (truncated?)`);
      }
    }
    checkArchitecture(path, metadata);
    return { version, metadata, tensors, alignment, dataStart, fileBytes: size };
  } finally {
    closeSync(fd);
  }
}

/** Hyperparameters llama.cpp divides by or sizes buffers from: must be positive and consistent. */
function checkArchitecture(path: string, metadata: GgufSummary['metadata']): void {
  const arch = metadata.get('general.architecture');
  if (typeof arch !== 'string' || !/^[a-z0-9_.-]{1,64}$/.test(arch)) throw invalid(path, 'general.architecture is missing or malformed');
  const num = (key: string): number | undefined => {
    const v = metadata.get(`${arch}.${key}`);
    if (v === undefined) return undefined;
    if (typeof v !== 'number' && typeof v !== 'bigint') throw invalid(path, `${arch}.${key} is not a number`);
    return Number(v);
  };
  for (const key of ['context_length', 'embedding_length', 'block_count', 'attention.head_count']) {
    const v = num(key);
    if (v !== undefined && !(v >= 1 && v <= 1 << 24)) throw invalid(path, `${arch}.${key} = ${v} is out of range`);
  }
  const heads = num('attention.head_count');
  const kvHeads = num('attention.head_count_kv');
  const embedding = num('embedding_length');
  if (kvHeads !== undefined && (kvHeads < 1 || (heads !== undefined && heads % kvHeads !== 0))) {
    throw invalid(path, `${arch}.attention.head_count_kv = ${kvHeads} does not divide the head count`);
  }
  if (heads !== undefined && embedding !== undefined && embedding % heads !== 0) {
    throw invalid(path, `${arch}.embedding_length ${embedding} is not a multiple of the head count ${heads}`);
  }
}
