// Authoring a TUF repository for Phantoma releases with @tufjs/models. The maintainers' side only: the
// node verifies with tuf-js (src/updates/verify.ts). Layout of a repository directory (served as static
// files by the control plane, or carried on a disk):
//   metadata/<N>.root.json, root.json, targets.json, snapshot.json, timestamp.json   (published)
//   targets/<name>                       the artifacts (release tarballs, models)
//   targets/<name>.bundles/<keyid>.sigstore.json   one Sigstore bundle per maintainer who signed <name>
//   staged/targets.json                  the next targets metadata, collecting maintainer signatures
// Roles: root (offline keys, threshold), targets (the maintainers' ECDSA P-256 keys, threshold k of n),
// snapshot (the publisher's key), timestamp (online, on the control plane).
import { createHash, createSign } from 'node:crypto';
import { copyFileSync, createReadStream, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { Role } from '@tufjs/models/dist/role.js';
import { Metadata, MetadataKind, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp } from '@tufjs/models';
import { toMessageSignatureBundle, bundleToJSON } from '@sigstore/bundle';
import { PhantomaError, ERRORS } from '../errors.ts';
import { tufKey, tufSigner, type PrivateKeyFile, type PublicKeyFile } from '../updates/keys.ts';

export const SPEC_VERSION = '1.0.31';
const DAY = 86_400_000;
export const DEFAULT_EXPIRY_DAYS = Object.freeze({ root: 365, targets: 90, snapshot: 14, timestamp: 1 });
/** Target names: a flat file name, so a URL path and a file path cannot disagree. */
export const TARGET_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$/;
export const VERSION_RE = /^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.]{1,20})?$/;

export type Clock = () => number;
type Json = Record<string, unknown>;
// @tufjs/models' own JSONObject type, which a parsed file is taken to be (it validates the shape itself).
type JSONObject = Parameters<typeof Root.fromJSON>[0];

function iso(ms: number): string {
  return new Date(Math.floor(ms / 1000) * 1000).toISOString().replace('.000Z', 'Z');
}

function usage(message: string): PhantomaError {
  return new PhantomaError(ERRORS.CLI_USAGE, message);
}

function writeAtomic(path: string, data: string | Buffer): void {
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, data);
  renameSync(tmp, path);
}

function writeMeta(path: string, md: Metadata<Root | Targets | Snapshot | Timestamp>): Buffer {
  const bytes = Buffer.from(JSON.stringify(md.toJSON(), null, 1));
  writeAtomic(path, bytes);
  return bytes;
}

export function readMeta(dir: string, kind: MetadataKind.Root, file?: string): Metadata<Root>;
export function readMeta(dir: string, kind: MetadataKind.Targets, file?: string): Metadata<Targets>;
export function readMeta(dir: string, kind: MetadataKind.Snapshot, file?: string): Metadata<Snapshot>;
export function readMeta(dir: string, kind: MetadataKind.Timestamp, file?: string): Metadata<Timestamp>;
export function readMeta(dir: string, kind: MetadataKind, file?: string): Metadata<Root | Targets | Snapshot | Timestamp> {
  const path = join(dir, 'metadata', file ?? `${kind}.json`);
  if (!existsSync(path)) throw usage(`${path} does not exist (run phantoma-release init-repo / publish first)`);
  return Metadata.fromJSON(kind as MetadataKind.Root, JSON.parse(readFileSync(path, 'utf8')) as JSONObject) as Metadata<Root | Targets | Snapshot | Timestamp>;
}

function sha256File(path: string): Promise<{ sha256: string; length: number }> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    let length = 0;
    createReadStream(path)
      .on('data', (c) => {
        h.update(c as Buffer);
        length += (c as Buffer).length;
      })
      .on('error', reject)
      .on('end', () => resolve({ sha256: h.digest('hex'), length }));
  });
}

export interface InitRepoOptions {
  dir: string;
  rootKeys: PrivateKeyFile[];
  rootThreshold: number;
  maintainers: PublicKeyFile[];
  threshold: number;
  snapshotKey: PublicKeyFile;
  timestampKey: PublicKeyFile;
  clock?: Clock;
}

