// The Ansible roles' install step, run ON THE TARGET from the verifier kit (tools/make-verifier-kit.ts):
// verifies a release tarball with Phantoma's own verifier (src/updates/verify.ts: k Sigstore bundles from
// distinct maintainers of the pinned TUF root) BEFORE a single byte of it is unpacked, then unpacks it
// into the A/B slot layout of src/updates/slots.ts (every file checked against the signed manifest).
//
//   node verify-install.ts --tarball F --trusted-root ROOT.json --bundle B.sigstore.json... --dest DIR
//                          --version X.Y.Z [--trial-seconds N]
//
// First install: slot a, current -> slots/a. A different tarball on an installed node: the inactive slot
// with a trial boot (the units' OnFailure= rollback concludes it), exactly as `phantoma update apply`.
// The same tarball again: nothing is touched (idempotent; the role reports "ok").
// Prints one JSON line: {"changed": bool, "version", "sha256", "slot", "signers"} or {"error": {code,
// message}} with exit code 11 (a refused release, docs/errors.md) / 2 (usage) / 1 (internal).
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Metadata, MetadataKind } from '@tufjs/models';
import { verifyArtifactOffline, MAX_BUNDLE_BYTES, MAX_BUNDLES } from '../../../src/updates/verify.ts';
import { initSlots, installIntoInactiveSlot, currentSlot, slotDir } from '../../../src/updates/slots.ts';
import { PhantomaError, ERRORS, isPhantomaError } from '../../../src/errors.ts';

/** Written after a successful install; its sha256 makes a second run a no-op. */
export const MARKER = '.phantoma-installed.json';

function refuse(code: (typeof ERRORS)[keyof typeof ERRORS], message: string): PhantomaError {
  return new PhantomaError(code, message);
}

async function main(): Promise<number> {
  const { values: v } = parseArgs({
    options: {
      tarball: { type: 'string' },
      'trusted-root': { type: 'string' },
      bundle: { type: 'string', multiple: true },
      dest: { type: 'string' },
      version: { type: 'string' },
      'trial-seconds': { type: 'string' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (!v.tarball || !v['trusted-root'] || !v.bundle?.length || !v.dest || !v.version) {
    process.stderr.write('usage: verify-install.ts --tarball F --trusted-root ROOT.json --bundle B... --dest DIR --version X.Y.Z [--trial-seconds N]\n');
    return 2;
  }
  const tarball = readFileSync(v.tarball);
  const sha256 = createHash('sha256').update(tarball).digest('hex');
  const markerPath = join(v.dest, MARKER);
  if (existsSync(markerPath) && existsSync(join(v.dest, 'current'))) {
    const m = JSON.parse(readFileSync(markerPath, 'utf8')) as { sha256?: string; version?: string; slot?: string; signers?: string[] };
    if (m.sha256 === sha256 && m.slot && existsSync(slotDir(v.dest, m.slot as 'a' | 'b'))) {
      process.stdout.write(JSON.stringify({ changed: false, version: m.version, sha256, slot: m.slot, signers: m.signers ?? [] }) + '\n');
      return 0;
    }
  }
  // 1. Verify: the pinned root's maintainers, k distinct bundles over these exact bytes.
  if (v.bundle.length > MAX_BUNDLES) throw refuse(ERRORS.UPDATE_BUNDLES_INSUFFICIENT, `at most ${MAX_BUNDLES} bundles`);
  const bundles = v.bundle.map((p) => {
    const b = readFileSync(p);
    if (b.length > MAX_BUNDLE_BYTES) throw refuse(ERRORS.UPDATE_BUNDLES_INSUFFICIENT, `${p} is larger than ${MAX_BUNDLE_BYTES} bytes`);
    return JSON.parse(b.toString('utf8')) as unknown;
  });
  const root = Metadata.fromJSON(MetadataKind.Root, JSON.parse(readFileSync(v['trusted-root'], 'utf8')) as Parameters<typeof Metadata.fromJSON>[1]).signed;
  const { signers } = verifyArtifactOffline(tarball, bundles, root);
  // 2. Only now unpack (every file against the manifest; the manifest's version must be the one asked for).
  let slot: 'a' | 'b';
  let version: string;
  if (!existsSync(join(v.dest, 'current'))) {
    const r = await initSlots(v.dest, v.tarball);
    if (r.version !== v.version) throw refuse(ERRORS.UPDATE_MANIFEST_MISMATCH, `the release says version ${r.version}, the inventory says ${v.version}`);
    slot = 'a';
    version = r.version;
  } else {
    const trialMs = 1000 * Number(v['trial-seconds'] ?? '180');
    const r = await installIntoInactiveSlot(v.dest, v.tarball, v.version, trialMs);
    slot = r.slot;
    version = r.version;
  }
  if (currentSlot(v.dest) !== slot) throw refuse(ERRORS.UPDATE_INSTALL_FAILED, `current does not point at slot ${slot} after the install`);
  const tmp = `${markerPath}.tmp-${process.pid}`;
  writeFileSync(tmp, JSON.stringify({ sha256, version, slot, signers }) + '\n', { mode: 0o644 });
  renameSync(tmp, markerPath);
  process.stdout.write(JSON.stringify({ changed: true, version, sha256, slot, signers }) + '\n');
  return 0;
}

if (import.meta.main) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      const e = isPhantomaError(err) ? err : new PhantomaError(ERRORS.INTERNAL, (err as Error).message);
      process.stdout.write(JSON.stringify({ error: { code: e.code, message: e.message } }) + '\n');
      process.stderr.write(`verify-install: ${e.code}: ${e.message}\n`);
      process.exit(isPhantomaError(err) ? e.exit : 1);
    },
  );
}
