// Constants of the GGUF v3 container (ggml's gguf.h), shared by the writer and the validating reader.

export const GGUF_MAGIC = 0x46554747; // "GGUF" read as a little-endian uint32
export const GGUF_VERSION = 3;
export const GGUF_DEFAULT_ALIGNMENT = 32;

export const GgufValueType = {
  UINT8: 0,
  INT8: 1,
  UINT16: 2,
  INT16: 3,
  UINT32: 4,
  INT32: 5,
  FLOAT32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  UINT64: 10,
  INT64: 11,
  FLOAT64: 12,
} as const;
export type GgufValueType = (typeof GgufValueType)[keyof typeof GgufValueType];

/** Byte size of each fixed-width scalar value type. */
export const GGUF_SCALAR_SIZE: Readonly<Record<number, number>> = {
  [GgufValueType.UINT8]: 1,
  [GgufValueType.INT8]: 1,
  [GgufValueType.UINT16]: 2,
  [GgufValueType.INT16]: 2,
  [GgufValueType.UINT32]: 4,
  [GgufValueType.INT32]: 4,
  [GgufValueType.FLOAT32]: 4,
  [GgufValueType.BOOL]: 1,
  [GgufValueType.UINT64]: 8,
  [GgufValueType.INT64]: 8,
  [GgufValueType.FLOAT64]: 8,
};

/** The ggml tensor types this project writes, with the bytes one element takes. */
export const GgmlType = { F32: 0, F16: 1 } as const;
export type GgmlType = (typeof GgmlType)[keyof typeof GgmlType];
export const GGML_TYPE_SIZE: Readonly<Record<number, number>> = { [GgmlType.F32]: 4, [GgmlType.F16]: 2 };

/** llama.cpp's token types (llama_token_type). */
export const TokenType = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6 } as const;

export function alignUp(n: number, alignment: number): number {
  return Math.ceil(n / alignment) * alignment;
}
