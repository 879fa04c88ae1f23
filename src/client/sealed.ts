// The sealed-request SDK (docs/protocol.md): a client that pins only the node's identity fingerprint.
// It fetches the key document, verifies it against that pin, pins the TLS certificate the document names,
// seals each request to a current request key, opens the sealed answer chunk by chunk (order and
// completeness checked), and verifies the receipt.
import { createPublicKey, type KeyObject } from 'node:crypto';
import type http from 'node:http';
import { ERRORS, PhantomaError, definitionOf } from '../errors.ts';
import { verifyKeyDocument, type KeyDocument } from '../vault/signing.ts';
import { ed25519PublicKeyObject } from '../vault/contents.ts';
import { planSealedRequest, type SealedRequest } from '../sealed/request.ts';
import { createKemSpare } from './kem-spare.ts';
import { wipeKemSecrets } from '../sealed/kem.ts';
import { createChunkOpener } from '../sealed/seal.ts';
import { decodeEvent, type SealedEvent } from '../sealed/inner.ts';
import type { TokenLogprob } from '../ephemeral/worker-protocol.ts';
import { verifyReceipt, type Receipt } from '../sealed/receipt.ts';
import { SEALED_CONTENT_TYPE, SEALED_PATH } from '../gateway/sealed-route.ts';
import { KEY_DOCUMENT_PATH } from '../gateway/key-document.ts';
import { normaliseFingerprint, presentedFingerprint, readAll, request, type NodeEndpoint } from './http.ts';

export interface SealedClientOptions {
  url: string;
  /** The node's identity fingerprint (`phantoma keys show`). */
  identityPin: string;
  clientName: string;
  clientKey: KeyObject;
  clock?: () => number;
  /**
   * Make the next request's key agreement while idle (after loading the key document, after each answer),
   * so a request does not wait for it (src/client/kem-spare.ts). Default on; a one-shot caller turns it off.
   */
  prepareAhead?: boolean;
}

export interface SealedAnswer {
  /** The text events in order (streamed as they open, when a callback is given). */
  text: string;
  finishReason: 'stop' | 'length' | 'tool_calls';
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  receipt: Receipt;
  /** The model's tool calls (chat with tools), assembled from their sealed pieces. */
  toolCalls?: Array<{ id: string; name: string; arguments: string }>;
  /** Embeddings bodies (`input`): one vector per input, in order. */
  embeddings?: number[][];
  /** Requests with logprobs: one entry per generated token, in order. */
  logprobs?: TokenLogprob[];
}

export interface SealedClient {
  /** The verified key document (fetched once, refreshed when the node says the key is unknown). */
  keyDocument(): Promise<KeyDocument>;
  /**
   * One sealed request: `body` is an OpenAI chat (`messages`) or completion (`prompt`) body without model
   * and stream. Throws the node's error (opened from the seal, or the gateway's clear refusal) as a
   * PhantomaError with its code; `receipt` is attached to errors raised after a worker started.
   */
  send(model: string, body: Record<string, unknown>, opts?: { stream?: boolean; onText?: (t: string) => void; signal?: AbortSignal }): Promise<SealedAnswer>;
}

