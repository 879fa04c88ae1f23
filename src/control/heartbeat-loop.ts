// The heartbeat loop of an enrolled node: one heartbeat every N seconds (the lease's interval, or
// control.heartbeatIntervalSeconds), jittered so a fleet restarted together does not beat in step; after a
// failure it retries sooner (30 s doubling, never later than the interval). One timer, one beat in flight.
import type { Logger } from '../logger.ts';
import { heartbeatOnce, type NodeSigner, type Snapshot } from './node.ts';
import { readControlState, type ControlState } from './state.ts';

export interface HeartbeatLoopDeps {
  stateDir: string;
  signer: NodeSigner;
  version: string;
  snapshot: () => Snapshot;
  logger: Logger;
  /** Overrides the lease's interval. */
  intervalSeconds?: number;
  /** Fraction of the interval the delay varies by, either way (0..0.5). */
  jitter: number;
  random?: () => number;
  clock?: () => number;
  /** Called after every attempt (the license gate re-reads the lease). */
  onAttempt?: () => void;
}

export interface HeartbeatLoop {
  start(): void;
  /** One heartbeat now (tests, `phantoma heartbeat send`); rejects with its coded error. */
  beatNow(): Promise<ControlState>;
  stop(): Promise<void>;
}

const RETRY_BASE_MS = 30_000;

/** Pure: the delay before the next heartbeat. */
export function nextDelayMs(intervalSeconds: number, jitter: number, failures: number, random: number): number {
  const base = intervalSeconds * 1000;
  const nominal = failures === 0 ? base : Math.min(base, RETRY_BASE_MS * 2 ** Math.min(failures - 1, 20));
  return Math.max(1000, Math.round(nominal * (1 - jitter + 2 * jitter * random)));
}

export function createHeartbeatLoop(deps: HeartbeatLoopDeps): HeartbeatLoop {
  const random = deps.random ?? Math.random;
  const log = deps.logger.child({ component: 'heartbeat' });
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<unknown> | undefined;
  let stopped = false;
  let failures = 0;

  const intervalSeconds = (): number => {
    if (deps.intervalSeconds !== undefined) return deps.intervalSeconds;
    try {
      return readControlState(deps.stateDir)?.lease.lease.heartbeatIntervalSeconds ?? 600;
    } catch {
      return 600;
    }
  };

  async function beat(): Promise<ControlState> {
    try {
      const state = await heartbeatOnce({ stateDir: deps.stateDir, signer: deps.signer, version: deps.version, snapshot: deps.snapshot, ...(deps.clock ? { clock: deps.clock } : {}) });
      failures = 0;
      log.info({ counter: state.counter, expiresAt: state.lease.lease.expiresAt }, 'heartbeat accepted; lease renewed');
      return state;
    } catch (err) {
      failures++;
      log.warn({ code: (err as { code?: string }).code, failures }, 'heartbeat failed');
      throw err;
    } finally {
      deps.onAttempt?.();
    }
  }

  function schedule(delayMs: number): void {
    if (stopped) return;
    timer = setTimeout(() => {
      timer = undefined;
      running = beat()
        .catch(() => undefined)
        .finally(() => {
          running = undefined;
          schedule(nextDelayMs(intervalSeconds(), deps.jitter, failures, random()));
        });
    }, delayMs);
    timer.unref();
  }

  return {
    start() {
      if (timer || stopped) return;
      // Soon after start (a restarted node renews quickly), spread over up to 30 s.
      schedule(Math.round(Math.min(intervalSeconds() * 1000, RETRY_BASE_MS) * random()));
    },
    beatNow: () => beat(),
    async stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      timer = undefined;
      await running;
    },
  };
}
