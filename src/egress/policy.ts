// What "the egress filter is in place" means, checked against the kernel's word: the warden answers
// BPF_PROG_QUERY for workers/ and download/ (and, where the gateway is confined, its own cgroup), and
// every hook of them must carry a program whose tag is the tag of the object we built (native/warden/build/egress.tags, written by `make` from the embedded
// object as this kernel loads it). Pin files are never evidence: a pin can outlive its attachment.
// The policy hash (program tags + allowlists + mode) goes into the key document and receipts.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { projectRoot } from '../paths.ts';
import { HOOKS, SETS, SOCK_HOOKS, type AttachedProgram, type EgressStatus, type Hook } from './warden-egress.ts';

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
  for (const s of SETS) for (const h of HOOKS) checkHook(`${s}/${h}`, status.sets[s].programs[h], expected.get(h), reasons);
  if (status.workersAllowCount !== 0) reasons.push(`workers/ allowlist has ${status.workersAllowCount} entries (must be empty)`);
  return reasons;
}

function checkHook(where: string, progs: AttachedProgram[] | string, want: string | undefined, reasons: string[]): void {
  if (typeof progs === 'string') reasons.push(`${where}: BPF_PROG_QUERY failed (${progs})`);
  else if (progs.length === 0) reasons.push(`${where}: no program attached`);
  else if (!progs.some((p) => p.tag === want)) reasons.push(`${where}: attached program tag ${progs.map((p) => p.tag).join('+')} is not the built ${want}`);
}

/**
 * Everything wrong with the gateway's own confinement (issue 13): the warden must run with
 * --gateway-egress, and its connect/sendmsg programs must sit on THIS process's cgroup (ownCgroupId),
 * as built. Empty when confined.
 */
export function checkGateway(status: EgressStatus, expected: ExpectedTags, ownCgroupId: number): string[] {
  const g = status.gateway;
  if (status.mode !== 'enforce' || !g) return ['the warden runs without --gateway-egress: nothing limits the gateway\'s own connections'];
  if (g.cgroupId !== ownCgroupId) return [g.cgroupId === 0 ? 'the gateway set is attached to no cgroup yet' : `the gateway set is on cgroup ${g.cgroupId}, not on this gateway's ${ownCgroupId}`];
  const reasons: string[] = [];
  for (const h of SOCK_HOOKS) checkHook(`gateway/${h}`, g.programs[h], expected.get(h), reasons);
  return reasons;
}

/**
 * sha256 over the mode, the built program tags and the allowlists, canonically ordered. The same
 * filter gives the same hash on every node; "off" gives a distinct one, so a key document or receipt
 * shows a development node for what it is.
 */
export function egressPolicyHash(input: { mode: 'enforce' | 'off'; expected?: ExpectedTags; downloadAllow?: readonly string[]; gatewayAllow?: readonly string[] }): string {
  const doc =
    input.mode === 'off'
      ? { v: 1, mode: 'off' }
      : {
          v: 1,
          mode: 'enforce',
          programs: HOOKS.map((h) => [h, input.expected?.get(h) ?? '']),
          // The gateway's allowlist only where the gateway is confined: a node without it keeps its hash.
          allow: { workers: [], download: [...(input.downloadAllow ?? [])].sort(), ...(input.gatewayAllow ? { gateway: [...input.gatewayAllow].sort() } : {}) },
        };
  return createHash('sha256').update(JSON.stringify(doc)).digest('hex');
}
