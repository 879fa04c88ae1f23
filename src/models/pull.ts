// `phantoma model pull URL --sha256 HEX` (issue 10). The bytes are fetched by the download helper that
// the warden runs in <NAME>/download/ (DOWNLOAD request; src/models/download-helper.ts), so the only
// network path is the download cgroup's allowlist, filled by a maintenance window. This side (the gateway's
// uid, outside any worker cgroup) stores them in `<modelDir>/.partial/<sha256>.part`, resumes with an
// HTTP Range after a short body (bounded attempts), watches for stalls, then verifies the SHA-256 and that
// the file is a GGUF our validating reader accepts, and only then renames it into the model directory
// (atomic) and writes its manifest. Every refusal removes the partial file; nothing reaches the directory.
import { connect, type Socket } from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, createReadStream, existsSync, ftruncateSync, mkdirSync, openSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { ERRORS, ModelError, PhantomaError } from '../errors.ts';
import { encodeRequest } from '../ephemeral/warden-client.ts';
import { fsyncDir } from '../util/atomic-file.ts';
import { readGgufSummary } from './gguf-reader.ts';
import { describeGguf, fileBytes, isServed, MODEL_NAME_RE, modelFile, readManifest, writeManifest, type ModelManifest } from './store.ts';
import { closeWindow, readWindow, systemResolver, type Resolver } from '../egress/window.ts';
import { createEgressClient } from '../egress/warden-egress.ts';

export interface PullProgress {
  bytes: number;
  total: number | null;
  /** bytes per second over the pull so far (this run) */
  rate: number;
  /** seconds left at that rate, null when unknown */
  eta: number | null;
}

export interface PullOptions {
  url: string;
  sha256: string;
  size?: number;
  name?: string;
  modelDir: string;
  stateDir: string;
  wardenSocket: string;
  stallMs?: number;
  /** Short bodies are resumed with a Range request up to this many attempts in all. */
  maxAttempts?: number;
  resolve?: Resolver;
  onProgress?: (p: PullProgress) => void;
}

export interface PullResult {
  manifest: ModelManifest;
  path: string;
  already: boolean;
  attempts: number;
  resumed: boolean;
}

function nameFromUrl(u: URL): string {
  const base = decodeURIComponent(u.pathname.split('/').filter(Boolean).at(-1) ?? '').replace(/\.gguf$/i, '');
  return base.replace(/[^A-Za-z0-9._:-]/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 64) || 'model';
}

