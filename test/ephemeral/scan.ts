// Scanners for the canary test: find unique random canaries in files, logs and a process's memory.
// The matching is pure (buffers in, counts out); the walkers and readers are thin layers over fs and /proc.
// Nothing here ever prints or returns a canary's bytes except the optional memory context sample, which
// the caller must not write anywhere persistent (a leak report must not itself become a leak).
import { randomBytes } from 'node:crypto';
import { closeSync, lstatSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, statSync } from 'node:fs';

export const CANARY_PREFIX = 'CANARY-';
/** `CANARY-` + 16 lowercase hex digits: 64 random bits, so a match is never a coincidence. */
export const CANARY_LENGTH = CANARY_PREFIX.length + 16;

export function makeCanary(): string {
  return CANARY_PREFIX + randomBytes(8).toString('hex');
}

// ---------------------------------------------------------------------------------------------------
// Matching (pure)

export type Encoding = 'utf8' | 'utf16le';

/** Counts, per canary, how many copies a body of bytes holds, in UTF-8/Latin-1 and in UTF-16LE. */
export interface Matcher {
  readonly canaries: ReadonlySet<string>;
  /** Longest encoded canary, in bytes: a streaming caller carries this many bytes minus one over. */
  readonly carryBytes: number;
  /** Adds every complete copy in buf to counts (canary → copies); returns how many it found. */
  scan(buf: Buffer, counts: Map<string, number>, onHit?: (canary: string, offset: number, encoding: Encoding) => void): number;
}

export function createMatcher(canaries: Iterable<string>): Matcher {
  const set = new Set(canaries);
  for (const c of set) if (!c.startsWith(CANARY_PREFIX) || c.length !== CANARY_LENGTH) throw new Error('a canary must be CANARY- and 16 hex digits');
  const prefixes: Array<{ enc: Encoding; bytes: Buffer; width: number }> = [
    { enc: 'utf8', bytes: Buffer.from(CANARY_PREFIX, 'latin1'), width: 1 },
    { enc: 'utf16le', bytes: Buffer.from(CANARY_PREFIX, 'utf16le'), width: 2 },
  ];
  return {
    canaries: set,
    carryBytes: CANARY_LENGTH * 2,
    scan(buf, counts, onHit) {
      let found = 0;
      for (const p of prefixes) {
        const tokenBytes = CANARY_LENGTH * p.width;
        for (let i = buf.indexOf(p.bytes); i !== -1 && i + tokenBytes <= buf.length; i = buf.indexOf(p.bytes, i + 1)) {
          const token = buf.toString(p.enc === 'utf8' ? 'latin1' : 'utf16le', i, i + tokenBytes);
          if (!set.has(token)) continue;
          counts.set(token, (counts.get(token) ?? 0) + 1);
          found++;
          onHit?.(token, i, p.enc);
        }
      }
      return found;
    },
  };
}

/**
 * Feeds a matcher chunk by chunk: the last carryBytes-1 bytes of each chunk are searched again with the
 * next one, so a copy split between chunks is found; a copy ending inside the carry was complete (and
 * counted) with the previous chunk, so it is skipped.
 */
export function createStreamScanner(m: Matcher, counts: Map<string, number>): { push(chunk: Buffer): number } {
  let carry = Buffer.alloc(0);
  return {
    push(chunk) {
      const buf = carry.length ? Buffer.concat([carry, chunk]) : chunk;
      const carried = carry.length;
      let found = 0;
      m.scan(buf, new Map(), (token, offset, enc) => {
        const end = offset + token.length * (enc === 'utf8' ? 1 : 2);
        if (end <= carried) return; // wholly inside the carry: counted with the previous chunk
        counts.set(token, (counts.get(token) ?? 0) + 1);
        found++;
      });
      carry = Buffer.from(buf.subarray(Math.max(0, buf.length - (m.carryBytes - 1))));
      return found;
    },
  };
}

/** Copies in a string (a log line, a file name), both as itself and nothing else. */
export function countInString(m: Matcher, s: string, counts: Map<string, number>): number {
  if (!s.includes(CANARY_PREFIX)) return 0;
  return m.scan(Buffer.from(s, 'utf8'), counts);
}

// ---------------------------------------------------------------------------------------------------
// Mounts (pure parse)

export interface Mount {
  id: number;
  parent: number;
  dev: string; // major:minor
  root: string;
  mountPoint: string;
  fstype: string;
  source: string;
}

const unescapeMount = (s: string): string => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));