function buildRoot(version: number, expires: string, o: { rootKeys: PublicKeyFile[]; rootThreshold: number; maintainers: PublicKeyFile[]; threshold: number; snapshotKey: PublicKeyFile; timestampKey: PublicKeyFile }): Root {
  const distinct = (ks: PublicKeyFile[]): number => new Set(ks.map((k) => k.keyid)).size;
  if (distinct(o.maintainers) !== o.maintainers.length) throw usage('a maintainer key is listed twice');
  if (!(o.threshold >= 1 && o.threshold <= o.maintainers.length)) throw usage(`the targets threshold ${o.threshold} must be between 1 and the ${o.maintainers.length} maintainer keys`);
  if (!(o.rootThreshold >= 1 && o.rootThreshold <= distinct(o.rootKeys))) throw usage(`the root threshold ${o.rootThreshold} must be between 1 and the ${o.rootKeys.length} root keys`);
  const root = new Root({ version, specVersion: SPEC_VERSION, expires, consistentSnapshot: false });
  // Root's constructor made empty roles; replace them with ours.
  const roles = root.roles as Record<string, Role>;
  roles.root = new Role({ keyIDs: [], threshold: o.rootThreshold });
  roles.targets = new Role({ keyIDs: [], threshold: o.threshold });
  roles.snapshot = new Role({ keyIDs: [], threshold: 1 });
  roles.timestamp = new Role({ keyIDs: [], threshold: 1 });
  for (const k of o.rootKeys) if (!roles.root.keyIDs.includes(k.keyid)) root.addKey(tufKey(k), 'root');
  for (const k of o.maintainers) root.addKey(tufKey(k), 'targets');
  root.addKey(tufKey(o.snapshotKey), 'snapshot');
  root.addKey(tufKey(o.timestampKey), 'timestamp');
  return root;
}

export function initRepo(o: InitRepoOptions): { rootPath: string } {
  const now = (o.clock ?? Date.now)();
  if (existsSync(join(o.dir, 'metadata', '1.root.json'))) throw usage(`${o.dir} already holds a repository`);
  for (const d of ['metadata', 'targets', 'staged']) mkdirSync(join(o.dir, d), { recursive: true });
  const root = buildRoot(1, iso(now + DEFAULT_EXPIRY_DAYS.root * DAY), o);
  const md = new Metadata(root);
  for (const k of o.rootKeys) md.sign(tufSigner(k), true);
  const bytes = writeMeta(join(o.dir, 'metadata', '1.root.json'), md);
  writeAtomic(join(o.dir, 'metadata', 'root.json'), bytes);
  // The first targets (version 1, empty) is staged for the maintainers to sign and publish.
  stageTargets(o.dir, new Targets({ version: 1, specVersion: SPEC_VERSION, expires: iso(now + DEFAULT_EXPIRY_DAYS.targets * DAY) }));
  return { rootPath: join(o.dir, 'metadata', '1.root.json') };
}

function stageTargets(dir: string, targets: Targets): void {
  writeMeta(join(dir, 'staged', 'targets.json'), new Metadata(targets));
}

function stagedTargets(dir: string): Metadata<Targets> {
  const path = join(dir, 'staged', 'targets.json');
  if (!existsSync(path)) throw usage(`nothing is staged in ${dir} (run phantoma-release add-target first)`);
  return Metadata.fromJSON(MetadataKind.Targets, JSON.parse(readFileSync(path, 'utf8')) as JSONObject);
}

/** The newest root in the repository (highest N of N.root.json). */
export function latestRoot(dir: string): Metadata<Root> {
  const versions = readdirSync(join(dir, 'metadata'))
    .map((f) => /^(\d+)\.root\.json$/.exec(f)?.[1])
    .filter((v): v is string => v !== undefined)
    .map(Number)
    .sort((a, b) => a - b);
  const last = versions.at(-1);
  if (last === undefined) throw usage(`${dir} has no root metadata (run phantoma-release init-repo)`);
  return readMeta(dir, MetadataKind.Root, `${last}.root.json`);
}

