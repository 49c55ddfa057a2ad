/**
 * The QEMU scripts' measures, on hand-made event sequences: a fault's wait as the kernel saw it
 * (kfaults.ts faultWaits), and quantiles read from a Prometheus histogram.
 */
import t from 'tap';
import { faultWaits, type SchedEvent, type UserFault } from '../../scripts/qemu/kfaults.js';
import { bucketQuantile } from '../../scripts/bench/stages.js';

const fault = (atMs: number, tid: number, page: number): UserFault => ({
  atMs,
  tid,
  comm: 'CPU 0/TCG',
  address: page * 4096 + 8,
  errorCode: 4,
});
const sleep = (atMs: number, tid: number): SchedEvent => ({ atMs, tid, kind: 'sleep' });
const wake = (atMs: number, tid: number): SchedEvent => ({ atMs, tid, kind: 'wake' });

t.test('fault entry → the wake-up that ended its sleep', async (t) => {
  const w = faultWaits(
    [fault(10, 1, 100), fault(20, 1, 101), fault(30, 1, 102), fault(31, 2, 500)],
    [
      sleep(10.01, 1),
      wake(10.5, 1), // page 100: 0.5 ms
      // page 101: never slept (placed before the thread went to sleep): no wait
      sleep(30.1, 1),
      wake(32, 1), // page 102: 2 ms
      sleep(31.01, 2),
      wake(31.25, 2), // another thread: 0.25 ms
      wake(40, 1), // a wake-up with no fault pending: ignored
    ],
  );
  t.equal(w.faults, 4);
  t.equal(w.waited, 3);
  t.same(w.waitsMs, [0.5, 0.25, 2]);
  t.equal(w.p50Ms, 0.5);
  t.equal(w.maxMs, 2);
});

t.test(
  'the same page faulting and sleeping again is one wait; `from` drops earlier faults',
  async (t) => {
    const w = faultWaits(
      [fault(5, 1, 7), fault(10, 1, 100), fault(10.3, 1, 100)],
      [sleep(5.1, 1), wake(6, 1), sleep(10.1, 1), wake(10.2, 1), sleep(10.4, 1), wake(11, 1)],
      8,
    );
    t.equal(w.faults, 1, 'the fault before `from` is not counted');
    t.same(w.waitsMs, [1], 'woken at 10.2 for another reason, the page came at 11');
  },
);

t.test('histogram quantiles, linear inside a bucket', async (t) => {
  const buckets: [number, number][] = [
    [0.0001, 10],
    [0.00025, 50],
    [0.0005, 90],
    [0.001, 100],
    [Infinity, 100],
  ];
  t.equal(bucketQuantile(buckets, 0.5), 0.0001 + (40 / 40) * 0.00015);
  t.equal(bucketQuantile(buckets, 0.1), 0.0001);
  t.ok(Math.abs(bucketQuantile(buckets, 0.99) - (0.0005 + 0.9 * 0.0005)) < 1e-12);
  t.ok(Number.isNaN(bucketQuantile([[Infinity, 0]], 0.5)));
});
