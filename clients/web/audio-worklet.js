// AudioWorklet processors for the vita-duplex web client (loaded with audioWorklet.addModule).
//
// The AudioContext runs at the device's own rate (often 48 kHz): not every browser lets a
// microphone feed a context at another rate, so both processors convert to/from the wire's
// 24 kHz themselves.

const WIRE_RATE = 24000;

// Microphone → 24 kHz PCM16 chunks of `chunkMs`, posted to the main thread as transferable buffers.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const chunkMs = options.processorOptions?.chunkMs ?? 50;
    this.step = sampleRate / WIRE_RATE; // input samples per output sample
    this.pos = 0; // fractional read position into `prev` + the current block
    this.prev = 0; // last input sample of the previous block (for interpolation across blocks)
    this.chunk = Math.round((WIRE_RATE * chunkMs) / 1000);
    this.out = new Int16Array(this.chunk);
    this.fill = 0;
    // Box filter width for downsampling: averaging ~step samples keeps most of the aliasing
    // (content between 12 kHz and the device's Nyquist) out; the server band-limits again to 8 kHz.
    this.taps = Math.max(1, Math.round(this.step));
    this.history = new Float32Array(this.taps);
    this.hpos = 0;
    this.hsum = 0;
  }

  process(inputs) {
    const input = inputs[0]?.[0];
    if (!input) return true; // no microphone data yet (or the track ended)
    // Low-pass (moving average) in place, then linear interpolation at the wire rate.
    const smoothed = new Float32Array(input.length);
    for (let i = 0; i < input.length; i++) {
      this.hsum += input[i] - this.history[this.hpos];
      this.history[this.hpos] = input[i];
      this.hpos = (this.hpos + 1) % this.taps;
      smoothed[i] = this.hsum / this.taps;
    }
    // Positions are relative to `prev` (index 0), so the block's sample i sits at i + 1.
    while (this.pos < smoothed.length) {
      const i = Math.floor(this.pos);
      const frac = this.pos - i;
      const a = i === 0 ? this.prev : smoothed[i - 1];
      const b = smoothed[i];
      const s = a + (b - a) * frac;
      this.out[this.fill++] = Math.max(-32768, Math.min(32767, Math.round(s * 32767)));
      if (this.fill === this.chunk) {
        this.port.postMessage(this.out.buffer, [this.out.buffer]); // transferred: `out` is now empty
        this.out = new Int16Array(this.chunk);
        this.fill = 0;
      }
      this.pos += this.step;
    }
    this.pos -= smoothed.length;
    this.prev = smoothed[smoothed.length - 1];
    return true;
  }
}

// A queue of 24 kHz float chunks, played at the device rate. Messages in:
//   {type: "push", item, samples: Float32Array}  — append (item: the assistant item id)
//   {type: "flush"}                              — drop everything queued, now
// Messages out: {type: "played", counts: {item: samples}, playing, flushed} every ~50 ms while
// playing, and at once when the queue empties or is flushed. Counts are wire (24 kHz) samples.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = WIRE_RATE / sampleRate; // wire samples per output sample
    this.queue = []; // [{item, samples}]
    this.pos = 0; // fractional read position in queue[0]
    this.counts = {}; // played wire samples per item since the last report
    this.sinceReport = 0;
    this.wasPlaying = false;
    this.port.onmessage = ({ data }) => {
      if (data.type === "push") {
        this.queue.push({ item: data.item, samples: data.samples });
      } else if (data.type === "flush") {
        this.queue = [];
        this.pos = 0;
        this.report(false, true);
      }
    };
  }

  report(playing, flushed = false) {
    this.port.postMessage({ type: "played", counts: this.counts, playing, flushed });
    this.counts = {};
    this.sinceReport = 0;
    this.wasPlaying = playing;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    while (written < out.length && this.queue.length) {
      const chunk = this.queue[0];
      const start = Math.floor(this.pos);
      while (written < out.length && this.pos < chunk.samples.length - 1) {
        const i = Math.floor(this.pos);
        const frac = this.pos - i;
        out[written++] = chunk.samples[i] + (chunk.samples[i + 1] - chunk.samples[i]) * frac;
        this.pos += this.step;
      }
      const consumed = Math.min(Math.floor(this.pos), chunk.samples.length) - start;
      this.counts[chunk.item] = (this.counts[chunk.item] || 0) + consumed;
      if (this.pos >= chunk.samples.length - 1) {
        // The last sample has no right neighbour to interpolate with: count it as played and move
        // on (a one-sample seam per chunk is inaudible).
        this.counts[chunk.item] += chunk.samples.length - Math.min(Math.floor(this.pos), chunk.samples.length);
        this.pos = Math.max(0, this.pos - (chunk.samples.length - 1));
        this.queue.shift();
      }
    }
    out.fill(0, written);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out); // mono to every channel
    const playing = this.queue.length > 0;
    this.sinceReport += out.length;
    if (playing !== this.wasPlaying || this.sinceReport >= sampleRate / 20) {
      if (playing || Object.keys(this.counts).length || this.wasPlaying) this.report(playing);
      else this.sinceReport = 0;
    }
    return true;
  }
}

registerProcessor("vita-capture", CaptureProcessor);
registerProcessor("vita-playback", PlaybackProcessor);
