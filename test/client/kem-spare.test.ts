// The client's key agreement made ahead: each set seals one request, and only to the key it was made for.
import t from 'tap';
import { createKemSpare } from '../../src/client/kem-spare.ts';
import { encapsulate, generateRequestKeyPair, type KemSecrets, type RequestPublicKeys } from '../../src/sealed/kem.ts';

const a = { keyId: 'aaaaaaaaaaaaaaaa', publicKeys: generateRequestKeyPair().publicKeys };
const b = { keyId: 'bbbbbbbbbbbbbbbb', publicKeys: generateRequestKeyPair().publicKeys };

function counting(): { spare: ReturnType<typeof createKemSpare>; made: Array<{ to: RequestPublicKeys; kem: KemSecrets }> } {
  const made: Array<{ to: RequestPublicKeys; kem: KemSecrets }> = [];
  const spare = createKemSpare({ encapsulate: (to) => {
    const kem = encapsulate(to);
    made.push({ to, kem });
    return kem;
  } });
  return { spare, made };
}

t.test('a prepared set is taken once; the next take makes a fresh one', async (t) => {
  const { spare, made } = counting();
  spare.prepare(a);
  t.equal(made.length, 1);
  t.ok(spare.holds(a));
  const first = spare.take(a);
  t.equal(first, made[0]!.kem, 'the take hands out the prepared set');
  t.notOk(spare.holds(a), 'and forgets it');
  const second = spare.take(a);
  t.equal(made.length, 2, 'nothing prepared: made now');
  t.not(Buffer.from(second.ephemeralPublicKey).toString('hex'), Buffer.from(first.ephemeralPublicKey).toString('hex'), 'never the same ephemeral key twice');
});

t.test('prepare is idempotent while a set for that key is held', async (t) => {
  const { spare, made } = counting();
  spare.prepare(a);
  spare.prepare(a);
  t.equal(made.length, 1);
});

t.test('a set made for another key is never used: it is zero-filled and replaced', async (t) => {
  const { spare, made } = counting();
  spare.prepare(a);
  const forA = made[0]!.kem;
  const kem = spare.take(b);
  t.equal(made.length, 2);
  t.equal(made[1]!.to, b.publicKeys, 'made for the key asked for');
  t.equal(kem, made[1]!.kem);
  t.ok(Buffer.from(forA.x25519Secret).every((x) => x === 0) && Buffer.from(forA.mlkemSecret).every((x) => x === 0), "the other key's secrets were wiped");
  // Same id, other bytes (a document that changed under an old id): also not used.
  spare.prepare(a);
  spare.take({ keyId: a.keyId, publicKeys: b.publicKeys });
  t.equal(made.length, 4);
});

t.test('clear wipes the held set', async (t) => {
  const { spare, made } = counting();
  spare.prepare(a);
  spare.clear();
  t.notOk(spare.holds(a));
  t.ok(Buffer.from(made[0]!.kem.x25519Secret).every((x) => x === 0));
});
