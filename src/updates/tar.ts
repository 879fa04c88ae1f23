// A deterministic tar writer and a strict, streaming tar reader — only what a release needs: regular files
// and symbolic links (directories are implied by paths), ustar headers with pax records for long names.
// Written here rather than taken from a package so that what is normalised is explicit: every entry has
// mtime 0, uid/gid 0, empty user/group names, mode 0644 or 0755 (only the owner-exec bit survives),
// and entries come in the order the caller gives (the release builder sorts by path).
import { Readable } from 'node:stream';

const BLOCK = 512;
/** Longest path or link target accepted (pax records allow more; nothing we ship needs it). */
export const MAX_PATH_BYTES = 1024;

export type TarEntry =
  | { type: 'file'; path: string; mode: number; size: number; data: () => AsyncIterable<Buffer> | Iterable<Buffer> }
  | { type: 'symlink'; path: string; target: string };

function octal(n: number, width: number): string {
  return n.toString(8).padStart(width - 1, '0') + '\0';
}

function header(name: string, prefix: string, type: string, size: number, mode: number, linkname: string): Buffer {
  const h = Buffer.alloc(BLOCK);
  h.write(name, 0, 100, 'utf8');
  h.write(octal(mode, 8), 100, 8, 'ascii');
  h.write(octal(0, 8), 108, 8, 'ascii');
  h.write(octal(0, 8), 116, 8, 'ascii');
  h.write(octal(size, 12), 124, 12, 'ascii');
  h.write(octal(0, 12), 136, 12, 'ascii');
  h.write('        ', 148, 8, 'ascii');
  h.write(type, 156, 1, 'ascii');
  h.write(linkname, 157, 100, 'utf8');
  h.write('ustar\0', 257, 6, 'ascii');
  h.write('00', 263, 2, 'ascii');
  h.write(prefix, 345, 155, 'utf8');
  let sum = 0;
  for (const b of h) sum += b;
  h.write(octal(sum, 7) + ' ', 148, 8, 'ascii');
  return h;
}

function padding(size: number): Buffer {
  const r = size % BLOCK;
  return Buffer.alloc(r ? BLOCK - r : 0);
}

function paxRecord(key: string, value: string): Buffer {
  const body = ` ${key}=${value}\n`;
  let len = Buffer.byteLength(body) + 1;
  while (String(len).length + Buffer.byteLength(body) !== len) len = String(len).length + Buffer.byteLength(body);
  return Buffer.from(`${len}${body}`, 'utf8');
}

/** Splits a path into ustar's prefix/name, or returns undefined when a pax record is needed. */
function ustarSplit(path: string): { prefix: string; name: string } | undefined {
  if (Buffer.byteLength(path) <= 100) return { prefix: '', name: path };
  for (let i = path.indexOf('/'); i !== -1; i = path.indexOf('/', i + 1)) {
    const prefix = path.slice(0, i);
    const name = path.slice(i + 1);
    if (Buffer.byteLength(prefix) <= 155 && Buffer.byteLength(name) <= 100 && name.length) return { prefix, name };
  }
  return undefined;
}

