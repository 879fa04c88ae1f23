// What a worker backend provides: start a one-shot worker process (or container) whose stdio is ours,
// and end it for certain. The pool, queue and request handling are shared by every backend.
import type { Readable, Writable } from 'node:stream';
import type { WorkerSpec } from './worker-main.ts';

export interface WorkerExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** The kernel's OOM killer fired in the worker's memory cgroup (backends that can tell: the warden). */
  outOfMemory?: boolean;
}

export interface WorkerHandle {
  readonly id: string;
  readonly pid: number | undefined;
  /**
   * The worker's id as keyd names it from the worker's cgroup (the warden's 16 hex id, a Docker container's
   * 64 hex id), for the gateway's keyd `prepare`; undefined where keyd does not know the worker as one.
   */
  readonly keydId?: string;
  readonly stdin: Writable;
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly exited: Promise<WorkerExit>;
  /** Ends the worker (SIGKILL) and resolves once it is gone. */
  kill(): Promise<WorkerExit>;
  /** Back to normal CPU priority when a warm worker (refilled at low priority) takes a request. */
  promote?(): void;
  /** Backends that can prove the end (the warden: cgroup killed, empty and removed) settle this once
   * the worker has ended, for the audit log. Plain process workers have no such proof. */
  readonly endResult?: Promise<WorkerEndResult>;
}

export interface WorkerEndResult {
  /** The worker's cgroup was killed, found empty and removed, and its main process reaped. */
  verified: boolean;
  /** Time the end and its verification took, measured by the warden; null when it did not answer. */
  ms: number | null;
  /** Why verification failed (a warden error code), when it did. */
  error?: string;
}

export interface WorkerBackend {
  readonly name: string;
  spawn(spec: WorkerSpec, opts: { lowPriority: boolean }): WorkerHandle;
}
