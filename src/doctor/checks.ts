// `phantoma doctor`: pure host checks. Each function takes the raw texts or values it judges (read by
// src/doctor/probe.ts, the only I/O) and returns pass / warn / fail with a one-line summary and, where it
// helps, what to do. `fail` means the node cannot keep its promises on this host (or will refuse to work);
// `warn` means a weaker guarantee worth fixing; nothing here decides anything from names or guesses alone.

export type CheckStatus = 'pass' | 'warn' | 'fail';

export interface CheckResult {
  id: string;
  status: CheckStatus;
  summary: string;
  detail?: string;
}

export const CHECK_IDS = ['swap', 'core-dumps', 'yama-ptrace', 'init-on-free', 'journald', 'cgroups', 'tmpfs-noswap'] as const;
export type CheckId = (typeof CHECK_IDS)[number];

function result(id: CheckId, status: CheckStatus, summary: string, detail?: string): CheckResult {
  return detail === undefined ? { id, status, summary } : { id, status, summary, detail };
}

/** Decodes the octal escapes (\040 space, \011 tab, \012 newline, \134 backslash) of /proc/swaps and mountinfo. */
export function unescapeProcPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** A kernel release "6.18.44-fc-v782" as [6, 18]; undefined when it does not start with major.minor. */
export function kernelVersion(release: string): [number, number] | undefined {
  const m = /^(\d+)\.(\d+)/.exec(release.trim());
  return m ? [Number(m[1]), Number(m[2])] : undefined;
}

function atLeast(release: string, major: number, minor: number): boolean | undefined {
  const v = kernelVersion(release);
  if (!v) return undefined;
  return v[0] > major || (v[0] === major && v[1] >= minor);
}

// ── swap ─────────────────────────────────────────────────────────────────────────────────────────────────

export interface SwapEntry {
  path: string;
  type: string;
  sizeKiB: number;
  usedKiB: number;
  priority: number;
}

/** /proc/swaps, header line skipped. */
export function parseSwaps(text: string): SwapEntry[] {
  const out: SwapEntry[] = [];
  for (const line of text.split('\n').slice(1)) {
    // The path has its blanks escaped, but a " (deleted)" suffix is not: match the numeric columns from the end.
    const m = /^(.+?)\s+(\S+)\s+(\d+)\s+(\d+)\s+(-?\d+)\s*$/.exec(line.trim());
    if (!m) continue;
    out.push({
      path: unescapeProcPath(m[1]!.replace(/ \(deleted\)$/, '')),
      type: m[2]!,
      sizeKiB: Number(m[3]),
      usedKiB: Number(m[4]),
      priority: Number(m[5]),
    });
  }
  return out;
}

/**
 * Where a swap area's pages end up: `dm-crypt` (encrypted block device, possibly under LVM), `zram`
 * (compressed RAM, no writeback device), `plain` (an unencrypted disk), `unknown` (could not be resolved:
 * treated as unencrypted).
 */
export type SwapBacking = 'dm-crypt' | 'zram' | 'plain' | 'unknown';

export interface SwapDevice extends SwapEntry {
  backing: SwapBacking;
  /** The block device chain that decided it, e.g. "dm-1 → dm-0 (CRYPT-LUKS2-…)". */
  via: string;
}

/** A read-only view of /sys/class/block: file contents (trimmed) and directory listings by relative path. */
export interface SysBlockView {
  read(rel: string): string | undefined;
  list(rel: string): string[];
}

/**
 * Classifies a block device by its sysfs name (vda2, dm-0, zram0, nvme0n1p3). A device-mapper device is
 * encrypted when its uuid starts with CRYPT- or when every device below it (slaves/) is; zram is RAM unless
 * it has a writeback backing_dev, which is then classified in turn.
 */
