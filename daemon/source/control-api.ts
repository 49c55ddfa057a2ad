/**
 * The source's JSON control API. It never shares the page port: it listens on a UNIX socket
 * (mode 0660 by default: its group is who may register, freeze and delete), and only if asked on
 * TCP too, where every request needs `Authorization: Bearer <token>` (like QEMU's QMP, which is
 * a local socket, and libvirt's, which authorises local clients by their uid).
 *   GET    /v1/migrations              list
 *   POST   /v1/migrations              register {id, image, regions?, frozen?, secret?, qmp?}
 *   GET    /v1/migrations/:id          status
 *   POST   /v1/migrations/:id/freeze   the VM stopped: serve pages
 *   DELETE /v1/migrations/:id          abort (releases the image) and forget
 * A body must be `application/json` (a web page cannot send that across origins without a
 * preflight nobody answers). Errors are `{error: {code, message}}` with a status that fits.
 * A registration without a secret gets one generated, returned in the answer this once.
 */
import { timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { z } from 'zod';
import { validMigrationId } from '../../protocol/page-codec.js';
import type { Logger } from '../ops/log.js';
import {
  claimSocketPath,
  listenError,
  ownSocketPath,
  releaseSocketPath,
} from '../ops/unix-socket.js';
import { SourceError } from './errors.js';
import type { MigrationRegistry } from './registry.js';

const safeInt = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

const RegionBody = z.strictObject({
  name: z.string().min(1).max(64),
  offset: safeInt,
  sizeBytes: safeInt.min(1),
  /** Defaults to `offset` (the image file laid out like the address space). */
  fileOffset: safeInt.optional(),
  pageSizeBytes: safeInt.default(4096),
});

export const RegisterBody = z.strictObject({
  id: z.string().refine(validMigrationId, 'migration id: 1..128 bytes of [A-Za-z0-9._:-]'),
  /** Beneath the source's image root: absolute, or relative to the root. */
  image: z.string().min(1).max(4096),
  /** Default: one region `ram0` over the whole file with 4 KiB pages. */
  regions: z.array(RegionBody).min(1).max(64).optional(),
  frozen: z.boolean().default(false),
  /** Hex, 16..64 bytes; generated (and returned once) when absent. */
  secret: z.string().optional(),
  /** The source QEMU's QMP socket, an absolute path: followed for the freeze (qmp-follow.ts). */
  qmp: z
    .string()
    .min(2)
    .max(107)
    .refine((p) => p.startsWith('/'), 'qmp: an absolute path to a UNIX socket')
    .optional(),
});

const MAX_BODY_BYTES = 1024 * 1024;

const STATUS: Record<string, number> = {
  NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  UNAUTHORIZED: 401,
  UNSUPPORTED_MEDIA_TYPE: 415,
  BODY_TOO_LARGE: 413,
  UNKNOWN_MIGRATION: 404,
  MIGRATION_EXISTS: 409,
  TOO_MANY_MIGRATIONS: 429,
  BAD_STATE: 409,
  IMAGE_NOT_FOUND: 404,
  IMAGE_OUTSIDE_ROOT: 403,
  IMAGE_IO: 500,
};

function statusFor(code: string): number {
  return STATUS[code] ?? (code.startsWith('IMAGE_') || code.startsWith('INVALID') ? 400 : 500);
}

class HttpError extends SourceError {}

function send(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
  });
  res.end(text);
}

function readJson(req: http.IncomingMessage): Promise<unknown> {
  const type = (req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
  if (type !== 'application/json') {
    return Promise.reject(
      new HttpError('UNSUPPORTED_MEDIA_TYPE', 'the body must be application/json'),
    );
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new HttpError('BODY_TOO_LARGE', `body exceeds ${MAX_BODY_BYTES} bytes`));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
      } catch {
        reject(new HttpError('INVALID_JSON', 'the body is not JSON'));
      }
    });
    req.on('error', reject);
  });
}

const ROUTE = /^\/v1\/migrations(?:\/([^/]+)(\/freeze)?)?\/?$/;

