// The bulk thread's credit policy as pure arithmetic: shares of the payload ring, the least
// share (the configured window, one frame, two of the largest pages), and when to grant.
import t from 'tap';
import { grantNow, leastShare, MIN_SHARE_BYTES, shareOf } from '../../daemon/dest/credit-share.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const RING = 16 * MiB;

t.test('one or two sessions get their whole window', async (t) => {
  t.equal(shareOf(RING, 1, 8 * MiB, 4 * KiB), 8 * MiB);
  t.equal(shareOf(RING, 2, 8 * MiB, 4 * KiB), 8 * MiB);
});

t.test('more sessions split the ring equally', async (t) => {
  t.equal(shareOf(RING, 4, 8 * MiB, 4 * KiB), 4 * MiB);
  t.equal(shareOf(RING, 3, 8 * MiB, 4 * KiB), Math.floor(RING / 3));
  const sixteen = shareOf(RING, 16, 8 * MiB, 4 * KiB);
  t.equal(sixteen, 1 * MiB);
  t.ok(16 * sixteen <= RING, 'sixteen shares fit in the ring');
});

t.test('never below the least share: one frame, or a smaller configured window', async (t) => {
  t.equal(
    shareOf(RING, 64, 8 * MiB, 4 * KiB),
    MIN_SHARE_BYTES,
    '64 sessions: 256 KiB each is raised',
  );
  t.equal(leastShare(64 * KiB, 4 * KiB), 64 * KiB, 'a 64 KiB window stays 64 KiB');
  t.equal(shareOf(RING, 1, 64 * KiB, 4 * KiB), 64 * KiB);
});

t.test('never below two of the largest pages (2 MiB pages: 4 MiB)', async (t) => {
  t.equal(leastShare(1 * MiB, 2 * MiB), 4 * MiB, 'a window below one huge page is raised');
  // Nine huge-page sessions: an equal split (1.78 MiB) could not pay for one 2 MiB page.
  t.equal(shareOf(RING, 9, 8 * MiB, 2 * MiB), 4 * MiB);
  t.equal(shareOf(RING, 9, 8 * MiB, 4 * KiB), Math.floor(RING / 9), 'the same with 4 KiB pages');
});

t.test('grants: the share less what is outstanding, in quarter steps', async (t) => {
  const base = { share: 8 * MiB, least: MIN_SHARE_BYTES, ringBytes: RING };
  t.equal(grantNow({ ...base, outstanding: 0, granted: 0 }), 8 * MiB, 'a first grant: all of it');
  t.equal(
    grantNow({ ...base, outstanding: 7 * MiB, granted: 7 * MiB }),
    0,
    'under a quarter: wait',
  );
  t.equal(
    grantNow({ ...base, outstanding: 6 * MiB, granted: 6 * MiB }),
    2 * MiB,
    'a quarter: grant',
  );
  t.equal(grantNow({ ...base, outstanding: 8 * MiB, granted: 8 * MiB }), 0, 'share held: nothing');
});

t.test('grants stay within the ring, except for a least share', async (t) => {
  const base = { share: 4 * MiB, least: MIN_SHARE_BYTES, ringBytes: RING };
  // The others hold the whole ring: a new session still gets its least share to start with.
  t.equal(grantNow({ ...base, outstanding: 0, granted: RING }), MIN_SHARE_BYTES);
  // Some room left: the grant is that room (more than the least share), not the whole share.
  t.equal(grantNow({ ...base, outstanding: 0, granted: RING - 3 * MiB }), 3 * MiB);
  // Holding its least share with the ring full: nothing more until runs are placed.
  t.equal(grantNow({ ...base, outstanding: MIN_SHARE_BYTES, granted: RING }), 0);
});
