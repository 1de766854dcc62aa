// Following WebSocket frame boundaries in a relayed byte stream, and closing at one.
import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { CLOSE_GOING_AWAY, FrameBoundaryTracker, FrameRelay, closeFrame } from '../../src/proxy/ws-frames.js';

/** One frame: FIN + opcode, the 7/16/64-bit length forms, optional mask key. */
function frame(payloadBytes: number, mask?: Buffer, opcode = 0x2): Buffer {
  const header: number[] = [0x80 | opcode];
  const maskBit = mask ? 0x80 : 0;
  if (payloadBytes < 126) header.push(maskBit | payloadBytes);
  else if (payloadBytes < 65_536) header.push(maskBit | 126, payloadBytes >> 8, payloadBytes & 0xff);
  else {
    header.push(maskBit | 127);
    const length = Buffer.alloc(8);
    length.writeBigUInt64BE(BigInt(payloadBytes));
    header.push(...length);
  }
  return Buffer.concat([Buffer.from(header), mask ?? Buffer.alloc(0), Buffer.alloc(payloadBytes, 0x61)]);
}

describe('FrameBoundaryTracker', () => {
  const frames = [frame(0), frame(5), frame(125, Buffer.from([1, 2, 3, 4])), frame(126), frame(70_000, Buffer.from([9, 9, 9, 9])), frame(3)];
  const stream = Buffer.concat(frames);
  const boundaries = new Set<number>();
  let offset = 0;
  for (const f of frames) {
    offset += f.length;
    boundaries.add(offset);
  }

  it('is at a boundary exactly between frames, fed one byte at a time', () => {
    const tracker = new FrameBoundaryTracker();
    expect(tracker.atBoundary).toBe(true);
    for (let i = 0; i < stream.length; i++) {
      tracker.feed(stream.subarray(i, i + 1));
      expect(tracker.atBoundary, `after byte ${i + 1}`).toBe(boundaries.has(i + 1));
    }
  });

  it('gives the same answer whatever the chunking', () => {
    for (const chunkBytes of [2, 7, 13, 4096, stream.length]) {
      const tracker = new FrameBoundaryTracker();
      for (let i = 0; i < stream.length; i += chunkBytes) tracker.feed(stream.subarray(i, i + chunkBytes));
      expect(tracker.atBoundary, `chunks of ${chunkBytes}`).toBe(true);
    }
  });

  it('advance stops just past the end of the current frame', () => {
    const tracker = new FrameBoundaryTracker();
    expect(tracker.advance(stream, 0)).toBe(frames[0]!.length);
    expect(tracker.advance(stream, frames[0]!.length)).toBe(frames[0]!.length + frames[1]!.length);
  });
});

describe('closeFrame', () => {
  it('unmasked for a client, masked for a server', () => {
    expect([...closeFrame(CLOSE_GOING_AWAY)]).toEqual([0x88, 2, 0x03, 0xe9]);
    const key = Buffer.from([1, 2, 3, 4]);
    expect([...closeFrame(CLOSE_GOING_AWAY, key)]).toEqual([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe9 ^ 2]);
    expect(() => closeFrame(1000, Buffer.from([1]))).toThrow(RangeError);
  });
});

describe('FrameRelay', () => {
  it('stopped mid-frame: forwards the rest of that frame, then the close frame, then nothing', async () => {
    const source = new PassThrough();
    const destination = new PassThrough();
    source.pipe(destination);
    const relay = new FrameRelay(source, destination, () => closeFrame(CLOSE_GOING_AWAY));
    const received: Buffer[] = [];
    destination.on('data', (chunk: Buffer) => received.push(chunk));
    const ended = new Promise<void>((resolve) => destination.on('end', () => resolve()));

    const big = frame(1000);
    source.write(big.subarray(0, 300));
    await new Promise((resolve) => setImmediate(resolve));
    relay.stop();
    expect(relay.closed).toBe(false);
    // The rest of the frame arrives together with the start of the next one.
    source.write(Buffer.concat([big.subarray(300), frame(10)]));
    source.write(frame(20));
    await ended;

    expect(relay.closed).toBe(true);
    expect(Buffer.concat(received)).toEqual(Buffer.concat([big, closeFrame(CLOSE_GOING_AWAY)]));
  });

  it('stopped between frames: the close frame at once', async () => {
    const source = new PassThrough();
    const destination = new PassThrough();
    source.pipe(destination);
    const relay = new FrameRelay(source, destination, () => closeFrame(CLOSE_GOING_AWAY));
    const received: Buffer[] = [];
    destination.on('data', (chunk: Buffer) => received.push(chunk));
    const ended = new Promise<void>((resolve) => destination.on('end', () => resolve()));
    source.write(frame(4));
    await new Promise((resolve) => setImmediate(resolve));
    relay.stop();
    await ended;
    expect(Buffer.concat(received)).toEqual(Buffer.concat([frame(4), closeFrame(CLOSE_GOING_AWAY)]));
  });
});
