// The release manifest: the first entry of every release tarball, listing each file's path, mode, size
// and sha256 and each symlink's target. Installing checks every entry against it (and refuses an entry
// it does not list), so a slot holds exactly what was built and signed. Pure parsing and checks.
import { isVersion } from './version.ts';

export const MANIFEST_NAME = 'manifest.json';
export const MANIFEST_FORMAT = 'phantoma-release/1';
export const MAX_MANIFEST_BYTES = 64 * 1024 * 1024;

export interface ManifestFile {
  path: string;
  mode: number;
  size: number;
  sha256: string;
}
export interface ManifestLink {
  path: string;
  target: string;
}
export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  name: string;
  version: string;
  commit?: string;
  files: ManifestFile[];
  symlinks: ManifestLink[];
}

/** A relative path with no empty, `.` or `..` component and nothing outside printable ASCII-ish names. */
export function isSafeRelativePath(p: string): boolean {
  if (!p || p.length > 1024 || p.startsWith('/') || p.includes('\0') || p.includes('\\')) return false;
  return p.split('/').every((c) => c !== '' && c !== '.' && c !== '..');
}

/** A symlink target that stays inside the slot when resolved from the link's directory. */
export function isContainedLink(linkPath: string, target: string): boolean {
  if (!target || target.startsWith('/') || target.includes('\0')) return false;
  const parts = linkPath.split('/').slice(0, -1);
  for (const c of target.split('/')) {
    if (c === '' || c === '.') continue;
    if (c === '..') {
      if (!parts.length) return false;
      parts.pop();
    } else parts.push(c);
  }
  return true;
}

export function parseManifest(bytes: Buffer): Manifest {
  const bad = (why: string): Error => new Error(`the manifest is invalid: ${why}`);
  let v: Manifest;
  try {
    v = JSON.parse(bytes.toString('utf8')) as Manifest;
  } catch {
    throw bad('not JSON');
  }
  if (v?.format !== MANIFEST_FORMAT) throw bad('unknown format');
  if (typeof v.name !== 'string' || !/^[a-z0-9-]{1,32}$/.test(v.name)) throw bad('name');
  if (typeof v.version !== 'string' || !isVersion(v.version)) throw bad('version');
  if (!Array.isArray(v.files) || !Array.isArray(v.symlinks)) throw bad('files or symlinks missing');
  const seen = new Set<string>();
  for (const f of v.files) {
    if (!isSafeRelativePath(f?.path) || seen.has(f.path)) throw bad(`file path ${JSON.stringify(f?.path)?.slice(0, 80)}`);
    if (!Number.isSafeInteger(f.size) || f.size < 0) throw bad(`size of ${f.path}`);
    if (f.mode !== 0o644 && f.mode !== 0o755) throw bad(`mode of ${f.path}`);
    if (typeof f.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(f.sha256)) throw bad(`sha256 of ${f.path}`);
    seen.add(f.path);
  }
  for (const l of v.symlinks) {
    if (!isSafeRelativePath(l?.path) || seen.has(l.path)) throw bad(`symlink path ${JSON.stringify(l?.path)?.slice(0, 80)}`);
    if (typeof l.target !== 'string' || !isContainedLink(l.path, l.target)) throw bad(`symlink ${l.path} points outside the release`);
    seen.add(l.path);
  }
  return v;
}
