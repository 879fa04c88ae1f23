// The gateway's view of who may send sealed requests and which request keys are current: public data
// from keyd (its `registry` op), refreshed at most every ttlMs so a revocation or a rotation takes
// effect within a second without asking keyd on every request.
import { ed25519PublicKeyObject } from '../vault/contents.ts';
import type { KeydRegistry } from '../vault/keyd-client.ts';
import type { KnownClient, KnownRequestKey } from '../sealed/envelope.ts';

export interface SealedRegistry {
  refresh(): Promise<void>;
  lookupClient(name: string): KnownClient | undefined;
  lookupKey(keyId: string): KnownRequestKey | undefined;
}

export function createSealedRegistry(deps: { fetch: () => Promise<KeydRegistry>; ttlMs?: number; clock?: () => number }): SealedRegistry {
  const ttl = deps.ttlMs ?? 1000;
  const clock = deps.clock ?? Date.now;
  let clients = new Map<string, KnownClient>();
  let keys = new Map<string, KnownRequestKey>();
  let at = -Infinity;
  let pending: Promise<void> | undefined;
  return {
    refresh() {
      if (clock() - at < ttl) return Promise.resolve();
      pending ??= deps
        .fetch()
        .then((r) => {
          clients = new Map(r.clients.map((c) => [c.name, { publicKey: ed25519PublicKeyObject(Buffer.from(c.publicKey, 'base64')), revoked: c.revoked }]));
          keys = new Map(r.requestKeys.map((k) => [k.id, { notBeforeMs: Date.parse(k.notBefore), notAfterMs: Date.parse(k.notAfter) }]));
          at = clock();
        })
        .finally(() => (pending = undefined));
      return pending;
    },
    lookupClient: (name) => clients.get(name),
    lookupKey: (id) => keys.get(id),
  };
}
