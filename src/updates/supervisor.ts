// The trial-boot contract, as a small supervisor for tests and hosts without systemd (in production
// systemd plays this part: the units issue wires Restart= and an OnFailure= trial check to the same state
// files). It runs the release behind <root>/current; on restart, if a trial is recorded, the new version
// must mark itself good (markTrialGood → <root>/trial-ok) within the trial bound. If it exits first or the
// bound passes, the supervisor stops it, switches `current` back and starts the previous version.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { realpathSync } from 'node:fs';
import { ERRORS } from '../errors.ts';
import type { AuditEvent } from '../audit/audit-events.ts';
import { concludeTrial, readState, slotVersion, trialMarkedGood, type SlotName } from './slots.ts';

export interface SupervisorEvent {
  type: 'started' | 'exited' | 'trial_passed' | 'trial_failed';
  version?: string;
  slot?: string;
  code?: number | null;
  reason?: string;
  ms?: number;
}

export interface SupervisorOptions {
  root: string;
  /** The command for a slot's directory (e.g. [node, <slot>/bin/start.mjs]). */
  command: (slotDir: string) => { file: string; args: string[] };
  env?: NodeJS.ProcessEnv;
  pollMs?: number;
  onEvent?: (e: SupervisorEvent) => void;
  /** Where trial outcomes are recorded (the node's audit log). */
  audit?: (e: AuditEvent) => void;
}

export interface Supervisor {
  start(): Promise<void>;
  /** What `systemctl restart` is to a unit: stop the child, start whatever `current` names (with its trial). */
  restart(): Promise<void>;
  stop(): Promise<void>;
}

export function createSupervisor(o: SupervisorOptions): Supervisor {
  let child: ChildProcess | undefined;
  let stopping = false;
  let busy: Promise<void> = Promise.resolve();
  const emit = (e: SupervisorEvent): void => o.onEvent?.(e);
  const pollMs = o.pollMs ?? 50;

  async function kill(): Promise<void> {
    const c = child;
    child = undefined;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = once(c, 'exit');
    c.kill('SIGTERM');
    const t = setTimeout(() => c.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(t);
  }

  function launch(): ChildProcess {
    const dir = realpathSync(join(o.root, 'current'));
    const slot = dir.endsWith('/b') ? 'b' : 'a';
    const { file, args } = o.command(dir);
    const c = spawn(file, args, { cwd: dir, env: { ...process.env, ...o.env, PHANTOMA_UPDATE_ROOT: o.root, PHANTOMA_SLOT: slot }, stdio: ['ignore', 'inherit', 'inherit'] });
    child = c;
    emit({ type: 'started', slot, version: slotVersion(o.root, slot as SlotName) ?? '' });
    c.on('exit', (code) => {
      emit({ type: 'exited', slot, code });
      // A crash outside a trial: start again (Restart=on-failure), unless we are the ones stopping it.
      if (child === c && !stopping && !readState(o.root).trial) {
        child = undefined;
        setTimeout(() => {
          if (!stopping && !child) launch();
        }, 200).unref();
      }
    });
    return c;
  }

  async function runTrial(): Promise<void> {
    const trial = readState(o.root).trial;
    const c = launch();
    if (!trial) return;
    const started = Date.now();
    for (;;) {
      if (trialMarkedGood(o.root, trial)) {
        concludeTrial(o.root, true);
        emit({ type: 'trial_passed', version: trial.version, slot: trial.slot, ms: Date.now() - started });
        o.audit?.({ type: 'update_trial', version: trial.version, slot: trial.slot, passed: true, ms: Date.now() - started });
        return;
      }
      const exited = c.exitCode !== null || c.signalCode !== null;
      const late = Date.now() - started > trial.deadlineMs;
      if (exited || late || stopping) {
        await kill();
        concludeTrial(o.root, false, ERRORS.UPDATE_TRIAL_FAILED.code);
        o.audit?.({ type: 'update_trial', version: trial.version, slot: trial.slot, passed: false, ms: Date.now() - started });
        o.audit?.({ type: 'update_rolled_back', from: trial.version, to: slotVersion(o.root, trial.previous) ?? 'unknown', manual: false });
        emit({ type: 'trial_failed', version: trial.version, slot: trial.slot, reason: exited ? 'exited' : stopping ? 'stopped' : 'not_ready_in_time', ms: Date.now() - started });
        if (!stopping) launch();
        return;
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }

  const serial = (fn: () => Promise<void>): Promise<void> => (busy = busy.then(fn, fn));

  return {
    start: () => serial(runTrial),
    restart: () =>
      serial(async () => {
        await kill();
        await runTrial();
      }),
    stop: async () => {
      stopping = true;
      await busy.catch(() => {});
      await kill();
    },
  };
}
