// phantoma doctor: every pure check with planted inputs for each status it can give, then the real probe on
// this machine, cross-checked against what the test reads itself, and the command's output and exit status.
import t from 'tap';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import {
  CHECK_IDS,
  cgroupLayout,
  checkCgroups,
  checkCoreDumps,
  checkInitOnFree,
  checkJournald,
  checkSwap,
  checkTmpfsNoswap,
  checkYama,
  classifyBlockDevice,
  journaldStorage,
  kernelVersion,
  overallStatus,
  parseCgroupMounts,
  parseSwaps,
  runChecks,
  swapPolicy,
  type CheckResult,
  type HostFacts,
  type SwapDevice,
  type SysBlockView,
} from '../../src/doctor/checks.ts';
import { gatherFacts, probeHost, probeSwaps, sysBlock } from '../../src/doctor/probe.ts';
import { doctorCommand, formatDoctorTable, DOCTOR_FAILED_EXIT } from '../../src/cli/doctor.ts';
import type { CommandContext } from '../../src/cli/main.ts';

/** A planted /sys/class/block: files by relative path; directories are implied by their files. */
function fakeSys(files: Record<string, string>): SysBlockView {
  return {
    read: (rel) => files[rel],
    list: (rel) => [...new Set(Object.keys(files).filter((k) => k.startsWith(rel + '/')).map((k) => k.slice(rel.length + 1).split('/')[0]!))].sort(),
  };
}

const SYS = fakeSys({
  'vda/dev': '254:0',
  'vda2/dev': '254:2',
  'vda2/partition': '2',
  'sdb1/dev': '8:17',
  'dm-0/dev': '253:0',
  'dm-0/dm/uuid': 'CRYPT-LUKS2-0123456789abcdef-cryptswap',
  'dm-0/slaves/vda2/dev': '254:2',
  'dm-1/dev': '253:1',
  'dm-1/dm/uuid': 'LVM-abcdef',
  'dm-1/slaves/dm-0/dev': '253:0',
  'dm-2/dev': '253:2',
  'dm-2/dm/uuid': 'LVM-plain',
  'dm-2/slaves/sdb1/dev': '8:17',
  'dm-3/dev': '253:3',
  'dm-3/dm/uuid': 'LVM-mixed',
  'dm-3/slaves/dm-0/dev': '253:0',
  'dm-3/slaves/sdb1/dev': '8:17',
  'dm-4/dev': '253:4',
  'dm-4/dm/uuid': 'CRYPT-PLAIN-swap',
  'zram0/dev': '252:0',
  'zram0/backing_dev': 'none',
  'zram1/dev': '252:1',
  'zram1/backing_dev': '/dev/sdb1',
  'zram2/dev': '252:2',
  'zram2/backing_dev': '/dev/dm-4',
});

function swap(path: string, backing: SwapDevice['backing']): SwapDevice {
  return { path, type: 'partition', sizeKiB: 1048576, usedKiB: 0, priority: -2, backing, via: path };
}

t.test('parseSwaps reads /proc/swaps, unescaping paths', async (t) => {
  const text = 'Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/dm-0                               partition\t1048572\t\t0\t\t-2\n/var/swap\\040file (deleted)              file\t\t65532\t\t12\t\t-3\n';
  t.same(parseSwaps(text), [
    { path: '/dev/dm-0', type: 'partition', sizeKiB: 1048572, usedKiB: 0, priority: -2 },
    { path: '/var/swap file', type: 'file', sizeKiB: 65532, usedKiB: 12, priority: -3 },
  ]);
  t.same(parseSwaps('Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n'), [], 'header only: swap off');
});

t.test('classifyBlockDevice follows dm-crypt, LVM stacks and zram writeback', async (t) => {
  t.equal(classifyBlockDevice('vda2', SYS).backing, 'plain', 'a plain partition');
  t.equal(classifyBlockDevice('dm-0', SYS).backing, 'dm-crypt', 'LUKS');
  t.equal(classifyBlockDevice('dm-4', SYS).backing, 'dm-crypt', 'plain dm-crypt (crypttab swap with a random key)');
  t.equal(classifyBlockDevice('dm-1', SYS).backing, 'dm-crypt', 'LVM on LUKS');
  t.match(classifyBlockDevice('dm-1', SYS).via, /dm-1 → dm-0 \(CRYPT-LUKS2\)/);
  t.equal(classifyBlockDevice('dm-2', SYS).backing, 'plain', 'LVM on a plain disk');
  t.equal(classifyBlockDevice('dm-3', SYS).backing, 'plain', 'LVM spanning an encrypted and a plain device');
  t.equal(classifyBlockDevice('zram0', SYS).backing, 'zram', 'zram without writeback stays in RAM');
  t.equal(classifyBlockDevice('zram1', SYS).backing, 'plain', 'zram writing back to a plain disk');
  t.equal(classifyBlockDevice('zram2', SYS).backing, 'dm-crypt', 'zram writing back to dm-crypt');
  t.equal(classifyBlockDevice('sdz9', SYS).backing, 'unknown', 'a device sysfs does not know');
  t.equal(classifyBlockDevice('../etc', SYS).backing, 'unknown', 'a name that is not a device name');
});

