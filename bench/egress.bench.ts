// Benchmark: what the egress filter costs (issue 9). (1) Added cost per connect() in a filtered cgroup,
// deny path (workers/: every connect refused by cgroup/connect4, with its deny event) and allow path
// (download/ with an allowlist entry), against the same connect() outside any filtered cgroup — for UDP
// (connect() sends nothing: the hook's own cost) and TCP (a full loopback handshake, every packet also
// passing cgroup_skb/egress). (2) Loopback throughput of one allowlisted TCP flow in download/ against the
// same flow outside. Baselines in the same run, interleaved rounds, medians; loopback only. Needs root.
//
// Run: . scripts/env.sh && node bench/egress.bench.ts [--connects N] [--mib N] [--rounds N]
import { parseArgs } from 'node:util';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, rmdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { createLogger } from '../src/logger.ts';
import { startWardenProcess } from '../src/ephemeral/warden-process.ts';
import { createWardenClient } from '../src/ephemeral/warden-client.ts';
import { createEgressClient } from '../src/egress/warden-egress.ts';
import { projectRoot } from '../src/paths.ts';

const { values } = parseArgs({ options: { connects: { type: 'string', default: '20000' }, mib: { type: 'string', default: '1024' }, rounds: { type: 'string', default: '5' } } });
const CONNECTS = Number(values.connects);
const MIB = Number(values.mib);
const ROUNDS = Number(values.rounds);
const root = projectRoot();
const logger = createLogger({ level: 'warn' });

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-egress-bench-'));
const bin = join(tmp, 'egress-bench');
const cc = spawnSync('gcc', ['-O2', '-Wall', '-Werror', '-o', bin, join(root, 'bench', 'egress-bench.c')], { encoding: 'utf8' });
if (cc.status !== 0) throw new Error(cc.stderr);
const mk = spawnSync('make', ['-s', '-C', join(root, 'native', 'warden')], { encoding: 'utf8' });
if (mk.status !== 0) throw new Error(mk.stderr);

const warden = await startWardenProcess({
  socketPath: join(tmp, 'w.sock'),
  clientUid: 0,
  cgroupName: `phantoma-egress-bench-${process.pid}`,
  workerExec: '/bin/true',
  workerScript: '/nonexistent',
  workerArgs: [],
  expose: [],
  uidRange: { from: 61000, to: 61999 },
  memoryMaxBytes: 1 << 30,
  pidsMax: 64,
  tmpfsBytes: 1 << 20,
  egress: 'enforce',
  logger,
});
const workers = (await createWardenClient({ socketPath: join(tmp, 'w.sock') }).ping()).cgroup;
const download = join(workers, '..', 'download');
const egress = createEgressClient({ socketPath: join(tmp, 'w.sock') });

// Below the ephemeral port range (32768-60999 here), so no client socket can hold them.
const UDP_PORT = 21000 + (process.pid % 1000);
const TCP_PORT = UDP_PORT + 1000;
const STREAM_PORT = UDP_PORT + 2000;
await egress.allow('udp', '127.0.0.1/32', UDP_PORT);
await egress.allow('tcp', '127.0.0.1/32', TCP_PORT);
await egress.allow('tcp', '127.0.0.1/32', STREAM_PORT);

