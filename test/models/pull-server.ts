// The far end for test/models/pull.test.ts, run INSIDE the test's own network namespace (`ip netns exec`):
// an HTTP server on the namespace's IPv4 and IPv6 addresses. One JSON line per request it received, so
// "reached" is decided here, on the server's side. argv: V4 V6 PORT GGUF_FILE OTHER_FILE
//   /model.gguf       the GGUF, honours Range
//   /trunc-once.gguf  a request without Range gets half the body and a reset; with Range: served
//   /trunc.gguf       always announces the full length, sends half, resets
//   /stall.gguf       headers and 4 KiB, then nothing
//   /other.bin        OTHER_FILE (not a GGUF), honours Range
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { readFileSync } from 'node:fs';

const [v4, v6, port, ggufFile, otherFile] = process.argv.slice(2) as [string, string, string, string, string];
const gguf = readFileSync(ggufFile);
const other = readFileSync(otherFile);
const out = (o: object): void => void process.stdout.write(JSON.stringify(o) + '\n');

function serve(req: IncomingMessage, res: ServerResponse, body: Buffer): void {
  const m = /^bytes=(\d+)-$/.exec(String(req.headers.range ?? ''));
  const start = m ? Number(m[1]) : 0;
  if (m && start < body.length) {
    res.writeHead(206, { 'content-length': body.length - start, 'content-range': `bytes ${start}-${body.length - 1}/${body.length}` });
  } else res.writeHead(200, { 'content-length': body.length });
  res.end(body.subarray(m && start < body.length ? start : 0));
}

function half(res: ServerResponse, body: Buffer): void {
  res.writeHead(200, { 'content-length': body.length });
  res.write(body.subarray(0, body.length >> 1), () => setTimeout(() => res.socket?.destroy(), 50));
}

let pending = 2;
for (const host of [v4, v6]) {
  const srv = createServer((req, res) => {
    out({ ev: 'req', host, path: req.url, range: req.headers.range ?? null });
    if (req.url === '/model.gguf') return serve(req, res, gguf);
    if (req.url === '/other.bin') return serve(req, res, other);
    if (req.url === '/trunc-once.gguf') return req.headers.range ? serve(req, res, gguf) : half(res, gguf);
    if (req.url === '/trunc.gguf') return half(res, gguf);
    if (req.url === '/stall.gguf') {
      res.writeHead(200, { 'content-length': gguf.length });
      res.write(gguf.subarray(0, 4096));
      return; // never more; the socket is closed when the client goes away
    }
    res.writeHead(404).end();
  });
  srv.on('connection', () => out({ ev: 'conn', host }));
  srv.listen(Number(port), host, () => {
    if (--pending === 0) out({ ev: 'ready' });
  });
}
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
