// The canary test of issue 5, with its positive controls, run with the Docker worker backend (issue 6):
// canary.test.ts starts its own private dockerd (test/ephemeral/docker-rig.ts) for this backend, and its
// file scan also walks, and first finds a planted canary in, that dockerd's data-root.
process.env.PHANTOMA_CANARY_BACKEND = 'docker';
await import('./canary.test.ts');