export interface AddTargetOptions {
  dir: string;
  file: string;
  name?: string;
  /** The release version the node compares with what it runs (refuses older or equal). */
  version: string;
  kind?: 'release' | 'model';
  clock?: Clock;
}

/** Copies an artifact into the repository and stages the next targets metadata listing it (signatures reset). */
export async function addTarget(o: AddTargetOptions): Promise<{ name: string; sha256: string; length: number; targetsVersion: number }> {
  const name = o.name ?? basename(o.file);
  if (!TARGET_NAME_RE.test(name)) throw usage(`target name "${name}" must match ${TARGET_NAME_RE}`);
  if (!VERSION_RE.test(o.version)) throw usage(`version "${o.version}" must be MAJOR.MINOR.PATCH`);
  const now = (o.clock ?? Date.now)();
  const { sha256, length } = await sha256File(o.file);
  const published = existsSync(join(o.dir, 'metadata', 'targets.json')) ? readMeta(o.dir, MetadataKind.Targets) : undefined;
  const staged = existsSync(join(o.dir, 'staged', 'targets.json')) ? stagedTargets(o.dir).signed : undefined;
  const base = staged && (!published || staged.version > published.signed.version) ? staged : published?.signed;
  const version = (published?.signed.version ?? 0) + 1;
  const next = new Targets({ version, specVersion: SPEC_VERSION, expires: iso(now + DEFAULT_EXPIRY_DAYS.targets * DAY) });
  for (const t of Object.values(base?.targets ?? {})) if (t.path !== name) next.addTarget(t);
  next.addTarget(new TargetFile({ path: name, length, hashes: { sha256 }, unrecognizedFields: { custom: { phantoma: { kind: o.kind ?? 'release', version: o.version } } } }));
  mkdirSync(join(o.dir, 'targets'), { recursive: true });
  const dest = join(o.dir, 'targets', name);
  copyFileSync(o.file, `${dest}.tmp`);
  renameSync(`${dest}.tmp`, dest);
  stageTargets(o.dir, next);
  return { name, sha256, length, targetsVersion: version };
}

/** A Sigstore bundle (message signature, public-key hint = the maintainer's TUF key id) over a file. */
export async function signBundle(file: string, key: PrivateKeyFile): Promise<Json> {
  const signer = createSign('sha256');
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) {
    signer.update(chunk as Buffer);
    h.update(chunk as Buffer);
  }
  const signature = signer.sign(key.private);
  return bundleToJSON(toMessageSignatureBundle({ digest: h.digest(), signature, keyHint: key.keyid })) as unknown as Json;
}

export function bundlePath(dir: string, target: string, keyid: string): string {
  return join(dir, 'targets', `${target}.bundles`, `${keyid}.sigstore.json`);
}

/**
 * One maintainer's turn: adds their signature to the staged targets metadata and writes their Sigstore
 * bundle for every staged target. Each maintainer runs this with their own key file, on their own machine.
 */
export async function signTargets(o: { dir: string; key: PrivateKeyFile }): Promise<{ signatures: number; threshold: number; bundles: string[] }> {
  const root = latestRoot(o.dir).signed;
  const role = root.roles.targets!;
  if (!role.keyIDs.includes(o.key.keyid)) throw new PhantomaError(ERRORS.RELEASE_KEY_INVALID, `key ${o.key.keyid.slice(0, 12)} (${o.key.name}) is not a maintainer key of this repository's root`);
  const md = stagedTargets(o.dir);
  md.sign(tufSigner(o.key), true);
  writeMeta(join(o.dir, 'staged', 'targets.json'), md);
  const bundles: string[] = [];
  for (const t of Object.values(md.signed.targets)) {
    const file = join(o.dir, 'targets', t.path);
    if (!existsSync(file)) continue;
    const path = bundlePath(o.dir, t.path, o.key.keyid);
    mkdirSync(join(o.dir, 'targets', `${t.path}.bundles`), { recursive: true });
    writeAtomic(path, JSON.stringify(await signBundle(file, o.key)));
    bundles.push(path);
  }
  return { signatures: countValid(root, md), threshold: role.threshold, bundles };
}