export function createSealedClient(opts: SealedClientOptions): SealedClient {
  const clock = opts.clock ?? Date.now;
  const pin = opts.identityPin.toLowerCase();
  let cached: { doc: KeyDocument; endpoint: NodeEndpoint; identity: KeyObject } | undefined;
  const spare = createKemSpare();
  const prepareAhead = opts.prepareAhead ?? true;
  const prepareSoon = (): void => {
    if (!prepareAhead) return;
    setImmediate(() => {
      try {
        if (cached) spare.prepare(currentKey(cached.doc));
      } catch {
        // No request key valid now: the next send reports it.
      }
    }).unref();
  };

  async function load(): Promise<NonNullable<typeof cached>> {
    const u = new URL(opts.url);
    // Over TLS the certificate is not trusted yet: read it, fetch the document pinned to it, then accept it
    // only if the identity-signed document names the same certificate.
    const seen = u.protocol === 'https:' ? await presentedFingerprint(opts.url) : undefined;
    const endpoint: NodeEndpoint = { url: opts.url, ...(seen ? { pin: seen } : {}) };
    const res = await request(endpoint, 'GET', KEY_DOCUMENT_PATH);
    const text = await readAll(res.body);
    if (res.status !== 200) throw new PhantomaError(ERRORS.KEY_DOCUMENT_INVALID, `the node served no key document (HTTP ${res.status})`);
    const doc = verifyKeyDocument(text, pin);
    if (seen && normaliseFingerprint(doc.tlsCertificateSha256) !== seen) {
      throw new PhantomaError(ERRORS.TLS_PIN_MISMATCH, `the node's certificate ${seen} is not the one its key document names (${doc.tlsCertificateSha256}); nothing was sent`);
    }
    cached = { doc, endpoint, identity: ed25519PublicKeyObject(Buffer.from(doc.identityPublicKey, 'base64')) };
    prepareSoon();
    return cached;
  }

  function currentKey(doc: KeyDocument): { keyId: string; publicKeys: { x25519: Uint8Array; mlkem: Uint8Array } } {
    const now = clock();
    const usable = doc.requestKeys.filter((k) => Date.parse(k.notBefore) <= now && now < Date.parse(k.notAfter));
    // The newest key that is valid now.
    const k = usable.sort((a, b) => Date.parse(b.notBefore) - Date.parse(a.notBefore))[0];
    if (!k) throw new PhantomaError(ERRORS.SEALED_UNKNOWN_KEY, 'the key document has no request key valid now');
    return { keyId: k.id, publicKeys: { x25519: Buffer.from(k.x25519, 'base64'), mlkem: Buffer.from(k.mlkem768, 'base64') } };
  }

  async function once(model: string, body: Record<string, unknown>, o: { stream?: boolean; onText?: (t: string) => void; signal?: AbortSignal }): Promise<SealedAnswer> {
    const c = cached ?? (await load());
    const stream = o.stream ?? false;
    const node = currentKey(c.doc);
    const kem = spare.take(node);
    const wipeKem = (): void => wipeKemSecrets(kem);
    let plan: ReturnType<typeof planSealedRequest>;
    try {
      plan = planSealedRequest({ node, clientName: opts.clientName, clientKey: opts.clientKey, model, stream, body, nowMs: clock(), kem });
    } catch (err) {
      wipeKem();
      throw err;
    }
    // The headers go out first; the body is sealed while they travel (src/client/http.ts).
    let made: SealedRequest | undefined;
    const seal = (): Uint8Array => {
      try {
        made = plan.seal();
        return made.envelope;
      } finally {
        wipeKem();
      }
    };
    let res: Awaited<ReturnType<typeof request>>;
    try {
      res = await request(c.endpoint, 'POST', SEALED_PATH, { bytes: seal, length: plan.length, contentType: SEALED_CONTENT_TYPE }, o.signal);
    } finally {
      wipeKem(); // also when no byte of the body was made (the node was not reachable)
    }
    const sealed = made!;
    const opener = createChunkOpener(sealed.keys.responseKey);
    const answer: { text: string[]; end?: SealedEvent; receipt?: Receipt; clearError?: PhantomaError } = { text: [] };
    const calls: Array<{ id: string; name: string; arguments: string }> = [];
    const vectors: Float32Array[] = [];
    const logprobs: TokenLogprob[] = [];
    const take = (b64: string): void => {
      const e = decodeEvent(opener.open(Buffer.from(b64, 'base64')));
      if (e.t === 'text') {
        answer.text.push(e.text);
        o.onText?.(e.text);
      } else if (e.t === 'logprobs') {
        logprobs.push(...e.entries);
      } else if (e.t === 'tool_call') {
        const call = (calls[e.index] ??= { id: e.id ?? '', name: e.name ?? '', arguments: '' });
        call.arguments += e.arguments;
      } else if (e.t === 'embedding') {
        const v = (vectors[e.index] ??= new Float32Array(e.length));
        const bytes = Buffer.from(e.b64, 'base64');
        if (v.length !== e.length || e.offset + bytes.length / 4 > v.length) throw new PhantomaError(ERRORS.SEALED_OPEN_FAILED, 'an embedding piece does not fit its vector');
        for (let i = 0; i < bytes.length / 4; i++) v[e.offset + i] = bytes.readFloatLE(i * 4);
      } else answer.end = e;
    };
    const contentType = String(res.headers['content-type'] ?? '');
    if (res.status === 200 && contentType.startsWith('text/event-stream')) {
      for await (const ev of sseEvents(res.body)) {
        if (ev.event === 'chunk') take(ev.data);
        else if (ev.event === 'error') answer.clearError = clearError(ev.data);
        else if (ev.event === 'receipt') answer.receipt = verifyReceipt(JSON.parse(ev.data), c.identity, sealed.envelope);
      }
    } else {
      const parsed = JSON.parse(await readAll(res.body)) as { chunks?: string[]; receipt?: unknown; error?: { code?: string; message?: string } };
      if (res.status !== 200) {
        const err = clearError(JSON.stringify(parsed));
        if (parsed.receipt) (err as PhantomaError & { receipt?: Receipt }).receipt = verifyReceipt(parsed.receipt, c.identity, sealed.envelope);
        throw err;
      }
      for (const ch of parsed.chunks ?? []) take(ch);
      answer.receipt = verifyReceipt(parsed.receipt, c.identity, sealed.envelope);
    }
    if (answer.clearError) throw Object.assign(answer.clearError, answer.receipt ? { receipt: answer.receipt } : {});
    if (!answer.receipt) throw new PhantomaError(ERRORS.RECEIPT_INVALID, 'the answer ended without a receipt');
    if (!opener.finished || !answer.end) throw new PhantomaError(ERRORS.SEALED_OPEN_FAILED, 'the sealed answer was truncated (no final chunk)');
    if (answer.end.t === 'error') {
      throw Object.assign(new PhantomaError(definitionOf(answer.end.code, ERRORS.INTERNAL), answer.end.message), { receipt: answer.receipt });
    }
    if (answer.end.t !== 'done') throw new PhantomaError(ERRORS.SEALED_OPEN_FAILED, 'the final chunk is not an end event');
    return {
      text: answer.text.join(''),
      finishReason: answer.end.finish_reason,
      usage: answer.end.usage,
      receipt: answer.receipt,
      ...(calls.length > 0 ? { toolCalls: calls } : {}),
      ...(vectors.length > 0 ? { embeddings: vectors.map((v) => [...v]) } : {}),
      ...(logprobs.length > 0 ? { logprobs } : {}),
    };
  }

  return {
    keyDocument: async () => (cached ?? (await load())).doc,
    async send(model, body, o = {}) {
      try {
        return await once(model, body, o);
      } catch (err) {
        // A rotated key: fetch the document again and retry once with the new key.
        if (err instanceof PhantomaError && err.code === ERRORS.SEALED_UNKNOWN_KEY.code && cached) {
          cached = undefined;
          return await once(model, body, o);
        }
        throw err;
      } finally {
        prepareSoon();
      }
    },
  };
}

