#!/usr/bin/env node
// phantoma-release: the maintainers' tool. Keys (keygen), the TUF repository (init-repo, add-target, sign,
// publish, rotate-root, timestamp, status) and the release tarball (build). Every maintainer signs with
// their own key file on their own machine; publish refuses below the targets threshold.
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { ERRORS, PhantomaError, UsageError, isPhantomaError } from '../errors.ts';
import { generateKey, readPrivateKey, readPublicKey, writeKeyFiles } from '../updates/keys.ts';
import { addTarget, initRepo, publish, repoStatus, rotateRoot, signTargets, signTimestamp } from './repo.ts';
import { buildRelease } from './build.ts';
import { verifyArtifactOffline } from '../updates/verify.ts';
import { Metadata, MetadataKind } from '@tufjs/models';

const USAGE = `phantoma-release — sign and publish Phantoma releases (TUF + Sigstore bundles)

usage:
  phantoma-release keygen --out BASE [--name NAME]            writes BASE.key.json (0600) and BASE.pub.json
  phantoma-release init-repo --repo DIR --root-key K.key.json... [--root-threshold 1]
                   --maintainer M.pub.json... [--threshold 2] --snapshot-key S.pub.json --timestamp-key T.pub.json
  phantoma-release add-target --repo DIR --file F --version X.Y.Z [--name NAME] [--kind release|model]
  phantoma-release sign --repo DIR --key M.key.json           one maintainer's signature and Sigstore bundles
  phantoma-release publish --repo DIR --snapshot-key S.key.json [--timestamp-key T.key.json]
  phantoma-release rotate-root --repo DIR --signing-key K.key.json... [--root-key R.pub.json... --root-threshold N]
                   [--maintainer M.pub.json... --threshold K]
  phantoma-release timestamp --repo DIR --timestamp-key T.key.json
  phantoma-release build --out FILE [--root DIR] [--version X.Y.Z]
  phantoma-release verify --file F --root ROOT.json --bundle B.sigstore.json...   offline, no repository
  phantoma-release status --repo DIR

exit codes: 0 ok, 1 internal, 2 usage, 11 refused (key, threshold, build) — docs/errors.md`;