/** A request listener serving the control API; `token`: the bearer token every request needs. */
export function controlApi(
  registry: MigrationRegistry,
  log: Logger,
  token?: string,
): http.RequestListener {
  const expected = token === undefined ? null : Buffer.from(`Bearer ${token}`);
  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    if (expected) {
      const got = Buffer.from(req.headers.authorization ?? '');
      if (got.length !== expected.length || !timingSafeEqual(got, expected)) {
        throw new HttpError('UNAUTHORIZED', 'a bearer token is required');
      }
    }
    const path = (req.url ?? '/').split('?')[0]!;
    const m = ROUTE.exec(path);
    if (!m) throw new HttpError('NOT_FOUND', `no route for ${path}`);
    const id = m[1] === undefined ? undefined : decodeURIComponent(m[1]);
    const freeze = m[2] !== undefined;
    const method = req.method ?? 'GET';
    if (id === undefined) {
      if (method === 'GET') return send(res, 200, { migrations: registry.list() });
      if (method === 'POST') {
        const parsed = RegisterBody.safeParse(await readJson(req));
        if (!parsed.success) {
          throw new HttpError('INVALID_REQUEST', z.prettifyError(parsed.error));
        }
        const body = parsed.data;
        const { status, generatedSecret } = registry.register({
          id: body.id,
          image: body.image,
          frozen: body.frozen,
          secret: body.secret,
          qmp: body.qmp,
          regions: body.regions?.map((r) => ({ ...r, fileOffset: r.fileOffset ?? r.offset })),
        });
        log.info('migration registered', {
          migrationId: body.id,
          image: body.image,
          ...(body.qmp ? { qmp: body.qmp } : {}),
        });
        return send(res, 201, {
          ...status,
          ...(generatedSecret ? { secret: generatedSecret } : {}),
        });
      }
    } else if (freeze) {
      if (method === 'POST') return send(res, 200, registry.freeze(id));
    } else {
      if (method === 'GET') {
        const mig = registry.get(id);
        if (!mig) throw new SourceError('UNKNOWN_MIGRATION', `no migration ${id}`);
        return send(res, 200, mig.status());
      }
      if (method === 'DELETE') {
        const status = registry.abort(id);
        // Answered once the image file is closed (the caller may delete it then).
        await registry.released(id);
        return send(res, 200, status);
      }
    }
    throw new HttpError('METHOD_NOT_ALLOWED', `${method} is not allowed on ${path}`);
  };

  return (req, res) => {
    handle(req, res).catch((err: unknown) => {
      const code = err instanceof SourceError ? err.code : 'INTERNAL';
      if (code === 'INTERNAL') log.error('control API failed', { err });
      if (res.headersSent) {
        res.destroy();
        return;
      }
      send(res, statusFor(code), { error: { code, message: (err as Error).message } });
    });
  };
}

export interface ControlServerOptions {
  /** The UNIX socket: path, permission bits, and the group that may use it. */
  socket?: { path: string; mode: number; gid?: number | undefined } | undefined;
  /** A TCP listener too, every request with `Authorization: Bearer <token>`. */
  tcp?: { host: string; port: number; token: string } | undefined;
}

export interface ControlServer {
  /** The TCP port, when listening on TCP. */
  readonly tcpPort: number | null;
  close(): Promise<void>;
}

/** Starts the control API's listeners. Throws (coded) when a socket path is taken. */
export async function startControlServer(
  registry: MigrationRegistry,
  log: Logger,
  opts: ControlServerOptions,
): Promise<ControlServer> {
  const servers: http.Server[] = [];
  const listen = (server: http.Server, ...args: [string] | [number, string]): Promise<void> =>
    new Promise((resolve, reject) => {
      const where = args.length === 1 ? String(args[0]) : `${String(args[1])}:${String(args[0])}`;
      const what = args.length === 1 ? 'controlSocket' : 'controlListen';
      const failed = (err: Error): void => reject(listenError(what, where, err));
      server.once('error', failed);
      server.listen(...(args as [number, string]), () => {
        server.off('error', failed);
        resolve();
      });
    });
  let tcpPort: number | null = null;
  let ino: number | undefined;
  try {
    if (opts.socket) {
      await claimSocketPath(opts.socket.path);
      const server = http.createServer(controlApi(registry, log));
      await listen(server, opts.socket.path);
      servers.push(server);
      ino = ownSocketPath(opts.socket.path, opts.socket.mode, opts.socket.gid);
    }
    if (opts.tcp) {
      const server = http.createServer(controlApi(registry, log, opts.tcp.token));
      await listen(server, opts.tcp.port, opts.tcp.host);
      servers.push(server);
      tcpPort = (server.address() as AddressInfo).port;
    }
  } catch (err) {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
    if (opts.socket && ino !== undefined) releaseSocketPath(opts.socket.path, ino);
    throw err;
  }
  return {
    tcpPort,
    async close() {
      for (const s of servers) s.closeAllConnections();
      await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
      if (opts.socket) releaseSocketPath(opts.socket.path, ino);
    },
  };
}
