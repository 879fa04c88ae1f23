// How the node reads a TUF repository: a tuf-js Fetcher over the control plane's pinned HTTPS (the same
// lease-key pin as heartbeats), plain HTTP on loopback (tests), or a directory (file: URL — a repository
// carried to an air-gapped node). tuf-js itself counts the bytes against each file's cap; a missing file is
// a DownloadHTTPError 404, which is how tuf-js learns there is no newer root.
import http from 'node:http';
import tls from 'node:tls';
import { once } from 'node:events';
import { createReadStream } from 'node:fs';
import { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { BaseFetcher } from 'tuf-js';
import { DownloadHTTPError } from 'tuf-js/dist/error.js';
import { keyFingerprint, normalisePin, rawPublicKeyOf } from '../control/protocol.ts';

export interface RepoFetcherOptions {
  /** "sha256:<hex>" of the control plane's lease key; required for https:// URLs. */
  pin?: string;
  timeoutMs?: number;
}

type WebStream = ReadableStream<Uint8Array<ArrayBuffer>>;

function toWeb(r: Readable): WebStream {
  return Readable.toWeb(r) as unknown as WebStream;
}

async function httpGet(u: URL, o: RepoFetcherOptions): Promise<http.IncomingMessage> {
  const timeoutMs = o.timeoutMs ?? 30_000;
  const host = u.hostname.replace(/^\[|\]$/g, '');
  let socket: tls.TLSSocket | undefined;
  if (u.protocol === 'https:') {
    const pin = normalisePin(o.pin ?? '');
    socket = tls.connect({ host, port: Number(u.port || 443), rejectUnauthorized: false, minVersion: 'TLSv1.3', ALPNProtocols: ['http/1.1'] });
    socket.setTimeout(timeoutMs, () => socket!.destroy(Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' })));
    await once(socket, 'secureConnect');
    const key = socket.getPeerX509Certificate()?.publicKey;
    // The certificate is self-signed by design; it is authenticated by its key's pinned fingerprint.
    if (!key || key.asymmetricKeyType !== 'ed25519' || keyFingerprint(rawPublicKeyOf(key)) !== pin) {
      socket.destroy();
      throw new DownloadHTTPError(`the repository at ${u.host} did not present the pinned key`, 495);
    }
  } else if (u.protocol !== 'http:') {
    throw new DownloadHTTPError(`unsupported repository URL scheme ${u.protocol}`, 400);
  }
  const req = http.request({
    method: 'GET',
    host,
    port: Number(u.port || 80),
    path: u.pathname,
    headers: { connection: 'close' },
    timeout: timeoutMs,
    ...(socket ? { createConnection: () => socket } : { agent: false }),
  });
  req.on('timeout', () => req.destroy(Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' })));
  const responded = once(req, 'response') as Promise<[http.IncomingMessage]>;
  req.end();
  const [res] = await responded;
  // Later errors (a timeout mid-body, a reset) reach the reader through the response stream.
  req.removeAllListeners('timeout');
  req.on('error', (err) => res.destroy(err));
  res.setTimeout(timeoutMs, () => res.destroy(Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' })));
  if (res.statusCode !== 200) {
    res.destroy();
    throw new DownloadHTTPError(`${u.pathname}: HTTP ${res.statusCode}`, res.statusCode ?? 0);
  }
  return res;
}

export class RepoFetcher extends BaseFetcher {
  readonly options: RepoFetcherOptions;
  constructor(options: RepoFetcherOptions = {}) {
    super();
    this.options = options;
  }
  override async fetch(url: string): Promise<WebStream> {
    const u = new URL(url);
    if (u.protocol === 'file:') {
      const stream = createReadStream(fileURLToPath(u));
      try {
        await once(stream, 'open');
      } catch (err) {
        throw new DownloadHTTPError(`${u.pathname}: ${(err as NodeJS.ErrnoException).code}`, 404);
      }
      return toWeb(stream);
    }
    return toWeb(await httpGet(u, this.options));
  }
}

/** Reads a small file from the repository with a hard cap (bundles); undefined when it is absent. */
export async function fetchSmall(fetcher: RepoFetcher, url: string, maxBytes: number): Promise<Buffer | undefined> {
  try {
    return await fetcher.downloadBytes(url, maxBytes);
  } catch (err) {
    if (err instanceof DownloadHTTPError && err.statusCode === 404) return undefined;
    throw err;
  }
}
