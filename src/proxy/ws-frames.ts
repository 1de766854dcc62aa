// Just enough of RFC 6455 framing to close a proxied WebSocket cleanly.
//
// The data plane relays WebSocket bytes as raw TCP chunks, and a chunk boundary is not a frame
// boundary: a close frame written in the middle of a relayed frame corrupts the stream. So each
// direction keeps a FrameBoundaryTracker that follows frame headers and skips payloads (no
// copying, no unmasking, no inflation: a few integer operations per frame), and at shutdown
// the relay forwards up to the end of the current frame before it writes the close frame.

import type { Duplex } from 'node:stream';

/** Close code "going away" (RFC 6455 §7.4.1): the server is shutting down. */
export const CLOSE_GOING_AWAY = 1001;

const MAX_HEADER_BYTES = 14; // 2 + 8 (64-bit length) + 4 (mask key)

export class FrameBoundaryTracker {
  private readonly header = new Uint8Array(MAX_HEADER_BYTES);
  private headerLength = 0;
  private payloadRemaining = 0;

  /** True between frames: a frame written now cannot split another one. */
  get atBoundary(): boolean {
    return this.headerLength === 0 && this.payloadRemaining === 0;
  }

  /** Follow a whole chunk. */
  feed(chunk: Uint8Array): void {
    let offset = 0;
    while (offset < chunk.length) offset = this.advance(chunk, offset);
  }

  /**
   * Follow bytes from `offset` until the current frame ends. Returns the offset just past the
   * frame's last byte, or `chunk.length` when the frame continues past this chunk; `atBoundary`
   * tells the two apart when the frame ends exactly at the chunk's end.
   */
  advance(chunk: Uint8Array, offset = 0): number {
    let i = offset;
    while (i < chunk.length) {
      if (this.payloadRemaining > 0) {
        const take = Math.min(this.payloadRemaining, chunk.length - i);
        this.payloadRemaining -= take;
        i += take;
        if (this.payloadRemaining === 0) return i;
        continue;
      }
      this.header[this.headerLength++] = chunk[i++]!;
      const size = this.headerSize();
      if (size !== undefined && this.headerLength === size) {
        this.payloadRemaining = this.payloadLength();
        this.headerLength = 0;
        if (this.payloadRemaining === 0) return i;
      }
    }
    return i;
  }

  /** Header size once the second byte is known; undefined before. */
  private headerSize(): number | undefined {
    if (this.headerLength < 2) return undefined;
    const second = this.header[1]!;
    const length7 = second & 0x7f;
    const extended = length7 === 126 ? 2 : length7 === 127 ? 8 : 0;
    const mask = (second & 0x80) !== 0 ? 4 : 0;
    return 2 + extended + mask;
  }

  private payloadLength(): number {
    const length7 = this.header[1]! & 0x7f;
    if (length7 < 126) return length7;
    if (length7 === 126) return (this.header[2]! << 8) | this.header[3]!;
    // 64-bit length; anything past 2^53 is not a real frame, and a Number still counts it down.
    let value = 0;
    for (let k = 2; k < 10; k++) value = value * 256 + this.header[k]!;
    return value;
  }
}

/**
 * A close frame with a status code and no reason. A client-to-server frame must be masked
 * (RFC 6455 §5.3): pass a 4-byte key for the frame the data plane sends upstream.
 */
export function closeFrame(code: number, maskKey?: Uint8Array): Buffer {
  const payload = [(code >> 8) & 0xff, code & 0xff];
  if (!maskKey) return Buffer.from([0x88, payload.length, ...payload]);
  if (maskKey.length !== 4) throw new RangeError('a WebSocket mask key is 4 bytes');
  const masked = payload.map((byte, index) => byte ^ maskKey[index % 4]!);
  return Buffer.from([0x88, 0x80 | payload.length, ...maskKey, ...masked]);
}

/**
 * Watches one direction of a relayed WebSocket (`source` piped to `destination` by the proxy
 * library) and, on `stop()`, ends it with a close frame at a frame boundary.
 *
 * While running it only observes: its 'data' listener sees the same chunks as the pipe and
 * feeds the tracker. On stop it unpipes, forwards the rest of the frame in flight itself,
 * writes the close frame, ends `destination`, and from then on discards what `source` still
 * sends (the peer's close reply) until the peer closes.
 */
export class FrameRelay {
  private readonly tracker = new FrameBoundaryTracker();
  private stopping = false;
  private done = false;
  private waitingForDrain = false;

  constructor(
    private readonly source: Duplex,
    private readonly destination: Duplex,
    private readonly makeCloseFrame: () => Buffer,
  ) {
    source.on('data', this.onData);
  }

  /** True once the close frame has been written (or could not be). */
  get closed(): boolean {
    return this.done;
  }

  stop(): void {
    if (this.stopping) return;
    this.stopping = true;
    this.source.unpipe(this.destination);
    // unpipe paused the source; keep reading either to discard or to finish the frame, no
    // faster than the destination takes it (as the pipe did).
    if (this.tracker.atBoundary) this.finish();
    else if (this.destination.writableNeedDrain) this.waitForDrain();
    else this.source.resume();
  }

  private readonly onData = (chunk: Buffer): void => {
    if (!this.stopping) {
      this.tracker.feed(chunk);
      return;
    }
    if (this.done) return;
    const end = this.tracker.advance(chunk, 0);
    if (!this.tracker.atBoundary) {
      this.write(chunk);
      return;
    }
    this.write(chunk.subarray(0, end));
    this.finish();
  };

  private write(chunk: Uint8Array): void {
    if (!this.destination.writable || this.destination.destroyed) return;
    // Backpressure, as the pipe had: without it the rest of a large frame towards a slow
    // reader was read into memory as fast as the sender could send it.
    if (!this.destination.write(chunk)) this.waitForDrain();
  }

  private waitForDrain(): void {
    this.source.pause();
    if (this.waitingForDrain) return;
    this.waitingForDrain = true;
    this.destination.once('drain', () => {
      this.waitingForDrain = false;
      this.source.resume();
    });
  }

  private finish(): void {
    this.done = true;
    if (this.destination.writable && !this.destination.destroyed) this.destination.end(this.makeCloseFrame());
    // Discarding writes nothing: read on (an ended destination emits no 'drain') to see the peer close.
    this.source.resume();
  }
}