t.test('checkSwap: off and encrypted pass; unencrypted or unknown fail; unreadable fails', async (t) => {
  t.match(checkSwap([]), { id: 'swap', status: 'pass', summary: 'swap is off' });
  t.match(checkSwap([swap('/dev/dm-0', 'dm-crypt'), swap('/dev/zram0', 'zram')]), { status: 'pass', summary: /encrypted or in RAM/ });
  t.match(checkSwap([swap('/dev/dm-0', 'dm-crypt'), swap('/dev/vda2', 'plain')]), { status: 'fail', summary: /unencrypted swap is on: \/dev\/vda2$/, detail: /refuses to start workers/ });
  t.match(checkSwap([swap('/swapfile', 'unknown')]), { status: 'fail' });
  t.match(checkSwap(undefined), { status: 'fail', summary: /cannot read/ });
});

t.test('swapPolicy refuses unencrypted swap unless explicitly allowed, and warns loudly then', async (t) => {
  t.same(swapPolicy([], false), { allowed: true });
  t.same(swapPolicy([swap('/dev/dm-0', 'dm-crypt'), swap('/dev/zram0', 'zram')], false), { allowed: true });
  const refused = swapPolicy([swap('/dev/dm-0', 'dm-crypt'), swap('/dev/vda2', 'plain')], false);
  t.equal(refused.allowed, false);
  t.match(refused.warning, /\/dev\/vda2 \(plain\).*refusing to start workers/);
  t.notMatch(refused.warning, /dm-0/, 'names only the unencrypted areas');
  const allowed = swapPolicy([swap('/dev/vda2', 'plain')], true);
  t.equal(allowed.allowed, true);
  t.match(allowed.warning, /^UNENCRYPTED SWAP IS ON/);
  t.equal(swapPolicy([swap('/swapfile', 'unknown')], false).allowed, false, 'unknown counts as unencrypted');
});

t.test('checkCoreDumps', async (t) => {
  const coredump = '|/usr/lib/systemd/systemd-coredump %P %u %g %s %t 9223372036854775808 %h';
  t.match(checkCoreDumps('0\n', 'core\n'), { id: 'core-dumps', status: 'pass' });
  t.match(checkCoreDumps('0', '|/bin/false'), { status: 'pass', detail: /discarded/ });
  t.match(checkCoreDumps('0', coredump), { status: 'warn', summary: /handler/, detail: /Storage=none/ });
  t.match(checkCoreDumps('2', '/var/crash/core.%p'), { status: 'warn', summary: /non-dumpable processes are dumped/ });
  t.match(checkCoreDumps('2', coredump), { status: 'fail', summary: /RLIMIT_CORE does not stop a pipe/ });
  t.match(checkCoreDumps('2', '|/bin/false'), { status: 'warn' });
  t.match(checkCoreDumps('1', 'core'), { status: 'fail', summary: /even non-dumpable/ });
  t.match(checkCoreDumps('7', 'core'), { status: 'fail', summary: /unknown value/ });
  t.match(checkCoreDumps(undefined, 'core'), { status: 'fail', summary: /suid_dumpable/ });
  t.match(checkCoreDumps('0', undefined), { status: 'fail', summary: /core_pattern/ });
});

t.test('checkYama: no Yama is a warning, never a failure', async (t) => {
  t.match(checkYama(undefined), { id: 'yama-ptrace', status: 'warn', summary: /no Yama/ });
  t.match(checkYama('0\n'), { status: 'warn', summary: /ptrace_scope=0/ });
  for (const v of ['1', '2', '3']) t.match(checkYama(`${v}\n`), { status: 'pass' }, `ptrace_scope=${v}`);
  t.match(checkYama('9'), { status: 'warn', summary: /unknown/ });
});

