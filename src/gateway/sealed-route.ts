// POST /phantoma/v1/sealed: the sealed API (docs/protocol.md). The gateway checks the envelope's clear
// fields and signature (src/sealed/envelope.ts) and relays the ciphertext to a warm worker; it has no key
// for the body and never parses it. The worker's sealed chunks come back as they are; after the worker's
// end keyd signs a receipt, sent last.
//
//   request:  Content-Type application/vnd.phantoma.sealed-envelope, the envelope bytes
//   stream:   text/event-stream — `event: chunk` (base64 sealed chunk) ..., `event: error` (a clear error
//             after the worker started: timeout, worker failure), then `event: receipt` ({receipt, signature})
//   else:     application/json {chunks: [base64...], receipt: {receipt, signature}} or, when the worker
//             failed, an OpenAI-shaped error with a `receipt` field
// No API key: the client's Ed25519 signature over the envelope is its authentication.
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { ERRORS, PhantomaError, isPhantomaError } from '../errors.ts';
import { checkEnvelope, createNonceCache, type Envelope, type KnownClient, type KnownRequestKey } from '../sealed/envelope.ts';
import { envelopeSha256, receiptPayload, type Receipt, type SignedReceipt } from '../sealed/receipt.ts';
import type { JobEnd, JobResult } from '../ephemeral/pool.ts';
import type { ServedModel } from './app.ts';
import type { AuditEvent } from '../audit/audit-events.ts';
import { errorBody } from './openai.ts';
import { workerTimingFields } from './metrics.ts';
import type { RefreshMoment } from './sealed-registry.ts';

export const SEALED_PATH = '/phantoma/v1/sealed';
export const SEALED_CONTENT_TYPE = 'application/vnd.phantoma.sealed-envelope';

/** A streamed sealed answer's 200 waits at most this long for its first event (a long prompt's evaluation). */
export const SEALED_HEAD_DELAY_MS = 50;

export interface SealedApiDeps {
  maxEnvelopeBytes: number;
  windowMs: number;
  /** Envelopes stamped before this are refused (the replay memory starts empty with the process). */
  processStartMs: number;
  maxRememberedNonces: number;
  /**
   * Brings lookupClient/lookupKey up to date (src/gateway/sealed-registry.ts): before each envelope's
   * checks (waits only for a missing or too old copy), again when they found no such client or key id, and
   * after the response (a background refresh, kept off the request's path).
   */
  refresh?(moment?: RefreshMoment): Promise<void>;
  lookupClient(name: string): KnownClient | undefined;
  lookupKey(keyId: string): KnownRequestKey | undefined;
  /**
   * keyd's `prepare` (src/vault/keyd.ts): keyd does worker `workerId`'s one decapsulation for this envelope
   * and pushes the key onto that worker's own connection; the gateway gets ok or a code, never the key.
   * Without it the worker asks keyd itself after its job arrives (one more serial round trip).
   */
  prepareKey?(workerId: string, env: Envelope): Promise<void>;
  /** keyd's signature (purpose "receipt") over the receipt's canonical JSON. */
  signReceipt(payload: Buffer): Promise<Buffer>;
  egressPolicyHash(): string;
  releaseVersion: string;
}

