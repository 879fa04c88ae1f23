// A deterministic GGUF v3 writer. The header is built in memory (pure); tensor data is streamed to the
// file by the caller's generator, so a 500 MB bench model never sits in memory whole.
import {
  GGUF_MAGIC,
  GGUF_VERSION,
  GGUF_DEFAULT_ALIGNMENT,
  GgufValueType,
  GGUF_SCALAR_SIZE,
  GGML_TYPE_SIZE,
  type GgmlType,
  alignUp,
} from './gguf-format.ts';

export type GgufScalarType = Exclude<GgufValueType, typeof GgufValueType.ARRAY>;

export type GgufMetadataEntry =
  | { key: string; type: GgufScalarType; value: number | bigint | boolean | string }
  | { key: string; type: typeof GgufValueType.ARRAY; itemType: GgufScalarType; value: ReadonlyArray<number | bigint | boolean | string> };

export interface GgufTensorSpec {
  name: string;
  /** ggml order: dims[0] is the innermost (contiguous) dimension. */
  dims: readonly number[];
  type: GgmlType;
}

export interface GgufLayout {
  header: Buffer;
  /** Offset of each tensor's data from the start of the data section. */
  tensorOffsets: number[];
  tensorBytes: number[];
  dataStart: number;
  totalBytes: number;
}

export const meta = {
  str: (key: string, value: string): GgufMetadataEntry => ({ key, type: GgufValueType.STRING, value }),
  u32: (key: string, value: number): GgufMetadataEntry => ({ key, type: GgufValueType.UINT32, value }),
  f32: (key: string, value: number): GgufMetadataEntry => ({ key, type: GgufValueType.FLOAT32, value }),
  bool: (key: string, value: boolean): GgufMetadataEntry => ({ key, type: GgufValueType.BOOL, value }),
  arr: (key: string, itemType: GgufScalarType, value: ReadonlyArray<number | string>): GgufMetadataEntry => ({
    key,
    type: GgufValueType.ARRAY,
    itemType,
    value,
  }),
};

/** Grows a byte buffer as values are appended; every number is little-endian as GGUF requires. */
class ByteSink {
  #buf = Buffer.alloc(1 << 16);
  #len = 0;
  #reserve(n: number): number {
    if (this.#len + n > this.#buf.length) {
      const next = Buffer.alloc(Math.max(this.#buf.length * 2, this.#len + n));
      this.#buf.copy(next, 0, 0, this.#len);
      this.#buf = next;
    }
    const at = this.#len;
    this.#len += n;
    return at;
  }
  // Reserve first, then read #buf: reserving may replace the buffer.
  u32(v: number): void {
    const at = this.#reserve(4);
    this.#buf.writeUInt32LE(v, at);
  }
  u64(v: number | bigint): void {
    const at = this.#reserve(8);
    this.#buf.writeBigUInt64LE(BigInt(v), at);
  }
  bytes(b: Uint8Array): void {
    const at = this.#reserve(b.length);
    this.#buf.set(b, at);
  }
  string(s: string): void {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.bytes(b);
  }
  scalar(type: GgufScalarType, v: number | bigint | boolean | string): void {
    if (type === GgufValueType.STRING) {
      this.string(String(v));
      return;
    }
    const at = this.#reserve(GGUF_SCALAR_SIZE[type]!);
    const b = this.#buf;
    switch (type) {
      case GgufValueType.UINT8: b.writeUInt8(Number(v), at); break;
      case GgufValueType.INT8: b.writeInt8(Number(v), at); break;
      case GgufValueType.UINT16: b.writeUInt16LE(Number(v), at); break;
      case GgufValueType.INT16: b.writeInt16LE(Number(v), at); break;
      case GgufValueType.UINT32: b.writeUInt32LE(Number(v), at); break;
      case GgufValueType.INT32: b.writeInt32LE(Number(v), at); break;
      case GgufValueType.FLOAT32: b.writeFloatLE(Number(v), at); break;
      case GgufValueType.BOOL: b.writeUInt8(v ? 1 : 0, at); break;
      case GgufValueType.UINT64: b.writeBigUInt64LE(BigInt(v), at); break;
      case GgufValueType.INT64: b.writeBigInt64LE(BigInt(v), at); break;
      case GgufValueType.FLOAT64: b.writeDoubleLE(Number(v), at); break;
      default: throw new TypeError(`unknown GGUF value type ${String(type)}`);
    }
  }
  padTo(alignment: number): void {
    const pad = alignUp(this.#len, alignment) - this.#len;
    this.#reserve(pad); // Buffer.alloc zero-filled, so padding is zeros
  }
  get length(): number {
    return this.#len;
  }
  take(): Buffer {
    return this.#buf.subarray(0, this.#len);
  }
}

export function tensorByteSize(t: GgufTensorSpec): number {
  return t.dims.reduce((a, d) => a * d, 1) * GGML_TYPE_SIZE[t.type]!;
}

/** Lays out a GGUF file: the header bytes (padded to the alignment) and where each tensor's data goes. */
export function layoutGguf(metadata: readonly GgufMetadataEntry[], tensors: readonly GgufTensorSpec[]): GgufLayout {
  const alignment = GGUF_DEFAULT_ALIGNMENT;
  const sink = new ByteSink();
  sink.u32(GGUF_MAGIC);
  sink.u32(GGUF_VERSION);
  sink.u64(tensors.length);
  sink.u64(metadata.length);
  for (const entry of metadata) {
    sink.string(entry.key);
    sink.u32(entry.type);
    if (entry.type === GgufValueType.ARRAY) {
      sink.u32(entry.itemType);
      sink.u64(entry.value.length);
      for (const item of entry.value) sink.scalar(entry.itemType, item);
    } else {
      sink.scalar(entry.type, entry.value);
    }
  }
  const tensorOffsets: number[] = [];
  const tensorBytes: number[] = [];
  let offset = 0;
  for (const t of tensors) {
    sink.string(t.name);
    sink.u32(t.dims.length);
    for (const d of t.dims) sink.u64(d);
    sink.u32(t.type);
    sink.u64(offset);
    tensorOffsets.push(offset);
    const size = tensorByteSize(t);
    tensorBytes.push(size);
    offset = alignUp(offset + size, alignment);
  }
  sink.padTo(alignment);
  const header = Buffer.from(sink.take());
  return { header, tensorOffsets, tensorBytes, dataStart: header.length, totalBytes: header.length + offset };
}
