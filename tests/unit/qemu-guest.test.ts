/**
 * The guest initramfs's newc writer, byte for byte against a hand-checked fixture, and read back
 * with a small reference reader over a larger archive.
 */
import t from 'tap';
import { encodeNewc, type CpioEntry } from '../../scripts/qemu/guest/build.js';

/** A reference newc reader: the fields and names of each entry, with its data. */
function readNewc(
  buf: Buffer,
): { name: string; mode: number; rdev: [number, number]; data: Buffer }[] {
  const out = [];
  let at = 0;
  const align = (n: number): number => (n + 3) & ~3;
  for (;;) {
    const magic = buf.toString('ascii', at, at + 6);
    if (magic !== '070701') throw new Error(`bad magic at ${at}: ${magic}`);
    const field = (i: number): number =>
      parseInt(buf.toString('ascii', at + 6 + 8 * i, at + 14 + 8 * i), 16);
    const mode = field(1);
    const size = field(6);
    const rdev: [number, number] = [field(9), field(10)];
    const nameSize = field(11);
    const name = buf.toString('ascii', at + 110, at + 110 + nameSize - 1);
    const dataAt = align(at + 110 + nameSize);
    if (name === 'TRAILER!!!') return out;
    out.push({ name, mode, rdev, data: buf.subarray(dataAt, dataAt + size) });
    at = align(dataAt + size);
  }
}

t.test('one file, byte for byte', async (t) => {
  const got = encodeNewc([{ name: 'init', mode: 0o100755, data: Buffer.from('hi\n') }]);
  const header = (
    ino: number,
    mode: number,
    nlink: number,
    size: number,
    nameSize: number,
  ): string =>
    '070701' +
    [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, nameSize, 0]
      .map((f) => f.toString(16).padStart(8, '0'))
      .join('');
  // 110-byte header + "init\0" = 115, padded to 116; 3 data bytes padded to 4.
  const want = Buffer.concat([
    Buffer.from(header(1, 0o100755, 1, 3, 5) + 'init\0' + '\0', 'ascii'),
    Buffer.from('hi\n\0', 'ascii'),
    // The trailer: 110 + 11 = 121, padded to 124.
    Buffer.from(header(2, 0, 1, 0, 11) + 'TRAILER!!!\0' + '\0\0\0', 'ascii'),
  ]);
  t.equal(got.toString('hex'), want.toString('hex'));
});

t.test('directories, a device node and files of every padding, read back', async (t) => {
  const entries: CpioEntry[] = [
    { name: 'dev', mode: 0o040755 },
    { name: 'dev/console', mode: 0o020600, rdevMajor: 5, rdevMinor: 1 },
    ...[0, 1, 2, 3, 4, 5, 4097].map((n) => ({
      name: `f${'x'.repeat(n % 4)}`,
      mode: 0o100644,
      data: Buffer.alloc(n, n & 0xff),
    })),
  ];
  const back = readNewc(encodeNewc(entries));
  t.equal(back.length, entries.length);
  entries.forEach((e, i) => {
    t.equal(back[i]!.name, e.name);
    t.equal(back[i]!.mode, e.mode);
    t.same(back[i]!.rdev, [e.rdevMajor ?? 0, e.rdevMinor ?? 0]);
    t.equal(back[i]!.data.toString('hex'), (e.data ?? Buffer.alloc(0)).toString('hex'));
  });
});
