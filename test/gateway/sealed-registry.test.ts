// The gateway's copy of keyd's public registry: a request waits for keyd only when the copy is missing or
// older than maxAgeMs, or when it named a client or key id the copy lacks; the refresh that is merely due
// (older than refreshAfterMs) runs after the request, in the background.
import t from 'tap';
import { generateKeyPairSync } from 'node:crypto';
import { createSealedRegistry } from '../../src/gateway/sealed-registry.ts';
import { rawEd25519Public } from '../../src/vault/contents.ts';
import type { KeydRegistry } from '../../src/vault/keyd-client.ts';

const pub = rawEd25519Public(generateKeyPairSync('ed25519').publicKey).toString('base64');
function setup(): { reg: ReturnType<typeof createSealedRegistry>; calls: () => number; clock: { now: number }; names: string[]; release: () => void } {
  const clock = { now: 1_000_000 };
  let calls = 0;
  const names = ['alice'];
  let gate: (() => void) | undefined;
  const fetch = async (): Promise<KeydRegistry> => {
    calls++;
    // Each fetch answers when the test releases it, so "did the caller wait" is observable.
    await new Promise<void>((r) => (gate = r));
    return { clients: names.map((name) => ({ name, publicKey: pub, revoked: false })), requestKeys: [{ id: 'k1', notBefore: new Date(0).toISOString(), notAfter: new Date(9e12).toISOString() }] };
  };
  const reg = createSealedRegistry({ fetch, refreshAfterMs: 250, maxAgeMs: 5000, clock: () => clock.now });
  return { reg, calls: () => calls, clock, names, release: () => gate?.() };
}
const settled = async (p: Promise<void>): Promise<boolean> => {
  let done = false;
  void p.then(() => (done = true));
  await new Promise((r) => setImmediate(r));
  return done;
};

t.test('the first request waits for a copy; a due refresh waits for the request to end', async (t) => {
  const s = setup();
  const first = s.reg.refresh();
  t.equal(await settled(first), false, 'no copy yet: the request waits');
  s.release();
  await first;
  t.ok(s.reg.lookupClient('alice'), 'copy in place');
  s.clock.now += 1000; // due (past 250 ms), still usable (under 5 s)
  t.equal(await settled(s.reg.refresh('before-request')), true, 'answered from the copy at once');
  t.equal(s.calls(), 1, 'and no keyd call beside the request');
  t.equal(await settled(s.reg.refresh('after-request')), true, 'after the request nobody waits');
  t.equal(s.calls(), 2, 'but the refresh has started');
  s.names.push('bob');
  s.release();
  await new Promise((r) => setImmediate(r));
  t.ok(s.reg.lookupClient('bob'), 'the background refresh brought the new client');
  t.equal(await settled(s.reg.refresh('after-request')), true);
  t.equal(s.calls(), 2, 'fresh again: nothing to do after the next request');
});

t.test('a copy past maxAgeMs, or one lacking a named client, makes the request wait', async (t) => {
  const s = setup();
  const first = s.reg.refresh();
  s.release();
  await first;
  s.clock.now += 6000;
  const old = s.reg.refresh('before-request');
  t.equal(await settled(old), false, 'too old: waits');
  s.release();
  await old;
  s.clock.now += 100;
  t.equal(await settled(s.reg.refresh('missing-entry')), true, 'younger than refreshAfterMs: no wait even for a missing entry');
  t.equal(s.calls(), 2);
  s.clock.now += 300;
  s.names.push('carol');
  const missing = s.reg.refresh('missing-entry');
  t.equal(await settled(missing), false, 'a missing entry with a due copy waits for the fresh one');
  s.release();
  await missing;
  t.ok(s.reg.lookupClient('carol'));
});
