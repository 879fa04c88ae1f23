// The node's only outbound connection: HTTPS to the configured control plane URL, pinned to the control
// plane's lease key. The TLS connection is made and the certificate's Ed25519 public key compared with the
// pin BEFORE a byte of the request is written; the response is read up to a hard cap. The node never
// listens for the control plane: it asks, the control plane answers.
import http from 'node:http';
import tls from 'node:tls';
import { once } from 'node:events';
import { PhantomaError, ERRORS } from '../errors.ts';
import { MAX_RESPONSE_BYTES, keyFingerprint, normalisePin, rawPublicKeyOf } from './protocol.ts';

export interface ControlPlaneEndpoint {
  url: string;
  /** "sha256:<hex>" of the control plane's lease key (`phantoma-cp key show`). */
  pin: string;
  timeoutMs?: number;
}

export interface ControlPlaneReply {
  status: number;
  /** The exact bytes received (the ledger records them as they came). */
  body: string;
  /** The control plane's raw 32-byte lease key, read from its certificate and matched against the pin. */
  publicKey: Buffer;
}

export interface ControlPlaneClient {
  post(path: string, body: string): Promise<ControlPlaneReply>;
}

function unreachable(u: URL, err: unknown): PhantomaError {
  return new PhantomaError(ERRORS.CONTROL_PLANE_UNREACHABLE, `cannot reach the control plane at ${u.host}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
}

/** A client for one control plane; keeps the last TLS session so the next connection can resume it. */
export function createControlPlaneClient(endpoint: ControlPlaneEndpoint): ControlPlaneClient {
  const u = new URL(endpoint.url);
  if (u.protocol !== 'https:') throw new PhantomaError(ERRORS.CONFIG_INVALID, `the control plane URL must be https://, not ${u.protocol}`);
  const pin = normalisePin(endpoint.pin);
  if (!/^sha256:[0-9a-f]{64}$/.test(pin)) throw new PhantomaError(ERRORS.CLI_USAGE, 'the control plane pin must be sha256:<64 hex> (phantoma-cp key show)');
  const timeoutMs = endpoint.timeoutMs ?? 30_000;
  const host = u.hostname.replace(/^\[|\]$/g, '');
  let session: Buffer | undefined;
  /** The pinned key the session was first established with (a resumed session shows no certificate). */
  let sessionKey: Buffer | undefined;

  async function connect(): Promise<{ socket: tls.TLSSocket; publicKey: Buffer }> {
    const socket = tls.connect({
      host,
      port: Number(u.port || 443),
      ...(/^[\d.]+$|:/.test(host) ? {} : { servername: host }),
      // The certificate is self-signed by design; it is authenticated by its key's pinned fingerprint below.
      rejectUnauthorized: false,
      minVersion: 'TLSv1.3',
      ALPNProtocols: ['http/1.1'],
      ...(session ? { session } : {}),
    });
    const resuming = session;
    socket.setTimeout(timeoutMs, () => socket.destroy(Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' })));
    try {
      await once(socket, 'secureConnect');
    } catch (err) {
      socket.destroy();
      throw unreachable(u, err);
    }
    // A resumed TLS 1.3 session proves the server holds the secret of a handshake whose key we pinned.
    const cert = socket.isSessionReused() && resuming ? undefined : socket.getPeerX509Certificate();
    const key = cert?.publicKey;
    const publicKey = socket.isSessionReused() && resuming ? sessionKey : key && key.asymmetricKeyType === 'ed25519' ? rawPublicKeyOf(key) : undefined;
    if (!publicKey || keyFingerprint(publicKey) !== pin) {
      socket.destroy();
      session = undefined;
      sessionKey = undefined;
      throw new PhantomaError(ERRORS.CONTROL_PLANE_PIN_MISMATCH, `the control plane at ${u.host} presented key ${publicKey ? keyFingerprint(publicKey) : '(not Ed25519)'}, not the pinned ${pin}; nothing was sent`);
    }
    // Tickets arrive after the handshake; keep the newest for the next connection.
    socket.on('session', (s: Buffer) => {
      session = s;
      sessionKey = publicKey;
    });
    return { socket, publicKey };
  }

  return {
    async post(path, body) {
      const { socket, publicKey } = await connect();
      const payload = Buffer.from(body, 'utf8');
      const req = http.request({
        method: 'POST',
        host,
        path,
        headers: { 'content-type': 'application/json', 'content-length': payload.length, connection: 'close' },
        createConnection: () => socket,
      });
      const responded = once(req, 'response') as Promise<[http.IncomingMessage]>;
      req.end(payload);
      try {
        const [res] = await responded;
        const parts: Buffer[] = [];
        let size = 0;
        for await (const chunk of res) {
          size += (chunk as Buffer).length;
          if (size > MAX_RESPONSE_BYTES) {
            res.destroy();
            throw new PhantomaError(ERRORS.LEASE_INVALID, `the control plane's answer exceeds ${MAX_RESPONSE_BYTES} bytes`);
          }
          parts.push(chunk as Buffer);
        }
        return { status: res.statusCode ?? 0, body: Buffer.concat(parts).toString('utf8'), publicKey };
      } catch (err) {
        if (err instanceof PhantomaError) throw err;
        throw unreachable(u, err);
      } finally {
        socket.destroy();
      }
    },
  };
}
