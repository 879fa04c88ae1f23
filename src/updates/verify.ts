// Verifying a release, both paths, with trust material handed in (never fetched implicitly):
//  1. TUF (tuf-js): the node's trusted root (pinned at install, rotated only by roots that chain from it)
//     → timestamp → snapshot → targets, each with its threshold, versions and expiry; then the target,
//     capped at its signed length and checked against its signed hashes. Freshness, rollback and freeze
//     protection come from here.
//  2. Sigstore bundles (@sigstore/verify, offline): k valid message signatures over the artifact from k
//     distinct maintainer keys of the trusted root's targets role. This is what makes one tarball
//     verifiable alone (first install, air-gapped nodes).
// Every refusal is a PhantomaError whose code names the attack class; the tuf-js error is its cause.
import { createHash, createPublicKey, type KeyObject } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { Updater } from 'tuf-js';
import { Metadata, MetadataKind, type Root, type TargetFile } from '@tufjs/models';
import { UnsignedMetadataError, LengthOrHashMismatchError, RepositoryError as ModelsRepositoryError } from '@tufjs/models/dist/error.js';
import { BadVersionError, ExpiredMetadataError, DownloadLengthMismatchError, DownloadError, RepositoryError, RuntimeError } from 'tuf-js/dist/error.js';
import { bundleFromJSON } from '@sigstore/bundle';
import { Verifier, toSignedEntity, VerificationError, type TrustMaterial } from '@sigstore/verify';
import { PhantomaError, ERRORS } from '../errors.ts';
import { RepoFetcher, fetchSmall, type RepoFetcherOptions } from './fetcher.ts';
import { compareVersions } from './version.ts';

type JSONObject = Parameters<typeof Metadata.fromJSON>[1];

/** Caps on every metadata file tuf-js reads (bytes), and on what we read beside it. */
export const TUF_LIMITS = Object.freeze({
  rootMaxLength: 256 * 1024,
  timestampMaxLength: 16 * 1024,
  snapshotMaxLength: 256 * 1024,
  targetsMaxLength: 4 * 1024 * 1024,
  maxRootRotations: 32,
  maxDelegations: 0,
});
export const MAX_TARGET_BYTES = 4 * 1024 ** 3;
export const MAX_BUNDLE_BYTES = 64 * 1024;
export const MAX_BUNDLES = 32;

export interface MaintainerKeys {
  keys: Map<string, KeyObject>;
  threshold: number;
}

/** The maintainer keys and threshold named by a (trusted) root: the targets role. */
export function maintainersOf(root: Root): MaintainerKeys {
  const role = root.roles.targets;
  if (!role) throw new PhantomaError(ERRORS.UPDATE_METADATA_INVALID, 'the root has no targets role');
  const keys = new Map<string, KeyObject>();
  for (const id of role.keyIDs) {
    const k = root.keys[id];
    if (k?.keyType === 'ecdsa' && k.scheme === 'ecdsa-sha2-nistp256' && k.keyVal.public) keys.set(id, createPublicKey(k.keyVal.public));
  }
  return { keys, threshold: role.threshold };
}

export function readTrustedRoot(metadataDir: string): Root {
  return Metadata.fromJSON(MetadataKind.Root, JSON.parse(readFileSync(join(metadataDir, 'root.json'), 'utf8')) as JSONObject).signed;
}

/**
 * The pure bundle check: how many distinct pinned maintainer keys produced a valid Sigstore bundle over
 * exactly these bytes. Refuses (update_bundles_insufficient) below the threshold. No network: the trust
 * material holds only the maintainer keys, with no transparency log, CT log or timestamp requirement.
 */
export function verifyBundles(artifact: Buffer, bundles: unknown[], trust: MaintainerKeys): { signers: string[] } {
  const digest = createHash('sha256').update(artifact).digest();
  const material: TrustMaterial = {
    certificateAuthorities: [],
    timestampAuthorities: [],
    tlogs: [],
    ctlogs: [],
    publicKey: (hint) => {
      const publicKey = trust.keys.get(hint);
      if (!publicKey) throw new VerificationError({ code: 'PUBLIC_KEY_ERROR', message: `no pinned maintainer key ${hint.slice(0, 12)}` });
      return { publicKey, validFor: () => true };
    },
  };
  const verifier = new Verifier(material, { tlogThreshold: 0, ctlogThreshold: 0, timestampThreshold: 0 });
  const signers = new Set<string>();
  const problems: string[] = [];
  for (const raw of bundles.slice(0, MAX_BUNDLES)) {
    try {
      const bundle = bundleFromJSON(raw);
      if (bundle.content.$case !== 'messageSignature' || bundle.verificationMaterial.content.$case !== 'publicKey') throw new Error('not a public-key message-signature bundle');
      if (!Buffer.from(bundle.content.messageSignature.messageDigest.digest).equals(digest)) throw new Error('its digest is not the artifact\'s');
      verifier.verify(toSignedEntity(bundle, artifact));
      signers.add(bundle.verificationMaterial.content.publicKey.hint);
    } catch (err) {
      problems.push((err as Error).message);
    }
  }
  if (signers.size < trust.threshold) {
    throw new PhantomaError(
      ERRORS.UPDATE_BUNDLES_INSUFFICIENT,
      `${signers.size} valid Sigstore bundle(s) from distinct maintainers; ${trust.threshold} are needed${problems.length ? ` (${problems.slice(0, 3).join('; ')})` : ''}`,
      { details: { valid: signers.size, threshold: trust.threshold } },
    );
  }
  return { signers: [...signers].sort() };
}

