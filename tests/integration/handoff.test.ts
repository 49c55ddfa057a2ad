// The handoff socket refuses every kind of bad handoff with a coded error and serves on.
import t, { type Test } from 'tap';
import { mkdtempSync, openSync, closeSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as sys from '../../daemon/linux/sys.js';
import * as abi from '../../daemon/linux/abi.js';
import type { DestDaemon } from '../../daemon/dest/daemon.js';
import { guestRam as ramOf, startTestDest } from '../helpers/dest.js';
import { noopDestMetrics } from '../../daemon/ops/metric-ports.js';
import { encodeHandoff, type HandoffRequest } from '../../protocol/handoff.js';
import { connectHandoff, sendRaw } from '../helpers/vmm-client.js';

const dir = mkdtempSync(join(tmpdir(), 'yabusame-handoff-'));
const socketPath = join(dir, 'dest.sock');
const refused: string[] = [];
let daemon: DestDaemon;

t.before(async () => {
  daemon = await startTestDest(socketPath, {
    timeoutMs: 500,
    metrics: { ...noopDestMetrics, handoff: (r) => refused.push(r) },
  });
});
t.teardown(async () => {
  await daemon.close();
  rmSync(dir, { recursive: true, force: true });
});

const SIZE = 1 << 20;
const guestRam = (): { base: number; fd: number } => ramOf(SIZE);

function request(base: number, patch: Partial<HandoffRequest> = {}): HandoffRequest {
  return {
    type: 'handoff',
    version: 1,
    migrationId: 'vm-test',
    source: 'ws://127.0.0.1:1',
    regions: [{ name: 'ram0', base, sizeBytes: SIZE, offset: 0, pageSizeBytes: 4096 }],
    ...patch,
  };
}

async function expectRefusal(t: Test, data: Buffer, fds: number[], code: string): Promise<void> {
  const c = await connectHandoff(socketPath);
  sendRaw(c, data, fds);
  const reply = await c.next();
  t.equal(reply.type, 'error');
  t.equal(reply.type === 'error' && reply.code, code, `refused with ${code}`);
  await c.closed;
}

t.test('invalid JSON', async (t) => {
  const { fd } = guestRam();
  await expectRefusal(t, Buffer.from('{not json\n'), [fd], 'HANDOFF_BAD_JSON');
  sys.close(fd);
});

t.test('no fd', async (t) => {
  const { base } = guestRam();
  await expectRefusal(t, encodeHandoff(request(base)), [], 'HANDOFF_NO_FD');
});

t.test('two fds', async (t) => {
  const a = guestRam();
  const b = guestRam();
  await expectRefusal(t, encodeHandoff(request(a.base)), [a.fd, b.fd], 'HANDOFF_TOO_MANY_FDS');
  sys.close(a.fd);
  sys.close(b.fd);
});

t.test('an fd that is not a userfaultfd', async (t) => {
  const { base } = guestRam();
  const fd = openSync('/dev/null', 'r');
  await expectRefusal(t, encodeHandoff(request(base)), [fd], 'HANDOFF_NOT_UFFD');
  closeSync(fd);
});

t.test('a userfaultfd without UFFDIO_API', async (t) => {
  const { base } = guestRam();
  const fd = sys.userfaultfd(abi.O_CLOEXEC);
  await expectRefusal(t, encodeHandoff(request(base)), [fd], 'HANDOFF_UFFD_UNINITIALIZED');
  sys.close(fd);
});

t.test('unaligned region', async (t) => {
  const { base, fd } = guestRam();
  const req = request(base);
  req.regions[0]!.base += 100;
  await expectRefusal(t, encodeHandoff(req), [fd], 'HANDOFF_UNALIGNED');
  sys.close(fd);
});

t.test('page size not a power of two', async (t) => {
  const { base, fd } = guestRam();
  const req = request(base);
  req.regions[0]!.pageSizeBytes = 12288;
  await expectRefusal(t, encodeHandoff(req), [fd], 'HANDOFF_BAD_PAGE_SIZE');
  sys.close(fd);
});

t.test('overlapping regions', async (t) => {
  const { base, fd } = guestRam();
  const req = request(base);
  req.regions.push({
    name: 'ram1',
    base: base + 4096,
    sizeBytes: 8192,
    offset: SIZE,
    pageSizeBytes: 4096,
  });
  await expectRefusal(t, encodeHandoff(req), [fd], 'HANDOFF_OVERLAP');
  sys.close(fd);
});

t.test('a region the VMM never mapped', async (t) => {
  const { fd } = guestRam();
  // An unmapped, aligned address far from anything mapped.
  const req = request(0x10000000000);
  await expectRefusal(t, encodeHandoff(req), [fd], 'HANDOFF_REGISTER_FAILED');
  sys.close(fd);
});

t.test('an unreachable source', async (t) => {
  const { base, fd } = guestRam();
  await expectRefusal(t, encodeHandoff(request(base)), [fd], 'SOURCE_UNREACHABLE');
  sys.close(fd);
});

t.test('a resumed handoff retries an unreachable source before it gives up', async (t) => {
  // The test dest gives a lost source reconnectTimeoutMs = 300 ms; a new handoff fails at once.
  const { base, fd } = guestRam();
  const t0 = Date.now();
  await expectRefusal(
    t,
    encodeHandoff(request(base, { migrationId: 'vm-resume', resume: true })),
    [fd],
    'SOURCE_UNREACHABLE',
  );
  const waited = Date.now() - t0;
  t.ok(waited >= 300, `it kept trying for ${waited} ms`);
  sys.close(fd);
});

t.test('a handoff that never ends times out', async (t) => {
  const { fd } = guestRam();
  await expectRefusal(t, Buffer.from('{"type":"handoff"'), [fd], 'HANDOFF_TIMEOUT');
  sys.close(fd);
});

t.test('an oversized handoff', async (t) => {
  const { fd } = guestRam();
  const c = await connectHandoff(socketPath);
  sendRaw(c, Buffer.alloc(1000, 0x20), [fd]);
  // Keep writing spaces without a newline until the daemon refuses.
  const filler = Buffer.alloc(64 * 1024, 0x20);
  for (let sent = 0; sent < filler.length;) sent += c.send(filler.subarray(sent));
  const reply = await c.next();
  t.equal(reply.type === 'error' && reply.code, 'HANDOFF_TOO_LARGE');
  sys.close(fd);
});

t.test('the daemon still serves after all that', async (t) => {
  const { base, fd } = guestRam();
  await expectRefusal(t, encodeHandoff(request(base)), [fd], 'SOURCE_UNREACHABLE');
  sys.close(fd);
  t.ok(refused.includes('HANDOFF_NO_FD'), 'refusals were counted');
});
