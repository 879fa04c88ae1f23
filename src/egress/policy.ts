// What "the egress filter is in place" means, checked against the kernel's word: the warden answers
// BPF_PROG_QUERY for workers/ and download/, and every hook of both must carry a program whose tag is
// the tag of the object we built (native/warden/build/egress.tags, written by `make` from the embedded
// object as this kernel loads it). Pin files are never evidence: a pin can outlive its attachment.
// The policy hash (program tags + allowlists + mode) goes into the key document and receipts.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { projectRoot } from '../paths.ts';
import { HOOKS, SETS, type EgressStatus, type Hook } from './warden-egress.ts';

export type ExpectedTags = ReadonlyMap<Hook, string>;

export function egressTagsPath(): string {
  return join(projectRoot(), 'native', 'warden', 'build', 'egress.tags');
}

/** Reads the build's tag manifest ("<hook> <16 hex>" per line); throws when missing or incomplete. */
export function loadExpectedTags(path = egressTagsPath()): ExpectedTags {
  const text = readFileSync(path, 'utf8');
  const tags = new Map<Hook, string>();
  for (const line of text.split('\n')) {
    const m = /^([a-z0-9]+) ([0-9a-f]{16})$/.exec(line.trim());
    if (m && (HOOKS as readonly string[]).includes(m[1]!)) tags.set(m[1] as Hook, m[2]!);
  }
  for (const h of HOOKS) if (!tags.has(h)) throw new Error(`${path} names no tag for ${h}: rebuild with make -C native/warden`);
  return tags;
}

/** Everything wrong with a status, as short reasons; empty when the filter is attached as built. */
export function checkStatus(status: EgressStatus, expected: ExpectedTags): string[] {
  if (status.mode !== 'enforce' || !status.sets) return ['the warden runs with --egress off: no egress filter is loaded'];
  const reasons: string[] = [];
  for (const s of SETS) {
    for (const h of HOOKS) {
      const progs = status.sets[s].programs[h];
      if (typeof progs === 'string') {
        reasons.push(`${s}/${h}: BPF_PROG_QUERY failed (${progs})`);
        continue;
      }
      const want = expected.get(h);
      if (progs.length === 0) reasons.push(`${s}/${h}: no program attached`);
      else if (!progs.some((p) => p.tag === want)) reasons.push(`${s}/${h}: attached program tag ${progs.map((p) => p.tag).join('+')} is not the built ${want}`);
    }
  }
  if (status.workersAllowCount !== 0) reasons.push(`workers/ allowlist has ${status.workersAllowCount} entries (must be empty)`);
  return reasons;
}

/**
 * sha256 over the mode, the built program tags and both allowlists, canonically ordered. The same
 * filter gives the same hash on every node; "off" gives a distinct one, so a key document or receipt
 * shows a development node for what it is.
 */
export function egressPolicyHash(input: { mode: 'enforce' | 'off'; expected?: ExpectedTags; downloadAllow?: readonly string[] }): string {
  const doc =
    input.mode === 'off'
      ? { v: 1, mode: 'off' }
      : {
          v: 1,
          mode: 'enforce',
          programs: HOOKS.map((h) => [h, input.expected?.get(h) ?? '']),
          allow: { workers: [], download: [...(input.downloadAllow ?? [])].sort() },
        };
  return createHash('sha256').update(JSON.stringify(doc)).digest('hex');
}