/** Maps tuf-js's errors to our codes, keeping tuf-js's error as the cause. */
export function tufFailure(err: unknown, what: string, stage: 'metadata' | 'target' = 'target'): PhantomaError {
  if (err instanceof PhantomaError) return err;
  const e = err as Error;
  const details = { tufError: e?.constructor?.name ?? 'Error' };
  const def =
    err instanceof UnsignedMetadataError
      ? ERRORS.UPDATE_SIGNATURES_INSUFFICIENT
      : err instanceof BadVersionError
        ? ERRORS.UPDATE_METADATA_ROLLBACK
        : err instanceof ExpiredMetadataError
          ? ERRORS.UPDATE_METADATA_EXPIRED
          : err instanceof LengthOrHashMismatchError
            ? stage === 'metadata'
              ? ERRORS.UPDATE_METADATA_INVALID
              : ERRORS.UPDATE_TARGET_MISMATCH
            : err instanceof DownloadLengthMismatchError
              ? ERRORS.UPDATE_TARGET_TOO_LARGE
              : err instanceof DownloadError
                ? ERRORS.UPDATE_REPOSITORY_UNREACHABLE
                : err instanceof RepositoryError || err instanceof ModelsRepositoryError
                  ? ERRORS.UPDATE_METADATA_INVALID
                  : (e as NodeJS.ErrnoException)?.code && /^E[A-Z]+$/.test(String((e as NodeJS.ErrnoException).code))
                    ? ERRORS.UPDATE_REPOSITORY_UNREACHABLE
                    : ERRORS.UPDATE_METADATA_INVALID;
  return new PhantomaError(def, `${what}: ${e?.message ?? String(err)}`, { cause: err, details });
}

export interface ReleaseRepository {
  /** Base URL of the repository's metadata/ and targets/ (https://cp/v1/updates/, http://127.0.0.1:N/, file:///dir/). */
  url: string;
  fetcher?: RepoFetcherOptions;
}

export interface UpdateTrust {
  /** tuf-js's local metadata directory: holds the pinned root.json and whatever newer metadata it trusted. */
  metadataDir: string;
  repository: ReleaseRepository;
}

export interface ReleaseChoice {
  /** The version the node runs: anything not newer is refused (update_version_rollback). */
  running: string;
  /** A specific target; otherwise the newest release target. */
  name?: string;
  /** The newest version the lease allows; newer targets are not chosen (or are refused when named). */
  allowed?: string;
}

export interface VerifiedRelease {
  name: string;
  version: string;
  sha256: string;
  length: number;
  /** Where the verified artifact was written. */
  path: string;
  signers: string[];
}

function releaseVersion(t: TargetFile): string | undefined {
  const p = (t.custom as { phantoma?: { kind?: unknown; version?: unknown } }).phantoma;
  return p?.kind === 'release' && typeof p.version === 'string' ? p.version : undefined;
}

function base(url: string): string {
  return url.endsWith('/') ? url : `${url}/`;
}

/** Refreshes TUF metadata and lists the signed release targets (name → version), newest first. */
export async function listReleases(trust: UpdateTrust): Promise<Array<{ name: string; version: string; length: number }>> {
  await refreshed(trust);
  return trustedReleases(trust.metadataDir);
}

/** The release targets of the targets metadata tuf-js last verified and persisted, newest first. */
function trustedReleases(metadataDir: string): Array<{ name: string; version: string; length: number }> {
  const targets = Metadata.fromJSON(MetadataKind.Targets, JSON.parse(readFileSync(join(metadataDir, 'targets.json'), 'utf8')) as JSONObject).signed;
  return Object.values(targets.targets)
    .map((t) => ({ name: t.path, version: releaseVersion(t), length: t.length }))
    .filter((t): t is { name: string; version: string; length: number } => t.version !== undefined)
    .sort((a, b) => compareVersions(b.version, a.version));
}

type Recorder = { last?: unknown };

/**
 * tuf-js 6.0.2 wraps every snapshot and targets failure in a RuntimeError whose message only quotes the
 * original; the original's class is what names the attack. So the trusted-metadata store's two update
 * methods are wrapped on this one instance to keep the original error (tuf-js is pinned exactly).
 */
