// The node's control-plane part as the composition root wires it: the license gate the gateway asks before
// new inference, coarse counters tallied from audit events (counts only, no ids), and — when the node is
// enrolled and a signer exists (keyd) — the heartbeat loop. Outbound only: nothing here listens.
import type { Config } from '../config/schema.ts';
import type { Logger } from '../logger.ts';
import type { AuditEvent } from '../audit/audit-events.ts';
import type { ChainHead } from '../audit/audit-log.ts';
import { createLicenseGate, type LicenseDecision } from './license.ts';
import { createHeartbeatLoop, type HeartbeatLoop } from './heartbeat-loop.ts';
import { readControlState } from './state.ts';
import { lastUpdateOutcome } from '../updates/slots.ts';
import { resolveFromRoot } from '../paths.ts';
import type { NodeSigner, Snapshot } from './node.ts';

export interface NodeControl {
  license(): LicenseDecision;
  /** Feed every audit event here: the heartbeat's counters are tallied from them. */
  observe(event: AuditEvent): void;
  start(): void;
  stop(): Promise<void>;
  loop: HeartbeatLoop | undefined;
}

export function createNodeControl(deps: {
  config: Readonly<Config>;
  stateDir: string;
  logger: Logger;
  version: string;
  signer: NodeSigner | undefined;
  pools: () => Array<{ workers(): Array<{ state: string }>; notReadyReason(): string | undefined }>;
  auditHead: () => ChainHead | null;
  clock?: () => number;
}): NodeControl {
  const c = deps.config.control;
  const gate = createLicenseGate({ stateDir: deps.stateDir, required: c.required, ...(deps.clock ? { clock: deps.clock } : {}) });
  const counters: Snapshot['counters'] = { requests: 0, refusals: 0, wipes: 0, wipeFailures: 0, egressDenials: 0 };
  const snapshot = (): Snapshot => {
    const pools = deps.pools();
    const workers = pools.flatMap((p) => p.workers());
    const head = deps.auditHead();
    const update = lastUpdateOutcome(resolveFromRoot(deps.config.updates.root));
    return {
      counters: { ...counters },
      pool: { workers: Math.min(workers.length, 4096), busy: Math.min(workers.filter((w) => w.state === 'busy').length, 4096), ready: pools.every((p) => p.notReadyReason() === undefined) },
      ...(head ? { auditHead: head } : {}),
      ...(update ? { update } : {}),
    };
  };
  let enrolled = false;
  try {
    enrolled = readControlState(deps.stateDir) !== undefined;
  } catch (err) {
    deps.logger.error({ code: (err as { code?: string }).code }, 'the control-plane state is damaged; heartbeats are off until the node re-enrols');
  }
  const loop =
    enrolled && c.heartbeats && deps.signer
      ? createHeartbeatLoop({
          stateDir: deps.stateDir,
          signer: deps.signer,
          version: deps.version,
          snapshot,
          logger: deps.logger,
          jitter: c.heartbeatJitter,
          ...(c.heartbeatIntervalSeconds !== undefined ? { intervalSeconds: c.heartbeatIntervalSeconds } : {}),
          ...(deps.clock ? { clock: deps.clock } : {}),
          onAttempt: () => gate.invalidate(),
        })
      : undefined;
  if (enrolled && c.heartbeats && !deps.signer) deps.logger.warn('the node is enrolled but has no heartbeat signer (keyd): no heartbeats; the lease will run out');
  return {
    license: () => gate.decision(),
    observe(event) {
      switch (event.type) {
        case 'request_served':
          counters.requests++;
          break;
        case 'refusal':
          counters.refusals++;
          break;
        case 'worker_ended':
          if (event.verified) counters.wipes++;
          else counters.wipeFailures++;
          break;
        case 'egress_denied':
          counters.egressDenials++;
          break;
      }
    },
    start: () => loop?.start(),
    stop: async () => loop?.stop(),
    loop,
  };
}
