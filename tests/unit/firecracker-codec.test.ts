/**
 * The Firecracker handshake codec against the byte-exact fixtures of every release family
 * (tests/fixtures/firecracker): the `aligned/` ones decode and re-encode to the same bytes; the
 * originals, whose bases are not page-aligned (no Firecracker sends that), are refused; then
 * each way a message can be wrong, by its exact code.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { ProtocolError } from '../../protocol/errors.js';
import {
  decodeFirecrackerHandshake,
  encodeFirecrackerHandshake,
  firecrackerMessageEnd,
  keepsSocketOpen,
  type FirecrackerFormat,
} from '../../protocol/firecracker.js';

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const FIXTURES = fileURLToPath(new URL('../../../tests/fixtures/firecracker/', import.meta.url));
const GiB = 2 ** 30;
const MiB = 2 ** 20;

const fixture = (name: string): Buffer => readFileSync(FIXTURES + name);
const NAMES = readdirSync(FIXTURES).filter((n) => n.endsWith('.json'));

const formatOf = (name: string): FirecrackerFormat =>
  name.includes('v1.12') ? 'v1.12' : name.includes('v1.7') ? 'v1.7' : 'v1.1';

function rejects(t: Tap, bytes: Uint8Array | string, code: string, what: string): void {
  try {
    decodeFirecrackerHandshake(typeof bytes === 'string' ? Buffer.from(bytes) : bytes);
  } catch (err) {
    t.ok(err instanceof ProtocolError, `${what}: a ProtocolError`);
    t.equal((err as ProtocolError).code, code, `${what}: ${(err as Error).message}`);
    return;
  }
  t.fail(`${what}: accepted, expected ${code}`);
}

t.test('the five fixtures and their aligned variants are here', async (t) => {
  t.equal(NAMES.length, 5);
  t.same(readdirSync(FIXTURES + 'aligned').sort(), [...NAMES].sort());
});

for (const name of NAMES) {
  t.test(`aligned/${name}: decodes, and encodes back byte for byte`, async (t) => {
    const bytes = fixture(`aligned/${name}`);
    t.equal(bytes.at(-1), 0x5d, 'no trailing newline: the last byte closes the array');
    const h = decodeFirecrackerHandshake(bytes);
    const page = name.includes('hugepages') ? 2 * MiB : 4096;
    t.equal(h.format, formatOf(name));
    t.same(h.regions, [
      {
        name: 'region0',
        base: 139999999688704,
        sizeBytes: 3 * GiB,
        offset: 0,
        pageSizeBytes: page,
      },
      {
        name: 'region1',
        base: 139989998370816,
        sizeBytes: GiB,
        offset: 3 * GiB,
        pageSizeBytes: page,
      },
    ]);
    t.same(encodeFirecrackerHandshake(h.format, h.regions), bytes, 'the same bytes');
    t.equal(keepsSocketOpen(h.format), h.format === 'v1.12');
  });

  t.test(`${name} (unaligned bases, as given): refused`, async (t) => {
    rejects(t, fixture(name), 'HANDOFF_UNALIGNED', name);
  });
}

t.test('the end of a message is found wherever the stream cuts it', async (t) => {
  const bytes = fixture('aligned/handshake-v1.12.json');
  for (let cut = 0; cut < bytes.length; cut++) {
    if (firecrackerMessageEnd(bytes, cut) !== -1) t.fail(`complete after ${cut} bytes`);
  }
  t.equal(firecrackerMessageEnd(bytes, bytes.length), bytes.length);
  const tail = Buffer.concat([bytes, Buffer.from('\n[1]')]);
  t.equal(firecrackerMessageEnd(tail, tail.length), bytes.length, 'bytes after it are not part');
  const str = Buffer.from(' [{"x":"]}[\\"]"}]');
  t.equal(firecrackerMessageEnd(str, str.length), str.length, 'brackets in strings do not count');
  t.throws(
    () => firecrackerMessageEnd(Buffer.from('{"type":"handoff"}'), 18),
    { code: 'HANDOFF_BAD_JSON' },
    'a native handoff line is not a Firecracker handshake',
  );
});

const region = (extra: Record<string, unknown> = {}): Record<string, unknown> => ({
  base_host_virt_addr: 0x7f0000000000,
  size: 64 * MiB,
  offset: 0,
  ...extra,
});
const msg = (...regions: unknown[]): string => JSON.stringify(regions);

t.test('unknown fields are ignored', async (t) => {
  const h = decodeFirecrackerHandshake(
    Buffer.from(msg(region({ page_size: 4096, gpa_start: 0, is_guest_memfd: false }))),
  );
  t.equal(h.regions[0]!.pageSizeBytes, 4096);
  t.equal(h.format, 'v1.12');
});

t.test('page_size_kib holds bytes', async (t) => {
  const h = decodeFirecrackerHandshake(Buffer.from(msg(region({ page_size_kib: 2 * MiB }))));
  t.equal(h.regions[0]!.pageSizeBytes, 2 * MiB);
  t.equal(h.format, 'v1.7');
  rejects(t, msg(region({ page_size_kib: 4 })), 'HANDOFF_BAD_PAGE_SIZE', 'KiB in page_size_kib');
});

t.test('each malformed handshake gets its code', async (t) => {
  rejects(t, '', 'HANDOFF_BAD_JSON', 'empty');
  rejects(t, '[{"size":1', 'HANDOFF_BAD_JSON', 'truncated');
  rejects(t, Buffer.from([0x5b, 0xff, 0x5d]), 'HANDOFF_BAD_JSON', 'not UTF-8');
  rejects(t, '{"base_host_virt_addr":0}', 'HANDOFF_INVALID', 'an object, not an array');
  rejects(t, '[]', 'HANDOFF_INVALID', 'no regions');
  rejects(t, msg(...Array.from({ length: 65 }, () => region())), 'HANDOFF_INVALID', '65 regions');
  rejects(t, '[1]', 'HANDOFF_INVALID', 'a number for a region');
  for (const f of ['base_host_virt_addr', 'size', 'offset']) {
    const r = region();
    delete r[f];
    rejects(t, msg(r), 'HANDOFF_INVALID', `${f} missing`);
    rejects(t, msg(region({ [f]: -4096 })), 'HANDOFF_INVALID', `${f} negative`);
    rejects(t, msg(region({ [f]: '4096' })), 'HANDOFF_INVALID', `${f} a string`);
    rejects(t, msg(region({ [f]: 2 ** 53 })), 'HANDOFF_INVALID', `${f} past 2^53`);
  }
  rejects(t, msg(region({ size: 0 })), 'HANDOFF_INVALID', 'size 0');
  rejects(t, msg(region({ page_size: 4096.5 })), 'HANDOFF_INVALID', 'a fractional page size');
  rejects(t, msg(region({ page_size: 3000 })), 'HANDOFF_BAD_PAGE_SIZE', 'not a power of two');
  rejects(t, msg(region({ page_size: 1 << 30 })), 'HANDOFF_BAD_PAGE_SIZE', '1 GiB pages');
  rejects(
    t,
    msg(region({ page_size: 4096, page_size_kib: 2 * MiB })),
    'HANDOFF_BAD_PAGE_SIZE',
    'page_size and page_size_kib differ',
  );
  rejects(t, msg(region({ size: 64 * MiB + 512 })), 'HANDOFF_UNALIGNED', 'a size of part pages');
  rejects(t, msg(region({ offset: 512 })), 'HANDOFF_UNALIGNED', 'an unaligned offset');
  rejects(
    t,
    msg(region({ page_size: 2 * MiB, base_host_virt_addr: 0x7f0000001000 })),
    'HANDOFF_UNALIGNED',
    'a base aligned to 4 KiB only, with 2 MiB pages',
  );
  rejects(
    t,
    msg(region(), region({ base_host_virt_addr: 0x7f0000000000 + 32 * MiB, offset: 64 * MiB })),
    'HANDOFF_OVERLAP',
    'two regions overlap in memory',
  );
  rejects(
    t,
    msg(region(), region({ base_host_virt_addr: 0x7e0000000000, offset: 32 * MiB })),
    'HANDOFF_OVERLAP',
    'two regions overlap in the memory file',
  );
  rejects(t, Buffer.alloc(64 * 1024 + 1, 0x20), 'HANDOFF_TOO_LARGE', 'over 64 KiB');
});
