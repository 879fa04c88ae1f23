// Typed wrappers over native/addon (phantoma_native.node): the Linux calls Node has no API for — prctl
// dumpable / no_new_privs, and a unix socket's peer credentials (for keyd). Built by `make -C native/addon`
// (scripts/setup.sh). Loaded lazily, so importing this module never fails; the first call does if the
// addon is missing, with an error that says how to build it.
import { createRequire } from 'node:module';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { projectRoot } from '../paths.ts';

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

interface NativeBinding {
  setDumpable(on: boolean): void;
  isDumpable(): boolean;
  setNoNewPrivs(): void;
  getNoNewPrivs(): boolean;
  peerCredentials(fd: number): PeerCredentials;
  peerPidfd(fd: number): number;
  mallocTrim(): boolean;
  sdNotify(socketPath: string, message: string): boolean;
}

/** A failed system call: `code` is the errno name (EBADF, ENOTSOCK, ENOTCONN, ...), `errno` is negative. */
export interface NativeSystemError extends Error {
  code: string;
  errno: number;
  syscall: string;
}

export const ADDON_PATH = join(projectRoot(), 'native', 'addon', 'build', 'phantoma_native.node');

let binding: NativeBinding | undefined;

function native(): NativeBinding {
  if (binding) return binding;
  const require = createRequire(import.meta.url);
  try {
    binding = require(ADDON_PATH) as NativeBinding;
  } catch (err) {
    throw new Error(`cannot load the native addon ${ADDON_PATH} (build it: make -C native/addon, or scripts/setup.sh): ${(err as Error).message}`, { cause: err });
  }
  return binding;
}

/** PR_SET_DUMPABLE: false stops core dumps and makes /proc/<pid>/mem, environ, ptrace root-only. Resets on execve. */
export function setDumpable(on: boolean): void {
  native().setDumpable(on);
}

export function isDumpable(): boolean {
  return native().isDumpable();
}

/** PR_SET_NO_NEW_PRIVS: one-way; execve can no longer gain privileges (setuid bits, file capabilities). */
export function setNoNewPrivs(): void {
  native().setNoNewPrivs();
}

export function getNoNewPrivs(): boolean {
  return native().getNoNewPrivs();
}

/**
 * SO_PEERCRED of a connected unix socket: the pid/uid/gid of the process that called connect() (client side
 * seen from a server) or listen() (server side seen from a client), taken at that moment by the kernel.
 * Throws ENOTCONN for a socket without a peer, ENOTSOCK/EBADF for anything else.
 */
export function peerCredentials(fd: number): PeerCredentials {
  return native().peerCredentials(fd);
}

/**
 * SO_PEERPIDFD (Linux >= 6.5): a pidfd referring to the peer process, immune to pid reuse. The caller owns
 * the returned descriptor and must close it (fs.closeSync).
 */
export function peerPidfd(fd: number): number {
  return native().peerPidfd(fd);
}

/** glibc malloc_trim(0): returns freed heap pages to the kernel; true when any were released. */
export function mallocTrim(): boolean {
  return native().mallocTrim();
}

/**
 * One sd_notify(3) datagram to systemd's notification socket (`$NOTIFY_SOCKET`: a path, or `@name` for the
 * abstract namespace), e.g. "READY=1\nSTATUS=serving". Sent by this process, so NotifyAccess=main accepts it.
 * Throws EINVAL for a bad path or a message over 4 KiB, and the sendto errno otherwise.
 */
export function sdNotify(socketPath: string, message: string): void {
  native().sdNotify(socketPath, message);
}

/** The file descriptor under a connected net.Socket on a unix path (Node's Pipe handle exposes it as `fd`). */
export function socketFd(socket: Socket): number {
  const handle = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle;
  const fd = handle?.fd;
  if (typeof fd !== 'number' || !Number.isInteger(fd) || fd < 0) {
    throw new Error('the socket has no file descriptor (not connected, already closed, or not a unix/TCP stream)');
  }
  return fd;
}

/** Peer credentials of a connected net.Socket on a unix path. */
export function socketPeerCredentials(socket: Socket): PeerCredentials {
  return peerCredentials(socketFd(socket));
}
