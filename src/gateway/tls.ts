// The node's TLS material. On first start the node makes its own ECDSA P-256 key and a self-signed
// certificate; the key is written 0600 and never leaves the node (the vault issue moves it into the vault).
// Clients pin the certificate's SHA-256 fingerprint, printed at start-up and by `phantoma keys show`.
import { webcrypto, X509Certificate, createHash } from 'node:crypto';
import { existsSync, readFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';
import { writeFileAtomic } from '../util/atomic-file.ts';
import { PhantomaError, ERRORS } from '../errors.ts';

export interface TlsMaterial {
  key: string;
  cert: string;
  /** SHA-256 of the certificate's DER, as colon-separated hex (what `openssl x509 -fingerprint -sha256` prints). */
  fingerprint: string;
  generated: boolean;
}

export function certificateFingerprint(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256;
}

function pem(label: string, der: ArrayBuffer): string {
  const b64 = Buffer.from(der).toString('base64').replace(/(.{64})/g, '$1\n').trimEnd();
  return `-----BEGIN ${label}-----\n${b64}\n-----END ${label}-----\n`;
}

export async function makeSelfSignedCertificate(opts: { commonName: string; dnsNames: string[]; ips: string[]; days: number; now?: Date }): Promise<{ key: string; cert: string }> {
  x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const keys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const notBefore = new Date((opts.now ?? new Date()).getTime() - 60_000);
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: createHash('sha256').update(webcrypto.getRandomValues(new Uint8Array(16))).digest('hex').slice(0, 32).replace(/^[89a-f]/, '7'),
    name: `CN=${opts.commonName}`,
    notBefore,
    notAfter: new Date(notBefore.getTime() + opts.days * 86_400_000),
    signingAlgorithm: alg,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension([...opts.dnsNames.map((value) => ({ type: 'dns' as const, value })), ...opts.ips.map((value) => ({ type: 'ip' as const, value }))]),
    ],
  });
  const pkcs8 = await webcrypto.subtle.exportKey('pkcs8', keys.privateKey);
  return { key: pem('PRIVATE KEY', pkcs8), cert: cert.toString('pem') + '\n' };
}

/** Loads the node's TLS key and certificate from `dir`, making them first if absent. */
export async function ensureSelfSignedTls(dir: string): Promise<TlsMaterial> {
  const keyPath = join(dir, 'tls-key.pem');
  const certPath = join(dir, 'tls-cert.pem');
  try {
    if (existsSync(keyPath) && existsSync(certPath)) {
      const key = readFileSync(keyPath, 'utf8');
      const cert = readFileSync(certPath, 'utf8');
      return { key, cert, fingerprint: certificateFingerprint(cert), generated: false };
    }
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const made = await makeSelfSignedCertificate({ commonName: 'phantoma node', dnsNames: ['localhost'], ips: ['127.0.0.1', '::1'], days: 3650 });
    // Key first: a crash between the two writes leaves a key without a certificate, which is remade.
    writeFileAtomic(keyPath, made.key, 0o600);
    writeFileAtomic(certPath, made.cert, 0o644);
    return { ...made, fingerprint: certificateFingerprint(made.cert), generated: true };
  } catch (err) {
    if (err instanceof PhantomaError) throw err;
    throw new PhantomaError(ERRORS.TLS_SETUP_FAILED, `cannot set up TLS in ${dir}: ${(err as Error).message}`, { cause: err });
  }
}

export function loadProvidedTls(certPath: string, keyPath: string): TlsMaterial {
  try {
    const cert = readFileSync(certPath, 'utf8');
    const key = readFileSync(keyPath, 'utf8');
    return { key, cert, fingerprint: certificateFingerprint(cert), generated: false };
  } catch (err) {
    throw new PhantomaError(ERRORS.TLS_SETUP_FAILED, `cannot read the provided TLS certificate or key: ${(err as Error).message}`, { cause: err });
  }
}