t.test('checkInitOnFree: the kernel log decides, then the command line (last wins), then the build default', async (t) => {
  const none = { cmdline: 'console=ttyS0 quiet', autoInitLine: undefined, kernelConfig: undefined };
  t.match(checkInitOnFree({ ...none, autoInitLine: 'mem auto-init: stack:all(zero), heap alloc:off, heap free:on' }), { id: 'init-on-free', status: 'pass' });
  t.match(checkInitOnFree({ ...none, autoInitLine: 'mem auto-init: stack:all(zero), heap alloc:off, heap free:off' }), { status: 'warn', detail: /init_on_free=1/ });
  t.match(
    checkInitOnFree({ cmdline: 'init_on_free=1', autoInitLine: 'mem auto-init: stack:off, heap alloc:off, heap free:off', kernelConfig: undefined }),
    { status: 'warn', summary: /asks for it but the kernel reports it off/ },
  );
  t.match(checkInitOnFree({ ...none, cmdline: 'quiet init_on_free=1' }), { status: 'pass', summary: /command line/ });
  t.match(checkInitOnFree({ ...none, cmdline: 'init_on_free=1 init_on_free=0' }), { status: 'warn' }, 'the last occurrence wins');
  t.match(checkInitOnFree({ ...none, cmdline: 'quiet -- init_on_free=1' }), { status: 'warn' }, 'after "--" the words belong to init, not the kernel');
  t.match(checkInitOnFree({ ...none, kernelConfig: 'CONFIG_X=y\nCONFIG_INIT_ON_FREE_DEFAULT_ON=y\n' }), { status: 'pass', summary: /build default/ });
  t.match(checkInitOnFree({ ...none, kernelConfig: '# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set\n' }), { status: 'warn', summary: /off/ });
  t.match(checkInitOnFree(none), { status: 'warn', summary: /cannot tell/ });
});

t.test('checkJournald: volatile or none pass; persistent, or auto with /var/log/journal, warn', async (t) => {
  const conf = (storage: string) => ({ path: '/etc/systemd/journald.conf', text: `[Journal]\n#Storage=auto\n${storage}\n` });
  const input = (files: { path: string; text: string }[], dir: boolean) => ({ files, persistentDirExists: dir, installed: true });
  t.match(checkJournald(input([conf('Storage=volatile')], true)), { id: 'journald', status: 'pass', summary: /volatile/ });
  t.match(checkJournald(input([conf('Storage=none')], true)), { status: 'pass' });
  t.match(checkJournald(input([conf('Storage=persistent')], false)), { status: 'warn', summary: /persistent/ });
  t.match(checkJournald(input([conf('')], true)), { status: 'warn', summary: /Storage=auto \(default\) and \/var\/log\/journal exists/ });
  t.match(checkJournald(input([conf('')], false)), { status: 'pass', summary: /does not exist/ });
  t.match(checkJournald(input([conf('Storage=bogus')], false)), { status: 'warn', summary: /unknown/ });
  const dropin = { path: '/etc/systemd/journald.conf.d/phantoma.conf', text: '[Journal]\nStorage=volatile\n' };
  t.match(checkJournald(input([conf('Storage=persistent'), dropin], true)), { status: 'pass', summary: /phantoma\.conf/ }, 'a later drop-in overrides');
  t.same(journaldStorage([{ path: 'x', text: '[Other]\nStorage=volatile\n' }]), { value: 'auto', from: 'default' }, 'only [Journal] counts');
  t.match(checkJournald({ files: [], persistentDirExists: false, installed: false }), { status: 'pass', summary: /not installed/ });
});

const HYBRID_MOUNTINFO = `24 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
`;
const UNIFIED_MOUNTINFO = `24 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
`;