/** The addresses to connect to: the window's pins for this host:port, else the literal / a fresh lookup. */
async function addressesFor(u: URL, port: number, stateDir: string, resolve: Resolver): Promise<string[]> {
  const host = u.hostname.replace(/^\[|\]$/g, '');
  if (isIP(host)) return [host];
  const w = readWindow(stateDir);
  const t = w?.targets.find((x) => x.host.toLowerCase() === host.toLowerCase() && x.port === port);
  if (t) return t.addresses;
  try {
    return await resolve(host);
  } catch (err) {
    throw new PhantomaError(ERRORS.MODEL_PULL_FAILED, `cannot resolve ${host}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

interface Header {
  ok: boolean;
  code?: string;
  errno?: string;
  status?: number;
  start?: number;
  length?: number | null;
  total?: number | null;
}

/** Bound on the helper's start-up and connect, before any body byte (a loaded host starts Node slowly). */
const START_TIMEOUT_MS = 20_000;

type Outcome = { kind: 'complete' } | { kind: 'short' };

/** One run of the helper; appends to fd from `offset`. Resolves on body end; rejects with a coded error. */
function runOnce(o: {
  socketPath: string;
  url: string;
  address: string;
  offset: number;
  stallMs: number;
  fd: number;
  onHeader: (h: Header) => number; // returns the offset the body starts at (after truncating when needed)
  onBytes: (n: number) => void;
  expectedTotal: () => number | null;
}): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const socket: Socket = connect({ path: o.socketPath });
    let phase: 'reply' | 'header' | 'body' = 'reply';
    let buf = Buffer.alloc(0);
    let pos = 0;
    let finished = false;
    let stall: NodeJS.Timeout | undefined;
    const finish = (err?: Error, out?: Outcome): void => {
      if (finished) return;
      finished = true;
      clearTimeout(stall);
      socket.destroy();
      if (err) reject(err);
      else resolve(out!);
    };
    // Until the helper's header arrives (warden spawn, runtime start, connect) the bound is generous; from
    // then on, no byte for stallMs is a stall.
    const arm = (): void => {
      clearTimeout(stall);
      const ms = phase === 'body' ? o.stallMs : Math.max(o.stallMs, START_TIMEOUT_MS);
      stall = setTimeout(() => finish(new PhantomaError(ERRORS.MODEL_PULL_STALLED, `no data from ${o.url} for ${ms} ms`)), ms);
    };
    arm();
    const line = (): string | undefined => {
      const nl = buf.indexOf(0x0a);
      if (nl < 0) {
        if (buf.length > 4096) finish(new PhantomaError(ERRORS.MODEL_PULL_FAILED, 'the download helper sent a malformed header'));
        return undefined;
      }
      const l = buf.subarray(0, nl).toString('utf8');
      buf = buf.subarray(nl + 1);
      return l;
    };
    const body = (chunk: Buffer): void => {
      if (chunk.length === 0) return;
      const total = o.expectedTotal();
      if (total !== null && pos + chunk.length > total) return finish(new PhantomaError(ERRORS.MODEL_SIZE_MISMATCH, `the server sent more than ${total} bytes`));
      let off = 0;
      while (off < chunk.length) off += writeSync(o.fd, chunk, off, chunk.length - off, pos + off);
      pos += chunk.length;
      o.onBytes(chunk.length);
    };
    socket.on('data', (c: Buffer) => {
      arm();
      if (phase === 'body') return body(c);
      buf = Buffer.concat([buf, c]);
      if (phase === 'reply') {
        const l = line();
        if (l === undefined) return;
        const m = /^ERR ([a-z_]+) ?(.*)$/.exec(l);
        if (m) return finish(new PhantomaError(ERRORS.MODEL_PULL_FAILED, `the warden refused the download: ${m[1]} ${m[2]}`, { details: { wardenCode: m[1] } }));
        if (!/^OK \d+$/.test(l)) return finish(new PhantomaError(ERRORS.MODEL_PULL_FAILED, 'unexpected reply from the warden'));
        phase = 'header';
      }
      if (phase === 'header') {
        const l = line();
        if (l === undefined) return;
        let h: Header;
        try {
          h = JSON.parse(l) as Header;
        } catch {
          return finish(new PhantomaError(ERRORS.MODEL_PULL_FAILED, 'the download helper sent a malformed header'));
        }
        if (!h.ok) {
          if (h.code === 'blocked') return finish(new PhantomaError(ERRORS.MODEL_PULL_BLOCKED, `the egress filter refused the connection to ${o.address} (${h.errno}): open a maintenance window that allows it (phantoma egress window open)`, { details: { address: o.address } }));
          return finish(new PhantomaError(ERRORS.MODEL_PULL_FAILED, `download failed: ${h.code}${h.status ? ` HTTP ${h.status}` : ''}${h.errno ? ` ${h.errno}` : ''}`, { details: { reason: h.code ?? 'unknown' } }));
        }
        try {
          pos = o.onHeader(h);
        } catch (err) {
          return finish(err as Error);
        }
        phase = 'body';
        arm();
        const rest = buf;
        buf = Buffer.alloc(0);
        body(rest);
      }
    });
    socket.on('error', (err: NodeJS.ErrnoException) => finish(new PhantomaError(ERRORS.MODEL_PULL_FAILED, `cannot reach the warden at ${o.socketPath}: ${err.code ?? err.message}`)));
    socket.on('close', () => {
      if (phase !== 'body') return finish(new PhantomaError(ERRORS.MODEL_PULL_FAILED, 'the download ended before it started'));
      const total = o.expectedTotal();
      finish(undefined, total !== null && pos === total ? { kind: 'complete' } : { kind: 'short' });
    });
    socket.write(encodeRequest(['DOWNLOAD', randomBytes(8).toString('hex'), o.url, o.address, String(o.offset), String(o.stallMs * 2)])); // the caller's stall timer decides; the helper's is a backstop
  });
}

async function sha256Of(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(path)) h.update(c as Buffer);
  return h.digest('hex');
}

export async function pullModel(o: PullOptions): Promise<PullResult> {
  const sha256 = o.sha256.toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(sha256)) throw new PhantomaError(ERRORS.CLI_USAGE, '--sha256 wants 64 hex digits');
  let u: URL;
  try {
    u = new URL(o.url);
  } catch {
    throw new PhantomaError(ERRORS.CLI_USAGE, 'the URL is not valid');
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new PhantomaError(ERRORS.CLI_USAGE, 'only http and https URLs can be pulled');
  if (o.size !== undefined && (!Number.isSafeInteger(o.size) || o.size <= 0)) throw new PhantomaError(ERRORS.CLI_USAGE, '--size wants a positive number of bytes');
  const name = o.name ?? nameFromUrl(u);
  if (!MODEL_NAME_RE.test(name)) throw new PhantomaError(ERRORS.CLI_USAGE, `"${name.slice(0, 64)}" is not a model name ([A-Za-z0-9][A-Za-z0-9._:-]{0,63})`);
  const dir = o.modelDir;
  const target = modelFile(dir, name);
  const existing = readManifest(dir, name);
  if (existing?.sha256 === sha256 && existsSync(target)) return { manifest: existing, path: target, already: true, attempts: 0, resumed: false };
  if (existsSync(target) && isServed(dir, name)) {
    throw new ModelError(ERRORS.MODEL_IN_USE, `the gateway serves "${name}" with other contents: it is not overwritten (pull under another --name)`, { details: { model: name } });
  }
  // A window past its deadline is closed now, whether or not the gateway's keeper got to it yet.
  const open = readWindow(o.stateDir);
  if (open && open.until <= Date.now()) await closeWindow({ egress: createEgressClient({ socketPath: o.wardenSocket }), stateDir: o.stateDir });
  const port = Number(u.port || (u.protocol === 'https:' ? 443 : 80));
  const addresses = await addressesFor(u, port, o.stateDir, o.resolve ?? systemResolver);
  if (addresses.length === 0) throw new PhantomaError(ERRORS.MODEL_PULL_FAILED, `${u.hostname} has no address`);
  const partialDir = join(dir, '.partial');
  mkdirSync(partialDir, { recursive: true, mode: 0o700 });
  const partial = join(partialDir, `${sha256}.part`);
  const stallMs = o.stallMs ?? 30_000;
  const maxAttempts = o.maxAttempts ?? 4;
  const fd = openSync(partial, existsSync(partial) ? 'r+' : 'w+', 0o600);
  let fdOpen = true;
  const closeFd = (): void => {
    if (fdOpen) closeSync(fd);
    fdOpen = false;
  };
  const started = Date.now();
  let thisRun = 0;
  let bytes = fileBytes(partial);
  const resumedFrom = bytes;
  let total: number | null = null;
  let attempts = 0;
  let complete = false;
  const report = (): void => {
    const secs = (Date.now() - started) / 1000;
    const rate = secs > 0 ? thisRun / secs : 0;
    o.onProgress?.({ bytes, total, rate, eta: total !== null && rate > 0 ? (total - bytes) / rate : null });
  };
  try {
    while (!complete && attempts < maxAttempts) {
      attempts++;
      const address = addresses[(attempts - 1) % addresses.length]!;
      const offset = bytes;
      const out = await runOnce({
        socketPath: o.wardenSocket,
        url: o.url,
        address,
        offset,
        stallMs,
        fd,
        expectedTotal: () => total,
        onHeader: (h) => {
          const start = h.start ?? 0;
          const t = h.total ?? (h.length !== null && h.length !== undefined ? start + h.length : null);
          if (t !== null && o.size !== undefined && t !== o.size) throw new PhantomaError(ERRORS.MODEL_SIZE_MISMATCH, `the server announces ${t} bytes, --size says ${o.size}`);
          if (total !== null && t !== null && t !== total) throw new PhantomaError(ERRORS.MODEL_PULL_FAILED, 'the file changed on the server between attempts');
          total = t ?? o.size ?? null;
          if (start !== offset) {
            // The server ignored the Range: start over.
            if (start !== 0) throw new PhantomaError(ERRORS.MODEL_PULL_FAILED, `asked for bytes from ${offset}, got from ${start}`);
            ftruncateSync(fd, 0);
            bytes = 0;
          }
          report();
          return start;
        },
        onBytes: (n) => {
          bytes += n;
          thisRun += n;
          report();
        },
      });
      complete = out.kind === 'complete';
    }
    closeFd();
    if (!complete) throw new PhantomaError(ERRORS.MODEL_PULL_TRUNCATED, `the download stayed short after ${attempts} attempts (${bytes}${total !== null ? ` of ${total}` : ''} bytes)`);
    const got = await sha256Of(partial);
    if (got !== sha256) throw new ModelError(ERRORS.MODEL_DIGEST_MISMATCH, `the download's sha256 is ${got}, not ${sha256}`, { details: { expected: sha256, actual: got } });
    const summary = readGgufSummary(partial); // throws model_file_invalid
    const d = describeGguf(summary);
    if (existsSync(target) && isServed(dir, name)) throw new ModelError(ERRORS.MODEL_IN_USE, `the gateway serves "${name}": it is not overwritten`, { details: { model: name } });
    renameSync(partial, target);
    fsyncDir(dir);
    const manifest: ModelManifest = { v: 1, name, file: `${name}.gguf`, sha256, bytes: fileBytes(target), source: { kind: 'url', url: o.url }, ...d, addedAt: new Date().toISOString() };
    writeManifest(dir, manifest);
    return { manifest, path: target, already: false, attempts, resumed: resumedFrom > 0 || attempts > 1 };
  } catch (err) {
    closeFd();
    try {
      unlinkSync(partial);
    } catch {
      // gone
    }
    throw err;
  }
}
