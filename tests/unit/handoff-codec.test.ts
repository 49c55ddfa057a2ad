/**
 * Handoff codec (VMM -> dest JSON line, and the reply lines): a valid request, then each way to
 * get it wrong, asserted by its exact code.
 */
import { readFileSync } from 'node:fs';
import t from 'tap';
import { HANDOFF_ERROR_CODES, ProtocolError } from '../../protocol/errors.js';
import {
  decodeHandoff,
  decodeReply,
  encodeHandoff,
  encodeReply,
  MAX_HANDOFF_BYTES,
  type HandoffReply,
  type HandoffRequest,
} from '../../protocol/handoff.js';

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const MiB = 2 ** 20;
const GiB = 2 ** 30;

/** Two regions: 1 GiB of 4 KiB pages, then 2 GiB of 2 MiB pages, back to back in the image. */
function valid(): HandoffRequest {
  return {
    type: 'handoff',
    version: 1,
    migrationId: 'vm-42.2024-06-01:a',
    source: 'ws://10.0.0.5:7070',
    regions: [
      { name: 'ram0', base: 0x7f0000000000, sizeBytes: GiB, offset: 0, pageSizeBytes: 4096 },
      { base: 0x7f8000000000, sizeBytes: 2 * GiB, offset: GiB, pageSizeBytes: 2 * MiB },
    ],
  };
}

const line = (value: unknown): Buffer => Buffer.from(JSON.stringify(value), 'utf8');

/** The request with `edit` applied to a fresh copy. */
function variant(
  edit: (r: Record<string, unknown> & { regions: Record<string, unknown>[] }) => void,
) {
  const r = valid() as unknown as Record<string, unknown> & { regions: Record<string, unknown>[] };
  edit(r);
  return line(r);
}

function rejects(t: Tap, bytes: Uint8Array, code: string, what: string): void {
  try {
    decodeHandoff(bytes);
  } catch (err) {
    t.ok(err instanceof ProtocolError, `${what}: a ProtocolError`);
    t.equal((err as ProtocolError).code, code, what);
    return;
  }
  t.fail(`${what}: accepted, expected ${code}`);
}

t.test('a valid handoff decodes to itself', async (t) => {
  t.same(decodeHandoff(line(valid())), valid());
  const enc = encodeHandoff(valid());
  t.equal(enc.at(-1), 0x0a, 'encodeHandoff ends the line with a newline');
  t.same(decodeHandoff(enc.subarray(0, -1)), valid(), 'and round trips');
  t.same(decodeHandoff(Buffer.from(` ${JSON.stringify(valid())}\r`)), valid(), 'JSON whitespace');
  const largestPages = variant((r) => {
    r.regions = [{ base: 0x7f0000000000, sizeBytes: GiB, offset: 0, pageSizeBytes: 16 * MiB }];
  });
  t.equal(decodeHandoff(largestPages).regions[0]!.pageSizeBytes, 16 * MiB, '16 MiB pages');
  const adjacent = variant((r) => {
    r.regions[1]!.base = 0x7f0000000000 + GiB;
  });
  t.equal(decodeHandoff(adjacent).regions.length, 2, 'adjacent in memory and in the image');
  const gaps = variant((r) => {
    r.regions[1]!.offset = 8 * GiB;
  });
  t.equal(decodeHandoff(gaps).regions[1]!.offset, 8 * GiB, 'a gap in the image is fine');
  const reversed = variant((r) => {
    r.regions.reverse();
  });
  t.equal(decodeHandoff(reversed).regions.length, 2, 'regions in any order');
});

t.test('resume: an optional boolean', async (t) => {
  for (const resume of [true, false]) {
    const req = { ...valid(), resume };
    t.same(decodeHandoff(line(req)), req, `resume ${resume} decodes`);
    t.same(decodeHandoff(encodeHandoff(req).subarray(0, -1)), req, `resume ${resume} round trips`);
  }
  t.notOk('resume' in decodeHandoff(line(valid())), 'absent stays absent');
  for (const resume of ['true', 1, 0, null, {}]) {
    rejects(
      t,
      variant((r) => (r.resume = resume)),
      'HANDOFF_INVALID',
      `resume ${JSON.stringify(resume)}`,
    );
  }
  rejects(
    t,
    variant((r) => (r.regions[0]!.resume = true)),
    'HANDOFF_INVALID',
    'resume inside a region',
  );
});

