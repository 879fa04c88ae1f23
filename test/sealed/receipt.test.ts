// Receipts: a receipt signed by the node's identity (purpose "receipt") verifies against that identity and
// the envelope it names; altering any field, swapping the envelope, another key or another signing purpose
// breaks it, each with receipt_invalid.
import t from 'tap';
import { generateKeyPairSync } from 'node:crypto';
import { envelopeSha256, receiptPayload, verifyReceipt, type Receipt } from '../../src/sealed/receipt.ts';
import { signPayload } from '../../src/vault/signing.ts';
import { isPhantomaError } from '../../src/errors.ts';

const identity = generateKeyPairSync('ed25519');
const envelope = Buffer.from('an envelope, as the client sent it');
const receipt: Receipt = {
  type: 'phantoma-receipt',
  version: 1,
  envelopeSha256: envelopeSha256(envelope),
  requestId: '0123456789abcdef',
  outcome: 'ok',
  workerEnded: true,
  wipeVerified: true,
  wipeMicros: 3812,
  egressPolicyHash: 'ab'.repeat(32),
  releaseVersion: '0.1.0',
  time: '2026-11-25T10:00:00.000Z',
};
const signed = { receipt, signature: signPayload(identity.privateKey, 'receipt', receiptPayload(receipt)).toString('base64') };

function code(f: () => unknown): string {
  try {
    f();
    return 'accepted';
  } catch (err) {
    return isPhantomaError(err) ? err.code : `not a PhantomaError: ${(err as Error).message}`;
  }
}

t.test('a genuine receipt verifies', async (t) => {
  t.same(verifyReceipt(signed, identity.publicKey, envelope), receipt);
});

t.test('altering any field breaks it', async (t) => {
  const changes: Record<keyof Receipt, unknown> = {
    type: 'phantoma-receipt-x',
    version: 2,
    envelopeSha256: envelopeSha256(Buffer.from('another')),
    requestId: 'fedcba9876543210',
    outcome: 'error',
    workerEnded: false,
    wipeVerified: false,
    wipeMicros: 3813,
    egressPolicyHash: 'cd'.repeat(32),
    releaseVersion: '0.1.1',
    time: '2026-11-25T10:00:00.001Z',
  };
  for (const [field, value] of Object.entries(changes)) {
    t.equal(code(() => verifyReceipt({ ...signed, receipt: { ...receipt, [field]: value } }, identity.publicKey, envelope)), 'receipt_invalid', field);
  }
  t.equal(code(() => verifyReceipt({ ...signed, receipt: { ...receipt, extra: 1 } }, identity.publicKey, envelope)), 'receipt_invalid', 'an added field');
});

t.test('another envelope, another key, another purpose, a missing signature: each refused', async (t) => {
  t.equal(code(() => verifyReceipt(signed, identity.publicKey, Buffer.from('another envelope'))), 'receipt_invalid', 'another envelope');
  t.equal(code(() => verifyReceipt(signed, generateKeyPairSync('ed25519').publicKey, envelope)), 'receipt_invalid', 'another identity');
  const heartbeatSig = signPayload(identity.privateKey, 'heartbeat', receiptPayload(receipt)).toString('base64');
  t.equal(code(() => verifyReceipt({ receipt, signature: heartbeatSig }, identity.publicKey, envelope)), 'receipt_invalid', 'signed for another purpose');
  t.equal(code(() => verifyReceipt({ receipt }, identity.publicKey, envelope)), 'receipt_invalid', 'no signature');
  t.equal(code(() => verifyReceipt(null, identity.publicKey, envelope)), 'receipt_invalid', 'nothing');
});