function clearError(json: string): PhantomaError {
  try {
    const e = (JSON.parse(json) as { error?: { code?: string; message?: string } }).error;
    return new PhantomaError(definitionOf(e?.code, ERRORS.INTERNAL), e?.message ?? 'the node refused the request');
  } catch {
    return new PhantomaError(ERRORS.INTERNAL, 'the node answered with an unreadable error');
  }
}

/** Named Server-Sent Events (`event:` + `data:`), bounded per event. */
async function* sseEvents(res: http.IncomingMessage): AsyncGenerator<{ event: string; data: string }> {
  let buffered = '';
  for await (const chunk of res) {
    buffered += (chunk as Buffer).toString('utf8');
    if (buffered.length > 1 << 20) throw new PhantomaError(ERRORS.SEALED_OPEN_FAILED, 'an event larger than 1 MiB');
    for (let i = buffered.indexOf('\n\n'); i !== -1; i = buffered.indexOf('\n\n')) {
      const lines = buffered.slice(0, i).split('\n');
      buffered = buffered.slice(i + 2);
      const event = lines.find((l) => l.startsWith('event:'))?.slice(6).trim() ?? 'message';
      const data = lines.filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      yield { event, data };
    }
  }
}

/** A client key from its PEM (PKCS#8 Ed25519) — what `phantoma clients add` registers the public half of. */
export function clientPublicKeyOf(key: KeyObject): KeyObject {
  return createPublicKey(key);
}
