// A stand-in for the gateway's window duty in test/models/pull.test.ts: the same keeper src/main.ts runs,
// in its own process so the test can SIGKILL it and start it again. Prints each audit event as a JSON line,
// then {"ready":true} once the start-up check is done. argv: WARDEN_SOCKET STATE_DIR
import { startWindowKeeper } from '../../src/egress/window.ts';
import { createEgressClient } from '../../src/egress/warden-egress.ts';

const [socketPath, stateDir] = process.argv.slice(2) as [string, string];
const keeper = await startWindowKeeper({
  egress: createEgressClient({ socketPath }),
  stateDir,
  audit: (e) => void process.stdout.write(JSON.stringify(e) + '\n'),
  intervalMs: 200,
});
process.stdout.write(JSON.stringify({ ready: true }) + '\n');
const hold = setInterval(() => undefined, 1000);
process.stdin.resume();
process.stdin.on('end', () => {
  keeper.close();
  clearInterval(hold);
  process.exit(0);
});
