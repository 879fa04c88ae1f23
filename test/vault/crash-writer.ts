// Test fixture (run as a child process): adds a client to the vault and SIGKILLs itself right after the
// named write step, as a crash at that moment would. Arguments: vault path, step name, passphrase.
import { updateVault, type WriteStep } from '../../src/vault/store.ts';
import { addClient } from '../../src/vault/contents.ts';

const [path, step, passphrase] = process.argv.slice(2) as [string, WriteStep, string];
updateVault(path, { kind: 'passphrase', secret: Buffer.from(passphrase) }, (c) => addClient(c, 'crash-client', Buffer.alloc(32, 7), new Date()), {
  onStep: (s) => {
    if (s === step) process.kill(process.pid, 'SIGKILL');
  },
});
process.stdout.write('finished\n');