export function classifyBlockDevice(name: string, sys: SysBlockView, depth = 0): { backing: SwapBacking; via: string } {
  if (depth > 8 || !/^[A-Za-z0-9._:-]+$/.test(name)) return { backing: 'unknown', via: name };
  if (sys.read(`${name}/dev`) === undefined) return { backing: 'unknown', via: `${name} (not in /sys/class/block)` };
  if (/^zram\d+$/.test(name)) {
    const backingDev = sys.read(`${name}/backing_dev`);
    if (backingDev === undefined || backingDev === 'none' || backingDev === '') return { backing: 'zram', via: `${name} (RAM, no writeback)` };
    const below = classifyBlockDevice(backingDev.split('/').pop() ?? '', sys, depth + 1);
    return { backing: below.backing === 'zram' ? 'unknown' : below.backing, via: `${name} writeback → ${below.via}` };
  }
  const uuid = sys.read(`${name}/dm/uuid`);
  if (uuid !== undefined && uuid.startsWith('CRYPT-')) return { backing: 'dm-crypt', via: `${name} (${uuid.split('-').slice(0, 2).join('-')})` };
  const slaves = sys.list(`${name}/slaves`);
  if (slaves.length > 0) {
    const below = slaves.map((s) => classifyBlockDevice(s, sys, depth + 1));
    const via = `${name} → ${below.map((b) => b.via).join(' + ')}`;
    if (below.every((b) => b.backing === 'dm-crypt')) return { backing: 'dm-crypt', via };
    return { backing: below.some((b) => b.backing === 'unknown') ? 'unknown' : 'plain', via };
  }
  return { backing: 'plain', via: uuid === undefined ? name : `${name} (${uuid || 'dm, no uuid'})` };
}

function isProtected(d: SwapDevice): boolean {
  return d.backing === 'dm-crypt' || d.backing === 'zram';
}

function describeSwap(d: SwapDevice): string {
  return `${d.path} (${d.type}, ${Math.round(d.sizeKiB / 1024)} MiB, ${d.backing} via ${d.via})`;
}

export function checkSwap(swaps: SwapDevice[] | undefined): CheckResult {
  if (swaps === undefined) return result('swap', 'fail', 'cannot read /proc/swaps', 'without it the node cannot tell whether worker memory may reach a disk');
  if (swaps.length === 0) return result('swap', 'pass', 'swap is off');
  const exposed = swaps.filter((d) => !isProtected(d));
  if (exposed.length === 0) return result('swap', 'pass', `swap is on, all of it encrypted or in RAM: ${swaps.map((d) => d.path).join(', ')}`, swaps.map(describeSwap).join('\n'));
  return result(
    'swap',
    'fail',
    `unencrypted swap is on: ${exposed.map((d) => d.path).join(', ')}`,
    `${swaps.map(describeSwap).join('\n')}\nWorker memory (prompts, answers, keys) could be written to disk. Turn swap off (swapoff -a and remove it from /etc/fstab) or put it on dm-crypt with a random key (crypttab "swap" option). The node refuses to start workers while this is so, unless the operator explicitly allows unencrypted swap.`,
  );
}

/** The node's swap rule: no workers on a host with unencrypted swap unless the operator explicitly allows it. */
export function swapPolicy(swaps: SwapDevice[], allowUnencryptedSwap: boolean): { allowed: boolean; warning?: string } {
  const exposed = swaps.filter((d) => !isProtected(d));
  if (exposed.length === 0) return { allowed: true };
  const list = exposed.map((d) => `${d.path} (${d.backing})`).join(', ');
  if (allowUnencryptedSwap) {
    return { allowed: true, warning: `UNENCRYPTED SWAP IS ON (${list}): worker memory may be written to disk; starting workers only because the operator allowed unencrypted swap` };
  }
  return { allowed: false, warning: `unencrypted swap is on (${list}): refusing to start workers; turn swap off or encrypt it, or explicitly allow unencrypted swap` };
}

// ── core dumps ──────────────────────────────────────────────────────────────────────────────────────────

/** A core_pattern pipe whose program stores nothing. */
function discardingPipe(pattern: string): boolean {
  const program = pattern.slice(1).trim().split(/\s+/)[0] ?? '';
  return ['/bin/false', '/usr/bin/false', '/bin/true', '/usr/bin/true'].includes(program);
}

/**
 * fs.suid_dumpable and kernel.core_pattern. Phantoma's processes are non-dumpable with RLIMIT_CORE 0, so the
 * host settings matter where they override that: suid_dumpable=1 dumps non-dumpable processes anyway;
 * suid_dumpable=2 dumps them as root, and through a pipe the kernel does not apply RLIMIT_CORE.
 */
