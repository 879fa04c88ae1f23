// The floor for bench/control-plane.bench.ts: a bare node:https server with the same kind of certificate
// (Ed25519, TLS 1.3 only) that reads a JSON body and answers a small JSON one — no fastify, no database, no
// signatures. Its CPU per request is what one new (resumed) TLS connection costs in Node on this machine.
import { createPublicKey, generateKeyPairSync } from 'node:crypto';
import https from 'node:https';
import { leaseKeyCertificate } from '../control-plane/src/lease-key.ts';
import { keyFingerprint, rawPublicKeyOf } from '../src/control/protocol.ts';

const { privateKey } = generateKeyPairSync('ed25519');
const publicKey = createPublicKey(privateKey);
const raw = rawPublicKeyOf(publicKey);
const fingerprint = keyFingerprint(raw);
const tls = await leaseKeyCertificate({ privateKey, publicKey, raw, fingerprint });
const answer = JSON.stringify({ lease: { ok: true, pad: 'x'.repeat(600) } });
const server = https.createServer({ ...tls, minVersion: 'TLSv1.3' }, (req, res) => {
  const parts: Buffer[] = [];
  req.on('data', (c: Buffer) => parts.push(c));
  req.on('end', () => {
    JSON.parse(Buffer.concat(parts).toString('utf8'));
    res.setHeader('content-type', 'application/json');
    res.end(answer);
  });
});
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ url: `https://127.0.0.1:${(server.address() as { port: number }).port}`, fingerprint, admin: '' }) + '\n');
});
process.once('SIGTERM', () => server.close());