t.test('not JSON: HANDOFF_BAD_JSON', async (t) => {
  rejects(t, Buffer.from(''), 'HANDOFF_BAD_JSON', 'empty line');
  rejects(t, Buffer.from('{'), 'HANDOFF_BAD_JSON', 'cut object');
  rejects(t, Buffer.from("{'type':'handoff'}"), 'HANDOFF_BAD_JSON', 'single quotes');
  rejects(t, line(valid()).subarray(0, 40), 'HANDOFF_BAD_JSON', 'truncated line');
  const badUtf8 = Buffer.concat([
    Buffer.from('{"type":"handoff","name":"'),
    Buffer.of(0xff),
    Buffer.from('"}'),
  ]);
  rejects(t, badUtf8, 'HANDOFF_BAD_JSON', 'invalid UTF-8');
});

t.test('wrong shape: HANDOFF_INVALID', async (t) => {
  rejects(t, Buffer.from('null'), 'HANDOFF_INVALID', 'null');
  rejects(t, Buffer.from('[]'), 'HANDOFF_INVALID', 'an array');
  rejects(t, Buffer.from('"handoff"'), 'HANDOFF_INVALID', 'a string');
  for (const key of ['type', 'version', 'migrationId', 'source', 'regions']) {
    rejects(
      t,
      variant((r) => delete r[key]),
      'HANDOFF_INVALID',
      `missing ${key}`,
    );
  }
  rejects(
    t,
    variant((r) => (r.secret = 'x')),
    'HANDOFF_INVALID',
    'extra top-level field',
  );
  for (const key of ['base', 'sizeBytes', 'offset', 'pageSizeBytes']) {
    rejects(
      t,
      variant((r) => delete r.regions[0]![key]),
      'HANDOFF_INVALID',
      `region without ${key}`,
    );
  }
  rejects(
    t,
    variant((r) => (r.regions[0]!.fd = 3)),
    'HANDOFF_INVALID',
    'extra region field',
  );
  rejects(
    t,
    variant((r) => (r.type = 'hello')),
    'HANDOFF_INVALID',
    'type not "handoff"',
  );
  rejects(
    t,
    variant((r) => (r.version = 2)),
    'HANDOFF_INVALID',
    'version 2',
  );
  rejects(
    t,
    variant((r) => (r.version = '1')),
    'HANDOFF_INVALID',
    'version as a string',
  );
  rejects(
    t,
    variant((r) => (r.regions = [])),
    'HANDOFF_INVALID',
    'no regions',
  );
  rejects(
    t,
    variant((r) => {
      r.regions = Array.from({ length: 65 }, (_, i) => ({
        base: i * 4096,
        sizeBytes: 4096,
        offset: i * 4096,
        pageSizeBytes: 4096,
      }));
    }),
    'HANDOFF_INVALID',
    '65 regions',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.base = -4096)),
    'HANDOFF_INVALID',
    'negative base',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.base = 4096.5)),
    'HANDOFF_INVALID',
    'fractional base',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.base = '4096')),
    'HANDOFF_INVALID',
    'base as a string',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.base = 2 ** 53)),
    'HANDOFF_INVALID',
    'base 2^53',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.sizeBytes = 0)),
    'HANDOFF_INVALID',
    'size 0',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.name = '')),
    'HANDOFF_INVALID',
    'empty name',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.name = 'n'.repeat(65))),
    'HANDOFF_INVALID',
    'long name',
  );
  rejects(
    t,
    variant((r) => {
      r.regions = [
        { base: 2 ** 53 - 2 * GiB, sizeBytes: 4 * GiB, offset: 0, pageSizeBytes: 2 * MiB },
      ];
    }),
    'HANDOFF_INVALID',
    'region ends beyond 2^53',
  );
});

t.test('page sizes: HANDOFF_BAD_PAGE_SIZE', async (t) => {
  // 1 GiB pages are refused: a page must fit in one DATA frame (16 MiB).
  for (const size of [0, 1, 2048, 4095, 12288, 3 * MiB, 32 * MiB, GiB, 2 * GiB, 2 ** 32]) {
    rejects(
      t,
      variant((r) => {
        r.regions = [{ base: 0, sizeBytes: 4 * GiB, offset: 0, pageSizeBytes: size }];
      }),
      'HANDOFF_BAD_PAGE_SIZE',
      `page size ${size}`,
    );
  }
});

