/**
 * The source's JSON control API, on the page server's HTTP port:
 *   GET    /v1/migrations              list
 *   POST   /v1/migrations              register {id, image, regions?, frozen?}
 *   GET    /v1/migrations/:id          status
 *   POST   /v1/migrations/:id/freeze   the VM stopped: serve pages
 *   DELETE /v1/migrations/:id          abort (releases the image) and forget
 * Errors are `{error: {code, message}}` with a status that fits the code.
 */
import type http from 'node:http';
import { z } from 'zod';
import { validMigrationId } from '../../protocol/page-codec.js';
import type { Logger } from '../ops/log.js';
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
  image: z.string().min(1),
  /** Default: one region `ram0` over the whole file with 4 KiB pages. */
  regions: z.array(RegionBody).min(1).max(64).optional(),
  frozen: z.boolean().default(false),
});

const MAX_BODY_BYTES = 1024 * 1024;

const STATUS: Record<string, number> = {
  NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  BODY_TOO_LARGE: 413,
  UNKNOWN_MIGRATION: 404,
  MIGRATION_EXISTS: 409,
  BAD_STATE: 409,
  IMAGE_OPEN: 422,
  IMAGE_IO: 500,
};

function statusFor(code: string): number {
  return STATUS[code] ?? (code.startsWith('IMAGE_') || code.startsWith('INVALID') ? 400 : 500);
}

class HttpError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

function send(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
  });
  res.end(text);
}

function readJson(req: http.IncomingMessage): Promise<unknown> {
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

/**
 * Returns a request listener serving the control API; requests for other paths go to `next`
 * (the lead's /metrics), or get a 404.
 */
export function controlApi(
  registry: MigrationRegistry,
  log: Logger,
  next?: http.RequestListener,
): http.RequestListener {
  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const path = (req.url ?? '/').split('?')[0]!;
    const m = ROUTE.exec(path);
    if (!m) {
      if (next) return void next(req, res);
      throw new HttpError('NOT_FOUND', `no route for ${path}`);
    }
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
        const status = registry.register({
          id: body.id,
          image: body.image,
          frozen: body.frozen,
          regions: body.regions?.map((r) => ({ ...r, fileOffset: r.fileOffset ?? r.offset })),
        });
        log.info('migration registered', { migration: body.id, image: body.image });
        return send(res, 201, status);
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
      const code = err instanceof HttpError || err instanceof SourceError ? err.code : 'INTERNAL';
      if (code === 'INTERNAL') log.error('control API failed', { err });
      if (res.headersSent) {
        res.destroy();
        return;
      }
      send(res, statusFor(code), { error: { code, message: (err as Error).message } });
    });
  };
}