export function checkCoreDumps(suidDumpable: string | undefined, corePattern: string | undefined): CheckResult {
  if (suidDumpable === undefined || corePattern === undefined) {
    return result('core-dumps', 'fail', `cannot read ${suidDumpable === undefined ? '/proc/sys/fs/suid_dumpable' : '/proc/sys/kernel/core_pattern'}`);
  }
  const mode = suidDumpable.trim();
  const pattern = corePattern.trim();
  const pipe = pattern.startsWith('|');
  const storingPipe = pipe && !discardingPipe(pattern);
  const settings = `fs.suid_dumpable=${mode}, kernel.core_pattern=${pattern}`;
  const fix = 'set fs.suid_dumpable=0 (sysctl.d) and, if cores are piped to a handler, tell it to store nothing (systemd-coredump: Storage=none in /etc/systemd/coredump.conf) or set kernel.core_pattern=|/bin/false';
  if (mode === '1') return result('core-dumps', 'fail', `${settings}: even non-dumpable processes dump core`, fix);
  if (mode === '2' && storingPipe) {
    return result('core-dumps', 'fail', `${settings}: non-dumpable processes dump to a handler, and RLIMIT_CORE does not stop a pipe`, fix);
  }
  if (mode === '2') return result('core-dumps', 'warn', `${settings}: non-dumpable processes are dumped (root-only)`, fix);
  if (mode !== '0') return result('core-dumps', 'fail', `fs.suid_dumpable has an unknown value "${mode}"`, fix);
  if (storingPipe) {
    return result('core-dumps', 'warn', `${settings}: cores of dumpable processes go to a handler that may store them`, `Phantoma's workers and gateway are non-dumpable, so they are not dumped; other processes may be. ${fix}`);
  }
  return result('core-dumps', 'pass', `${settings}: non-dumpable processes are never dumped`, pipe ? 'cores are discarded' : 'cores of dumpable processes go to files per core_pattern; Phantoma\'s processes are non-dumpable with RLIMIT_CORE 0');
}

// ── Yama ────────────────────────────────────────────────────────────────────────────────────────────────

/** kernel.yama.ptrace_scope; undefined when this kernel has no Yama (never a failure). */
export function checkYama(ptraceScope: string | undefined): CheckResult {
  if (ptraceScope === undefined) {
    return result('yama-ptrace', 'warn', 'no Yama on this kernel: ptrace is limited by uid and dumpable only', 'workers run under their own uids and are non-dumpable, so they cannot trace the gateway or each other; Yama (ptrace_scope >= 1) would add a second fence');
  }
  const v = ptraceScope.trim();
  if (v === '0') return result('yama-ptrace', 'warn', 'kernel.yama.ptrace_scope=0: classic ptrace permissions', 'set kernel.yama.ptrace_scope=1 (or 2) in sysctl.d');
  if (v === '1' || v === '2' || v === '3') return result('yama-ptrace', 'pass', `kernel.yama.ptrace_scope=${v}`);
  return result('yama-ptrace', 'warn', `kernel.yama.ptrace_scope has an unknown value "${v}"`);
}

// ── init_on_free ────────────────────────────────────────────────────────────────────────────────────────

export interface InitOnFreeInput {
  /** /proc/cmdline. */
  cmdline: string | undefined;
  /** The kernel's own boot line "mem auto-init: stack:…, heap alloc:…, heap free:…", if still in the log. */
  autoInitLine: string | undefined;
  /** The kernel build configuration (/proc/config.gz or /boot/config-*), if available. */
  kernelConfig: string | undefined;
}

function flagValue(v: string): boolean | undefined {
  if (/^(1|on|y|yes|true)$/i.test(v)) return true;
  if (/^(0|off|n|no|false)$/i.test(v)) return false;
  return undefined;
}

/**
 * Whether freed pages are zeroed (init_on_free=1): with it, a worker's memory is wiped by the kernel as the
 * worker dies, instead of lingering in free pages until reused. The boot log line is the kernel's own word;
 * otherwise the command line, then the build default.
 */
