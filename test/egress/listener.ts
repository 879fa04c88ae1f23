// The far end for test/egress/filter.test.ts, run INSIDE the test's own network namespace
// (`ip netns exec`): TCP and UDP listeners and a tiny DNS responder on the namespace's addresses. It
// prints one JSON line per thing that reached it, so "reached" is decided here, on the listener's side.
// stdin commands: "snmp" prints this namespace's ICMP echo-request counter (raw ICMP reaching us).
import { createServer } from 'node:net';
import { createSocket } from 'node:dgram';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

const [v4, v6, tcpPort, udpPort] = process.argv.slice(2) as [string, string, string, string];
const out = (o: object): void => void process.stdout.write(JSON.stringify(o) + '\n');
let pending = 0;
const ready = (): void => {
  if (--pending === 0) out({ ev: 'ready' });
};

for (const host of [v4, v6]) {
  pending++;
  const srv = createServer((s) => {
    out({ ev: 'accept', host });
    let data = '';
    s.on('data', (c) => {
      data += c.toString();
    });
    s.on('error', () => undefined);
    s.on('close', () => out({ ev: 'tcp', host, data }));
  });
  srv.listen(Number(tcpPort), host, ready);
  pending++;
  const udp = createSocket(host.includes(':') ? 'udp6' : 'udp4');
  udp.on('message', (m) => out({ ev: 'udp', host, data: m.toString() }));
  udp.bind(Number(udpPort), host, ready);
  // DNS: answer every A query with 10.9.8.7 and report the first label (the attempt's token).
  pending++;
  const dns = createSocket(host.includes(':') ? 'udp6' : 'udp4');
  dns.on('message', (m, rinfo) => {
    const len = m[12] ?? 0;
    const label = m.subarray(13, 13 + len).toString();
    out({ ev: 'dns', host, data: label });
    const qEnd = 12 + m.subarray(12).indexOf(0) + 5;
    const header = Buffer.from(m.subarray(0, 12));
    header.writeUInt16BE(0x8180, 2); // response, RD, RA
    header.writeUInt16BE(1, 6); // one answer
    const answer = Buffer.from([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 9, 8, 7]);
    dns.send(Buffer.concat([header, m.subarray(12, qEnd), answer]), rinfo.port, rinfo.address);
  });
  dns.bind(53, host, ready);
}

createInterface({ input: process.stdin }).on('line', (l) => {
  if (l === 'snmp') {
    const lines = readFileSync('/proc/net/snmp', 'utf8').split('\n').filter((x) => x.startsWith('Icmp:'));
    const names = lines[0]!.split(/\s+/);
    const values = lines[1]!.split(/\s+/);
    out({ ev: 'snmp', inEchos: Number(values[names.indexOf('InEchos')]) });
  }
});
process.stdin.on('end', () => process.exit(0));