export function parseMountinfo(text: string): Mount[] {
  const out: Mount[] = [];
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    const [left, right] = line.split(' - ');
    const f = left!.split(' ');
    const r = (right ?? '').split(' ');
    out.push({ id: Number(f[0]), parent: Number(f[1]), dev: f[2]!, root: unescapeMount(f[3]!), mountPoint: unescapeMount(f[4]!), fstype: r[0]!, source: unescapeMount(r[1] ?? '') });
  }
  return out;
}

/** Memory-backed and kernel pseudo filesystems: nothing written there survives a reboot, or it is not files. */
export const NON_DISK_FSTYPES = new Set([
  'proc', 'sysfs', 'tmpfs', 'devtmpfs', 'devpts', 'ramfs', 'cgroup', 'cgroup2', 'bpf', 'debugfs', 'tracefs', 'securityfs',
  'fusectl', 'mqueue', 'hugetlbfs', 'configfs', 'pstore', 'autofs', 'binfmt_misc', 'nsfs', 'rpc_pipefs', 'efivarfs',
  'selinuxfs', 'nfsd', 'overlay-tmpfs', 'rootfs-tmpfs',
]);

export function isDiskFs(fstype: string): boolean {
  return !NON_DISK_FSTYPES.has(fstype) && !fstype.startsWith('cgroup');
}

/** The mounts to walk: disk filesystems, not under /proc or /sys, each mount point once. */
export function diskMounts(mounts: readonly Mount[]): Mount[] {
  const seen = new Set<string>();
  return mounts.filter((m) => {
    if (!isDiskFs(m.fstype)) return false;
    if (m.mountPoint === '/proc' || m.mountPoint.startsWith('/proc/') || m.mountPoint === '/sys' || m.mountPoint.startsWith('/sys/')) return false;
    if (seen.has(m.mountPoint)) return false;
    seen.add(m.mountPoint);
    return true;
  });
}

// ---------------------------------------------------------------------------------------------------
// Files

export interface FileScanResult {
  mounts: string[];
  /** Directory entries looked at (every one is lstat'ed: the cost of the walk). */
  entries: number;
  /** Files (and symlinks) changed since `sinceMs` and read end to end. */
  filesChecked: number;
  bytesRead: number;
  /** canary → paths holding it (in content, a symlink target, or a name). */
  hits: Map<string, Set<string>>;
  /** Paths that could not be read (vanished mid-walk, permissions): reported, not hidden. */
  unreadable: string[];
  ms: number;
}

const CHUNK = 1 << 20;
const PAGE = 4096;

// One read buffer for every file: a fresh 1 MiB per file is an mmap, page faults and zero-filling on each
// of tens of thousands of files (it tripled the scan's time).
let readBuffer: Buffer | undefined;

function scanFileContent(path: string, m: Matcher, counts: Map<string, number>): number {
  const fd = openSync(path, 'r');
  try {
    const s = createStreamScanner(m, counts);
    const buf = (readBuffer ??= Buffer.allocUnsafe(CHUNK));
    let total = 0;
    for (;;) {
      const n = readSync(fd, buf, 0, CHUNK, null);
      if (n <= 0) break;
      total += n;
      s.push(buf.subarray(0, n));
    }
    return total;
  } finally {
    closeSync(fd);
  }
}

/**
 * One pass over every disk mount: lstat every entry, never cross into another device, skip /proc and /sys,
 * and read (streamed) each regular file or symlink whose mtime or ctime is at or after sinceMs. Entry names
 * are matched too, everywhere: a file named after a prompt is a leak whatever its age.
 */