export function checkInitOnFree(input: InitOnFreeInput): CheckResult {
  const fix = 'add init_on_free=1 to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub and reboot)';
  const logged = input.autoInitLine !== undefined ? /heap free:\s*(on|off)/.exec(input.autoInitLine)?.[1] : undefined;
  // The last occurrence on the command line wins, as for the kernel's own parsing.
  const params = (input.cmdline ?? '').split(' -- ')[0]!.trim().split(/\s+/);
  const cmd = params.filter((p) => p.startsWith('init_on_free=')).pop();
  const cmdValue = cmd === undefined ? undefined : flagValue(cmd.slice('init_on_free='.length));
  const configDefault = input.kernelConfig === undefined ? undefined : /^CONFIG_INIT_ON_FREE_DEFAULT_ON=y$/m.test(input.kernelConfig);
  const sources = [
    logged !== undefined ? `kernel log: heap free:${logged}` : 'kernel log: no "mem auto-init" line',
    cmd !== undefined ? `command line: ${cmd}` : input.cmdline === undefined ? 'command line: unreadable' : 'command line: no init_on_free',
    configDefault === undefined ? 'build default: unknown' : `build default: CONFIG_INIT_ON_FREE_DEFAULT_ON=${configDefault ? 'y' : 'n'}`,
  ].join('; ');
  if (logged === 'on') return result('init-on-free', 'pass', 'freed memory is zeroed by the kernel (init_on_free on)', sources);
  if (logged === 'off') {
    const why = cmdValue === true ? 'the command line asks for it but the kernel reports it off' : 'it is off';
    return result('init-on-free', 'warn', `freed memory is not zeroed: ${why}`, `${sources}\n${fix}`);
  }
  const effective = cmdValue ?? configDefault;
  if (effective === true) return result('init-on-free', 'pass', `freed memory is zeroed (init_on_free on, from the ${cmdValue !== undefined ? 'command line' : 'build default'})`, sources);
  if (effective === false) return result('init-on-free', 'warn', 'freed memory is not zeroed (init_on_free off)', `${sources}\n${fix}`);
  return result('init-on-free', 'warn', 'cannot tell whether freed memory is zeroed, and the command line does not ask for it', `${sources}\n${fix}`);
}

// ── journald ────────────────────────────────────────────────────────────────────────────────────────────

export interface JournaldInput {
  /** journald.conf then its drop-ins, in the order systemd applies them. */
  files: { path: string; text: string }[];
  /** Whether /var/log/journal exists (Storage=auto then persists). */
  persistentDirExists: boolean;
  /** Whether journald is installed at all. */
  installed: boolean;
}

/** The effective Storage= of journald: the last assignment in [Journal] sections wins; default "auto". */
export function journaldStorage(files: { path: string; text: string }[]): { value: string; from: string } {
  let value = 'auto';
  let from = 'default';
  for (const f of files) {
    let section = '';
    for (const raw of f.text.split('\n')) {
      const line = raw.trim();
      if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
      const sec = /^\[(.+)\]$/.exec(line);
      if (sec) {
        section = sec[1]!;
        continue;
      }
      const kv = /^Storage\s*=\s*(.*)$/.exec(line);
      if (section === 'Journal' && kv) {
        value = kv[1]!.trim().toLowerCase() || 'auto';
        from = f.path;
      }
    }
  }
  return { value, from };
}

/**
 * Phantoma logs no content, so a persistent journal is not a leak by itself; but on a node whose promise is
 * "nothing persists", volatile logs are the better default, and any stray line would survive otherwise.
 */
export function checkJournald(input: JournaldInput): CheckResult {
  if (!input.installed) return result('journald', 'pass', 'journald is not installed');
  const { value, from } = journaldStorage(input.files);
  const where = `Storage=${value} (${from})`;
  const fix = 'set Storage=volatile in /etc/systemd/journald.conf.d/phantoma.conf and restart systemd-journald';
  if (value === 'volatile' || value === 'none') return result('journald', 'pass', `journal kept in RAM only: ${where}`);
  if (value === 'persistent') return result('journald', 'warn', `journal written to disk: ${where}`, fix);
  if (value === 'auto') {
    return input.persistentDirExists
      ? result('journald', 'warn', `journal written to disk: ${where} and /var/log/journal exists`, fix)
      : result('journald', 'pass', `journal kept in RAM: ${where} and /var/log/journal does not exist`, `creating /var/log/journal would make it persistent; ${fix} to be sure`);
  }
  return result('journald', 'warn', `unknown journald storage: ${where}`, fix);
}

