// GET /.well-known/phantoma/keys: the node's request public keys, TLS fingerprint, release version and
// egress policy hash, signed by the identity key (through keyd; the gateway holds no identity key). The
// exact bytes are `{"document":<canonical JSON>,"signature":"<base64>"}` (src/vault/signing.ts), cached
// for a short while so a busy node does not ask keyd to sign on every fetch.
import type { KeydClient } from '../vault/keyd-client.ts';
import { encodeSignedKeyDocument } from '../vault/signing.ts';

export const KEY_DOCUMENT_PATH = '/.well-known/phantoma/keys';

export interface KeyDocumentSource {
  get(): Promise<string>;
}

export function createKeyDocumentSource(deps: { keyd: KeydClient; egressPolicyHash: () => string; tlsFingerprint: string | undefined; ttlMs?: number; clock?: () => number }): KeyDocumentSource {
  const ttl = deps.ttlMs ?? 60_000;
  const clock = deps.clock ?? Date.now;
  let cached: { body: string; until: number; policy: string } | undefined;
  let pending: Promise<string> | undefined;
  return {
    get() {
      const policy = deps.egressPolicyHash();
      if (cached && clock() < cached.until && cached.policy === policy) return Promise.resolve(cached.body);
      pending ??= deps.keyd
        .keyDocument({ egressPolicyHash: policy, tlsCertificateSha256: deps.tlsFingerprint ?? '' })
        .then((r) => {
          const body = encodeSignedKeyDocument(r.document, Buffer.from(r.signature, 'base64'));
          // Never served past the end of a listed key's window (rotation overlap ending).
          const firstEnd = Math.min(...r.document.requestKeys.map((k) => Date.parse(k.notAfter)));
          cached = { body, until: Math.min(clock() + ttl, firstEnd), policy };
          return body;
        })
        .finally(() => (pending = undefined));
      return pending;
    },
  };
}
