// systemd's notification protocol (sd_notify(3)) for `phantoma serve` under a Type=notify unit: READY=1,
// STATUS=, WATCHDOG=1, STOPPING=1. Only when systemd asked for it ($NOTIFY_SOCKET set); otherwise every
// call is a no-op, so a node run by hand or by tests behaves exactly as before. Datagrams go out through
// the project's own N-API addon (native/addon, `sdNotify`: socket(AF_UNIX, SOCK_DGRAM) + sendto), from
// the main process, which is what NotifyAccess=main accepts (docs/architecture.md "systemd" says why not
// the sd-notify npm package or the systemd-notify tool).
import { sdNotify } from '../native/addon.ts';

export interface Notifier {
  /** True when $NOTIFY_SOCKET was set: systemd is listening. */
  readonly active: boolean;
  /** The watchdog interval systemd asked for (WATCHDOG_USEC, for this pid), in ms; undefined: none. */
  readonly watchdogMs: number | undefined;
  ready(status: string): void;
  status(status: string): void;
  watchdog(): void;
  stopping(status: string): void;
}

/** One line of STATUS= must not carry a newline (it would start a new assignment). */
export function statusLine(s: string): string {
  return s.replace(/[\r\n]+/g, ' ').slice(0, 400);
}

/**
 * Reads NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID from `env` (the CLI edge passes process.env) and
 * removes them from it, so no child process inherits them (a child could otherwise speak for the unit
 * under NotifyAccess=all, and would confuse systemd's watchdog bookkeeping).
 */
export function createNotifier(env: NodeJS.ProcessEnv, onError?: (err: Error) => void): Notifier {
  const socket = env.NOTIFY_SOCKET;
  const usec = Number(env.WATCHDOG_USEC);
  const forPid = env.WATCHDOG_PID === undefined || Number(env.WATCHDOG_PID) === process.pid;
  delete env.NOTIFY_SOCKET;
  delete env.WATCHDOG_USEC;
  delete env.WATCHDOG_PID;
  const active = typeof socket === 'string' && socket.length > 1;
  let failures = 0;
  const send = (msg: string): void => {
    if (!active) return;
    try {
      sdNotify(socket, msg);
    } catch (err) {
      // Reported (bounded): a lost WATCHDOG=1 is systemd's business; a lost READY=1 shows as a start timeout.
      if (failures++ < 5) onError?.(err as Error);
    }
  };
  return {
    active,
    watchdogMs: active && forPid && Number.isFinite(usec) && usec > 0 ? Math.max(1, Math.floor(usec / 1000)) : undefined,
    ready: (s) => send(`READY=1\nSTATUS=${statusLine(s)}\nMAINPID=${process.pid}`),
    status: (s) => send(`STATUS=${statusLine(s)}`),
    watchdog: () => send('WATCHDOG=1'),
    stopping: (s) => send(`STOPPING=1\nSTATUS=${statusLine(s)}`),
  };
}