// ── cgroups ─────────────────────────────────────────────────────────────────────────────────────────────

export interface CgroupMount {
  version: 1 | 2;
  mountPoint: string;
  /** The mount's root inside the hierarchy ("/" unless this is a namespaced or bind view). */
  root: string;
  /** v1: the controllers bound to the hierarchy (name=… for named ones); v2: filled from cgroup.controllers. */
  controllers: string[];
}

const V1_CONTROLLERS = new Set(['cpu', 'cpuacct', 'cpuset', 'memory', 'devices', 'freezer', 'net_cls', 'blkio', 'perf_event', 'net_prio', 'hugetlb', 'pids', 'rdma', 'misc']);

/** The cgroup and cgroup2 mounts of a /proc/<pid>/mountinfo. */
export function parseCgroupMounts(mountinfo: string): CgroupMount[] {
  const out: CgroupMount[] = [];
  for (const line of mountinfo.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const pre = line.slice(0, sep).split(' ');
    const post = line.slice(sep + 3).split(' ');
    const fstype = post[0];
    if (fstype !== 'cgroup' && fstype !== 'cgroup2') continue;
    const root = unescapeProcPath(pre[3] ?? '/');
    const mountPoint = unescapeProcPath(pre[4] ?? '');
    if (fstype === 'cgroup2') {
      out.push({ version: 2, mountPoint, root, controllers: [] });
    } else {
      const opts = (post[2] ?? '').split(',');
      const controllers = opts.filter((o) => V1_CONTROLLERS.has(o) || o.startsWith('name='));
      out.push({ version: 1, mountPoint, root, controllers });
    }
  }
  return out;
}

export interface ControllerPlacement {
  version: 1 | 2;
  path: string;
}

export interface CgroupLayout {
  v2: CgroupMount | undefined;
  v1: CgroupMount[];
  memory: ControllerPlacement | undefined;
  pids: ControllerPlacement | undefined;
}

/**
 * Which hierarchy serves memory and pids limits: cgroup v2 when its root offers the controller (a standard
 * systemd host), else the v1 hierarchy that has it (a hybrid host such as this one, where v2 has only hugetlb).
 * `v2Controllers` is the text of <cgroup2 mount>/cgroup.controllers.
 */
export function cgroupLayout(mounts: CgroupMount[], v2Controllers: string | undefined): CgroupLayout {
  const v2mount = mounts.find((m) => m.version === 2);
  const v2 = v2mount ? { ...v2mount, controllers: (v2Controllers ?? '').trim().split(/\s+/).filter(Boolean) } : undefined;
  const v1 = mounts.filter((m) => m.version === 1);
  const place = (name: string): ControllerPlacement | undefined => {
    if (v2?.controllers.includes(name)) return { version: 2, path: v2.mountPoint };
    const h = v1.find((m) => m.controllers.includes(name));
    return h ? { version: 1, path: h.mountPoint } : undefined;
  };
  return { v2, v1, memory: place('memory'), pids: place('pids') };
}

export function checkCgroups(mountinfo: string | undefined, v2Controllers: string | undefined): CheckResult {
  if (mountinfo === undefined) return result('cgroups', 'fail', 'cannot read /proc/self/mountinfo');
  const layout = cgroupLayout(parseCgroupMounts(mountinfo), v2Controllers);
  const v2 = layout.v2;
  const lines = [
    v2 ? `cgroup2 at ${v2.mountPoint}${v2.root !== '/' ? ` (root ${v2.root})` : ''}: controllers ${v2.controllers.join(' ') || '(none)'}${v2Controllers === undefined ? ' (cgroup.controllers unreadable)' : ''}` : 'no cgroup2 mount',
    ...layout.v1.map((m) => `cgroup v1 at ${m.mountPoint}: ${m.controllers.join(',')}`),
  ];
  const placed = (name: string, p: ControllerPlacement | undefined) => (p ? `${name}: v${p.version} ${p.path}` : `${name}: none`);
  const summaryTail = `${placed('memory', layout.memory)}; ${placed('pids', layout.pids)}`;
  if (!v2) return result('cgroups', 'fail', `no cgroup2 mount (the warden's worker tree and egress programs need it); ${summaryTail}`, lines.join('\n'));
  const missing = (['memory', 'pids'] as const).filter((c) => layout[c] === undefined);
  if (missing.length > 0) return result('cgroups', 'fail', `no ${missing.join(' or ')} controller in any hierarchy: workers cannot be limited; ${summaryTail}`, lines.join('\n'));
  const kind = layout.memory?.version === 2 && layout.pids?.version === 2 ? 'unified' : 'hybrid';
  return result('cgroups', 'pass', `${kind}: cgroup2 at ${v2.mountPoint}; ${summaryTail}`, lines.join('\n'));
}

