// The canary test of issue 5, with its positive controls, run with the Docker worker backend (issue 6):
// canary.test.ts starts its own private dockerd (test/ephemeral/docker-rig.ts) for this backend, and its
// file scan also walks, and first finds a planted canary in, that dockerd's data-root.
//
// Slower than the other backends: every request consumes a container (create, start, model load ≈ 3-4 s
// on 2 shared cores, against ≈ 1.5 s for a process), and the data-root adds the image layers to the file
// scan; hence a longer time limit for this file.
import t from 'tap';

t.setTimeout(900_000);
process.env.PHANTOMA_CANARY_BACKEND = 'docker';
await import('./canary.test.ts');
