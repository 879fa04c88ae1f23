// Whether a pid names a live process, for lock and stale-file decisions: EPERM (it exists but is not ours
// to signal) counts as alive, so another user's process is never mistaken for a dead writer.
export function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
