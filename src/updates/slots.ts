// The A/B slot layout on a node and the only code that changes it:
//   <root>/slots/a/, <root>/slots/b/     two complete releases (one running, one spare)
//   <root>/current -> slots/<x>          what the supervisor starts; switched by an atomic rename
//   <root>/update-state.json             which slot runs, which is on trial, the last outcome
//   <root>/trial-ok                      written by the new version when it is ready (markTrialGood)
// A release is unpacked into the inactive slot with every entry checked against its manifest; only then
// is `current` swapped. A failed install wipes the inactive slot and never touches the running one.
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, mkdirSync, readFileSync, readlinkSync, realpathSync, renameSync, rmSync, symlinkSync, writeFileSync, chmodSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { createGunzip } from 'node:zlib';
import { finished } from 'node:stream/promises';
import { PhantomaError, ERRORS } from '../errors.ts';
import { readTar, TarError } from './tar.ts';
import { MANIFEST_NAME, MAX_MANIFEST_BYTES, parseManifest, type Manifest } from './manifest.ts';

export type SlotName = 'a' | 'b';
export const SLOT_INFO = '.phantoma-slot.json';

export interface TrialState {
  slot: SlotName;
  version: string;
  previous: SlotName;
  startedAt: string;
  deadlineMs: number;
}

export interface UpdateOutcome {
  result: 'installed' | 'rolled_back' | 'refused' | 'manual_rollback';
  version: string;
  code?: string;
  at: string;
}

export interface UpdateState {
  current: SlotName;
  previous?: SlotName;
  trial?: TrialState;
  last?: UpdateOutcome;
}

export function otherSlot(s: SlotName): SlotName {
  return s === 'a' ? 'b' : 'a';
}

export function slotDir(root: string, s: SlotName): string {
  return join(root, 'slots', s);
}

function writeAtomic(path: string, data: string): void {
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, data, { mode: 0o644 });
  renameSync(tmp, path);
}

export function readState(root: string): UpdateState {
  const path = join(root, 'update-state.json');
  if (!existsSync(path)) {
    const link = existsSync(join(root, 'current')) ? readlinkSync(join(root, 'current')) : 'slots/a';
    return { current: link.endsWith('b') ? 'b' : 'a' };
  }
  const v = JSON.parse(readFileSync(path, 'utf8')) as UpdateState;
  if (v.current !== 'a' && v.current !== 'b') throw new PhantomaError(ERRORS.STATE_FILE_INVALID, `${path} names no slot`);
  return v;
}

export function writeState(root: string, s: UpdateState): void {
  writeAtomic(join(root, 'update-state.json'), JSON.stringify(s, null, 1) + '\n');
}

/** Points <root>/current at a slot with one rename(2): a reader sees the old or the new link, never none. */
export function switchCurrent(root: string, s: SlotName): void {
  const tmp = join(root, `current.tmp-${process.pid}`);
  rmSync(tmp, { force: true });
  symlinkSync(join('slots', s), tmp);
  renameSync(tmp, join(root, 'current'));
}

export function currentSlot(root: string): SlotName {
  return readlinkSync(join(root, 'current')).endsWith('b') ? 'b' : 'a';
}

export function slotVersion(root: string, s: SlotName): string | undefined {
  try {
    return (JSON.parse(readFileSync(join(slotDir(root, s), SLOT_INFO), 'utf8')) as { version?: string }).version;
  } catch {
    return undefined;
  }
}

function mismatch(why: string): PhantomaError {
  return new PhantomaError(ERRORS.UPDATE_MANIFEST_MISMATCH, `the release does not match its manifest: ${why}`);
}

/**
 * Unpacks a (verified) release tarball into `dest`, refusing any entry its manifest does not list, any
 * file whose size, mode or sha256 differs, and any listed entry that is missing. Throws
 * update_manifest_mismatch; the caller wipes `dest`.
 */