function* entryHeaders(path: string, type: string, size: number, mode: number, target: string): Generator<Buffer> {
  const split = ustarSplit(path);
  const longLink = Buffer.byteLength(target) > 100;
  if (!split || longLink) {
    const records = Buffer.concat([...(split ? [] : [paxRecord('path', path)]), ...(longLink ? [paxRecord('linkpath', target)] : [])]);
    yield header('PaxHeader', '', 'x', records.length, 0o644, '');
    yield records;
    yield padding(records.length);
  }
  const s = split ?? { prefix: '', name: path.slice(-100).replace(/^[^/]*\//, '') };
  yield header(s.name, s.prefix, type, size, mode, longLink ? '' : target);
}

/** The tar stream of these entries, in this order, normalised as described above. */
export function tarStream(entries: Iterable<TarEntry>): Readable {
  async function* gen(): AsyncGenerator<Buffer> {
    for (const e of entries) {
      if (e.type === 'symlink') {
        yield* entryHeaders(e.path, '2', 0, 0o777, e.target);
        continue;
      }
      yield* entryHeaders(e.path, '0', e.size, e.mode & 0o100 ? 0o755 : 0o644, '');
      let n = 0;
      for await (const chunk of e.data()) {
        n += chunk.length;
        if (n > e.size) throw new Error(`${e.path} grew while it was being packed`);
        yield chunk;
      }
      if (n !== e.size) throw new Error(`${e.path} changed size while it was being packed`);
      yield padding(e.size);
    }
    yield Buffer.alloc(BLOCK * 2);
  }
  return Readable.from(gen(), { objectMode: false });
}

export type TarReadEntry =
  | { type: 'file'; path: string; mode: number; size: number; body: AsyncIterable<Buffer> }
  | { type: 'symlink'; path: string; target: string };

/** Pulls exact byte counts from a stream of chunks. */
class ByteReader {
  private buf: Buffer = Buffer.alloc(0);
  private readonly it: AsyncIterator<Buffer>;
  constructor(source: AsyncIterable<Buffer>) {
    this.it = source[Symbol.asyncIterator]();
  }
  private async fill(n: number): Promise<boolean> {
    while (this.buf.length < n) {
      const { value, done } = await this.it.next();
      if (done) return false;
      this.buf = this.buf.length ? Buffer.concat([this.buf, value]) : value;
    }
    return true;
  }
  async read(n: number): Promise<Buffer> {
    if (!(await this.fill(n))) throw new TarError('the archive is truncated');
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  async *take(n: number): AsyncGenerator<Buffer> {
    let left = n;
    while (left > 0) {
      if (!this.buf.length && !(await this.fill(1))) throw new TarError('the archive is truncated');
      const part = this.buf.subarray(0, Math.min(left, this.buf.length));
      this.buf = this.buf.subarray(part.length);
      left -= part.length;
      yield part;
    }
  }
}

export class TarError extends Error {}

function field(h: Buffer, off: number, len: number): string {
  const s = h.subarray(off, off + len);
  const z = s.indexOf(0);
  return (z === -1 ? s : s.subarray(0, z)).toString('utf8');
}

function num(h: Buffer, off: number, len: number): number {
  const s = field(h, off, len).trim();
  if (!/^[0-7]{1,12}$/.test(s)) throw new TarError('a header number is not octal');
  return parseInt(s, 8);
}

function parsePax(data: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let i = 0;
  while (i < data.length) {
    const sp = data.indexOf(0x20, i);
    if (sp === -1) throw new TarError('a pax record is malformed');
    const len = Number(data.subarray(i, sp).toString('ascii'));
    if (!Number.isSafeInteger(len) || len <= sp - i || i + len > data.length) throw new TarError('a pax record is malformed');
    const rec = data.subarray(sp + 1, i + len - 1).toString('utf8');
    const eq = rec.indexOf('=');
    if (eq === -1) throw new TarError('a pax record is malformed');
    out[rec.slice(0, eq)] = rec.slice(eq + 1);
    i += len;
  }
  return out;
}

/**
 * Reads entries one at a time; the caller must consume each file's body before asking for the next.
 * Refuses anything but files, symlinks and pax path records, and bounds every size it is told.
 */
export async function* readTar(source: AsyncIterable<Buffer>, limits: { maxEntryBytes: number; maxEntries: number }): AsyncGenerator<TarReadEntry> {
  const r = new ByteReader(source);
  let pax: Record<string, string> = {};
  let count = 0;
  for (;;) {
    const h = await r.read(BLOCK);
    if (h.every((b) => b === 0)) return;
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i]!;
    if (num(h, 148, 8) !== sum) throw new TarError('a header checksum does not match');
    if (++count > limits.maxEntries * 2 + 2) throw new TarError('the archive has more entries than its manifest');
    const type = String.fromCharCode(h[156]!);
    const size = num(h, 124, 12);
    if (size > limits.maxEntryBytes) throw new TarError('an entry is larger than any the manifest allows');
    const prefix = field(h, 345, 155);
    const path = pax.path ?? (prefix ? `${prefix}/${field(h, 0, 100)}` : field(h, 0, 100));
    const linkname = pax.linkpath ?? field(h, 157, 100);
    if (type === 'x') {
      if (size > 64 * 1024) throw new TarError('a pax header is too large');
      const data = await r.read(size);
      await r.read(padding(size).length);
      pax = parsePax(data);
      continue;
    }
    pax = {};
    if (Buffer.byteLength(path) > MAX_PATH_BYTES || Buffer.byteLength(linkname) > MAX_PATH_BYTES) throw new TarError('a path is too long');
    if (type === '0' || type === '\0') {
      const body = r.take(size);
      let consumed = false;
      yield {
        type: 'file',
        path,
        mode: num(h, 100, 8),
        size,
        body: {
          [Symbol.asyncIterator]: () => {
            consumed = true;
            return body;
          },
        },
      };
      if (!consumed) for await (const _ of body) void _;
      await r.read(padding(size).length);
    } else if (type === '2') {
      if (size !== 0) throw new TarError('a symlink entry has data');
      yield { type: 'symlink', path, target: linkname };
    } else {
      throw new TarError(`entry type ${JSON.stringify(type)} is not allowed in a release`);
    }
  }
}
