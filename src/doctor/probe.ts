// The I/O edge of `phantoma doctor`: reads what the pure checks in checks.ts judge. Every read tolerates an
// absent or unreadable source (undefined), and the checks decide what that means. The only side effect is
// the tmpfs noswap test: as root, a tiny tmpfs is mounted in a fresh temporary directory and unmounted at once.
import { execFileSync } from 'node:child_process';
import { closeSync, constants, existsSync, mkdtempSync, openSync, readFileSync, readSync, readdirSync, readlinkSync, realpathSync, rmdirSync, statSync } from 'node:fs';
import { release, tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import {
  classifyBlockDevice,
  parseSwaps,
  runChecks,
  unescapeProcPath,
  type CheckResult,
  type HostFacts,
  type JournaldInput,
  type NoswapTest,
  type SwapDevice,
  type SysBlockView,
} from './checks.ts';

function readText(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

function listDir(path: string): string[] {
  try {
    return readdirSync(path).sort();
  } catch {
    return [];
  }
}

const SYS_BLOCK = '/sys/class/block';

export const sysBlock: SysBlockView = {
  read: (rel) => readText(join(SYS_BLOCK, rel))?.trim(),
  list: (rel) => listDir(join(SYS_BLOCK, rel)),
};

/** Linux's dev_t split (glibc's gnu_dev_major/minor). */
function majorMinor(dev: bigint): string {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

/** The sysfs block device name behind a swap area: the device itself, or the one holding a swap file. */
function swapBlockDevice(path: string, type: string, mountinfo: string | undefined): string | undefined {
  try {
    if (type === 'partition') return basename(realpathSync(path));
    const link = readlinkSync(`/sys/dev/block/${majorMinor(statSync(path, { bigint: true }).dev)}`);
    return basename(link);
  } catch {
    // A file on a filesystem with an anonymous device number (btrfs): use its mount's source device.
  }
  let best: { point: string; source: string } | undefined;
  for (const line of (mountinfo ?? '').split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const point = unescapeProcPath(line.slice(0, sep).split(' ')[4] ?? '');
    const source = unescapeProcPath(line.slice(sep + 3).split(' ')[1] ?? '');
    const inside = point === '/' || path === point || path.startsWith(point + '/');
    if (inside && source.startsWith('/dev/') && (!best || point.length > best.point.length)) best = { point, source };
  }
  if (!best) return undefined;
  try {
    return basename(realpathSync(best.source));
  } catch {
    return undefined;
  }
}

/** The active swap areas with what backs each; undefined when /proc/swaps cannot be read. The node uses this with swapPolicy(). */
export function probeSwaps(): SwapDevice[] | undefined {
  const text = readText('/proc/swaps');
  if (text === undefined) return undefined;
  const mountinfo = readText('/proc/self/mountinfo');
  return parseSwaps(text).map((entry) => {
    const dev = swapBlockDevice(entry.path, entry.type, mountinfo);
    const cls = dev === undefined ? { backing: 'unknown' as const, via: 'no block device found' } : classifyBlockDevice(dev, sysBlock);
    return { ...entry, ...cls };
  });
}

/** The kernel's "mem auto-init: …" boot line, from /dev/kmsg (root, or dmesg_restrict=0); undefined if not there. */
function kernelAutoInitLine(): string | undefined {
  let fd: number;
  try {
    fd = openSync('/dev/kmsg', constants.O_RDONLY | constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
  const buf = Buffer.alloc(8192);
  try {
    for (let i = 0; i < 100_000; i++) {
      let n: number;
      try {
        n = readSync(fd, buf, 0, buf.length, null);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EPIPE') continue; // a record was overwritten while reading: skip to the next
        break; // EAGAIN: the end of the buffer
      }
      if (n <= 0) break;
      const record = buf.toString('utf8', 0, n);
      const at = record.indexOf('mem auto-init:');
      if (at >= 0) return record.slice(at).split('\n')[0]!.trim();
    }
  } finally {
    closeSync(fd);
  }
  return undefined;
}

function kernelConfig(kernelRelease: string): string | undefined {
  try {
    return gunzipSync(readFileSync('/proc/config.gz')).toString('utf8');
  } catch {
    return readText(`/boot/config-${kernelRelease}`);
  }
}

// systemd's search order, highest precedence first.
const SYSTEMD_CONF_DIRS = ['/etc/systemd', '/run/systemd', '/usr/local/lib/systemd', '/usr/lib/systemd'];

function journaldInput(): JournaldInput {
  const files: { path: string; text: string }[] = [];
  for (const dir of SYSTEMD_CONF_DIRS) {
    const path = join(dir, 'journald.conf');
    const text = readText(path);
    if (text !== undefined) {
      files.push({ path, text });
      break;
    }
  }
  // Drop-ins: ordered by file name across all directories; a name in a higher directory masks the lower ones.
  const dropins = new Map<string, string>();
  for (const dir of [...SYSTEMD_CONF_DIRS].reverse()) {
    for (const name of listDir(join(dir, 'journald.conf.d'))) if (name.endsWith('.conf')) dropins.set(name, join(dir, 'journald.conf.d', name));
  }
  for (const name of [...dropins.keys()].sort()) {
    const path = dropins.get(name)!;
    const text = readText(path);
    if (text !== undefined) files.push({ path, text });
  }
  const installed = files.length > 0 || ['/usr/lib/systemd/systemd-journald', '/lib/systemd/systemd-journald'].some((p) => existsSync(p));
  return { files, persistentDirExists: existsSync('/var/log/journal'), installed };
}

function mountOptionsOf(mountPoint: string): string[] | undefined {
  for (const line of (readText('/proc/self/mountinfo') ?? '').split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    if (unescapeProcPath(line.slice(0, sep).split(' ')[4] ?? '') !== mountPoint) continue;
    const post = line.slice(sep + 3).split(' ');
    if (post[0] === 'tmpfs') return (post[2] ?? '').split(',');
  }
  return undefined;
}

function tryMount(dir: string, options: string): { ok: boolean; message?: string; options?: string[] } {
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'phantoma-doctor', dir], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 });
  } catch (err) {
    const e = err as { stderr?: Buffer; message: string };
    return { ok: false, message: (e.stderr?.toString().trim() || e.message).split('\n')[0] };
  }
  try {
    return { ok: true, options: mountOptionsOf(dir) ?? [] };
  } finally {
    execFileSync('umount', [dir], { stdio: 'ignore', timeout: 10_000 });
  }
}

/** As root: mounts a 64 KiB tmpfs without, then with, noswap in a fresh temporary directory. */
export function noswapTest(): { test?: NoswapTest; reason?: string } {
  if (process.getuid?.() !== 0) return { reason: 'not root, so no test mount' };
  let dir: string;
  try {
    dir = mkdtempSync(join(tmpdir(), 'phantoma-doctor-'));
  } catch (err) {
    return { reason: `no temporary directory: ${(err as Error).message}` };
  }
  try {
    const control = tryMount(dir, 'size=64k,mode=0700');
    if (!control.ok) return { test: { control: false, noswap: false, listed: false, ...(control.message ? { message: control.message } : {}) } };
    const withNoswap = tryMount(dir, 'size=64k,mode=0700,noswap');
    const message = withNoswap.message ?? (withNoswap.ok ? `mounted with ${withNoswap.options?.join(',')}` : undefined);
    return { test: { control: true, noswap: withNoswap.ok, listed: withNoswap.options?.includes('noswap') ?? false, ...(message ? { message } : {}) } };
  } finally {
    try {
      rmdirSync(dir);
    } catch {
      // still mounted (umount failed): leave it rather than remove anything inside a mount
    }
  }
}

/** Reads everything the checks need from this host. */
export function gatherFacts(): HostFacts {
  const kernelRelease = release();
  const mountinfo = readText('/proc/self/mountinfo');
  const v2 = (mountinfo ?? '').split('\n').find((l) => l.includes(' - cgroup2 '));
  const v2Point = v2 ? unescapeProcPath(v2.split(' ')[4] ?? '') : undefined;
  const noswap = noswapTest();
  return {
    swaps: probeSwaps(),
    suidDumpable: readText('/proc/sys/fs/suid_dumpable'),
    corePattern: readText('/proc/sys/kernel/core_pattern'),
    yamaPtraceScope: readText('/proc/sys/kernel/yama/ptrace_scope'),
    initOnFree: { cmdline: readText('/proc/cmdline'), autoInitLine: kernelAutoInitLine(), kernelConfig: kernelConfig(kernelRelease) },
    journald: journaldInput(),
    mountinfo,
    v2Controllers: v2Point === undefined ? undefined : readText(join(v2Point, 'cgroup.controllers')),
    kernelRelease,
    noswapTest: noswap.test,
    ...(noswap.reason !== undefined ? { noswapNoTestReason: noswap.reason } : {}),
  };
}

/** Runs every doctor check against this host. */
export function probeHost(): CheckResult[] {
  return runChecks(gatherFacts());
}