export async function extractRelease(tarball: string, dest: string): Promise<Manifest> {
  mkdirSync(dest, { recursive: true, mode: 0o755 });
  let manifest: Manifest | undefined;
  const files = new Map<string, Manifest['files'][number]>();
  const links = new Map<string, string>();
  const done = new Set<string>();
  const source = createReadStream(tarball).pipe(createGunzip());
  try {
    for await (const e of readTar(source as AsyncIterable<Buffer>, { maxEntryBytes: 8 * 1024 ** 3, maxEntries: 1_000_000 })) {
      if (!manifest) {
        if (e.type !== 'file' || e.path !== MANIFEST_NAME || e.size > MAX_MANIFEST_BYTES) throw mismatch('the first entry is not the manifest');
        const parts: Buffer[] = [];
        for await (const c of e.body) parts.push(c);
        try {
          manifest = parseManifest(Buffer.concat(parts));
        } catch (err) {
          throw mismatch((err as Error).message);
        }
        for (const f of manifest.files) files.set(f.path, f);
        for (const l of manifest.symlinks) links.set(l.path, l.target);
        continue;
      }
      if (done.has(e.path)) throw mismatch(`${e.path} appears twice`);
      done.add(e.path);
      // Nothing is written through a symlink of the release: a link may point anywhere inside the slot by
      // its own path, but a chain of links could climb out, and a write through one would follow it.
      const parts = e.path.split('/');
      for (let i = 1; i < parts.length; i++) if (links.has(parts.slice(0, i).join('/'))) throw mismatch(`${e.path} lies under a symlink`);
      const abs = join(dest, e.path);
      if (e.type === 'symlink') {
        if (links.get(e.path) !== e.target) throw mismatch(`symlink ${e.path} is not in the manifest as it is`);
        mkdirSync(dirname(abs), { recursive: true });
        symlinkSync(e.target, abs);
        continue;
      }
      const want = files.get(e.path);
      if (!want) throw mismatch(`${e.path} is not in the manifest`);
      if (want.size !== e.size) throw mismatch(`${e.path} has ${e.size} bytes, the manifest says ${want.size}`);
      if ((e.mode & 0o7777) !== want.mode) throw mismatch(`${e.path} has mode ${(e.mode & 0o7777).toString(8)}, the manifest says ${want.mode.toString(8)}`);
      mkdirSync(dirname(abs), { recursive: true });
      const h = createHash('sha256');
      const out = createWriteStream(abs, { mode: 0o600, flags: 'wx' });
      for await (const c of e.body) {
        h.update(c);
        if (!out.write(c)) await new Promise<void>((r) => out.once('drain', () => r()));
      }
      out.end();
      await finished(out);
      if (h.digest('hex') !== want.sha256) throw mismatch(`${e.path}'s sha256 differs from the manifest`);
      chmodSync(abs, want.mode);
    }
  } catch (err) {
    source.destroy();
    if (err instanceof PhantomaError) throw err;
    if (err instanceof TarError || (err as NodeJS.ErrnoException).code === 'Z_DATA_ERROR' || (err as NodeJS.ErrnoException).code === 'Z_BUF_ERROR') throw mismatch((err as Error).message);
    throw new PhantomaError(ERRORS.UPDATE_INSTALL_FAILED, `could not unpack the release: ${(err as Error).message}`, { cause: err });
  }
  if (!manifest) throw mismatch('the archive is empty');
  // Every link that resolves must resolve inside the slot (a chain of contained-looking links can escape).
  // The kernel's realpath(3): Node's JS realpathSync resolves "link/.." lexically and would miss it.
  const top = realpathSync.native(dest);
  for (const l of links.keys()) {
    let real: string;
    try {
      real = realpathSync.native(join(dest, l));
    } catch {
      continue; // dangling: points at nothing, reads nothing
    }
    if (real !== top && !real.startsWith(`${top}/`)) throw mismatch(`symlink ${l} resolves outside the release`);
  }
  const missing = [...files.keys(), ...links.keys()].filter((p) => !done.has(p));
  if (missing.length) throw mismatch(`${missing.length} listed entr${missing.length === 1 ? 'y is' : 'ies are'} missing (${missing[0]})`);
  return manifest;
}

export interface InstallResult {
  slot: SlotName;
  version: string;
  trial: TrialState;
}