function inCgroup(parent: string | undefined, args: string[]): Record<string, number | string> {
  let dir: string | undefined;
  if (parent) {
    dir = join(parent, randomBytes(8).toString('hex'));
    mkdirSync(dir);
  }
  try {
    const r = spawnSync(bin, [dir ? join(dir, 'cgroup.procs') : '-', ...args], { encoding: 'utf8', timeout: 300_000 });
    if (r.status !== 0) throw new Error(`egress-bench ${args.join(' ')}: ${r.stderr}`);
    return JSON.parse(r.stdout) as Record<string, number | string>;
  } finally {
    if (dir) for (let i = 0; i < 100; i++) try { rmdirSync(dir); break; } catch { spawnSync('sleep', ['0.02']); }
  }
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const cases = {
  udpOutside: () => inCgroup(undefined, ['connect-udp', String(UDP_PORT), String(CONNECTS)]).nsPerConnect as number,
  udpDeny: () => inCgroup(workers, ['connect-udp', String(UDP_PORT), String(CONNECTS)]).nsPerConnect as number,
  udpAllow: () => inCgroup(download, ['connect-udp', String(UDP_PORT), String(CONNECTS)]).nsPerConnect as number,
  tcpOutside: () => inCgroup(undefined, ['connect-tcp', String(TCP_PORT), String(CONNECTS / 4)]).nsPerConnect as number,
  tcpDeny: () => inCgroup(workers, ['connect-tcp', String(TCP_PORT), String(CONNECTS / 4)]).nsPerConnect as number,
  tcpAllow: () => inCgroup(download, ['connect-tcp', String(TCP_PORT), String(CONNECTS / 4)]).nsPerConnect as number,
  streamOutside: () => inCgroup(undefined, ['stream', String(STREAM_PORT), String(MIB)]).mibPerSec as number,
  streamAllow: () => inCgroup(download, ['stream', String(STREAM_PORT), String(MIB)]).mibPerSec as number,
};
// Sanity: the deny path really is refused, the allow path really connects.
const deny = inCgroup(workers, ['connect-udp', String(UDP_PORT), '10']);
const allow = inCgroup(download, ['connect-tcp', String(TCP_PORT), '10']);
if (deny.refused !== 10 || allow.refused !== 0) throw new Error(`sanity: deny refused ${deny.refused}/10, allow refused ${allow.refused}/10`);

const samples: Record<string, number[]> = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
for (let r = 0; r < ROUNDS; r++) for (const [k, f] of Object.entries(cases)) samples[k]!.push(f());
const m = Object.fromEntries(Object.entries(samples).map(([k, v]) => [k, median(v)])) as Record<keyof typeof cases, number>;
const status = await egress.status();
await warden.stop();
rmSync(tmp, { recursive: true, force: true });

const round1 = (x: number): number => Math.round(x * 10) / 10;
const report = {
  date: new Date().toISOString(),
  kernel: spawnSync('uname', ['-r'], { encoding: 'utf8' }).stdout.trim(),
  rounds: ROUNDS,
  connectsPerRound: { udp: CONNECTS, tcp: CONNECTS / 4 },
  streamMiB: MIB,
  udpConnectNs: { outside: round1(m.udpOutside), denyWorkers: round1(m.udpDeny), allowDownload: round1(m.udpAllow) },
  udpAddedNs: { deny: round1(m.udpDeny - m.udpOutside), allow: round1(m.udpAllow - m.udpOutside) },
  udpRatio: { deny: +(m.udpDeny / m.udpOutside).toFixed(3), allow: +(m.udpAllow / m.udpOutside).toFixed(3) },
  tcpConnectNs: { outside: round1(m.tcpOutside), denyWorkers: round1(m.tcpDeny), allowDownload: round1(m.tcpAllow) },
  tcpAddedNs: { deny: round1(m.tcpDeny - m.tcpOutside), allow: round1(m.tcpAllow - m.tcpOutside) },
  tcpRatio: { deny: +(m.tcpDeny / m.tcpOutside).toFixed(3), allow: +(m.tcpAllow / m.tcpOutside).toFixed(3) },
  streamMiBPerSec: { outside: round1(m.streamOutside), allowDownload: round1(m.streamAllow) },
  streamRatio: +(m.streamAllow / m.streamOutside).toFixed(3),
  denyEventsCounted: status.sets?.workers.denied,
  eventsLost: status.sets?.workers.lost,
  samples,
};
console.log(`egress filter, ${ROUNDS} interleaved rounds (medians), kernel ${report.kernel}`);
console.log(`UDP connect(): outside ${report.udpConnectNs.outside} ns; workers/ deny ${report.udpConnectNs.denyWorkers} ns (${report.udpAddedNs.deny >= 0 ? '+' : ''}${report.udpAddedNs.deny} ns, x${report.udpRatio.deny}); download/ allow ${report.udpConnectNs.allowDownload} ns (+${report.udpAddedNs.allow} ns, x${report.udpRatio.allow})`);
console.log(`TCP connect() (loopback handshake): outside ${report.tcpConnectNs.outside} ns; workers/ deny ${report.tcpConnectNs.denyWorkers} ns (x${report.tcpRatio.deny}); download/ allow ${report.tcpConnectNs.allowDownload} ns (+${report.tcpAddedNs.allow} ns, x${report.tcpRatio.allow})`);
console.log(`loopback TCP stream ${MIB} MiB: outside ${report.streamMiBPerSec.outside} MiB/s; download/ allowlisted ${report.streamMiBPerSec.allowDownload} MiB/s (x${report.streamRatio})`);
mkdirSync(join(root, 'bench', 'results'), { recursive: true });
writeFileSync(join(root, 'bench', 'results', 'egress.json'), JSON.stringify(report, null, 2) + '\n');