export function scanFilesSince(opts: { sinceMs: number; matcher: Matcher; mounts?: readonly Mount[]; onChecked?: (path: string) => void }): FileScanResult {
  const started = performance.now();
  const mounts = diskMounts(opts.mounts ?? parseMountinfo(readFileSync('/proc/self/mountinfo', 'utf8')));
  const res: FileScanResult = { mounts: mounts.map((x) => `${x.mountPoint} (${x.fstype})`), entries: 0, filesChecked: 0, bytesRead: 0, hits: new Map(), unreadable: [], ms: 0 };
  const seenFiles = new Set<string>();
  const hit = (counts: Map<string, number>, path: string): void => {
    for (const c of counts.keys()) {
      let s = res.hits.get(c);
      if (!s) res.hits.set(c, (s = new Set()));
      s.add(path);
    }
  };
  for (const mount of mounts) {
    let rootDev: number;
    try {
      rootDev = statSync(mount.mountPoint).dev;
    } catch {
      res.unreadable.push(mount.mountPoint);
      continue;
    }
    const stack = [mount.mountPoint];
    while (stack.length) {
      const dir = stack.pop()!;
      if (dir === '/proc' || dir === '/sys') continue;
      let names: string[];
      try {
        names = readdirSync(dir);
      } catch {
        res.unreadable.push(dir);
        continue;
      }
      for (const name of names) {
        const path = dir === '/' ? '/' + name : dir + '/' + name;
        res.entries++;
        if (name.includes(CANARY_PREFIX)) {
          const c = new Map<string, number>();
          if (countInString(opts.matcher, name, c)) hit(c, path);
        }
        let st;
        try {
          st = lstatSync(path);
        } catch {
          continue; // vanished since readdir
        }
        if (st.dev !== rootDev) continue; // another mount: walked on its own, or not a disk
        if (st.isDirectory()) {
          stack.push(path);
          continue;
        }
        if (st.mtimeMs < opts.sinceMs && st.ctimeMs < opts.sinceMs) continue;
        if (!st.isFile() && !st.isSymbolicLink()) continue; // sockets, fifos, devices hold no bytes
        const key = `${st.dev}:${st.ino}`;
        if (seenFiles.has(key)) continue;
        seenFiles.add(key);
        const counts = new Map<string, number>();
        try {
          if (st.isSymbolicLink()) countInString(opts.matcher, readlinkSync(path), counts);
          else res.bytesRead += scanFileContent(path, opts.matcher, counts);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'ENOENT') res.unreadable.push(path);
          continue;
        }
        res.filesChecked++;
        opts.onChecked?.(path);
        if (counts.size) hit(counts, path);
      }
    }
  }
  res.ms = performance.now() - started;
  return res;
}

/** Lines (of a captured log file) that carry a canary: line numbers only, never the line. */
export function scanLogText(text: string, m: Matcher): { lines: number; hitLines: number[]; counts: Map<string, number> } {
  const counts = new Map<string, number>();
  const hitLines: number[] = [];
  const lines = text.split('\n');
  lines.forEach((line, i) => {
    if (countInString(m, line, counts)) hitLines.push(i + 1);
  });
  return { lines: lines.length, hitLines, counts };
}

// ---------------------------------------------------------------------------------------------------
// Process memory

export interface Region {
  start: number;
  end: number;
  perms: string;
  offset: number;
  inode: number;
  path: string;
}

export function parseMaps(text: string): Region[] {
  const out: Region[] = [];
  for (const line of text.split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ (\d+)\s*(.*)$/.exec(line);
    if (!m) continue;
    out.push({ start: parseInt(m[1]!, 16), end: parseInt(m[2]!, 16), perms: m[3]!, offset: parseInt(m[4]!, 16), inode: Number(m[5]), path: m[6]! });
  }
  return out;
}

/** Readable regions that can hold data the process made: anonymous (heap, stacks, V8 spaces) or writable. */
export function dataRegions(regions: readonly Region[]): Region[] {
  return regions.filter((r) => {
    if (r.perms[0] !== 'r') return false;
    if (r.path === '[vvar]' || r.path === '[vsyscall]' || r.path === '[vvar_vclock]') return false;
    const fileBacked = r.inode !== 0 && r.path.startsWith('/');
    return !fileBacked || r.perms[1] === 'w';
  });
}

export interface MemoryScanResult {
  regions: number;
  bytesRead: number;
  /** Byte ranges the kernel refused (EIO): counted, tolerated. */
  unreadableBytes: number;
  counts: Map<string, number>;
  total: number;
  ms: number;
}

/**
 * Reads /proc/<pid>/mem through /proc/<pid>/maps and counts canary copies. `onHit` receives the region and
 * up to `contextBytes` either side of each copy, for diagnosis in memory only.
 */
export function scanProcessMemory(
  pid: number,
  m: Matcher,
  opts: { contextBytes?: number; onHit?: (hit: { canary: string; address: number; encoding: Encoding; region: Region; context: Buffer }) => void } = {},
): MemoryScanResult {
  const started = performance.now();
  const regions = dataRegions(parseMaps(readFileSync(`/proc/${pid}/maps`, 'utf8')));
  const res: MemoryScanResult = { regions: regions.length, bytesRead: 0, unreadableBytes: 0, counts: new Map(), total: 0, ms: 0 };
  const fd = openSync(`/proc/${pid}/mem`, 'r');
  const buf = Buffer.allocUnsafe(CHUNK + m.carryBytes);
  try {
    for (const r of regions) {
      // Each region is scanned on its own (copies do not span regions), with a carry between chunks.
      let carried = 0;
      for (let addr = r.start; addr < r.end; ) {
        const want = Math.min(CHUNK, r.end - addr);
        let n = 0;
        try {
          n = readSync(fd, buf, carried, want, addr);
        } catch {
          /* EIO: the page at addr is not readable */
        }
        if (n <= 0) {
          // Skip one page and go on: a read stops at the first unreadable page, the next may be fine.
          const skip = Math.min(PAGE - (addr % PAGE), r.end - addr);
          res.unreadableBytes += skip;
          addr += skip;
          carried = 0;
          continue;
        }
        res.bytesRead += n;
        const view = buf.subarray(0, carried + n);
        const base = addr - carried;
        m.scan(view, new Map(), (canary, offset, encoding) => {
          const len = canary.length * (encoding === 'utf8' ? 1 : 2);
          if (offset + len <= carried) return; // counted with the previous chunk
          res.counts.set(canary, (res.counts.get(canary) ?? 0) + 1);
          res.total++;
          if (opts.onHit) {
            const cb = opts.contextBytes ?? 64;
            const context = Buffer.from(view.subarray(Math.max(0, offset - cb), Math.min(view.length, offset + len + cb)));
            opts.onHit({ canary, address: base + offset, encoding, region: r, context });
          }
        });
        const keep = Math.min(m.carryBytes - 1, view.length);
        view.copy(buf, 0, view.length - keep, view.length);
        carried = keep;
        addr += n;
      }
    }
  } finally {
    closeSync(fd);
  }
  res.ms = performance.now() - started;
  return res;
}

