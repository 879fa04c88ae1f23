// What keyd hands a worker for an envelope: the two one-way keys derived from the per-request key.
import { deriveSessionKeys } from '../../src/sealed/seal.ts';

export function sessionKeysB64(requestKey: Uint8Array): { bodyKey: string; responseKey: string } {
  const k = deriveSessionKeys(requestKey);
  return { bodyKey: k.bodyKey.toString('base64'), responseKey: k.responseKey.toString('base64') };
}

/** The two keys of a keyd reply or push, as the tests compare them. */
export function keysOf(reply: Record<string, unknown> | undefined): { bodyKey: unknown; responseKey: unknown } {
  return { bodyKey: reply?.bodyKey, responseKey: reply?.responseKey };
}
