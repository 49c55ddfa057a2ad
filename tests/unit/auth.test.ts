// The HELLO proof (protocol/auth.ts) against an independent HMAC implementation (openssl's
// command line), and the parsers of secrets, nonces and source URLs.
import t from 'tap';
import { execFileSync } from 'node:child_process';
import {
  checkProof,
  helloProof,
  parseNonce,
  parseSecret,
  PROOF_BYTES,
} from '../../protocol/auth.js';
import { formatHostPort, pagesUrl, parseSourceUrl } from '../../protocol/source-url.js';
import { Channel } from '../../protocol/wire.js';

const SECRET = Buffer.from(
  '000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f',
  'hex',
);
const NONCE = Buffer.from('f0e1d2c3b4a5968778695a4b3c2d1e0f', 'hex');

function opensslHmac(key: Buffer, data: Buffer): Buffer | null {
  try {
    const out = execFileSync(
      'openssl',
      ['dgst', '-sha256', '-mac', 'HMAC', '-macopt', `hexkey:${key.toString('hex')}`, '-binary'],
      { input: data },
    );
    return out;
  } catch {
    return null;
  }
}

t.test('the proof is HMAC-SHA256 over the documented bytes', async (t) => {
  const data = Buffer.concat([
    Buffer.from('yabusame hello v2\0', 'ascii'),
    NONCE,
    Buffer.of(Channel.BACKGROUND),
    Buffer.from('vm-42', 'ascii'),
  ]);
  const want = opensslHmac(SECRET, data);
  if (!want) {
    t.fail('openssl is needed for this check (.ci/run installs it)');
    return;
  }
  const proof = helloProof(SECRET, NONCE, Channel.BACKGROUND, 'vm-42');
  t.equal(proof.length, PROOF_BYTES);
  t.equal(proof.toString('hex'), want.toString('hex'), 'equals openssl dgst -mac HMAC');
});

t.test('a proof is bound to its secret, nonce, channel and migration', async (t) => {
  const proof = helloProof(SECRET, NONCE, Channel.DEMAND, 'vm-42');
  t.ok(checkProof(proof, SECRET, NONCE, Channel.DEMAND, 'vm-42'), 'the right one passes');
  const other = Buffer.from(SECRET);
  other[0]! ^= 1;
  const nonce2 = Buffer.from(NONCE);
  nonce2[15]! ^= 0x80;
  t.notOk(checkProof(proof, other, NONCE, Channel.DEMAND, 'vm-42'), 'another secret');
  t.notOk(checkProof(proof, SECRET, nonce2, Channel.DEMAND, 'vm-42'), 'another nonce (a replay)');
  t.notOk(checkProof(proof, SECRET, NONCE, Channel.BACKGROUND, 'vm-42'), 'the other channel');
  t.notOk(checkProof(proof, SECRET, NONCE, Channel.DEMAND, 'vm-43'), 'another migration');
  t.notOk(checkProof(new Uint8Array(0), SECRET, NONCE, Channel.DEMAND, 'vm-42'), 'no proof');
  t.notOk(checkProof(proof.subarray(0, 31), SECRET, NONCE, Channel.DEMAND, 'vm-42'), 'short');
  const flipped = Buffer.from(proof);
  flipped[31]! ^= 1;
  t.notOk(checkProof(flipped, SECRET, NONCE, Channel.DEMAND, 'vm-42'), 'one bit off');
});

t.test('secrets and nonces as written', async (t) => {
  t.same(parseSecret('ab'.repeat(16)), Buffer.alloc(16, 0xab), '128 bits');
  t.equal(parseSecret('ab'.repeat(64))?.length, 64, '512 bits');
  for (const bad of ['ab'.repeat(15), 'ab'.repeat(65), 'AB'.repeat(16), 'ab'.repeat(16) + '\n']) {
    t.equal(parseSecret(bad), null, JSON.stringify(bad));
  }
  t.same(parseNonce(NONCE.toString('hex')), NONCE);
  for (const bad of [undefined, '', NONCE.toString('hex') + '00', ['a', 'b'], 'x'.repeat(32)]) {
    t.equal(parseNonce(bad), null, JSON.stringify(bad));
  }
});

t.test('source URLs: host and port only, page URLs built, not appended', async (t) => {
  t.same(parseSourceUrl('wss://src.example:7443'), {
    scheme: 'wss',
    host: 'src.example',
    port: 7443,
  });
  t.same(parseSourceUrl('ws://[fd00::5]:7070/'), { scheme: 'ws', host: 'fd00::5', port: 7070 });
  t.same(parseSourceUrl('wss://src.example'), { scheme: 'wss', host: 'src.example', port: 443 });
  t.equal(
    pagesUrl(parseSourceUrl('ws://[fd00::5]:7070'), Channel.BACKGROUND),
    'ws://[fd00::5]:7070/v1/pages?channel=background',
  );
  t.equal(formatHostPort({ host: '10.0.0.5', port: 1 }), '10.0.0.5:1');
  for (const bad of [
    'ws://u:p@h:1',
    'ws://h:1/x',
    'ws://h:1/?a',
    'http://h:1',
    'h:1',
    'ws://h:1#f',
  ]) {
    t.throws(() => parseSourceUrl(bad), { code: 'HANDOFF_INVALID' }, bad);
  }
  const err = (() => {
    try {
      parseSourceUrl('ws://user:s3cret@h:1');
    } catch (e) {
      return (e as Error).message;
    }
    return '';
  })();
  t.notMatch(err, /s3cret/, 'the message does not repeat the credentials');
});
