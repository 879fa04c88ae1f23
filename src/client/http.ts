// A small HTTP(S) client for the node's API with certificate pinning: with a pin, the TLS connection is
// made and its certificate's SHA-256 fingerprint checked BEFORE any byte of the request is written, so a
// wrong node never sees the API key or the prompt. Without a pin, the system's CAs verify as usual.
import http from 'node:http';
import https from 'node:https';
import tls from 'node:tls';
import { once } from 'node:events';
import type { Socket } from 'node:net';
import { PhantomaError, ERRORS } from '../errors.ts';

export interface NodeEndpoint {
  url: string;
  /** SHA-256 fingerprint of the node's certificate, colon-separated hex (any case, colons optional). */
  pin?: string;
  apiKey?: string;
}

export function normaliseFingerprint(fp: string): string {
  const hex = fp.replace(/[^0-9a-fA-F]/g, '').toUpperCase();
  return hex.match(/.{2}/g)?.join(':') ?? '';
}

/**
 * The certificate fingerprint a TLS server presents, read without trusting it. For the sealed API, whose
 * trust comes from the pinned identity key: the key document signed by it names the certificate, and the
 * client then pins that (src/client/sealed.ts).
 */
export async function presentedFingerprint(url: string): Promise<string> {
  const u = new URL(url);
  const socket = tls.connect({ host: u.hostname.replace(/^\[|\]$/g, ''), port: Number(u.port || 443), servername: /^[\d.]+$|:/.test(u.hostname) ? undefined : u.hostname, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] });
  try {
    await once(socket, 'secureConnect');
    return normaliseFingerprint(socket.getPeerCertificate().fingerprint256 ?? '');
  } catch (err) {
    throw new PhantomaError(ERRORS.NODE_UNREACHABLE, `cannot reach ${u.host}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  } finally {
    socket.destroy();
  }
}

async function connectPinned(u: URL, pin: string): Promise<tls.TLSSocket> {
  const socket = tls.connect({ host: u.hostname.replace(/^\[|\]$/g, ''), port: Number(u.port || 443), servername: /^[\d.]+$|:/.test(u.hostname) ? undefined : u.hostname, rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] });
  try {
    await once(socket, 'secureConnect');
  } catch (err) {
    throw new PhantomaError(ERRORS.NODE_UNREACHABLE, `cannot reach ${u.host}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const seen = socket.getPeerCertificate().fingerprint256;
  if (normaliseFingerprint(seen ?? '') !== normaliseFingerprint(pin)) {
    socket.destroy();
    throw new PhantomaError(ERRORS.TLS_PIN_MISMATCH, `the node at ${u.host} presented certificate ${seen}, not the pinned ${normaliseFingerprint(pin)}; nothing was sent`);
  }
  return socket;
}

export interface ApiResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: http.IncomingMessage;
}

/**
 * A body sent as it is (a sealed envelope), not as JSON. Its bytes may be made late: given `length`, the
 * request's headers go out first and `bytes()` runs while they travel, so the node reads and routes the
 * request while the client is still sealing its body (the two are different machines, or processes).
 */
export type RawBody = { bytes: Uint8Array; contentType: string } | { bytes: () => Uint8Array; length: number; contentType: string };

export async function request(endpoint: NodeEndpoint, method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<ApiResponse> {
  const u = new URL(path, endpoint.url);
  const raw = body instanceof Object && 'bytes' in body && 'contentType' in body ? (body as RawBody) : undefined;
  const late = raw && typeof raw.bytes === 'function' ? (raw as Extract<RawBody, { length: number }>) : undefined;
  const payload = body === undefined || late ? undefined : raw ? Buffer.from(raw.bytes as Uint8Array) : Buffer.from(JSON.stringify(body));
  const length = late ? late.length : payload?.length;
  const headers: http.OutgoingHttpHeaders = {
    accept: 'application/json, text/event-stream',
    ...(length !== undefined ? { 'content-type': raw ? raw.contentType : 'application/json', 'content-length': length } : {}),
    ...(endpoint.apiKey ? { authorization: `Bearer ${endpoint.apiKey}` } : {}),
  };
  const opts: http.RequestOptions = { method, path: u.pathname + u.search, headers, ...(signal ? { signal } : {}) };
  let req: http.ClientRequest;
  if (u.protocol === 'https:' && endpoint.pin) {
    const socket = await connectPinned(u, endpoint.pin);
    req = http.request({ ...opts, host: u.hostname, port: u.port, createConnection: () => socket });
  } else if (u.protocol === 'https:') {
    req = https.request({ ...opts, host: u.hostname.replace(/^\[|\]$/g, ''), port: u.port });
  } else {
    req = http.request({ ...opts, host: u.hostname.replace(/^\[|\]$/g, ''), port: u.port });
  }
  const responded = once(req, 'response') as Promise<[http.IncomingMessage]>;
  // A failed request rejects `responded` with nobody listening yet while a late body is made.
  let failed = false;
  responded.catch(() => void (failed = true));
  if (!late) {
    req.end(payload);
  } else {
    req.flushHeaders();
    // Once connected (a reused keep-alive socket is), one turn of the event loop writes the headers; then
    // the body is made. A connection that fails ends the wait too, and no body is made (the error is
    // reported below).
    await Promise.race([connected(req).then(() => new Promise((res) => setImmediate(res)), () => undefined), responded.then(() => undefined, () => undefined)]);
    if (!failed) {
      let bytes: Buffer;
      try {
        bytes = Buffer.from(late.bytes());
        if (bytes.length !== late.length) throw new PhantomaError(ERRORS.INTERNAL, `the body is ${bytes.length} bytes, not the ${late.length} its headers announced`);
      } catch (err) {
        // The node sees a request whose body never completes, and refuses it: nothing reaches a worker.
        req.destroy();
        throw err;
      }
      req.end(bytes);
    }
  }
  try {
    const [res] = await responded;
    return { status: res.statusCode ?? 0, headers: res.headers, body: res };
  } catch (err) {
    if (signal?.aborted) throw err;
    throw new PhantomaError(ERRORS.NODE_UNREACHABLE, `cannot reach ${u.host}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** Resolves once the request has a connected socket (a new connection's TCP connect, or a reused one). */
async function connected(req: http.ClientRequest): Promise<void> {
  const socket = req.socket ?? ((await once(req, 'socket')) as [Socket])[0];
  if (socket.connecting) await once(socket, 'connect');
}

export async function readAll(res: http.IncomingMessage): Promise<string> {
  const parts: Buffer[] = [];
  for await (const c of res) parts.push(c as Buffer);
  return Buffer.concat(parts).toString('utf8');
}

/** Yields each SSE `data:` payload until `[DONE]` or the end of the stream. */
export async function* sseData(res: http.IncomingMessage): AsyncGenerator<string> {
  let buffered = '';
  for await (const chunk of res) {
    buffered += (chunk as Buffer).toString('utf8');
    for (let i = buffered.indexOf('\n\n'); i !== -1; i = buffered.indexOf('\n\n')) {
      const event = buffered.slice(0, i);
      buffered = buffered.slice(i + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (data === '[DONE]') return;
      if (data !== '') yield data;
    }
  }
}
