// One error -> HTTP mapping for both Express apps. Every error body has the same shape:
//   {"error": {"code": "<stable_code>", "message": "<human text>", ...details}}
import { isUtf8 } from 'node:buffer';
import { STATUS_CODES } from 'node:http';
import type { Duplex } from 'node:stream';
import type { ErrorRequestHandler, RequestHandler, Response } from 'express';
import iconv from 'iconv-lite';
import type { Logger } from '../log.js';
import { RouteValidationError } from '../routes/route.js';

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details: Record<string, unknown> = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

export function sendError(res: Response, status: number, code: string, message: string, details: Record<string, unknown> = {}): void {
  if (res.headersSent) return;
  res.status(status).json({ error: { code, message, ...details } });
}

/** body-parser's error types (err.type) -> status and stable code. */
const BODY_ERRORS: Readonly<Record<string, readonly [number, string, string]>> = {
  'entity.too.large': [413, 'body_too_large', 'request body is larger than this endpoint accepts'],
  'entity.parse.failed': [400, 'invalid_json', 'request body is not valid JSON'],
  'encoding.unsupported': [415, 'unsupported_encoding', 'unsupported content encoding'],
  'charset.unsupported': [415, 'unsupported_charset', 'the body must be UTF-8 JSON (RFC 8259 §8.1): name charset=utf-8 or no charset'],
  'request.aborted': [400, 'request_aborted', 'request aborted by the client'],
  'request.size.invalid': [400, 'invalid_body_size', 'request body size does not match Content-Length'],
};

export function errorHandler(logger: Logger): ErrorRequestHandler {
  return (error: unknown, req, res, _next) => {
    if (error instanceof ApiError) return sendError(res, error.status, error.code, error.message, error.details);
    if (error instanceof RouteValidationError) {
      return sendError(res, 400, 'invalid_route', error.message, { reason: error.reason, ...(error.field ? { field: error.field } : {}) });
    }
    const type = (error as { type?: unknown } | null)?.type;
    if (typeof type === 'string' && BODY_ERRORS[type]) {
      const [status, code, message] = BODY_ERRORS[type];
      return sendError(res, status, code, message);
    }
    const status = (error as { status?: unknown } | null)?.status;
    if (typeof status === 'number' && status >= 400 && status < 500) {
      return sendError(res, status, 'bad_request', 'the request could not be read');
    }
    // Only the method, path and error: never the body or headers, which may hold secrets.
    logger.error({ method: req.method, path: req.path, err: error }, 'internal error');
    return sendError(res, 500, 'internal', 'internal error');
  };
}

export const notFound: RequestHandler = (req, res) => {
  sendError(res, 404, 'not_found', `no endpoint ${req.method} ${req.path}`);
};

/**
 * Answer 415 unless the request says it carries JSON (the local API is strict; /refresh is not),
 * and 400 for a request with no body at all: `req.is` is null for any request without one,
 * and a 415 telling a client that sent `Content-Type: application/json` to send it was wrong.
 */
export const requireJson: RequestHandler = (req, _res, next) => {
  if (req.headers['transfer-encoding'] === undefined && (req.headers['content-length'] === undefined || req.headers['content-length'] === '0')) {
    next(new ApiError(400, 'invalid_json', 'the request has no body: send the route as JSON, with Content-Type: application/json'));
    return;
  }
  if (!req.is('application/json')) {
    next(new ApiError(415, 'unsupported_media_type', 'the body must be JSON with Content-Type: application/json'));
    return;
  }
  next();
};

/** Answer 405 with Allow for any other method on a known path. */
export function methodNotAllowed(allow: string): RequestHandler {
  return (req, res) => {
    res.setHeader('Allow', allow);
    sendError(res, 405, 'method_not_allowed', `${req.method} is not allowed here; allowed: ${allow}`);
  };
}

/**
 * body-parser asks iconv-lite whether a body's charset exists before reading it, and iconv-lite
 * loads its table of charsets from files on the first question; a question it cannot answer
 * reads as "no such charset". So a replica out of file descriptors (EMFILE) before its first
 * JSON body answered every body 415 unsupported_charset for as long as it stayed short, and a
 * peer answering a push so had the batch dropped as a permanent 4xx. The table is loaded here,
 * at start-up, once, for both apps (body-parser and this module share the one copy of
 * iconv-lite).
 */
iconv.encodingExists('utf-8');

/**
 * A body that is not valid UTF-8 is not JSON (RFC 8259 §8.1). body-parser decodes it anyway,
 * each invalid byte as U+FFFD, so sandbox IDs that differ only in such bytes became one ID and
 * one identity took over the other's traffic. Refused as invalid JSON instead (400). Every JSON
 * parser of the local and the peer API verifies with it (express.json's `verify`).
 *
 * body-parser also decodes any other `utf-*` charset the type names (utf-16le, utf-7, ...), which
 * this check would not see: those are refused with 415 unsupported_charset, as body-parser itself
 * refuses the rest. /refresh drops the Content-Type first, so it always reads UTF-8.
 */
export function rejectInvalidUtf8(_req: unknown, _res: unknown, body: Buffer, encoding: string): void {
  if (encoding !== 'utf-8') {
    throw Object.assign(new Error(`request body charset ${encoding} is not UTF-8`), { status: 415, type: 'charset.unsupported' });
  }
  if (!isUtf8(body)) {
    throw Object.assign(new Error('request body is not valid UTF-8'), { status: 400, type: 'entity.parse.failed' });
  }
}

/** Node's own statuses for a request its parser refused (lib/_http_server.js), by error code. */
const UNPARSABLE: Record<string, { status: number; code: string; message: string }> = {
  HPE_HEADER_OVERFLOW: { status: 431, code: 'headers_too_large', message: 'the request line and headers are larger than this server reads (16 KiB)' },
  HPE_CHUNK_EXTENSIONS_OVERFLOW: { status: 413, code: 'body_too_large', message: 'chunk extensions too large' },
  ERR_HTTP_REQUEST_TIMEOUT: { status: 408, code: 'request_timeout', message: 'the request did not arrive in time' },
};

/**
 * The server's `clientError` listener: a request Node's parser refused (headers over 16 KiB, a
 * malformed request line or framing) gets the APIs' one error shape instead of Node's bare
 * status line, and the connection closes. Nothing is written once an answer on the connection
 * has begun, or to a connection already gone.
 */
export function answerUnparsable(error: Error & { code?: string }, socket: Duplex): void {
  const answering = (socket as Duplex & { _httpMessage?: { headersSent?: boolean } | null })._httpMessage;
  if (error.code === 'ECONNRESET' || !socket.writable || answering?.headersSent) {
    socket.destroy();
    return;
  }
  const { status, code, message } = UNPARSABLE[error.code ?? ''] ?? { status: 400, code: 'bad_request', message: 'the request is not valid HTTP/1.1' };
  const body = JSON.stringify({ error: { code, message } });
  // Written, then closed at once, as Node's own handler does (the small write goes out first):
  // ended only, a client that keeps its side open would hold the socket past every server
  // timeout, and a shutdown for its whole grace.
  socket.write(
    `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
  );
  socket.destroy();
}
