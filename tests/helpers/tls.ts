/**
 * Certificates for TLS tests, made at test setup with the `openssl` command (Debian's openssl
 * package): a CA, a server certificate for 127.0.0.1 and localhost (subjectAltName) and a client
 * certificate, both signed by that CA, and a second, unrelated CA for the cases that must fail
 * verification. EC P-256 keys: quick to make. Keys are
 * written with mode 0600, as the daemons require of key files.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface Pki {
  dir: string;
  /** The CA that signed the server and client certificates (PEM file). */
  ca: string;
  server: { cert: string; key: string };
  client: { cert: string; key: string };
  /** An unrelated CA: who trusts only it must refuse the server certificate. */
  otherCa: string;
}

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

const KEY_ARGS = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

/** A self-signed CA named `name`: `<name>.pem` and `<name>.key` in `dir`. */
function makeCa(dir: string, name: string): { cert: string; key: string } {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}.key`);
  openssl(
    [
      'req',
      '-x509',
      ...KEY_ARGS,
      '-keyout',
      key,
      '-out',
      cert,
      '-days',
      '2',
      '-subj',
      `/CN=yabusame test ${name}`,
      '-addext',
      'basicConstraints=critical,CA:TRUE',
      '-addext',
      'keyUsage=critical,keyCertSign,cRLSign',
    ],
    dir,
  );
  chmodSync(key, 0o600);
  return { cert, key };
}

/** A leaf certificate `<name>.pem`/`<name>.key` signed by `ca`, with `extensions`. */
function makeLeaf(
  dir: string,
  name: string,
  ca: { cert: string; key: string },
  cn: string,
  extensions: string[],
): { cert: string; key: string } {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}.key`);
  const csr = join(dir, `${name}.csr`);
  const ext = join(dir, `${name}.ext`);
  writeFileSync(ext, ['basicConstraints=CA:FALSE', ...extensions].join('\n') + '\n');
  openssl(['req', '-new', ...KEY_ARGS, '-keyout', key, '-out', csr, '-subj', `/CN=${cn}`], dir);
  chmodSync(key, 0o600);
  openssl(
    [
      'x509',
      '-req',
      '-in',
      csr,
      '-CA',
      ca.cert,
      '-CAkey',
      ca.key,
      '-set_serial',
      `0x${randomBytes(8).toString('hex')}`,
      '-days',
      '2',
      '-out',
      cert,
      '-extfile',
      ext,
    ],
    dir,
  );
  return { cert, key };
}

/** Makes the certificates in `dir` (created if needed). */
export function makePki(dir: string): Pki {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const ca = makeCa(dir, 'ca');
  return {
    dir,
    ca: ca.cert,
    server: makeLeaf(dir, 'server', ca, '127.0.0.1', [
      'subjectAltName=IP:127.0.0.1,DNS:localhost',
      'keyUsage=critical,digitalSignature',
      'extendedKeyUsage=serverAuth',
    ]),
    client: makeLeaf(dir, 'client', ca, 'yabusame-dest', [
      'keyUsage=critical,digitalSignature',
      'extendedKeyUsage=clientAuth',
    ]),
    otherCa: makeCa(dir, 'other-ca').cert,
  };
}