// ---------------------------------------------------------------------------------------------------
// Processes

export function readCmdline(pid: number): string[] | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((s, i, a) => s !== '' || i < a.length - 1);
  } catch {
    return undefined;
  }
}

/** Every live process whose command line satisfies `match` (zombies have an empty command line). */
export function findProcesses(match: (argv: string[]) => boolean): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const argv = readCmdline(Number(name));
    if (argv && argv.length && match(argv)) out.push(Number(name));
  }
  return out;
}

export function childrenOf(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** User + system CPU ticks a process has used, or undefined once it is gone. */
export function cpuTicks(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch {
    return undefined;
  }
}

/** Bytes a process has written (any fd): a generating worker streams chunks, an idle or loading one does not. */
export function bytesWritten(pid: number): number | undefined {
  try {
    const m = /^wchar: (\d+)$/m.exec(readFileSync(`/proc/${pid}/io`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** The cgroup paths (v1 hierarchies and v2) a process is in, e.g. "4:memory:/workers/ab12". */
export function cgroupsOf(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cgroup`, 'utf8').trim().split('\n').filter(Boolean);
  } catch {
    return [];
  }
}

// ---------------------------------------------------------------------------------------------------
// Forcing a GC in another Node process through its inspector

/**
 * Opens the inspector of a Node process with SIGUSR1, finds its port (from the process's captured stderr,
 * where Node prints "Debugger listening on ws://…", so --inspect-port=0 works), runs
 * HeapProfiler.collectGarbage `times` times, and closes the connection.
 */
export async function forceGc(pid: number, readStderr: () => string, opts: { times?: number; timeoutMs?: number } = {}): Promise<void> {
  const timeoutMs = opts.timeoutMs ?? 15_000;
  const deadline = Date.now() + timeoutMs;
  const listening = (): string | undefined => [...readStderr().matchAll(/Debugger listening on (ws:\/\/127\.0\.0\.1:\d+\/[0-9a-f-]+)/g)].at(-1)?.[1];
  if (!listening()) process.kill(pid, 'SIGUSR1');
  let wsUrl: string | undefined;
  while (!(wsUrl = listening())) {
    if (Date.now() > deadline) throw new Error('the inspector did not open');
    await new Promise((r) => setTimeout(r, 50));
  }
  const ws = new WebSocket(wsUrl);
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('inspector connect timed out')), Math.max(1, deadline - Date.now()));
      ws.addEventListener('open', () => (clearTimeout(timer), resolve()), { once: true });
      ws.addEventListener('error', () => (clearTimeout(timer), reject(new Error('inspector connect failed'))), { once: true });
    });
    let nextId = 1;
    const call = (method: string): Promise<unknown> =>
      new Promise((resolve, reject) => {
        const id = nextId++;
        const timer = setTimeout(() => reject(new Error(`${method} timed out`)), Math.max(1, deadline - Date.now()));
        const onMessage = (ev: MessageEvent): void => {
          const msg = JSON.parse(String(ev.data)) as { id?: number; error?: { message: string }; result?: unknown };
          if (msg.id !== id) return;
          clearTimeout(timer);
          ws.removeEventListener('message', onMessage);
          if (msg.error) reject(new Error(`${method}: ${msg.error.message}`));
          else resolve(msg.result);
        };
        ws.addEventListener('message', onMessage);
        ws.send(JSON.stringify({ id, method }));
      });
    for (let i = 0; i < (opts.times ?? 2); i++) await call('HeapProfiler.collectGarbage');
  } finally {
    ws.close();
  }
}