// ── tmpfs noswap ────────────────────────────────────────────────────────────────────────────────────────

export interface NoswapTest {
  /** A plain tiny tmpfs mounted (the positive control: mounting works at all here). */
  control: boolean;
  /** The same with `noswap` mounted. */
  noswap: boolean;
  /** The noswap mount's options in mountinfo include noswap. */
  listed: boolean;
  /** Why the test could not run or what the kernel said. */
  message?: string;
}

/** `noswap` on the workers' tmpfs (Linux >= 6.4) keeps its pages out of swap even if swap is on. */
export function checkTmpfsNoswap(kernelRelease: string, test: NoswapTest | undefined, whyNoTest?: string): CheckResult {
  if (test?.control) {
    if (test.noswap && test.listed) return result('tmpfs-noswap', 'pass', 'tmpfs noswap works (a test mount had it)', `kernel ${kernelRelease}${test.message ? `; ${test.message}` : ''}`);
    if (test.noswap) return result('tmpfs-noswap', 'warn', 'tmpfs accepted noswap but the mount does not list it', `kernel ${kernelRelease}${test.message ? `: ${test.message}` : ''}`);
    return result('tmpfs-noswap', 'warn', 'the kernel rejects tmpfs noswap: worker tmpfs pages can be swapped (harmless while swap is off or encrypted)', `kernel ${kernelRelease}${test.message ? `: ${test.message}` : ''}`);
  }
  const reason = test ? `a plain tmpfs test mount failed too${test.message ? ` (${test.message})` : ''}` : (whyNoTest ?? 'no test mount');
  const ok = atLeast(kernelRelease, 6, 4);
  if (ok === true) return result('tmpfs-noswap', 'pass', `tmpfs noswap supported (inferred from kernel ${kernelRelease} >= 6.4; not tested: ${reason})`);
  if (ok === false) return result('tmpfs-noswap', 'warn', `tmpfs noswap unsupported (inferred from kernel ${kernelRelease} < 6.4; not tested: ${reason})`, 'worker tmpfs pages can be swapped (harmless while swap is off or encrypted)');
  return result('tmpfs-noswap', 'warn', `cannot tell whether tmpfs noswap works: kernel release "${kernelRelease}" unparsable and not tested (${reason})`);
}

// ── everything ──────────────────────────────────────────────────────────────────────────────────────────

/** Everything the probe reads; undefined where a source was absent or unreadable. */
export interface HostFacts {
  swaps: SwapDevice[] | undefined;
  suidDumpable: string | undefined;
  corePattern: string | undefined;
  yamaPtraceScope: string | undefined;
  initOnFree: InitOnFreeInput;
  journald: JournaldInput;
  mountinfo: string | undefined;
  v2Controllers: string | undefined;
  kernelRelease: string;
  noswapTest: NoswapTest | undefined;
  noswapNoTestReason?: string;
}

export function runChecks(facts: HostFacts): CheckResult[] {
  return [
    checkSwap(facts.swaps),
    checkCoreDumps(facts.suidDumpable, facts.corePattern),
    checkYama(facts.yamaPtraceScope),
    checkInitOnFree(facts.initOnFree),
    checkJournald(facts.journald),
    checkCgroups(facts.mountinfo, facts.v2Controllers),
    checkTmpfsNoswap(facts.kernelRelease, facts.noswapTest, facts.noswapNoTestReason),
  ];
}

/** The worst status of a set of results. */
export function overallStatus(results: CheckResult[]): CheckStatus {
  if (results.some((r) => r.status === 'fail')) return 'fail';
  if (results.some((r) => r.status === 'warn')) return 'warn';
  return 'pass';
}