export function registerSealedRoute(
  app: FastifyInstance,
  deps: SealedApiDeps & {
    modelFor(name: string): ServedModel;
    now(): number;
    requestTimeoutMs: number;
    audit?: (e: AuditEvent) => void;
    observe(model: string, r: JobResult): void;
  },
): void {
  const nonces = createNonceCache({ windowMs: deps.windowMs, maxEntries: deps.maxRememberedNonces });

  app.addContentTypeParser(SEALED_CONTENT_TYPE, (request, payload, done) => {
    if (Number(request.headers['content-length'] ?? 0) > deps.maxEnvelopeBytes) {
      payload.resume();
      return done(new PhantomaError(ERRORS.SEALED_ENVELOPE_TOO_LARGE, `a sealed envelope may have at most ${deps.maxEnvelopeBytes} bytes`), undefined);
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let failed = false;
    payload.on('data', (c: Buffer) => {
      if (failed) return;
      size += c.length;
      if (size > deps.maxEnvelopeBytes) {
        failed = true;
        return done(new PhantomaError(ERRORS.SEALED_ENVELOPE_TOO_LARGE, `a sealed envelope may have at most ${deps.maxEnvelopeBytes} bytes`), undefined);
      }
      chunks.push(c);
    });
    payload.on('error', (err) => {
      if (!failed) done(err, undefined);
      failed = true;
    });
    payload.on('end', () => {
      if (!failed) done(null, Buffer.concat(chunks, size));
    });
  });

  const audit = (e: AuditEvent): void => deps.audit?.(e);

  async function receiptFor(requestId: string, envelope: Buffer, outcome: string, end: JobEnd | undefined): Promise<SignedReceipt> {
    const receipt: Receipt = {
      type: 'phantoma-receipt',
      version: 1,
      envelopeSha256: envelopeSha256(envelope),
      requestId,
      outcome,
      workerEnded: true,
      wipeVerified: end?.verified ?? false,
      wipeMicros: end?.ms === null || end === undefined ? 0 : Math.round(end.ms * 1000),
      egressPolicyHash: deps.egressPolicyHash(),
      releaseVersion: deps.releaseVersion,
      time: new Date(deps.now()).toISOString(),
    };
    const signature = await deps.signReceipt(receiptPayload(receipt));
    return { receipt, signature: signature.toString('base64') };
  }

  app.post(SEALED_PATH, async (request: FastifyRequest, reply: FastifyReply) => {
    const started = deps.now();
    const body = request.body;
    if (!Buffer.isBuffer(body)) throw new PhantomaError(ERRORS.UNSUPPORTED_MEDIA_TYPE, `send the envelope as ${SEALED_CONTENT_TYPE}`);
    // The registry's background refresh waits for this response's end (it competed with the worker's keyd hop).
    reply.raw.once('close', () => void deps.refresh?.('after-request'));
    const check = (): Envelope =>
      checkEnvelope(body, {
        maxEnvelopeBytes: deps.maxEnvelopeBytes,
        lookupClient: deps.lookupClient,
        lookupKey: deps.lookupKey,
        nowMs: deps.now(),
        processStartMs: deps.processStartMs,
        windowMs: deps.windowMs,
        nonces,
      });
    let env: Envelope;
    try {
      await deps.refresh?.('before-request');
      try {
        env = check();
      } catch (err) {
        // A client or key id the copy lacks may be new (a client added, a key rotated): check once more
        // against a fresh copy. Both checks come before the replay check, so the nonce is not yet spent.
        if (!deps.refresh || !isPhantomaError(err) || (err.code !== ERRORS.SEALED_UNKNOWN_CLIENT.code && err.code !== ERRORS.SEALED_UNKNOWN_KEY.code)) throw err;
        await deps.refresh('missing-entry');
        env = check();
      }
    } catch (err) {
      if (isPhantomaError(err)) audit({ type: 'refusal', requestId: request.id, code: err.code, route: SEALED_PATH });
      throw err;
    }
    const served = deps.modelFor(env.model);
    const ac = new AbortController();
    reply.raw.once('close', () => {
      if (!reply.raw.writableFinished) ac.abort();
    });
    const lease = await served.pool.acquire(ac.signal);
    request.logFields = { ...request.logFields, model: served.name, workerId: lease.workerId, sealed: true };
    // keyd decapsulates while the job travels to the worker, instead of after the worker has read it. A
    // refusal needs nothing here: keyd then pushes the worker its code, or, when the worker holds no
    // connection (keyd_worker_not_connected), counted nothing and the worker asks for itself.
    const keydId = lease.keydWorkerId;
    const prepared = deps.prepareKey !== undefined && keydId !== undefined;
    if (prepared) {
      deps.prepareKey!(keydId, env).catch((err: unknown) => {
        const code = isPhantomaError(err) ? err.code : 'keyd_failed';
        const fields = { code, workerId: lease.workerId };
        if (code === ERRORS.KEYD_WORKER_NOT_CONNECTED.code) request.log.debug(fields, 'keyd did not prepare the request key');
        else request.log.warn(fields, 'keyd did not prepare the request key');
      });
    }
    const job = { type: 'job' as const, kind: 'sealed' as const, requestId: request.id, envelope: body.toString('base64'), ...(prepared ? { prepared: true } : {}) };
    let end: JobEnd | undefined;
    const onEnded = (e: JobEnd): void => {
      end = e;
    };
    const served_ = (outcome: string, code?: string): void =>
      audit({ type: 'request_served', requestId: request.id, model: served.name, durationMs: Math.round((deps.now() - started) * 10) / 10, promptTokens: 0, completionTokens: 0, outcome, ...(code ? { code } : {}) });

    if (!env.stream) {
      const chunks: string[] = [];
      try {
        const result = await lease.run(job, { onChunk: () => undefined, onSealed: (d) => chunks.push(d), onEnded, signal: ac.signal, timeoutMs: deps.requestTimeoutMs });
        deps.observe(served.name, result);
        request.logFields = { ...request.logFields, ...workerTimingFields(result) };
        const outcome = result.sealedOutcome ?? 'ok';
        served_(outcome);
        return { chunks, receipt: await receiptFor(request.id, body, outcome, end) };
      } catch (err) {
        const e = isPhantomaError(err) ? err : new PhantomaError(ERRORS.INTERNAL, 'internal error', { cause: err });
        served_(outcomeOf(e), e.code);
        request.logFields = { ...request.logFields, code: e.code };
        const receipt = await receiptFor(request.id, body, outcomeOf(e), end).catch(() => undefined);
        return reply.code(e.status).send({ ...errorBody(e), ...(receipt ? { receipt } : {}) });
      }
    }

    reply.hijack();
    const raw = reply.raw;
    // The 200 goes with the first event, or SEALED_HEAD_DELAY_MS after the job, whichever is first; not
    // before the job. Written at once, it woke the client while keyd and the worker took the job: on a
    // small machine three processes for two cores, on the step that decides when the model starts.
    const writeHead = (): void => {
      if (raw.headersSent || raw.destroyed) return;
      raw.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-request-id': request.id });
    };
    const event = (name: string, data: string): void => {
      writeHead();
      if (!raw.destroyed) raw.write(`event: ${name}\ndata: ${data}\n\n`);
    };
    let outcome = 'ok';
    const headTimer = setTimeout(writeHead, SEALED_HEAD_DELAY_MS);
    try {
      const result = await lease.run(job, { onChunk: () => undefined, onSealed: (d) => event('chunk', d), onEnded, signal: ac.signal, timeoutMs: deps.requestTimeoutMs });
      deps.observe(served.name, result);
      request.logFields = { ...request.logFields, ...workerTimingFields(result) };
      outcome = result.sealedOutcome ?? 'ok';
      served_(outcome);
    } catch (err) {
      const e = isPhantomaError(err) ? err : new PhantomaError(ERRORS.INTERNAL, 'internal error', { cause: err });
      outcome = outcomeOf(e);
      served_(outcome, e.code);
      request.logFields = { ...request.logFields, code: e.code };
      event('error', JSON.stringify(errorBody(e)));
    }
    try {
      if (!raw.destroyed) event('receipt', JSON.stringify(await receiptFor(request.id, body, outcome, end)));
    } catch (err) {
      request.log.error({ code: isPhantomaError(err) ? err.code : 'receipt_failed' }, 'no receipt could be signed');
      event('error', JSON.stringify(errorBody(new PhantomaError(ERRORS.KEYD_UNAVAILABLE, 'the receipt could not be signed'))));
    }
    clearTimeout(headTimer);
    writeHead();
    raw.end();
  });
}

function outcomeOf(e: PhantomaError): string {
  switch (e.code) {
    case ERRORS.REQUEST_TIMEOUT.code:
      return 'timeout';
    case ERRORS.CLIENT_CLOSED.code:
      return 'client_closed';
    case ERRORS.WORKER_OUT_OF_MEMORY.code:
      return 'out_of_memory';
    default:
      return 'worker_failed';
  }
}