/** Creates the layout around an existing release directory (first install): slot a, current -> a. */
export async function initSlots(root: string, tarball: string): Promise<{ version: string }> {
  mkdirSync(join(root, 'slots'), { recursive: true });
  const dir = slotDir(root, 'a');
  rmSync(dir, { recursive: true, force: true });
  try {
    const m = await extractRelease(tarball, dir);
    writeAtomic(join(dir, SLOT_INFO), JSON.stringify({ version: m.version }) + '\n');
    switchCurrent(root, 'a');
    writeState(root, { current: 'a' });
    return { version: m.version };
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

/**
 * Unpacks a verified release into the inactive slot, checks it, switches `current` to it and records a
 * trial: the supervisor restarts into it, and switches back unless it marks itself good within trialMs.
 */
export async function installIntoInactiveSlot(root: string, tarball: string, expectedVersion: string, trialMs: number, clock: () => number = Date.now): Promise<InstallResult> {
  const state = readState(root);
  if (state.trial) throw new PhantomaError(ERRORS.UPDATE_INSTALL_FAILED, `slot ${state.trial.slot} is still on trial; wait for its outcome`);
  const running = currentSlot(root);
  const target = otherSlot(running);
  // Unpacked and checked beside the slots first: a refused release leaves both slots as they were.
  const staging = join(root, 'slots', '.incoming');
  rmSync(staging, { recursive: true, force: true });
  let manifest: Manifest;
  try {
    manifest = await extractRelease(tarball, staging);
    if (manifest.version !== expectedVersion) throw mismatch(`the manifest says ${manifest.version}, the signed target says ${expectedVersion}`);
    writeAtomic(join(staging, SLOT_INFO), JSON.stringify({ version: manifest.version }) + '\n');
    const dir = slotDir(root, target);
    rmSync(dir, { recursive: true, force: true });
    renameSync(staging, dir);
  } catch (err) {
    rmSync(staging, { recursive: true, force: true });
    if (err instanceof PhantomaError) throw err;
    throw new PhantomaError(ERRORS.UPDATE_INSTALL_FAILED, `could not install into slot ${target}: ${(err as Error).message}`, { cause: err });
  }
  rmSync(join(root, 'trial-ok'), { force: true });
  const trial: TrialState = { slot: target, version: manifest.version, previous: running, startedAt: new Date(clock()).toISOString(), deadlineMs: trialMs };
  writeState(root, { ...state, current: target, previous: running, trial });
  switchCurrent(root, target);
  return { slot: target, version: manifest.version, trial };
}

/** Called by the new version once it is ready: ends its trial as good. */
export function markTrialGood(root: string, slot: SlotName, version: string): void {
  writeAtomic(join(root, 'trial-ok'), JSON.stringify({ slot, version }) + '\n');
}

export function trialMarkedGood(root: string, trial: TrialState): boolean {
  try {
    const v = JSON.parse(readFileSync(join(root, 'trial-ok'), 'utf8')) as { slot?: string; version?: string };
    return v.slot === trial.slot && v.version === trial.version;
  } catch {
    return false;
  }
}

/** The supervisor's decision after a trial: keep (good) or switch back to the previous slot. */
export function concludeTrial(root: string, good: boolean, code?: string): UpdateState {
  const state = readState(root);
  const trial = state.trial;
  if (!trial) return state;
  const at = new Date().toISOString();
  let next: UpdateState;
  if (good) {
    next = { current: trial.slot, previous: trial.previous, last: { result: 'installed', version: trial.version, at } };
  } else {
    switchCurrent(root, trial.previous);
    // No `previous`: the failed slot is not something to roll back to.
    next = { current: trial.previous, last: { result: 'rolled_back', version: trial.version, code: code ?? ERRORS.UPDATE_TRIAL_FAILED.code, at } };
  }
  writeState(root, next);
  rmSync(join(root, 'trial-ok'), { force: true });
  return next;
}

/** `phantoma update rollback`: back to the previous slot, if it still holds a release. */
export function rollbackToPrevious(root: string): UpdateState {
  const state = readState(root);
  const prev = state.previous;
  if (!prev || !slotVersion(root, prev)) throw new PhantomaError(ERRORS.UPDATE_NO_PREVIOUS_SLOT, 'there is no previous slot to roll back to');
  const from = currentSlot(root);
  switchCurrent(root, prev);
  const next: UpdateState = { current: prev, previous: from, last: { result: 'manual_rollback', version: slotVersion(root, prev)!, at: new Date().toISOString() } };
  writeState(root, next);
  return next;
}

/**
 * Called by the node once it serves: if the slot it runs from is on trial, it marks the trial good (the
 * supervisor then keeps it). A node outside an A/B layout (development, tests) finds no state and does
 * nothing. Returns the version marked, if any.
 */
export function markGoodIfOnTrial(root: string, runningFrom: string = process.argv[1] ?? ''): string | undefined {
  if (!existsSync(join(root, 'update-state.json'))) return undefined;
  const trial = readState(root).trial;
  if (!trial) return undefined;
  // Only the release in the trial slot may vouch for itself.
  if (!runningFrom.startsWith(`${slotDir(root, trial.slot)}/`) && !runningFrom.startsWith(`${join(root, 'current')}/`)) return undefined;
  if (currentSlot(root) !== trial.slot) return undefined;
  markTrialGood(root, trial.slot, trial.version);
  return trial.version;
}

/** The last update outcome for the heartbeat (nothing when the node runs outside an A/B layout). */
export function lastUpdateOutcome(root: string): { result: UpdateOutcome['result']; version: string; code?: string; at: string } | undefined {
  try {
    if (!existsSync(join(root, 'update-state.json'))) return undefined;
    const last = readState(root).last;
    if (!last) return undefined;
    return { result: last.result, version: last.version, ...(last.code ? { code: last.code } : {}), at: last.at };
  } catch {
    return undefined;
  }
}