t.test('cgroup layout: unified, hybrid, and hosts that cannot limit workers', async (t) => {
  const hybrid = cgroupLayout(parseCgroupMounts(HYBRID_MOUNTINFO), 'hugetlb\n');
  t.same(hybrid.memory, { version: 1, path: '/sys/fs/cgroup/memory' });
  t.same(hybrid.pids, { version: 1, path: '/sys/fs/cgroup/pids' });
  t.same(hybrid.v2?.controllers, ['hugetlb']);
  t.same(hybrid.v1.map((m) => m.controllers), [['cpu'], ['memory'], ['pids'], ['name=systemd']], 'options like xattr are not controllers');
  t.match(checkCgroups(HYBRID_MOUNTINFO, 'hugetlb\n'), { id: 'cgroups', status: 'pass', summary: /^hybrid: cgroup2 at \/sys\/fs\/cgroup\/unified; memory: v1 \/sys\/fs\/cgroup\/memory; pids: v1 \/sys\/fs\/cgroup\/pids$/ });

  const v2all = 'cpuset cpu io memory hugetlb pids rdma misc\n';
  t.match(checkCgroups(UNIFIED_MOUNTINFO, v2all), { status: 'pass', summary: /^unified: .*memory: v2 \/sys\/fs\/cgroup; pids: v2 \/sys\/fs\/cgroup$/ });
  t.match(checkCgroups(UNIFIED_MOUNTINFO, 'cpuset cpu io memory\n'), { status: 'fail', summary: /no pids controller/ });
  t.match(checkCgroups(UNIFIED_MOUNTINFO, undefined), { status: 'fail', detail: /unreadable/ });
  t.match(checkCgroups(HYBRID_MOUNTINFO.replace(/.*cgroup2.*\n/, ''), undefined), { status: 'fail', summary: /no cgroup2 mount/ });
  t.match(checkCgroups(HYBRID_MOUNTINFO.replace(/.*memory.*\n/, ''), 'hugetlb'), { status: 'fail', summary: /no memory controller/ });
  t.match(checkCgroups(undefined, undefined), { status: 'fail' });
  const escaped = parseCgroupMounts('41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw - cgroup2 cgroup2 rw\n');
  t.equal(escaped[0]?.mountPoint, '/sys/fs/cgroup/uni fied');
});

t.test('checkTmpfsNoswap: a test mount decides; without one, the kernel version, said so', async (t) => {
  t.match(checkTmpfsNoswap('6.8.0', { control: true, noswap: true, listed: true }), { id: 'tmpfs-noswap', status: 'pass', summary: /test mount/ });
  t.match(checkTmpfsNoswap('6.1.0', { control: true, noswap: false, listed: false, message: "tmpfs: Unknown parameter 'noswap'" }), { status: 'warn', summary: /rejects/, detail: /Unknown parameter/ });
  t.match(checkTmpfsNoswap('6.8.0', { control: true, noswap: true, listed: false }), { status: 'warn', summary: /does not list it/ });
  t.match(checkTmpfsNoswap('6.4.0-1-amd64', undefined, 'not root, so no test mount'), { status: 'pass', summary: /inferred from kernel 6\.4\.0-1-amd64 >= 6\.4; not tested: not root/ });
  t.match(checkTmpfsNoswap('6.1.0-28-amd64', undefined, 'not root'), { status: 'warn', summary: /inferred .* < 6\.4/ });
  t.match(checkTmpfsNoswap('10.0.1', { control: false, noswap: false, listed: false, message: 'permission denied' }), { status: 'pass', summary: /plain tmpfs test mount failed too \(permission denied\)/ });
  t.match(checkTmpfsNoswap('weird', undefined), { status: 'warn', summary: /cannot tell/ });
  t.same(kernelVersion('6.18.44-fc-v782'), [6, 18]);
});

function plantedFacts(over: Partial<HostFacts> = {}): HostFacts {
  return {
    swaps: [],
    suidDumpable: '0',
    corePattern: 'core',
    yamaPtraceScope: undefined,
    initOnFree: { cmdline: 'init_on_free=1', autoInitLine: undefined, kernelConfig: undefined },
    journald: { files: [], persistentDirExists: false, installed: false },
    mountinfo: HYBRID_MOUNTINFO,
    v2Controllers: 'hugetlb',
    kernelRelease: '6.8.0',
    noswapTest: { control: true, noswap: true, listed: true },
    ...over,
  };
}

t.test('runChecks gives every check once, in order; overallStatus is the worst', async (t) => {
  const results = runChecks(plantedFacts());
  t.same(results.map((r) => r.id), [...CHECK_IDS]);
  t.equal(overallStatus(results), 'warn', 'no Yama is the only warning');
  t.equal(overallStatus(runChecks(plantedFacts({ swaps: [swap('/dev/vda2', 'plain')] }))), 'fail');
  t.equal(overallStatus(runChecks(plantedFacts({ yamaPtraceScope: '1' }))), 'pass');
  const table = formatDoctorTable(results, true);
  t.match(table, /^PASS  swap +swap is off$/m);
  t.match(table, /^WARN  yama-ptrace +no Yama/m);
  t.match(table, /6 pass, 1 warn, 0 fail: warn$/);
});

// ── the real probe on this machine ─────────────────────────────────────────────────────────────────────

function tmpfsMountsNamedDoctor(): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter((l) => / - tmpfs phantoma-doctor /.test(l));
}

