// Which cgroup this process is in, as an id the warden's egress status can be compared with (a cgroup's
// id is its kernfs inode number). The gateway checks that the programs the warden attached for it sit
// on its own cgroup, not on one it had before a restart.
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** The cgroup2 mount point from a mountinfo text (the first cgroup2 mount), or undefined. */
export function cgroup2MountOf(mountinfo: string): string | undefined {
  for (const line of mountinfo.split('\n')) {
    const f = line.split(' ');
    const dash = f.indexOf('-');
    if (dash > 0 && f[dash + 1] === 'cgroup2') return f[4]!.replace(/\\040/g, ' ');
  }
  return undefined;
}

/** The "0::" path of a /proc/<pid>/cgroup text (cgroup v2), or undefined. */
export function cgroup2PathOf(procCgroup: string): string | undefined {
  return procCgroup.split('\n').find((l) => l.startsWith('0::'))?.slice(3);
}

/** This process's cgroup2 directory and id; throws when there is no cgroup2 (then nothing can be confined). */
export function ownCgroup(): { dir: string; id: number } {
  const mount = cgroup2MountOf(readFileSync('/proc/self/mountinfo', 'utf8'));
  const rel = cgroup2PathOf(readFileSync('/proc/self/cgroup', 'utf8'));
  if (!mount || rel === undefined) throw new Error('no cgroup2 hierarchy: this process has no cgroup the egress filter could be attached to');
  const dir = join(mount, rel);
  return { dir, id: statSync(dir).ino };
}
