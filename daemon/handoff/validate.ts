/**
 * Checks on a received file descriptor before any ioctl touches it: it must be a userfaultfd
 * (its /proc link names the anon inode) on which the VMM already completed UFFDIO_API (the
 * kernel shows the INITIALIZED feature bit in fdinfo; a second UFFDIO_API would fail).
 */
import { readFileSync, readlinkSync } from 'node:fs';
import { ProtocolError } from '../../protocol/errors.js';

/** Internal kernel flag set once UFFDIO_API succeeded (fs/userfaultfd.c, UFFD_FEATURE_INITIALIZED). */
const UFFD_FEATURE_INITIALIZED = 2 ** 31;

export interface UffdInfo {
  /** Features the VMM negotiated with UFFDIO_API. */
  features: number;
}

export function inspectUffd(fd: number): UffdInfo {
  let link: string;
  try {
    link = readlinkSync(`/proc/self/fd/${fd}`);
  } catch (err) {
    throw new ProtocolError('HANDOFF_NOT_UFFD', `fd ${fd} cannot be inspected`, { cause: err });
  }
  if (link !== 'anon_inode:[userfaultfd]') {
    throw new ProtocolError('HANDOFF_NOT_UFFD', `the handoff fd is not a userfaultfd (${link})`);
  }
  const info = readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  const api = /^API:\s*([0-9a-f]+):([0-9a-f]+):/m.exec(info);
  const features = api ? parseInt(api[2]!, 16) : 0;
  if (features < UFFD_FEATURE_INITIALIZED) {
    throw new ProtocolError(
      'HANDOFF_UFFD_UNINITIALIZED',
      'the userfaultfd has not completed UFFDIO_API; the VMM must do the API handshake',
    );
  }
  return { features: features - UFFD_FEATURE_INITIALIZED };
}