const OPTIONS = {
  out: { type: 'string' },
  name: { type: 'string' },
  repo: { type: 'string' },
  'root-key': { type: 'string', multiple: true },
  'root-threshold': { type: 'string' },
  maintainer: { type: 'string', multiple: true },
  threshold: { type: 'string' },
  'snapshot-key': { type: 'string' },
  'timestamp-key': { type: 'string' },
  'signing-key': { type: 'string', multiple: true },
  file: { type: 'string' },
  version: { type: 'string' },
  kind: { type: 'string' },
  key: { type: 'string' },
  root: { type: 'string' },
  bundle: { type: 'string', multiple: true },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

type Values = { [K in keyof typeof OPTIONS]?: (typeof OPTIONS)[K] extends { multiple: true } ? string[] : (typeof OPTIONS)[K] extends { type: 'boolean' } ? boolean : string };

function need<T>(v: T | undefined, flag: string): T {
  if (v === undefined || (Array.isArray(v) && v.length === 0)) throw new UsageError(ERRORS.CLI_USAGE, `--${flag} is required (phantoma-release --help)`);
  return v;
}

function int(v: string | undefined, flag: string, fallback: number): number {
  if (v === undefined) return fallback;
  if (!/^\d{1,3}$/.test(v)) throw new UsageError(ERRORS.CLI_USAGE, `--${flag} must be a small integer`);
  return Number(v);
}

export async function runReleaseCli(argv: string[], io: { out: (s: string) => void; err: (s: string) => void }): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    io.out(USAGE);
    return cmd ? 0 : 2;
  }
  try {
    let parsed;
    try {
      parsed = parseArgs({ args: rest, options: OPTIONS, allowPositionals: false, strict: true });
    } catch (err) {
      throw new UsageError(ERRORS.CLI_USAGE, (err as Error).message);
    }
    const v = parsed.values as Values;
    const print = (o: unknown, text: string): void => io.out(v.json ? JSON.stringify(o) : text);
    switch (cmd) {
      case 'keygen': {
        const key = generateKey(v.name ?? 'maintainer');
        const paths = writeKeyFiles(resolve(need(v.out, 'out')), key);
        print({ keyid: key.keyid, ...paths }, `key ${key.keyid}\n  private: ${paths.privatePath} (keep offline)\n  public:  ${paths.publicPath}`);
        return 0;
      }
      case 'init-repo': {
        const rootKeys = need(v['root-key'], 'root-key').map(readPrivateKey);
        const maintainers = need(v.maintainer, 'maintainer').map(readPublicKey);
        const r = initRepo({
          dir: need(v.repo, 'repo'),
          rootKeys,
          rootThreshold: int(v['root-threshold'], 'root-threshold', 1),
          maintainers,
          threshold: int(v.threshold, 'threshold', 2),
          snapshotKey: readPublicKey(need(v['snapshot-key'], 'snapshot-key')),
          timestampKey: readPublicKey(need(v['timestamp-key'], 'timestamp-key')),
        });
        print(r, `repository initialised: ${r.rootPath} (pin this root on nodes)`);
        return 0;
      }
      case 'add-target': {
        const r = await addTarget({ dir: need(v.repo, 'repo'), file: need(v.file, 'file'), version: need(v.version, 'version'), ...(v.name ? { name: v.name } : {}), ...(v.kind === 'model' ? { kind: 'model' as const } : {}) });
        print(r, `staged ${r.name} (${r.length} bytes, sha256 ${r.sha256}) in targets version ${r.targetsVersion}; now each maintainer runs phantoma-release sign`);
        return 0;
      }
      case 'sign': {
        const r = await signTargets({ dir: need(v.repo, 'repo'), key: readPrivateKey(need(v.key, 'key')) });
        print(r, `signed: ${r.signatures} of ${r.threshold} needed signatures; ${r.bundles.length} Sigstore bundle(s) written`);
        return 0;
      }
      case 'publish': {
        const r = publish({ dir: need(v.repo, 'repo'), snapshotKey: readPrivateKey(need(v['snapshot-key'], 'snapshot-key')), ...(v['timestamp-key'] ? { timestampKey: readPrivateKey(v['timestamp-key']) } : {}) });
        print(r, `published targets version ${r.targetsVersion}, snapshot version ${r.snapshotVersion}`);
        return 0;
      }
      case 'rotate-root': {
        const r = rotateRoot({
          dir: need(v.repo, 'repo'),
          signingKeys: need(v['signing-key'], 'signing-key').map(readPrivateKey),
          ...(v['root-key'] ? { rootKeys: v['root-key'].map(readPublicKey) } : {}),
          ...(v['root-threshold'] ? { rootThreshold: int(v['root-threshold'], 'root-threshold', 1) } : {}),
          ...(v.maintainer ? { maintainers: v.maintainer.map(readPublicKey) } : {}),
          ...(v.threshold ? { threshold: int(v.threshold, 'threshold', 2) } : {}),
        });
        print(r, `root version ${r.version} written; the staged targets must be signed again`);
        return 0;
      }
      case 'timestamp': {
        const md = signTimestamp({ dir: need(v.repo, 'repo'), key: readPrivateKey(need(v['timestamp-key'], 'timestamp-key')) });
        print({ version: md.signed.version, expires: md.signed.expires }, `timestamp version ${md.signed.version}, expires ${md.signed.expires}`);
        return 0;
      }
      case 'build': {
        const started = Date.now();
        const r = await buildRelease({ root: resolve(v.root ?? '.'), out: resolve(need(v.out, 'out')), ...(v.version ? { version: v.version } : {}) });
        print({ ...r, ms: Date.now() - started }, `${r.path}: ${r.files} files, ${r.symlinks} symlinks, ${r.bytes} bytes, sha256 ${r.sha256} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
        return 0;
      }
      case 'verify': {
        const root = Metadata.fromJSON(MetadataKind.Root, JSON.parse(readFileSync(need(v.root, 'root'), 'utf8')) as Parameters<typeof Metadata.fromJSON>[1]).signed;
        const bundles = need(v.bundle, 'bundle').map((p) => JSON.parse(readFileSync(p, 'utf8')) as unknown);
        const r = verifyArtifactOffline(readFileSync(need(v.file, 'file')), bundles, root);
        print(r, `verified: ${r.signers.length} distinct maintainer bundle(s) (${r.signers.map((s) => s.slice(0, 12)).join(', ')})`);
        return 0;
      }
      case 'status': {
        const s = repoStatus(need(v.repo, 'repo'));
        print(s, JSON.stringify(s, null, 2));
        return 0;
      }
      default:
        throw new UsageError(ERRORS.CLI_USAGE, `unknown command "${cmd}" (phantoma-release --help)`);
    }
  } catch (err) {
    const e = isPhantomaError(err) ? err : new PhantomaError(ERRORS.INTERNAL, (err as Error)?.stack ?? String(err));
    if (argv.includes('--json')) io.err(JSON.stringify({ error: { code: e.code, message: e.message } }));
    else io.err(`phantoma-release: ${e.message} [${e.code}]`);
    return e.exit;
  }
}

if (import.meta.main) {
  process.exitCode = await runReleaseCli(process.argv.slice(2), { out: (s) => process.stdout.write(s + '\n'), err: (s) => process.stderr.write(s + '\n') });
}
