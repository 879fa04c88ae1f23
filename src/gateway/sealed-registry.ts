// The gateway's view of who may send sealed requests and which request keys are current: public data
// from keyd (its `registry` op). A request never waits for keyd while the copy is younger than maxAgeMs;
// past maxAgeMs it waits for a fresh copy. Past refreshAfterMs the copy is refreshed in the background
// once a request is over ('after-request'), not while it runs: started at the request's start, that
// refresh (a new keyd connection, keyd's identification of the caller, the registry's JSON, a key object
// per client) ran beside the worker's own keyd hop and competed with it for keyd and for the 2 cores
// (measured ≈ 2.5 ms into every sealed request that came more than refreshAfterMs after the last). A
// request is checked against the copy it finds either way, so a revocation or a rotation still reaches the
// gateway within maxAgeMs (5 s) at most, usually within refreshAfterMs of the next request's end.
import { ed25519PublicKeyObject } from '../vault/contents.ts';
import type { KeydRegistry } from '../vault/keyd-client.ts';
import type { KnownClient, KnownRequestKey } from '../sealed/envelope.ts';

/**
 * before-request (the default): wait only for a missing or too old copy. after-request: refresh in the
 * background if due. missing-entry (a request named a client or key id the copy lacks): wait for a fresh
 * copy if due, so a client retrying with a just-rotated key is not refused by the gateway's old copy.
 */
export type RefreshMoment = 'before-request' | 'after-request' | 'missing-entry';

export interface SealedRegistry {
  refresh(moment?: RefreshMoment): Promise<void>;
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
    refresh(moment = 'before-request') {
      const age = clock() - at;
      if (age < refreshAfter || (moment === 'before-request' && age < maxAge)) return Promise.resolve();
      pending ??= deps
        .fetch()
        .then((r) => {
          clients = new Map(r.clients.map((c) => [c.name, { publicKey: ed25519PublicKeyObject(Buffer.from(c.publicKey, 'base64')), revoked: c.revoked }]));
          keys = new Map(r.requestKeys.map((k) => [k.id, { notBeforeMs: Date.parse(k.notBefore), notAfterMs: Date.parse(k.notAfter) }]));
          at = clock();
        })
        .finally(() => (pending = undefined));
      // After a request, or young enough: nobody waits; a failed background refresh is retried by the next.
      if (moment === 'after-request' || (moment === 'before-request' && age < maxAge)) {
        pending.catch(() => undefined);
        return Promise.resolve();
      }
      return pending;
    },
    lookupClient: (name) => clients.get(name),
    lookupKey: (id) => keys.get(id),
  };
}
