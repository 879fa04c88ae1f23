// What `phantoma serve` tells systemd (issue 13), decided from the node's own parts:
//   READY=1    once the gateway listens (startNode has returned) AND every model pool can serve (a warm
//              worker, or scaled to zero on purpose) AND keyd answers a ping AND the egress filter is
//              verified (kernel program tags + live probe, src/egress/monitor.ts). Until then STATUS= says
//              what is still missing; systemd's TimeoutStartSec= bounds the wait (a trial boot that never
//              gets here fails and is rolled back).
//   WATCHDOG=1 from a timer at half of WatchdogSec=, only while the event loop keeps up (delay below half
//              the interval), no pool is unavailable, keyd answers and the filter is verified. When any
//              check fails it stops pinging and sets STATUS=degraded: <why>; if that lasts WatchdogSec=,
//              systemd kills and restarts the service. A frozen process (SIGSTOP, a blocked loop) stops
//              pinging by itself.
// Nothing here runs without $NOTIFY_SOCKET: outside systemd the node behaves as before.
import { monitorEventLoopDelay } from 'node:perf_hooks';
import type { Logger } from '../logger.ts';
import type { Notifier } from './notify.ts';

export interface HealthSources {
  pools: () => ReadonlyArray<{ readonly model: string; notReadyReason(): string | undefined; state(): string }>;
  /** The egress monitor of a warden-backed node; undefined when the node has none (no filter to verify). */
  egress?: { readonly mode: string; ok(): boolean; reason(): string | undefined } | undefined;
  /** keyd's ping, when the node has a vault. */
  keydPing?: (() => Promise<unknown>) | undefined;
}

export interface ServiceReadiness {
  /** Resolves when READY=1 was sent. */
  readonly ready: Promise<void>;
  stop(): void;
}

async function keydAnswers(ping: () => Promise<unknown>, timeoutMs: number): Promise<string | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([ping(), new Promise((_r, reject) => (timer = setTimeout(() => reject(new Error(`no answer in ${timeoutMs} ms`)), timeoutMs)))]);
    return undefined;
  } catch (err) {
    return `keyd not answering (${(err as Error).message})`;
  } finally {
    clearTimeout(timer);
  }
}

export function startServiceReadiness(o: { notifier: Notifier; sources: HealthSources; logger: Logger; pollMs?: number }): ServiceReadiness {
  const ready = Promise.withResolvers<void>();
  if (!o.notifier.active) return { ready: ready.promise, stop: () => undefined };
  const log = o.logger.child({ component: 'systemd' });
  const s = o.sources;
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  let lastStatus = '';
  const status = (text: string): void => {
    if (text === lastStatus) return;
    lastStatus = text;
    o.notifier.status(text);
  };

  async function startupReasons(): Promise<string[]> {
    const reasons: string[] = [];
    if (s.egress && s.egress.mode === 'enforce' && !s.egress.ok()) reasons.push(`egress filter not verified (${s.egress.reason() ?? 'pending'})`);
    for (const p of s.pools()) {
      const r = p.notReadyReason();
      if (r) reasons.push(r);
    }
    if (s.keydPing) {
      const k = await keydAnswers(s.keydPing, 2000);
      if (k) reasons.push(k);
    }
    return reasons;
  }

  const pollMs = o.pollMs ?? 250;
  const waitReady = async (): Promise<void> => {
    if (stopped) return;
    const reasons = await startupReasons();
    if (stopped) return;
    if (reasons.length > 0) {
      status(`starting: waiting for ${reasons.join('; ')}`);
      timer = setTimeout(() => void waitReady(), pollMs);
      return;
    }
    const models = s.pools().map((p) => p.model);
    log.info({ models, egress: s.egress?.mode ?? 'none', keyd: Boolean(s.keydPing) }, 'ready: gateway listening, pools warm, keyd answering, egress filter verified; READY=1 sent to systemd');
    lastStatus = `serving ${models.join(', ')}`;
    o.notifier.ready(lastStatus);
    ready.resolve();
    startWatchdog();
  };

  const delay = monitorEventLoopDelay({ resolution: 20 });
  let degraded: string | undefined;
  function startWatchdog(): void {
    const wd = o.notifier.watchdogMs;
    if (wd === undefined) return;
    const interval = Math.max(100, Math.floor(wd / 2));
    delay.enable();
    const tick = async (): Promise<void> => {
      if (stopped) return;
      const reasons: string[] = [];
      const lagMs = delay.max / 1e6;
      delay.reset();
      if (lagMs > interval) reasons.push(`event loop delayed ${Math.round(lagMs)} ms`);
      if (s.egress && s.egress.mode === 'enforce' && !s.egress.ok()) reasons.push(`egress filter not verified (${s.egress.reason() ?? 'unknown'})`);
      for (const p of s.pools()) if (p.state() === 'unavailable') reasons.push(p.notReadyReason() ?? `model ${p.model} unavailable`);
      if (s.keydPing) {
        const k = await keydAnswers(s.keydPing, Math.min(2000, Math.floor(interval / 2)));
        if (k) reasons.push(k);
      }
      if (stopped) return;
      if (reasons.length === 0) {
        o.notifier.watchdog();
        if (degraded !== undefined) {
          log.info('healthy again: watchdog pings resumed');
          degraded = undefined;
          status(`serving ${s.pools().map((p) => p.model).join(', ')}`);
        }
      } else {
        const why = reasons.join('; ');
        if (why !== degraded) log.warn({ reasons }, 'unhealthy: watchdog pings withheld (systemd restarts the service if this lasts WatchdogSec)');
        degraded = why;
        status(`degraded: ${why}`);
      }
      timer = setTimeout(() => void tick(), interval);
    };
    // The first ping at once: the watchdog runs from READY=1 on.
    void tick();
  }

  timer = setTimeout(() => void waitReady(), 0);
  return {
    ready: ready.promise,
    stop() {
      stopped = true;
      clearTimeout(timer);
      delay.disable();
    },
  };
}