function recordErrors(updater: Updater, fetcher: RepoFetcher, rec: Recorder): void {
  const set = (updater as unknown as { trustedSet?: Record<string, unknown> }).trustedSet;
  for (const name of ['updateSnapshot', 'updateDelegatedTargets', 'updateTimestamp', 'updateRoot']) {
    const fn = set?.[name];
    if (typeof fn !== 'function') continue;
    set![name] = function (this: unknown, ...args: unknown[]) {
      try {
        return (fn as (...a: unknown[]) => unknown).apply(this, args);
      } catch (err) {
        rec.last = err;
        throw err;
      }
    };
  }
  const download = fetcher.downloadBytes.bind(fetcher);
  fetcher.downloadBytes = async (url: string, max: number) => {
    try {
      return await download(url, max);
    } catch (err) {
      rec.last = err;
      throw err;
    }
  };
}

function original(err: unknown, rec: Recorder): unknown {
  return err instanceof RuntimeError && /^Unable to load/.test(err.message) && rec.last ? rec.last : err;
}

async function refreshed(trust: UpdateTrust): Promise<{ updater: Updater; fetcher: RepoFetcher }> {
  const fetcher = new RepoFetcher(trust.repository.fetcher);
  const root = base(trust.repository.url);
  const rec: Recorder = {};
  let updater: Updater;
  try {
    updater = new Updater({ metadataDir: trust.metadataDir, metadataBaseUrl: `${root}metadata`, targetBaseUrl: `${root}targets`, fetcher, config: { ...TUF_LIMITS } });
    recordErrors(updater, fetcher, rec);
    await updater.refresh();
  } catch (err) {
    throw tufFailure(original(err, rec), 'TUF metadata refused', 'metadata');
  }
  return { updater, fetcher };
}

/**
 * verifyRelease: the whole check before anything is unpacked. Updates TUF metadata from the repository,
 * picks (or finds) the release, downloads it under its signed length and hashes into `downloadDir`, then
 * requires k Sigstore bundles from distinct maintainers of the now-trusted root. On any refusal the
 * download is deleted.
 */
export async function verifyRelease(choice: ReleaseChoice, trust: UpdateTrust, downloadDir: string): Promise<VerifiedRelease> {
  const { updater, fetcher } = await refreshed(trust);
  let info: TargetFile | undefined;
  try {
    if (choice.name) info = await updater.getTargetInfo(choice.name);
    else {
      const all = trustedReleases(trust.metadataDir);
      const pick = all.find((t) => !choice.allowed || compareVersions(t.version, choice.allowed) <= 0);
      if (pick) info = await updater.getTargetInfo(pick.name);
    }
  } catch (err) {
    throw tufFailure(err, 'TUF targets refused');
  }
  if (!info) throw new PhantomaError(ERRORS.UPDATE_TARGET_NOT_FOUND, choice.name ? `the signed targets list no ${choice.name}` : 'the signed targets list no release');
  const version = releaseVersion(info);
  if (!version) throw new PhantomaError(ERRORS.UPDATE_TARGET_NOT_FOUND, `${info.path} is not a release target`);
  if (compareVersions(version, choice.running) <= 0) {
    throw new PhantomaError(ERRORS.UPDATE_VERSION_ROLLBACK, `release ${version} is not newer than the running ${choice.running}`, { details: { offered: version, running: choice.running } });
  }
  if (choice.allowed && compareVersions(version, choice.allowed) > 0) {
    throw new PhantomaError(ERRORS.UPDATE_NOT_ALLOWED, `release ${version} is newer than the ${choice.allowed} the lease allows`);
  }
  if (info.length > MAX_TARGET_BYTES) throw new PhantomaError(ERRORS.UPDATE_TARGET_TOO_LARGE, `${info.path} declares ${info.length} bytes, over the ${MAX_TARGET_BYTES} cap`);
  mkdirSync(downloadDir, { recursive: true, mode: 0o700 });
  const path = join(downloadDir, info.path);
  try {
    try {
      await updater.downloadTarget(info, path);
    } catch (err) {
      throw tufFailure(err, `target ${info.path} refused`);
    }
    const root = readTrustedRoot(trust.metadataDir);
    const maintainers = maintainersOf(root);
    const bundles: unknown[] = [];
    for (const keyid of maintainers.keys.keys()) {
      let bytes: Buffer | undefined;
      try {
        bytes = await fetchSmall(fetcher, `${base(trust.repository.url)}targets/${info.path}.bundles/${keyid}.sigstore.json`, MAX_BUNDLE_BYTES);
      } catch (err) {
        throw tufFailure(err, `bundle of ${keyid.slice(0, 12)}`);
      }
      if (!bytes) continue;
      try {
        bundles.push(JSON.parse(bytes.toString('utf8')));
      } catch {
        /* a malformed bundle counts for nothing */
      }
    }
    const artifact = readFileSync(path);
    const { signers } = verifyBundles(artifact, bundles, maintainers);
    return { name: info.path, version, sha256: info.hashes.sha256 ?? '', length: info.length, path, signers };
  } catch (err) {
    rmSync(path, { force: true });
    throw err;
  }
}

/** The offline path (no repository): an artifact and its bundles against a pinned root's maintainers. */
export function verifyArtifactOffline(artifact: Buffer, bundles: unknown[], pinnedRoot: Root): { signers: string[] } {
  return verifyBundles(artifact, bundles, maintainersOf(pinnedRoot));
}
