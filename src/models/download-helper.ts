// The download helper (issue 10): the fixed script the warden runs for a DOWNLOAD request, inside
// <NAME>/download/<id>/ (the egress filter's download set), host network namespace, unprivileged uid,
// read-only filesystem. It fetches ONE http(s) URL from ONE pinned address (resolved by the daemon at
// window open: the helper does no DNS) and writes to stdout, which is the caller's connection:
//   one JSON header line: {"ok":true,"status":200|206,"start":N,"length":N|null,"total":N|null}
//                      or {"ok":false,"code":"blocked"|"connect_failed"|"http_status"|"bad_args","errno"?,"status"?}
//   then the body bytes, raw. The caller stores, hashes and validates them; the helper writes no file.
// argv: URL ADDRESS OFFSET STALL_MS. Standalone on purpose (node: modules only).
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { isIP, type LookupFunction } from 'node:net';

const [url, address, offsetArg, stallArg] = process.argv.slice(2);
const out = process.stdout;
let sent = false;
const header = (o: object): void => {
  sent = true;
  out.write(JSON.stringify(o) + '\n');
};
const done = (code: number): void => {
  out.end(() => process.exit(code));
  setTimeout(() => process.exit(code), 2000).unref();
};

// The caller closing the connection (stdin end) ends the helper: nothing outlives its pull.
process.stdin.on('end', () => process.exit(3));
process.stdin.on('error', () => process.exit(3));
process.stdin.resume();
out.on('error', () => process.exit(3));

function parseTarget(): URL | undefined {
  try {
    const t = new URL(url ?? '');
    if (!['http:', 'https:'].includes(t.protocol) || isIP(address ?? '') === 0 || !/^[0-9]{1,15}$/.test(offsetArg ?? '') || !/^[0-9]{1,7}$/.test(stallArg ?? '')) return undefined;
    return t;
  } catch {
    return undefined;
  }
}
const parsed = parseTarget();
if (!parsed) {
  header({ ok: false, code: 'bad_args' });
  done(2);
} else fetchOnce(parsed);

function fetchOnce(target: URL): void {
const offset = Number(offsetArg);
const stallMs = Number(stallArg);
const family = isIP(address!);
const opts = {
  method: 'GET',
  // The pinned address, whatever the name would resolve to now; the name still goes in Host and SNI.
  lookup: ((_h: string, o: { all?: boolean }, cb: (err: null, a: unknown, f?: number) => void): void => (o.all ? cb(null, [{ address: address!, family }]) : cb(null, address!, family))) as unknown as LookupFunction,
  headers: { 'user-agent': 'phantoma-model-pull/1', accept: '*/*', 'accept-encoding': 'identity', ...(offset > 0 ? { range: `bytes=${offset}-` } : {}) },
  timeout: stallMs,
};
const req = (target.protocol === 'https:' ? httpsRequest : httpRequest)(target, opts, (res: IncomingMessage) => {
  const status = res.statusCode ?? 0;
  if (status !== 200 && status !== 206) {
    header({ ok: false, code: 'http_status', status });
    res.resume();
    return done(4);
  }
  const len = res.headers['content-length'] !== undefined ? Number(res.headers['content-length']) : null;
  let start = 0;
  let total: number | null = status === 200 ? len : null;
  if (status === 206) {
    const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(String(res.headers['content-range'] ?? ''));
    if (!m) {
      header({ ok: false, code: 'http_status', status });
      return done(4);
    }
    start = Number(m[1]);
    total = m[3] === '*' ? null : Number(m[3]);
  }
  header({ ok: true, status, start, length: len, total });
  res.pipe(out, { end: false });
  res.on('end', () => done(res.complete ? 0 : 5));
  res.on('aborted', () => done(5));
  res.on('error', () => done(5));
});
req.on('timeout', () => req.destroy(Object.assign(new Error('stalled'), { code: 'ETIMEDOUT' })));
req.on('error', (err: NodeJS.ErrnoException) => {
  if (!sent) header({ ok: false, code: err.code === 'EPERM' ? 'blocked' : 'connect_failed', errno: err.code ?? 'unknown' });
  done(err.code === 'EPERM' ? 6 : 5);
});
req.end();
}
