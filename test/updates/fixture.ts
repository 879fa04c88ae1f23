// Shared pieces of the update tests: maintainer/root/online keys, a tiny release tree with a trial app
// (bin/start.mjs: serves its version on TRIAL_PORT and marks its trial good — or crashes, or hangs), the
// real control plane on loopback serving a TUF repository, and a digest of a slot to prove a refusal
// changed nothing.
import { createHash } from 'node:crypto';
import { cpSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createGzip } from 'node:zlib';
import { createReadStream, createWriteStream } from 'node:fs';
import { createGunzip } from 'node:zlib';
import { pipeline } from 'node:stream/promises';
import { Metadata, MetadataKind, Snapshot } from '@tufjs/models';
import { generateKey, tufSigner, type PrivateKeyFile } from '../../src/updates/keys.ts';
import { buildRelease } from '../../src/release/build.ts';
import { readMeta, signTimestamp, SPEC_VERSION } from '../../src/release/repo.ts';
import { readTar, tarStream, type TarEntry } from '../../src/updates/tar.ts';
import type { UpdateTrust } from '../../src/updates/verify.ts';
import { startCpRig, type CpRig } from '../control-plane/rig.ts';

export interface Keys {
  root: PrivateKeyFile;
  m: PrivateKeyFile[];
  snapshot: PrivateKeyFile;
  timestamp: PrivateKeyFile;
}

export function makeKeys(): Keys {
  return { root: generateKey('root'), m: [generateKey('alice'), generateKey('bob'), generateKey('carol'), generateKey('dave')], snapshot: generateKey('snapshot'), timestamp: generateKey('timestamp') };
}

export type Behaviour = 'ok' | 'crash' | 'hang';

const START = `import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
const dir = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const info = JSON.parse(fs.readFileSync(path.join(dir, 'lib', 'release.json'), 'utf8'));
if (info.behaviour === 'crash') process.exit(3);
const server = http.createServer((req, res) => res.end(JSON.stringify({ version: info.version })));
server.listen(Number(process.env.TRIAL_PORT), '127.0.0.1', () => {
  if (info.behaviour === 'ok') {
    const p = path.join(process.env.PHANTOMA_UPDATE_ROOT, 'trial-ok');
    fs.writeFileSync(p + '.tmp', JSON.stringify({ slot: process.env.PHANTOMA_SLOT, version: info.version }));
    fs.renameSync(p + '.tmp', p);
  }
});
process.on('SIGTERM', () => { server.close(); process.exit(0); });
`;

/** A small release tree: package.json, bin/start.mjs (executable), lib/ files and a symlink. */
export function makeTree(dir: string, version: string, behaviour: Behaviour = 'ok'): string {
  mkdirSync(join(dir, 'bin'), { recursive: true });
  mkdirSync(join(dir, 'lib', 'deep', 'er'), { recursive: true });
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'phantoma', version }) + '\n');
  writeFileSync(join(dir, 'bin', 'start.mjs'), START, { mode: 0o755 });
  writeFileSync(join(dir, 'lib', 'release.json'), JSON.stringify({ version, behaviour }) + '\n');
  writeFileSync(join(dir, 'lib', 'payload.bin'), Buffer.alloc(20_000, version));
  writeFileSync(join(dir, 'lib', 'deep', 'er', `${'a-rather-long-file-name-'.repeat(6)}.txt`), 'long path\n');
  if (!existsSync(join(dir, 'lib', 'link.json'))) symlinkSync('release.json', join(dir, 'lib', 'link.json'));
  return dir;
}

export const TREE_PATHS = ['package.json', 'bin', 'lib'];

export async function makeRelease(work: string, version: string, behaviour: Behaviour = 'ok'): Promise<string> {
  const tree = makeTree(mkdtempSync(join(work, `tree-${version}-`)), version, behaviour);
  const out = join(work, `phantoma-${version}.tar.gz`);
  await buildRelease({ root: tree, out, version, paths: TREE_PATHS, commit: null });
  return out;
}

/** The same release with one file's bytes changed after the manifest was made (same size). */
export async function tamperedRelease(good: string, out: string, victim = 'lib/payload.bin'): Promise<void> {
  const entries: TarEntry[] = [];
  for await (const e of readTar(createReadStream(good).pipe(createGunzip()) as AsyncIterable<Buffer>, { maxEntryBytes: 1 << 26, maxEntries: 1000 })) {
    if (e.type === 'symlink') {
      entries.push({ type: 'symlink', path: e.path, target: e.target });
      continue;
    }
    const parts: Buffer[] = [];
    for await (const c of e.body) parts.push(c);
    const data = Buffer.concat(parts);
    if (e.path === victim) data[0] = data[0]! ^ 0xff;
    entries.push({ type: 'file', path: e.path, mode: e.mode, size: data.length, data: () => [data] });
  }
  await pipeline(tarStream(entries), createGzip(), createWriteStream(out));
}

/** A control plane on loopback serving `repoDir` under /v1/updates/. */
export async function startRepoCp(repoDir: string): Promise<CpRig> {
  return startCpRig({ overrides: { updates: { repoDir } } });
}

export function nodeTrust(repoDir: string, rig: CpRig): UpdateTrust {
  const metadataDir = mkdtempSync(join(tmpdir(), 'phantoma-tufnode-'));
  cpSync(join(repoDir, 'metadata', '1.root.json'), join(metadataDir, 'root.json'));
  return { metadataDir, repository: { url: `${rig.cp.url}/v1/updates/`, fetcher: { pin: rig.cp.fingerprint } } };
}

/** sha256 over a directory tree: every path, kind, mode, link target and file content, in order. */
export function treeDigest(dir: string): string {
  const h = createHash('sha256');
  const walk = (rel: string): void => {
    const abs = rel ? join(dir, rel) : dir;
    const st = lstatSync(abs);
    if (st.isSymbolicLink()) h.update(`L ${rel} ${readlinkSync(abs)}\n`);
    else if (st.isFile()) h.update(`F ${rel} ${st.mode & 0o777} `).update(readFileSync(abs)).update('\n');
    else if (st.isDirectory()) {
      h.update(`D ${rel}\n`);
      for (const n of readdirSync(abs).sort()) walk(rel ? `${rel}/${n}` : n);
    }
  };
  walk('');
  return h.digest('hex');
}

/**
 * What a compromised control plane (holding the online snapshot and timestamp keys) can do: publish the
 * staged targets whatever their signatures, with a fresh snapshot and timestamp.
 */
export function forcePublish(dir: string, keys: Keys): void {
  const staged = JSON.parse(readFileSync(join(dir, 'staged', 'targets.json'), 'utf8')) as { signed: { version: number } };
  writeFileSync(join(dir, 'metadata', 'targets.json'), JSON.stringify(staged, null, 1));
  const prev = readMeta(dir, MetadataKind.Snapshot).signed;
  const snap = new Snapshot({ version: prev.version + 1, specVersion: SPEC_VERSION, expires: new Date(Date.now() + 86_400_000).toISOString().replace(/\.\d+Z$/, 'Z'), meta: { 'targets.json': new (prev.meta['targets.json']!.constructor as typeof import('@tufjs/models').MetaFile)({ version: staged.signed.version }) } });
  const md = new Metadata(snap);
  md.sign(tufSigner(keys.snapshot), false);
  writeFileSync(join(dir, 'metadata', 'snapshot.json'), JSON.stringify(md.toJSON(), null, 1));
  signTimestamp({ dir, key: keys.timestamp });
}
