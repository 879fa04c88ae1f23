// The gateway's view of its model directory (issue 10): a poll (default every 2 s) of the manifests that
// `phantoma model pull` writes after the verified file is in place. A new manifest is a model to serve; a
// manifest gone is a model to stop serving. No restart.
import { listModels, type ModelManifest } from './store.ts';

export interface ModelDirWatch {
  /** One scan now (also run by the timer). */
  scan(): Promise<void>;
  close(): void;
}

export function watchModelDir(o: {
  dir: string;
  intervalMs?: number;
  onAdd: (m: ModelManifest) => Promise<void> | void;
  onRemove: (name: string) => Promise<void> | void;
  onError?: (err: unknown) => void;
}): ModelDirWatch {
  const known = new Map<string, string>();
  let running: Promise<void> | undefined;
  const once = async (): Promise<void> => {
    const now = new Map(listModels(o.dir).map((m) => [m.name, m]));
    for (const [name, sha] of known) {
      if (now.get(name)?.sha256 !== sha) {
        known.delete(name);
        await o.onRemove(name);
      }
    }
    for (const [name, m] of now) {
      if (known.has(name)) continue;
      known.set(name, m.sha256);
      await o.onAdd(m);
    }
  };
  const scan = (): Promise<void> => (running ??= once().finally(() => (running = undefined)));
  const timer = setInterval(() => void scan().catch((err: unknown) => o.onError?.(err)), o.intervalMs ?? 2000);
  timer.unref();
  return { scan, close: () => clearInterval(timer) };
}