function countValid(root: Root, md: Metadata<Targets>): number {
  let n = 0;
  const role = root.roles.targets!;
  for (const id of new Set(role.keyIDs)) {
    try {
      root.keys[id]!.verifySignature(md);
      n++;
    } catch {
      /* not signed by this key, or not validly */
    }
  }
  return n;
}

function signMeta<T extends Targets | Snapshot | Timestamp>(signed: T, key: PrivateKeyFile): Metadata<T> {
  const md = new Metadata(signed);
  md.sign(tufSigner(key), false);
  return md;
}

function metaFileOf(bytes: Buffer, version: number): MetaFile {
  return new MetaFile({ version, length: bytes.length, hashes: { sha256: createHash('sha256').update(bytes).digest('hex') } });
}

/** Writes a new timestamp (version + 1) for the current snapshot; the control plane's online job. */
export function signTimestamp(o: { dir: string; key: PrivateKeyFile; clock?: Clock; expiresInMs?: number; version?: number }): Metadata<Timestamp> {
  const now = (o.clock ?? Date.now)();
  const snapBytes = readFileSync(join(o.dir, 'metadata', 'snapshot.json'));
  const snap = Metadata.fromJSON(MetadataKind.Snapshot, JSON.parse(snapBytes.toString('utf8')) as JSONObject);
  const prev = existsSync(join(o.dir, 'metadata', 'timestamp.json')) ? readMeta(o.dir, MetadataKind.Timestamp).signed.version : 0;
  const ts = new Timestamp({
    version: o.version ?? prev + 1,
    specVersion: SPEC_VERSION,
    expires: iso(now + (o.expiresInMs ?? DEFAULT_EXPIRY_DAYS.timestamp * DAY)),
    snapshotMeta: metaFileOf(snapBytes, snap.signed.version),
  });
  const md = signMeta(ts, o.key);
  writeMeta(join(o.dir, 'metadata', 'timestamp.json'), md);
  return md;
}

/**
 * Publishes the staged targets: refuses unless the newest root's targets threshold of maintainer keys
 * signed it (release_threshold_not_met), then writes targets.json, a new snapshot and (given the key) a new
 * timestamp.
 */
export function publish(o: { dir: string; snapshotKey: PrivateKeyFile; timestampKey?: PrivateKeyFile; clock?: Clock }): { targetsVersion: number; snapshotVersion: number } {
  const now = (o.clock ?? Date.now)();
  const rootMd = latestRoot(o.dir);
  const root = rootMd.signed;
  const staged = stagedTargets(o.dir);
  const valid = countValid(root, staged);
  const threshold = root.roles.targets!.threshold;
  if (valid < threshold) {
    throw new PhantomaError(ERRORS.RELEASE_THRESHOLD_NOT_MET, `the staged targets carry ${valid} valid maintainer signature(s); ${threshold} are needed; nothing was published`, { details: { valid, threshold } });
  }
  if (!root.roles.snapshot!.keyIDs.includes(o.snapshotKey.keyid)) throw new PhantomaError(ERRORS.RELEASE_KEY_INVALID, 'the snapshot key is not the root\'s snapshot key');
  if (o.timestampKey && !root.roles.timestamp!.keyIDs.includes(o.timestampKey.keyid)) throw new PhantomaError(ERRORS.RELEASE_KEY_INVALID, 'the timestamp key is not the root\'s timestamp key');
  writeMeta(join(o.dir, 'metadata', 'targets.json'), staged);
  const prevSnap = existsSync(join(o.dir, 'metadata', 'snapshot.json')) ? readMeta(o.dir, MetadataKind.Snapshot).signed.version : 0;
  const snapshot = new Snapshot({
    version: prevSnap + 1,
    specVersion: SPEC_VERSION,
    expires: iso(now + DEFAULT_EXPIRY_DAYS.snapshot * DAY),
    // Version only (the TUF default): a targets file of another version is then refused as what it is, a
    // version mismatch (mix-and-match), by tuf-js's BadVersionError; its signatures protect its bytes.
    meta: { 'targets.json': new MetaFile({ version: staged.signed.version }) },
  });
  writeMeta(join(o.dir, 'metadata', 'snapshot.json'), signMeta(snapshot, o.snapshotKey));
  // Without the timestamp key (it lives on the control plane) the control plane's re-signer picks up the
  // new snapshot on its next round.
  if (o.timestampKey) signTimestamp({ dir: o.dir, key: o.timestampKey, clock: o.clock ?? Date.now });
  return { targetsVersion: staged.signed.version, snapshotVersion: snapshot.version };
}