t.test('alignment: HANDOFF_UNALIGNED', async (t) => {
  rejects(
    t,
    variant((r) => (r.regions[0]!.base = 0x7f0000000800)),
    'HANDOFF_UNALIGNED',
    'base',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.sizeBytes = GiB + 512)),
    'HANDOFF_UNALIGNED',
    'size',
  );
  rejects(
    t,
    variant((r) => (r.regions[0]!.offset = 100)),
    'HANDOFF_UNALIGNED',
    'offset',
  );
  // 4 KiB-aligned but not 2 MiB-aligned, in the huge-page region.
  rejects(
    t,
    variant((r) => (r.regions[1]!.base = 0x7f8000000000 + 4096)),
    'HANDOFF_UNALIGNED',
    'huge base',
  );
  rejects(
    t,
    variant((r) => (r.regions[1]!.offset = GiB + 4096)),
    'HANDOFF_UNALIGNED',
    'huge offset',
  );
});

t.test('overlaps: HANDOFF_OVERLAP', async (t) => {
  rejects(
    t,
    variant((r) => (r.regions[1]!.base = 0x7f0000000000 + GiB - 2 * MiB)),
    'HANDOFF_OVERLAP',
    'overlap in memory',
  );
  rejects(
    t,
    variant((r) => (r.regions[1]!.offset = 0)),
    'HANDOFF_OVERLAP',
    'overlap in the image',
  );
  rejects(
    t,
    variant((r) => {
      r.regions.reverse();
      r.regions[0]!.offset = GiB - 2 * MiB;
    }),
    'HANDOFF_OVERLAP',
    'overlap in the image, listed out of order',
  );
  rejects(
    t,
    variant((r) => {
      r.regions = [r.regions[0]!, { ...r.regions[0]!, name: 'again' }];
    }),
    'HANDOFF_OVERLAP',
    'the same region twice',
  );
});

t.test('source URL: ws or wss only', async (t) => {
  t.equal(
    decodeHandoff(variant((r) => (r.source = 'wss://src.example'))).source,
    'wss://src.example',
  );
  t.equal(decodeHandoff(variant((r) => (r.source = 'ws://[::1]:7070'))).source, 'ws://[::1]:7070');
  for (const source of [
    'http://10.0.0.5:7070',
    'tcp://10.0.0.5:7070',
    'unix:/run/x',
    '10.0.0.5:7070',
    'not a url',
    '',
  ]) {
    rejects(
      t,
      variant((r) => (r.source = source)),
      'HANDOFF_INVALID',
      `source ${JSON.stringify(source)}`,
    );
  }
  rejects(
    t,
    variant((r) => (r.source = 7070)),
    'HANDOFF_INVALID',
    'source as a number',
  );
  // Host and port only: the dest builds the page URLs itself (no SSRF through the path, no
  // credentials in logs).
  t.equal(
    decodeHandoff(variant((r) => (r.source = 'ws://10.0.0.5:7070/'))).source,
    'ws://10.0.0.5:7070/',
  );
  for (const source of [
    'ws://user:s3cret@127.0.0.1:18080',
    'ws://user@127.0.0.1:18080',
    'ws://127.0.0.1:18080/internal/admin/delete?all=1&x=',
    'ws://127.0.0.1:18080/v1/pages',
    'ws://127.0.0.1:18080?x=1',
    'ws://127.0.0.1:18080#frag',
    'ws://' + 'a'.repeat(2048),
  ]) {
    rejects(
      t,
      variant((r) => (r.source = source)),
      'HANDOFF_INVALID',
      `source ${JSON.stringify(source.slice(0, 60))}`,
    );
  }
});

t.test('secret: optional, 16..64 bytes of lowercase hex', async (t) => {
  const ok = 'ab'.repeat(16);
  t.equal(decodeHandoff(variant((r) => (r.secret = ok))).secret, ok, '16 bytes');
  t.equal(decodeHandoff(variant((r) => (r.secret = 'cd'.repeat(64)))).secret?.length, 128);
  t.equal(decodeHandoff(variant(() => undefined)).secret, undefined, 'absent');
  for (const [secret, why] of [
    ['ab'.repeat(15), '15 bytes: under 128 bits'],
    ['ab'.repeat(65), '65 bytes'],
    ['AB'.repeat(16), 'upper case'],
    ['abc'.repeat(11), 'an odd number of digits'],
    ['zz'.repeat(16), 'not hex'],
    ['', 'empty'],
  ] as const) {
    rejects(
      t,
      variant((r) => (r.secret = secret)),
      'HANDOFF_INVALID',
      why,
    );
  }
  rejects(
    t,
    variant((r) => (r.secret = 1234)),
    'HANDOFF_INVALID',
    'a number',
  );
});

