// Running the real playbook (deploy/ansible/site.yml) against a booted container (test/helpers/nspawn.ts)
// through Ansible's community.general.chroot connection, whose ansible_chroot_exe is an
// `nsenter --target <leader> --all` wrapper (writeChrootWrapper): every module runs inside the
// container's namespaces, with pipelining on (deploy/ansible/ansible.cfg).
import { spawn } from 'node:child_process';
import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from '../helpers.ts';
import type { Container } from '../helpers/nspawn.ts';
import type { TestRelease } from './ansible-release.ts';

export const ANSIBLE_DIR = join(ROOT, 'deploy', 'ansible');
export const GATEWAY_PORT = 8443;
export const CP_PORT = 8444;

export interface PlaybookResult {
  code: number;
  output: string;
  ms: number;
  recap: Map<string, Record<string, number>>;
}

/** Parses the PLAY RECAP lines: host : ok=N changed=N unreachable=N failed=N skipped=N rescued=N ignored=N. */
export function parseRecap(output: string): Map<string, Record<string, number>> {
  const recap = new Map<string, Record<string, number>>();
  const at = output.lastIndexOf('PLAY RECAP');
  if (at < 0) return recap;
  for (const line of output.slice(at).split('\n').slice(1)) {
    const m = /^(\S+)\s+:\s+(.*)$/.exec(line.trim());
    if (!m) continue;
    const counts: Record<string, number> = {};
    for (const kv of m[2]!.trim().split(/\s+/)) {
      const [k, v] = kv.split('=');
      if (k && v !== undefined && /^\d+$/.test(v)) counts[k] = Number(v);
    }
    recap.set(m[1]!, counts);
  }
  return recap;
}

/** Runs a command on the host with a bound; a command past it is killed with its process group. */
export function runBounded(file: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs: number; input?: string }): Promise<{ code: number; output: string; ms: number }> {
  const started = Date.now();
  return new Promise((resolve) => {
    const child = spawn(file, args, { cwd: opts.cwd, env: opts.env, stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'], detached: true });
    if (opts.input !== undefined) {
      child.stdin!.on('error', () => {});
      child.stdin!.end(opts.input);
    }
    let output = '';
    child.stdout!.on('data', (c: Buffer) => (output += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (output += c.toString()));
    const timer = setTimeout(() => {
      output += `\n[killed after ${opts.timeoutMs} ms]`;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    }, opts.timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      resolve({ code: 127, output: output + String(err), ms: Date.now() - started });
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal ? 137 : 1), output, ms: Date.now() - started });
    });
  });
}

/** The environment ansible-playbook runs in: our ansible.cfg, a private local temp dir, no colour. */
export function ansibleEnv(work: string): NodeJS.ProcessEnv {
  return {
    PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    LANG: 'C.UTF-8',
    HOME: work,
    ANSIBLE_CONFIG: join(ANSIBLE_DIR, 'ansible.cfg'),
    ANSIBLE_LOCAL_TEMP: join(work, 'ansible-local'),
    ANSIBLE_NOCOLOR: '1',
    ANSIBLE_FORCE_COLOR: '0',
    ANSIBLE_HOST_KEY_CHECKING: 'False',
    ANSIBLE_COLLECTIONS_PATH: '/usr/lib/python3/dist-packages/ansible_collections',
  };
}

export async function runPlaybook(work: string, inventory: string, args: string[], timeoutMs = 300_000): Promise<PlaybookResult> {
  const r = await runBounded('ansible-playbook', ['-i', inventory, join(ANSIBLE_DIR, 'site.yml'), ...args], { cwd: ANSIBLE_DIR, env: ansibleEnv(work), timeoutMs });
  return { ...r, recap: parseRecap(r.output) };
}

/**
 * An inventory for one container that holds the control plane (cp), the node (node1) and two more node
 * identities (node2, node3: their own configuration, vault and state paths, services not started) that
 * exist only to show a reused enrolment token refused.
 */
export function writeInventory(path: string, c: Container, chrootExe: string, rel: TestRelease, tinyModel: string, systemdDir: string): void {
  const connection = {
    ansible_connection: 'community.general.chroot',
    ansible_host: c.root,
    ansible_chroot_exe: chrootExe,
    ansible_python_interpreter: '/usr/bin/python3',
    // The connection is root inside the container already; Debian's minbase has no sudo.
    ansible_become: false,
  };
  const release = (prefix: string): Record<string, unknown> => ({
    [`${prefix}_release_tarball`]: rel.tarball,
    [`${prefix}_release_version`]: rel.version,
    [`${prefix}_release_bundles`]: rel.bundles,
    [`${prefix}_release_trusted_root`]: rel.trustedRoot,
    [`${prefix}_release_kit`]: rel.kit,
    [`${prefix}_release_kit_sha256`]: rel.kitSha256,
  });
  const scratch = (n: string): Record<string, unknown> => ({
    phantoma_node_config_path: `/etc/phantoma-${n}/node.json`,
    phantoma_node_state_dir: `/var/lib/phantoma-${n}`,
    phantoma_node_keyd_state_dir: `/var/lib/phantoma-keyd-${n}`,
    phantoma_node_vault_key_path: `/etc/credstore-${n}/phantoma-vault-key`,
    phantoma_node_start_services: false,
  });
  const inventory = {
    all: {
      vars: connection,
      children: {
        phantoma_control_plane: {
          hosts: { cp: {} },
          vars: {
            ...release('phantoma_control_plane'),
            phantoma_control_plane_systemd_dir: systemdDir,
            phantoma_control_plane_host: '127.0.0.1',
            phantoma_control_plane_port: CP_PORT,
            // A weak scrypt cost for the sealed lease key keeps the test fast (the test-only switch).
            phantoma_control_plane_config_extra: { key: { kdfLog2N: 10, allowWeakKdf: true } },
            // Heartbeats every 10 s (the minimum), so the test sees one soon after the start.
            phantoma_control_plane_heartbeat_interval_seconds: 10,
          },
        },
        phantoma_nodes: {
          hosts: { node1: {}, node2: scratch('node2'), node3: scratch('node3') },
          vars: {
            ...release('phantoma_node'),
            phantoma_node_systemd_dir: systemdDir,
            phantoma_node_models: [{ name: 'tiny', src: tinyModel }],
            phantoma_node_gateway_host: '127.0.0.1',
            phantoma_node_gateway_port: GATEWAY_PORT,
            phantoma_node_gateway_tls: 'off',
            phantoma_node_gateway_auth: 'none',
            phantoma_node_pool_size: 1,
            phantoma_node_inference_threads: 1,
            phantoma_node_control_plane_url: `https://127.0.0.1:${CP_PORT}`,
            phantoma_node_control_plane_host: 'cp',
            // The container's kernel and swap are the host's: write the files, leave the live values alone.
            phantoma_node_sysctl_apply: false,
            phantoma_node_swap_apply: false,
            phantoma_node_init_on_free: true,
          },
        },
      },
    },
  };
  writeFileSync(path, JSON.stringify(inventory, null, 1) + '\n', { mode: 0o600 });
  chmodSync(path, 0o600);
}