export interface RotateRootOptions {
  dir: string;
  /** Private keys that sign the new root: a threshold of the current root keys AND of the new ones. */
  signingKeys: PrivateKeyFile[];
  rootKeys?: PublicKeyFile[];
  rootThreshold?: number;
  maintainers?: PublicKeyFile[];
  threshold?: number;
  snapshotKey?: PublicKeyFile;
  timestampKey?: PublicKeyFile;
  clock?: Clock;
}

function keysOf(root: Root, role: string): PublicKeyFile[] {
  return root.roles[role]!.keyIDs.map((id) => {
    const k = root.keys[id]!;
    return { keyid: id, name: id.slice(0, 12), keytype: 'ecdsa', scheme: 'ecdsa-sha2-nistp256', public: k.keyVal.public! };
  });
}

/**
 * Writes root version N+1 (e.g. a maintainer key removed or replaced). It must verify under both the old
 * root and itself, as a client checks it; the staged targets are re-staged so they are signed anew.
 */
export function rotateRoot(o: RotateRootOptions): { version: number } {
  const now = (o.clock ?? Date.now)();
  const old = latestRoot(o.dir);
  const r = old.signed;
  const next = buildRoot(r.version + 1, iso(now + DEFAULT_EXPIRY_DAYS.root * DAY), {
    rootKeys: o.rootKeys ?? keysOf(r, 'root'),
    rootThreshold: o.rootThreshold ?? r.roles.root!.threshold,
    maintainers: o.maintainers ?? keysOf(r, 'targets'),
    threshold: o.threshold ?? r.roles.targets!.threshold,
    snapshotKey: o.snapshotKey ?? keysOf(r, 'snapshot')[0]!,
    timestampKey: o.timestampKey ?? keysOf(r, 'timestamp')[0]!,
  });
  const md = new Metadata(next);
  const wanted = new Set([...r.roles.root!.keyIDs, ...next.roles.root!.keyIDs]);
  for (const k of o.signingKeys) if (wanted.has(k.keyid)) md.sign(tufSigner(k), true);
  try {
    old.verifyDelegate('root', md);
    md.verifyDelegate('root', md);
  } catch (err) {
    throw new PhantomaError(ERRORS.RELEASE_THRESHOLD_NOT_MET, `the new root is not signed by a threshold of both the old and the new root keys: ${(err as Error).message}`);
  }
  const bytes = writeMeta(join(o.dir, 'metadata', `${next.version}.root.json`), md);
  writeAtomic(join(o.dir, 'metadata', 'root.json'), bytes);
  // Whatever was staged must be signed again under the new root; keep its content, drop its signatures.
  const path = join(o.dir, 'staged', 'targets.json');
  if (existsSync(path)) stageTargets(o.dir, stagedTargets(o.dir).signed);
  return { version: next.version };
}

/** The repository's status for `phantoma-release status`. */
export function repoStatus(dir: string): Json {
  const root = latestRoot(dir).signed;
  const out: Json = { root: root.version, threshold: root.roles.targets!.threshold, maintainers: root.roles.targets!.keyIDs };
  if (existsSync(join(dir, 'metadata', 'targets.json'))) {
    const t = readMeta(dir, MetadataKind.Targets).signed;
    out.targets = { version: t.version, expires: t.expires, files: Object.values(t.targets).map((f) => ({ path: f.path, length: f.length, ...(f.custom as Json) })) };
  }
  if (existsSync(join(dir, 'staged', 'targets.json'))) {
    const s = stagedTargets(dir);
    out.staged = { version: s.signed.version, signatures: countValid(root, s), files: Object.keys(s.signed.targets) };
  }
  return out;
}
