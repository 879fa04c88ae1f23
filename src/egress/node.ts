// Wiring for src/main.ts: builds the egress monitor for a warden-backed node and wraps the backend and the
// pools so the node fails closed (gate.ts). A node whose workers are not warden workers (the process
// backend, an injected test backend) has no cgroup to filter: it gets no monitor and the "off" hash.
import type { Registry } from 'prom-client';
import type { Config } from '../config/schema.ts';
import type { Logger } from '../logger.ts';
import type { AuditEvent } from '../audit/audit-events.ts';
import type { WorkerBackend } from '../ephemeral/backend.ts';
import type { WorkerPool } from '../ephemeral/pool.ts';
import { createEgressClient } from './warden-egress.ts';
import { createEgressMonitor, type EgressMonitor } from './monitor.ts';
import { egressPolicyHash, loadExpectedTags, type ExpectedTags } from './policy.ts';
import { gateBackend, gatePool } from './gate.ts';
import { ownCgroup } from './own-cgroup.ts';

export interface NodeEgress {
  monitor: EgressMonitor | undefined;
  backend: WorkerBackend;
  wrapPool(pool: WorkerPool): WorkerPool;
  /** The egress policy hash for the key document and receipts. */
  policyHash(): string;
  close(): void;
}

export async function setupNodeEgress(o: {
  config: Readonly<Config>;
  backend: WorkerBackend;
  /** True when workers live under the warden's egress filter (backend "warden" or "docker", not injected). */
  wardenBackend: boolean;
  logger: Logger;
  audit: (e: AuditEvent) => void;
  registry: Registry;
}): Promise<NodeEgress> {
  if (!o.wardenBackend) {
    return { monitor: undefined, backend: o.backend, wrapPool: (p) => p, policyHash: () => egressPolicyHash({ mode: 'off' }), close: () => undefined };
  }
  const mode = o.config.egress.mode;
  let expected: ExpectedTags | undefined;
  let expectedError: string | undefined;
  if (mode === 'enforce') {
    try {
      expected = loadExpectedTags();
    } catch (err) {
      expectedError = (err as Error).message;
    }
  }
  const monitor = createEgressMonitor({
    mode,
    client: createEgressClient({ socketPath: o.config.warden.socket }),
    expected,
    ...(expectedError ? { expectedError } : {}),
    checkIntervalMs: o.config.egress.checkIntervalMs,
    probeIntervalMs: o.config.egress.probeIntervalMs,
    ...(o.config.egress.confineGateway ? { confineGateway: { ownCgroupId: () => ownCgroup().id } } : {}),
    logger: o.logger,
    audit: o.audit,
    registry: o.registry,
  });
  await monitor.start();
  if (mode === 'off') return { monitor, backend: o.backend, wrapPool: (p) => p, policyHash: () => monitor.policyHash(), close: () => monitor.close() };
  return {
    monitor,
    backend: gateBackend(o.backend, monitor),
    wrapPool: (p) => gatePool(p, monitor),
    policyHash: () => monitor.policyHash(),
    close: () => monitor.close(),
  };
}
