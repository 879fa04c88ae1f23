// The gateway's view of who may send sealed requests and which request keys are current: public data
// from keyd (its `registry` op). A request never waits for keyd while the copy is younger than maxAgeMs:
// past refreshAfterMs it is refreshed in the background (one more process hop on the request's path cost
// tens of ms on a loaded 2-core machine); past maxAgeMs the request waits for a fresh copy. So a revocation
// or a rotation reaches the gateway within maxAgeMs (5 s) at most, usually within refreshAfterMs.
import { ed25519PublicKeyObject } from '../vault/contents.ts';
import type { KeydRegistry } from '../vault/keyd-client.ts';
import type { KnownClient, KnownRequestKey } from '../sealed/envelope.ts';

export interface SealedRegistry {
  refresh(): Promise<void>;
  lookupClient(name: string): KnownClient | undefined;
  lookupKey(keyId: string): KnownRequestKey | undefined;
}

export function createSealedRegistry(deps: { fetch: () => Promise<KeydRegistry>; refreshAfterMs?: number; maxAgeMs?: number; clock?: () => number }): SealedRegistry {
  const refreshAfter = deps.refreshAfterMs ?? 250;
  const maxAge = deps.maxAgeMs ?? 5000;
  const clock = deps.clock ?? Date.now;
  let clients = new Map<string, KnownClient>();
  let keys = new Map<string, KnownRequestKey>();
  let at = -Infinity;
  let pending: Promise<void> | undefined;
  return {
    refresh() {
      const age = clock() - at;
      if (age < refreshAfter) return Promise.resolve();
      pending ??= deps
        .fetch()
        .then((r) => {
          clients = new Map(r.clients.map((c) => [c.name, { publicKey: ed25519PublicKeyObject(Buffer.from(c.publicKey, 'base64')), revoked: c.revoked }]));
          keys = new Map(r.requestKeys.map((k) => [k.id, { notBeforeMs: Date.parse(k.notBefore), notAfterMs: Date.parse(k.notAfter) }]));
          at = clock();
        })
        .finally(() => (pending = undefined));
      // Young enough: answer from the copy now; a failed background refresh is retried by the next request.
      if (age < maxAge) {
        pending.catch(() => undefined);
        return Promise.resolve();
      }
      return pending;
    },
    lookupClient: (name) => clients.get(name),
    lookupKey: (id) => keys.get(id),
  };
}
