// The client's request with a body made late (a sealed envelope): the exact bytes arrive under the length
// announced in the headers; a body that fails to be made, or comes out another length, aborts the request,
// so the node never sees a complete body.
import t from 'tap';
import http from 'node:http';
import { once } from 'node:events';
import { request, readAll } from '../../src/client/http.ts';

interface Seen {
  headersAt: number;
  body?: Buffer;
  aborted: boolean;
  contentLength?: string;
}

async function server(t: { teardown: (fn: () => unknown) => void }): Promise<{ url: string; seen: Seen[] }> {
  const seen: Seen[] = [];
  const s = http.createServer((req, res) => {
    const entry: Seen = { headersAt: performance.now(), aborted: false, contentLength: req.headers['content-length'] };
    seen.push(entry);
    const parts: Buffer[] = [];
    req.on('data', (c: Buffer) => parts.push(c));
    req.on('aborted', () => (entry.aborted = true));
    req.on('error', () => (entry.aborted = true));
    req.on('end', () => {
      entry.body = Buffer.concat(parts);
      res.end('ok');
    });
  });
  s.listen(0, '127.0.0.1');
  await once(s, 'listening');
  t.teardown(() => new Promise<void>((res) => s.close(() => res())).then(() => undefined));
  t.teardown(() => s.closeAllConnections());
  return { url: `http://127.0.0.1:${(s.address() as { port: number }).port}`, seen };
}

const waitFor = async (cond: () => boolean): Promise<void> => {
  for (let i = 0; i < 200 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
};

t.test('a late body: made once, after the headers were handed to the connection, and delivered whole', async (t) => {
  const { url, seen } = await server(t);
  const bytes = Buffer.from('sealed-envelope-bytes'.repeat(100));
  let made = 0;
  const res = await request({ url }, 'POST', '/v1/sealed', { contentType: 'application/x-test', length: bytes.length, bytes: () => (made++, bytes) });
  t.equal(res.status, 200);
  t.equal(await readAll(res.body), 'ok');
  t.equal(made, 1);
  t.equal(seen[0]!.contentLength, String(bytes.length));
  t.same(seen[0]!.body, bytes, 'the exact bytes');
  // A second request on the kept-alive connection, which is connected already.
  const again = await request({ url }, 'POST', '/v1/sealed', { contentType: 'application/x-test', length: 3, bytes: () => Buffer.from('abc') });
  t.equal(await readAll(again.body), 'ok');
  t.same(seen[1]!.body, Buffer.from('abc'));
});

t.test('a body that fails to be made: the error is the caller\'s, the node sees no complete body', async (t) => {
  const { url, seen } = await server(t);
  await t.rejects(request({ url }, 'POST', '/v1/sealed', { contentType: 'application/x-test', length: 10, bytes: () => { throw new Error('seal failed'); } }), { message: 'seal failed' });
  await waitFor(() => seen.length > 0 && seen[0]!.aborted);
  t.equal(seen.length, 1, 'the headers had gone out');
  t.ok(seen[0]!.aborted, 'and the request was aborted');
  t.equal(seen[0]!.body, undefined, 'no body completed');
});

t.test('a body of another length than announced is refused before it is sent', async (t) => {
  const { url, seen } = await server(t);
  await t.rejects(request({ url }, 'POST', '/v1/sealed', { contentType: 'application/x-test', length: 10, bytes: () => Buffer.alloc(9) }), { code: 'internal_error' });
  await waitFor(() => seen.length > 0 && seen[0]!.aborted);
  t.ok(seen[0]!.aborted);
  t.equal(seen[0]!.body, undefined);
});

t.test('an unreachable node is node_unreachable, and the body is never made', async (t) => {
  const { url } = await server(t);
  const closed = url.replace(/:\d+$/, ':1');
  let made = 0;
  await t.rejects(request({ url: closed }, 'POST', '/v1/sealed', { contentType: 'application/x-test', length: 3, bytes: () => (made++, Buffer.from('abc')) }), { code: 'node_unreachable' });
  t.equal(made, 0);
});
