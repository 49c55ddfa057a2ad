// `npm run bench` as a user runs it (compiled, a separate process), on its smallest selection:
// the JSON document has its documented shape and plausible values, and the working folder is
// gone afterwards. No timing thresholds: speed lives in the bench output, not in tests.
import t from 'tap';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const BENCH = fileURLToPath(new URL('../../scripts/bench.js', import.meta.url));

interface Metric {
  label: string;
  unit: string;
  median: number;
  min: number;
  max: number;
  values: number[];
}

const run = await new Promise<{ code: number | null; stdout: string; stderr: string }>(
  (resolve, reject) => {
    const child = spawn(
      process.execPath,
      [BENCH, '--quick', '--runs', '1', '--json', '--solo', '--only', 'demand-idle,local-floor'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  },
);

t.test('exit 0 and one JSON document on stdout', async (t) => {
  t.equal(run.code, 0, run.stderr.slice(-3000));
  t.doesNotThrow(() => JSON.parse(run.stdout));
});

const report = JSON.parse(run.stdout || '{}');

t.test('document shape: schema, options, machine', async (t) => {
  t.equal(report.schema, 'yabusame-bench/2');
  t.match(report.startedAt, /^\d{4}-\d\d-\d\dT/);
  t.same(report.options, {
    runs: 1,
    quick: true,
    only: ['demand-idle', 'local-floor'],
    solo: true,
  });
  t.match(report.machine, {
    cpuModel: String,
    cores: Number,
    kernel: /^Linux /,
    node: process.version,
    memTotalBytes: Number,
  });
  t.ok(report.machine.cores >= 1);
  t.equal(report.ok, true);
  t.ok(report.totalSeconds > 0);
  t.same(
    report.scenarios.map((s: { name: string }) => s.name),
    ['demand-idle', 'local-floor'],
  );
});

const LATENCY = ['faults', 'faultP50Us', 'faultP99Us', 'faultP999Us', 'faultMaxUs'];

for (const name of ['demand-idle', 'local-floor']) {
  t.test(`${name}: verified, latency metrics consistent`, async (t) => {
    const s = report.scenarios.find((x: { name: string }) => x.name === name);
    t.ok(s, 'row present');
    t.match(s, {
      group: name,
      description: String,
      verification: String,
      runs: 1,
      verifiedRuns: 1,
      ok: true,
      seconds: Number,
    });
    t.notOk(s.error);
    t.notOk(
      s.problems.some((p: string) => /fail/i.test(p)),
      `no failure: ${s.problems.join('; ')}`,
    );
    const m = s.metrics as Record<string, Metric>;
    for (const key of LATENCY) {
      t.ok(m[key], `${key} present`);
      t.equal(m[key]!.values.length, 1, `${key}: one value per run`);
      t.ok(
        m[key]!.min <= m[key]!.median && m[key]!.median <= m[key]!.max,
        `${key}: min ≤ median ≤ max`,
      );
      t.type(m[key]!.label, 'string');
      t.type(m[key]!.unit, 'string');
    }
    t.ok(m['faults']!.median > 0, `${m['faults']!.median} faults timed`);
    t.ok(m['faultP50Us']!.median > 0);
    t.ok(m['faultP50Us']!.median <= m['faultP99Us']!.median, 'p50 ≤ p99');
    t.ok(m['faultP99Us']!.median <= m['faultP999Us']!.median, 'p99 ≤ p99.9');
    t.ok(m['faultP999Us']!.median <= m['faultMaxUs']!.median, 'p99.9 ≤ max');
    if (name === 'demand-idle') {
      // Background held back: every touch faulted.
      t.equal(m['faults']!.median, 2000, 'every quick-mode touch was a fault');
      for (const key of ['destCpuSecPerGiB', 'sourceCpuSecPerGiB']) {
        t.ok(m[key] && m[key]!.median >= 0, `${key} = ${m[key]?.median}`);
      }
      for (const key of ['destPeakRssMiB', 'sourcePeakRssMiB']) {
        t.ok(m[key] && m[key]!.median > 10, `${key} = ${m[key]?.median}`);
      }
      // Warm daemons (the measured migration) and fresh ones (the warm-up migration before it).
      for (const key of [
        'destCpuUsPerFault',
        'sourceCpuUsPerFault',
        'freshDestCpuUsPerFault',
        'freshSourceCpuUsPerFault',
      ]) {
        t.ok(m[key] && m[key]!.median > 0, `${key} = ${m[key]?.median}`);
      }
      // The local floor is its partner: they ran interleaved, the ratio is taken run by run.
      t.same(s.interleavedWith, ['local-floor']);
      t.ok(m['vsLocalFloor']!.median > 0, 'ratio against the local floor computed');
      t.equal((m['vsLocalFloor'] as Metric & { pairing?: string }).pairing, 'per-run');
    } else {
      t.ok(m['handlerServiceP50Us']!.median > 0);
      t.ok(m['handlerCpuSecPerGiB']!.median >= 0);
    }
  });
}

t.test('targets: each measured or saying why not', async (t) => {
  t.ok(Array.isArray(report.targets) && report.targets.length > 0);
  for (const x of report.targets as Array<Record<string, unknown>>) {
    t.match(x, { id: String, text: String, limit: Number, unit: String, detail: String });
    if (x['value'] === null) t.equal(x['pass'], null, `${x['id']}: not measured, no verdict`);
    else t.type(x['pass'], 'boolean', `${x['id']}: measured, pass or fail`);
  }
  const idle = report.targets.find((x: { id: string }) => x.id === 'idle-vs-local-floor');
  t.type(idle?.value, 'number', 'the interleaved ratio is measured');
});

t.test('the working folder (images, logs) is deleted', async (t) => {
  const m = /working folder (\S+)/.exec(run.stderr);
  t.ok(m, 'progress on stderr names the working folder');
  if (m) t.notOk(existsSync(m[1]!), `${m[1]} removed`);
});