t.test('the real probe: every check present with a valid status, consistent with this host', async (t) => {
  const results = probeHost();
  t.same(results.map((r) => r.id), [...CHECK_IDS], 'every check id, once');
  for (const r of results) {
    t.ok(['pass', 'warn', 'fail'].includes(r.status), `${r.id}: valid status ${r.status}`);
    t.ok(r.summary.length > 0, `${r.id}: has a summary`);
  }
  const by = Object.fromEntries(results.map((r) => [r.id, r])) as Record<string, CheckResult>;

  // Cross-checks against what this test reads by itself.
  const swapLines = readFileSync('/proc/swaps', 'utf8').trim().split('\n').length - 1;
  t.equal(probeSwaps()?.length, swapLines, 'probeSwaps sees every line of /proc/swaps');
  if (swapLines === 0) t.equal(by.swap!.status, 'pass', 'swap off here: pass');
  const yamaPresent = existsSync('/proc/sys/kernel/yama/ptrace_scope');
  t.equal(by['yama-ptrace']!.status === 'warn' && /no Yama/.test(by['yama-ptrace']!.summary), !yamaPresent, 'reports "no Yama" exactly when Yama is absent');
  const mountinfo = readFileSync('/proc/self/mountinfo', 'utf8');
  const v2Point = /^\S+ \S+ \S+ \S+ (\S+) .* - cgroup2 /m.exec(mountinfo)?.[1];
  t.ok(v2Point, 'this host has a cgroup2 mount (the warden needs one)');
  t.match(by.cgroups!.summary, `cgroup2 at ${v2Point}`, 'names the cgroup2 mount found in mountinfo');
  t.match(by.cgroups!.summary, /memory: v[12] \/\S+; pids: v[12] \/\S+/, 'says where memory and pids limits come from');
  t.match(by['core-dumps']!.summary, `fs.suid_dumpable=${readFileSync('/proc/sys/fs/suid_dumpable', 'utf8').trim()}`);

  // The sysfs reader sees real devices (positive control for the swap encryption classification).
  const rootDev = /^\S+ \S+ \S+ \S+ \/ .* - \S+ (\/dev\/\S+) /m.exec(mountinfo)?.[1];
  if (rootDev !== undefined) {
    const name = rootDev.split('/').pop()!;
    t.not(classifyBlockDevice(name, sysBlock).backing, 'unknown', `the root device ${name} is found in /sys/class/block`);
  } else {
    t.ok(readdirSync('/sys/class/block').length > 0, '/sys/class/block lists devices');
  }

  // The tmpfs noswap check ran for real: as root a test mount (and it left nothing behind), else inference.
  const facts = gatherFacts();
  if (process.getuid!() === 0) {
    t.equal(facts.noswapTest?.control, true, 'as root, the plain tmpfs test mount works (positive control)');
    const [major, minor] = kernelVersion(facts.kernelRelease)!;
    if (major > 6 || (major === 6 && minor >= 4)) {
      t.equal(by['tmpfs-noswap']!.status, 'pass', `kernel ${facts.kernelRelease} >= 6.4 and the test mount had noswap`);
      t.match(by['tmpfs-noswap']!.summary, /a test mount had it/);
    }
  } else {
    t.match(by['tmpfs-noswap']!.summary, /inferred/);
  }
  t.same(tmpfsMountsNamedDoctor(), [], 'no test tmpfs left mounted');
  t.same(readdirSync(tmpdir()).filter((n) => n.startsWith('phantoma-doctor-')), [], 'no test directory left');
});

t.test('phantoma doctor: --json prints the array; exit 0 without a fail, 8 with one', async (t) => {
  const run = async (json: boolean) => {
    const out: string[] = [];
    const ctx: CommandContext = { args: [], json, out: (s) => out.push(s), err: () => {}, config: () => { throw new Error('doctor needs no configuration'); } };
    const code = await doctorCommand.run(ctx, { values: json ? { json: true } : {}, positionals: [] });
    return { code, text: out.join('\n') };
  };
  const json = await run(true);
  const results = JSON.parse(json.text) as CheckResult[];
  t.same(results.map((r) => r.id), [...CHECK_IDS]);
  t.equal(json.code, results.some((r) => r.status === 'fail') ? DOCTOR_FAILED_EXIT : 0);
  t.equal(DOCTOR_FAILED_EXIT, 8);
  const table = await run(false);
  t.equal(table.code, json.code);
  for (const id of CHECK_IDS) t.match(table.text, new RegExp(`^(PASS|WARN|FAIL)  ${id} `, 'm'), `table row for ${id}`);
  await t.rejects(doctorCommand.run({ args: [], json: false, out: () => {}, err: () => {}, config: () => { throw new Error('x'); } }, { values: {}, positionals: ['extra'] }), { code: 'cli_usage' });
});
