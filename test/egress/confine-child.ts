// Run by gateway-confine.test.ts inside the cgroup it tests (the test writes this process's pid into
// cgroup.procs before exec): asks the warden to CONFINE the caller's own cgroup, as a gateway does, and
// prints the result (or the refusal's code) as one JSON line.
import { createEgressClient } from '../../src/egress/warden-egress.ts';
import { WardenError } from '../../src/ephemeral/warden-client.ts';

try {
  const r = await createEgressClient({ socketPath: process.argv[2]! }).confine();
  console.log(JSON.stringify(r));
} catch (err) {
  console.log(JSON.stringify({ error: err instanceof WardenError ? err.code : String(err) }));
}
