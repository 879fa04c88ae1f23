// A real control plane on loopback for tests: a temp data dir, a lease key sealed with a weak (fast) KDF,
// the given database (PGlite in memory by default), HTTPS on 127.0.0.1 port 0. Plus simulated nodes: an
// Ed25519 identity key, a temp state dir, and the real node-side enrol/heartbeat code.
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { createLogger } from '../../src/logger.ts';
import { validateCpConfig, type CpConfig } from '../../control-plane/src/config.ts';
import { createLeaseKey } from '../../control-plane/src/lease-key.ts';
import { startControlPlane, type RunningControlPlane } from '../../control-plane/src/server.ts';
import type { Db } from '../../control-plane/src/db.ts';
import type { Credential } from '../../src/vault/format.ts';
import { signerFromPrivateKey, enrolNode, heartbeatOnce, type NodeSigner, type Snapshot } from '../../src/control/node.ts';
import { createControlPlaneClient } from '../../src/control/client.ts';

export const PASSPHRASE: Credential = { kind: 'passphrase', secret: Buffer.from('test passphrase for the lease key') };
export const WEAK = { log2N: 10, r: 8, p: 1 };

export interface CpRig {
  cp: RunningControlPlane;
  dataDir: string;
  config: Readonly<CpConfig>;
  logs: string[];
  clock: { now: number };
  close(): Promise<void>;
}

export function makeDataDir(): string {
  const dataDir = mkdtempSync(join(tmpdir(), 'phantoma-cp-'));
  createLeaseKey(dataDir, PASSPHRASE, WEAK);
  return dataDir;
}

export async function startCpRig(opts: { db?: Db; database?: string; dataDir?: string; overrides?: Record<string, unknown>; clock?: { now: number } } = {}): Promise<CpRig> {
  const dataDir = opts.dataDir ?? makeDataDir();
  const config = validateCpConfig({
    dataDir,
    database: opts.database ?? 'pglite:memory',
    host: '127.0.0.1',
    port: 0,
    metricsPort: 0,
    logLevel: 'info',
    key: { kdfLog2N: 10, allowWeakKdf: true },
    ...opts.overrides,
  });
  const logs: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) if (line) logs.push(line);
      cb();
    },
  });
  const clock = opts.clock ?? { now: Date.now() };
  const cp = await startControlPlane(config, {
    logger: createLogger({ level: 'info', destination }),
    credential: PASSPHRASE,
    clock: () => clock.now,
    ...(opts.db ? { db: opts.db } : {}),
  });
  return {
    cp,
    dataDir,
    config,
    logs,
    clock,
    async close() {
      await cp.close();
      if (!opts.dataDir) rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

export const SNAPSHOT: Snapshot = {
  counters: { requests: 3, refusals: 1, wipes: 3, wipeFailures: 0, egressDenials: 0 },
  pool: { workers: 2, busy: 0, ready: true },
};

export interface SimNode {
  stateDir: string;
  signer: NodeSigner;
  enrol(token: string, url?: string, pin?: string): ReturnType<typeof enrolNode>;
  beat(): ReturnType<typeof heartbeatOnce>;
  close(): void;
}

export function simNode(rig: { cp: RunningControlPlane; clock: { now: number } }, signer?: NodeSigner): SimNode {
  const stateDir = mkdtempSync(join(tmpdir(), 'phantoma-simnode-'));
  const s = signer ?? signerFromPrivateKey(generateKeyPairSync('ed25519').privateKey);
  return {
    stateDir,
    signer: s,
    enrol: (token, url, pin) => enrolNode({ url: url ?? rig.cp.url, pin: pin ?? rig.cp.fingerprint, token, signer: s, stateDir, version: '0.1.0', clock: () => rig.clock.now }),
    beat: () => heartbeatOnce({ stateDir, signer: s, version: '0.1.0', snapshot: () => SNAPSHOT, clock: () => rig.clock.now }),
    close: () => rmSync(stateDir, { recursive: true, force: true }),
  };
}

/** Posts raw bytes to the control plane over pinned HTTPS (refusal tests craft their own bodies). */
export async function postRaw(cp: RunningControlPlane, path: string, body: string): Promise<{ status: number; json: { error?: { code: string }; lease?: unknown } }> {
  const r = await createControlPlaneClient({ url: cp.url, pin: cp.fingerprint }).post(path, body);
  return { status: r.status, json: JSON.parse(r.body) };
}

/** Everything the control plane has recorded, to show a refusal changed nothing. */
export async function snapshotDb(db: Db): Promise<string> {
  const nodes = await db.query('SELECT name, encode(public_key, \'hex\') AS k, enrolment, status, last_counter::text AS c, last_seen_at, last_state::text AS s FROM nodes ORDER BY name');
  const hbs = await db.query('SELECT node_name, enrolment, counter::text AS c FROM heartbeats ORDER BY node_name, enrolment, counter');
  const tokens = await db.query('SELECT token_sha256, node_name, used_at FROM enrol_tokens ORDER BY token_sha256');
  return JSON.stringify({ nodes, hbs, tokens });
}
