// What a worker backend provides: start a one-shot worker process (or container) whose stdio is ours,
// and end it for certain. The pool, queue and request handling are shared by every backend.
import type { Readable, Writable } from 'node:stream';
import type { WorkerSpec } from './worker-main.ts';

export interface WorkerExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface WorkerHandle {
  readonly id: string;
  readonly pid: number | undefined;
  readonly stdin: Writable;
  readonly stdout: Readable;
  readonly stderr: Readable;
  readonly exited: Promise<WorkerExit>;
  /** Ends the worker (SIGKILL) and resolves once it is gone. */
  kill(): Promise<WorkerExit>;
}

export interface WorkerBackend {
  readonly name: string;
  spawn(spec: WorkerSpec, opts: { lowPriority: boolean }): WorkerHandle;
}
