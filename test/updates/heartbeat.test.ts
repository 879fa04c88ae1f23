// The outcome of an update goes home in the next heartbeat (issue 12): the node reads it from its A/B
// state and the control plane records it with the node's last state — a result, a version and a code,
// nothing else (the heartbeat schema stays closed).
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initSlots, installIntoInactiveSlot, concludeTrial, lastUpdateOutcome } from '../../src/updates/slots.ts';
import { heartbeatOnce } from '../../src/control/node.ts';
import { startCpRig, simNode, SNAPSHOT } from '../control-plane/rig.ts';
import { makeRelease } from './fixture.ts';

const work = mkdtempSync(join(tmpdir(), 'phantoma-uphb-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));

t.test('a rolled-back update is reported in the next heartbeat and recorded by the control plane', async (t) => {
  const root = join(work, 'node');
  t.equal(lastUpdateOutcome(root), undefined, 'no layout, nothing to report');
  await initSlots(root, await makeRelease(work, '0.1.0'));
  await installIntoInactiveSlot(root, await makeRelease(work, '0.2.0'), '0.2.0', 1000);
  concludeTrial(root, false);
  const outcome = lastUpdateOutcome(root)!;
  t.match(outcome, { result: 'rolled_back', version: '0.2.0', code: 'update_trial_failed' });

  const rig = await startCpRig();
  t.teardown(() => rig.close());
  const node = simNode(rig);
  t.teardown(() => node.close());
  const { token } = await rig.cp.service.createToken('edge-upd', 600);
  await node.enrol(token);
  await heartbeatOnce({ stateDir: node.stateDir, signer: node.signer, version: '0.1.0', snapshot: () => ({ ...SNAPSHOT, update: outcome }), clock: () => rig.clock.now });
  const shown = (await rig.cp.service.showNode('edge-upd')) as unknown as { lastState: { update?: unknown } };
  t.same(shown.lastState.update, outcome, 'the control plane holds the outcome');
});