t.test('migration id: 1..128 of [A-Za-z0-9._:-]', async (t) => {
  t.equal(decodeHandoff(variant((r) => (r.migrationId = 'a'.repeat(128)))).migrationId.length, 128);
  for (const id of ['', 'a b', 'a/b', '../etc', 'é', 'a'.repeat(129), 'x\n']) {
    rejects(
      t,
      variant((r) => (r.migrationId = id)),
      'HANDOFF_INVALID',
      `id ${JSON.stringify(id)}`,
    );
  }
  rejects(
    t,
    variant((r) => (r.migrationId = 42)),
    'HANDOFF_INVALID',
    'id as a number',
  );
});

t.test('size limit: HANDOFF_TOO_LARGE', async (t) => {
  const big = Buffer.alloc(MAX_HANDOFF_BYTES, 0x20);
  rejects(t, big, 'HANDOFF_TOO_LARGE', `${MAX_HANDOFF_BYTES} bytes without the newline`);
  const padded = Buffer.concat([
    line(valid()),
    Buffer.alloc(MAX_HANDOFF_BYTES - 1 - line(valid()).length, 0x20),
  ]);
  t.same(decodeHandoff(padded), valid(), 'the largest line that fits is accepted');
});

t.test('reply lines round trip and are checked', async (t) => {
  const replies: HandoffReply[] = [
    { type: 'ack', migrationId: 'vm-42', totalPages: 263168 },
    { type: 'progress', presentPages: 1000, totalPages: 263168 },
    {
      type: 'complete',
      totalPages: 263168,
      demandPages: 812,
      backgroundPages: 200000,
      zeroPages: 62356,
      existedPages: 0,
      discardedPages: 0,
    },
    { type: 'error', code: 'SOURCE_UNREACHABLE', message: 'connect ECONNREFUSED 10.0.0.5:7070' },
  ];
  for (const reply of replies) {
    const enc = encodeReply(reply);
    t.equal(enc.at(-1), 0x0a, `${reply.type} ends with a newline`);
    t.same(decodeReply(enc.toString('utf8').trimEnd()), reply, `${reply.type} round trips`);
  }
  const expectCode = (s: string, code: string): void => {
    t.throws(() => decodeReply(s), { code }, `${JSON.stringify(s)} -> ${code}`);
  };
  expectCode('{', 'HANDOFF_BAD_JSON');
  expectCode('{"type":"nope"}', 'HANDOFF_INVALID');
  expectCode('{"type":"ack","migrationId":"m"}', 'HANDOFF_INVALID');
  expectCode('{"type":"ack","migrationId":"m","totalPages":-1}', 'HANDOFF_INVALID');
});

t.test('the JSON examples in protocol/README.md are valid', async (t) => {
  // dist/tests/unit/ -> repository root
  const readme = readFileSync(new URL('../../../protocol/README.md', import.meta.url), 'utf8');
  const blocks = [...readme.matchAll(/```json\n(.*)\n```/g)].map((m) => m[1]!);
  t.equal(blocks.length, 6, 'two requests and four replies');
  const [request, resumed, ...replies] = blocks;
  const req = decodeHandoff(Buffer.from(request!));
  const again = decodeHandoff(Buffer.from(resumed!));
  t.equal(again.resume, true, 'the second request resumes');
  t.same({ ...again, resume: undefined }, { ...req, resume: undefined }, 'the same handoff again');
  const pages = req.regions.reduce((n, r) => n + r.sizeBytes / r.pageSizeBytes, 0);
  t.same(
    replies.map((r) => decodeReply(r).type),
    ['ack', 'progress', 'complete', 'error'],
  );
  const complete = decodeReply(replies[2]!);
  if (complete.type === 'complete') {
    t.equal(complete.totalPages, pages, 'totalPages = sum of sizeBytes / pageSizeBytes');
    const counted =
      complete.demandPages +
      complete.backgroundPages +
      complete.zeroPages +
      complete.existedPages +
      complete.discardedPages;
    t.equal(counted, pages, 'demand + background + zero + existed + discarded = total');
  }
  const ack = decodeReply(replies[0]!);
  if (ack.type === 'ack') t.equal(ack.totalPages, pages, 'ack totalPages');
  const error = decodeReply(replies[3]!);
  if (error.type === 'error') t.ok(HANDOFF_ERROR_CODES.includes(error.code as never), error.code);
});
