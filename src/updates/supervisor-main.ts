// A standalone process around createSupervisor (the test supervisor): `node supervisor-main.ts <root>`
// runs `node <current>/bin/start.mjs`; SIGHUP restarts (as `systemctl restart` would), SIGTERM stops.
// Each supervisor event is one JSON line on stdout.
import { createSupervisor } from './supervisor.ts';

const root = process.argv[2];
if (!root) {
  process.stderr.write('usage: supervisor-main.ts <update-root>\n');
  process.exit(2);
}
const sup = createSupervisor({
  root,
  command: (dir) => ({ file: process.execPath, args: [`${dir}/bin/start.mjs`] }),
  onEvent: (e) => process.stdout.write(JSON.stringify(e) + '\n'),
  audit: (event) => process.stdout.write(JSON.stringify({ type: 'audit', event }) + '\n'),
});
process.on('SIGHUP', () => void sup.restart());
process.on('SIGTERM', () => {
  void sup.stop().then(() => process.exit(0));
});
await sup.start();
process.stdout.write(JSON.stringify({ type: 'supervising' }) + '\n');
setInterval(() => {}, 1 << 30);
