// vita-duplex browser client: microphone (+ optional camera) in, speech and transcript out, over the
// OpenAI Realtime protocol on WS /v1/realtime with VITA's `vita.*` extensions. No build step.
"use strict";

const WIRE_RATE = 24000; // PCM16 mono at 24 kHz both ways (the server's default format)
const CHUNK_MS = 50; // one input_audio_buffer.append per 50 ms of microphone audio
const FRAME_MS = 700; // camera: ~1.4 frames per second
const FRAME_SIDE = 448; // VITA's tile size: frames are scaled so their short side is at most this

const $ = (id) => document.getElementById(id);

// Read by the browser test (tests/test_browser.py); also handy in the devtools console.
const vitaState = (window.vitaState = {
  status: "disconnected",
  segments: [], // vita.segment.classified events
  speechStarted: 0, // input_audio_buffer.speech_started count
  transcript: "", // all assistant text (audio transcript and text deltas)
  audioSamplesPlayed: 0, // 24 kHz samples actually rendered by the playback worklet
  speaking: false, // the playback queue holds audio
  framesSent: 0,
  model: "", // from session.created
  notices: [], // vita.notice events ({code, message})
  userTranscripts: {}, // user item id -> its input transcription (conversation.item.input_audio_transcription.*)
  micLevel: 0, // RMS of the latest microphone chunk (0..1)
  micPeak: 0, // the loudest chunk so far
  errors: [],
});

let ws = null;
let audioCtx = null;
let micStream = null;
let camStream = null;
let frameTimer = null;
let playback = null; // AudioWorkletNode "vita-playback"
let flushWaiters = [];

// Per-connection conversation state.
let userSpeaking = false;
let responding = false;
let paused = false;
let currentItem = null; // the assistant item whose audio was pushed last
const played = {}; // assistant item id -> 24 kHz samples played
const hadAudio = new Set(); // assistant items that received audio
const truncated = new Set(); // items we truncated: their late audio is dropped
const responseItems = {}; // response id -> assistant item id
const entries = new Map(); // item id -> <li>
const noticesShown = new Set(); // notice codes already on the page (camera turns repeat input_dropped)

// --- UI ------------------------------------------------------------------------------------------

function updateState() {
  let s = "disconnected";
  if (ws && ws.readyState === WebSocket.CONNECTING) s = "connecting";
  else if (ws && ws.readyState === WebSocket.OPEN) {
    if (vitaState.speaking) s = "speaking";
    else if (userSpeaking) s = "hearing";
    else if (paused) s = "paused";
    else if (responding) s = "thinking";
    else s = "listening";
  }
  const labels = { hearing: "hearing you", paused: "paused (listening)" };
  vitaState.status = s;
  const el = $("state");
  el.textContent = labels[s] || s;
  el.className = "state " + (s === "disconnected" ? "off" : s === "paused" ? "thinking" : s);
}

function addEntry(kind, text, id) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  $("transcript").append(li);
  li.scrollIntoView({ block: "end" });
  if (id) entries.set(id, li);
  return li;
}

// What the user said, as the server transcribed it, replaces the "(speech)" placeholder of its item.
function showUserTranscript(itemId, text, final) {
  vitaState.userTranscripts[itemId] = text;
  const li = entries.get(itemId) || addEntry("user", "", itemId);
  if (li.className === "note") return; // the segment was ignored (noise): keep saying so
  li.classList.add("heard");
  li.textContent = text || (final ? "(speech: no words recognised)" : "…");
}

function showNotice(e) {
  vitaState.notices.push({ code: e.code, message: e.message });
  if (e.code === "demo_model") {
    const banner = $("notice");
    banner.textContent = e.message;
    banner.hidden = false;
  } else if (!noticesShown.has(e.code)) addEntry("note", e.message);
  noticesShown.add(e.code);
}

// Microphone level meter: RMS of each PCM16 chunk, on a dB scale (-60 dBFS .. 0) so speech fills it.
function showMicLevel(buffer) {
  const samples = new Int16Array(buffer);
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  const rms = samples.length ? Math.sqrt(sum / samples.length) / 32768 : 0;
  vitaState.micLevel = rms;
  vitaState.micPeak = Math.max(vitaState.micPeak, rms);
  const db = 20 * Math.log10(Math.max(rms, 1e-6));
  $("mic-level").value = Math.min(1, Math.max(0, (db + 60) / 60));
}

function showError(message) {
  vitaState.errors.push(message);
  const li = document.createElement("li");
  li.textContent = message;
  $("errors").prepend(li);
}

function setConnected(on) {
  $("connect").disabled = on;
  $("disconnect").disabled = !on;
  $("key").disabled = on;
  $("text").disabled = !on;
  $("send").disabled = !on;
}

// --- wire helpers --------------------------------------------------------------------------------

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function pcm16ToFloat(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const out = new Float32Array(bytes.length >> 1);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768; // little-endian
  return out;
}

// --- audio ---------------------------------------------------------------------------------------

async function startAudio() {
  // Created inside the click handler: browsers only let a user gesture start audio output.
  audioCtx = new AudioContext({ latencyHint: "interactive" });
  await audioCtx.audioWorklet.addModule("static/audio-worklet.js");
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const capture = new AudioWorkletNode(audioCtx, "vita-capture", {
    numberOfOutputs: 0,
    processorOptions: { chunkMs: CHUNK_MS },
  });
  capture.port.onmessage = ({ data }) => {
    showMicLevel(data);
    send({ type: "input_audio_buffer.append", audio: toBase64(data) });
  };
  audioCtx.createMediaStreamSource(micStream).connect(capture);

  playback = new AudioWorkletNode(audioCtx, "vita-playback", {
    numberOfInputs: 0,
    outputChannelCount: [1],
  });
  playback.port.onmessage = ({ data }) => {
    for (const [item, n] of Object.entries(data.counts)) {
      played[item] = (played[item] || 0) + n;
      vitaState.audioSamplesPlayed += n;
    }
    vitaState.speaking = data.playing;
    if (data.flushed) flushWaiters.splice(0).forEach((resolve) => resolve());
    updateState();
  };
  playback.connect(audioCtx.destination);
  await audioCtx.resume();
}

// Drops everything queued for playback at once; resolves when the worklet has counted what played.
function flushPlayback() {
  if (!playback) return Promise.resolve();
  vitaState.speaking = false;
  updateState();
  return new Promise((resolve) => {
    flushWaiters.push(resolve);
    playback.port.postMessage({ type: "flush" });
  });
}

// Playback of `item` ended before its audio did: tell the server what the user actually heard, so
// the conversation history keeps only that part (OpenAI's playback-true truncation).
async function stopEarly(item) {
  await flushPlayback();
  if (!item || !hadAudio.has(item) || truncated.has(item)) return;
  truncated.add(item);
  entries.get(item)?.classList.add("cut");
  const ms = Math.floor(((played[item] || 0) * 1000) / WIRE_RATE);
  send({ type: "conversation.item.truncate", item_id: item, content_index: 0, audio_end_ms: ms });
}

// --- camera --------------------------------------------------------------------------------------

async function startCamera() {
  if (camStream || !ws) return;
  try {
    camStream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  } catch (e) {
    showError(`Camera: ${e.message}`);
    $("camera").checked = false;
    return;
  }
  const video = $("preview");
  video.srcObject = camStream;
  video.hidden = false;
  await video.play().catch(() => {});
  const canvas = document.createElement("canvas");
  frameTimer = setInterval(() => {
    if (!video.videoWidth || !ws || ws.readyState !== WebSocket.OPEN) return;
    const scale = Math.min(1, FRAME_SIDE / Math.min(video.videoWidth, video.videoHeight));
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    send({ type: "vita.frame.append", image: canvas.toDataURL("image/jpeg", 0.8) });
    vitaState.framesSent++;
  }, FRAME_MS);
}

function stopCamera() {
  clearInterval(frameTimer);
  frameTimer = null;
  camStream?.getTracks().forEach((t) => t.stop());
  camStream = null;
  $("preview").hidden = true;
  $("preview").srcObject = null;
}

// --- server events -------------------------------------------------------------------------------

function onEvent(e) {
  switch (e.type) {
    case "session.created":
      // Say the formats out loud rather than relying on the defaults; ask for the user's transcript
      // (the server's transcription backend and language).
      send({
        type: "session.update",
        session: {
          type: "realtime",
          audio: {
            input: { format: { type: "audio/pcm", rate: WIRE_RATE }, transcription: {} },
            output: { format: { type: "audio/pcm", rate: WIRE_RATE } },
          },
        },
      });
      vitaState.model = e.session.model || "";
      $("model").textContent = vitaState.model;
      addEntry("note", `Connected (${e.session.model}). Speak or type.`);
      break;

    case "vita.notice":
      showNotice(e);
      break;

    case "conversation.item.input_audio_transcription.delta":
      showUserTranscript(e.item_id, (vitaState.userTranscripts[e.item_id] || "") + (e.delta || ""), false);
      break;

    case "conversation.item.input_audio_transcription.completed":
      showUserTranscript(e.item_id, e.transcript, true);
      break;

    case "conversation.item.input_audio_transcription.failed":
      if (!(e.item_id in vitaState.userTranscripts)) showUserTranscript(e.item_id, "", true);
      break;

    case "input_audio_buffer.speech_started":
      vitaState.speechStarted++;
      userSpeaking = true;
      // Barge-in. The server normally pauses us first (vita.output.paused); if audio is still
      // playing, it thought we had finished, so stop now and report what was heard.
      if (vitaState.speaking && !paused) stopEarly(currentItem);
      addEntry("user", "(speaking…)", e.item_id);
      break;

    case "input_audio_buffer.speech_stopped":
      userSpeaking = false;
      if (entries.has(e.item_id)) entries.get(e.item_id).textContent = "(speech)";
      break;

    case "vita.segment.discarded":
      entries.get(e.item_id)?.remove();
      break;

    case "vita.segment.classified": {
      vitaState.segments.push(e);
      const li = entries.get(e.item_id);
      if (e.ignored) {
        const why = e.reason === "noise" ? "background noise" : (e.reason || "").replaceAll("_", " ");
        const note = `Ignored as ${why} — no answer.`;
        if (li) {
          li.className = "note";
          li.textContent = note;
        } else addEntry("note", note);
      } else if (li && e.kind === "query" && !(e.item_id in vitaState.userTranscripts)) {
        li.textContent = "(spoken question)";
      }
      break;
    }

    case "vita.output.paused":
      // Someone may be talking over the answer: go quiet at once. No truncate here: if the segment
      // turns out to be noise, the server resumes from where we stopped.
      paused = true;
      flushPlayback();
      break;

    case "vita.output.resumed":
      paused = false; // the server re-sends the audio from the paused position
      break;

    case "output_audio_buffer.cleared":
      // The answer was cancelled (a real barge-in, or response.cancel): drop what is queued.
      paused = false;
      stopEarly(responseItems[e.response_id]);
      break;

    case "response.created":
      responding = true;
      break;

    case "response.output_item.added":
      responseItems[e.response_id] = e.item.id;
      break;

    case "response.output_audio_transcript.delta":
    case "response.output_text.delta": {
      const li = entries.get(e.item_id) || addEntry("assistant", "", e.item_id);
      li.textContent += e.delta;
      vitaState.transcript += e.delta;
      li.scrollIntoView({ block: "end" });
      break;
    }

    case "response.output_audio.delta": {
      if (truncated.has(e.item_id) || !playback) break; // late audio of an answer we cut
      const samples = pcm16ToFloat(e.delta);
      if (!samples.length) break;
      currentItem = e.item_id;
      hadAudio.add(e.item_id);
      playback.port.postMessage({ type: "push", item: e.item_id, samples }, [samples.buffer]);
      vitaState.speaking = true;
      break;
    }

    case "response.done": {
      responding = false;
      const item = responseItems[e.response.id];
      if (e.response.status === "cancelled") entries.get(item)?.classList.add("cut");
      vitaState.transcript += "\n";
      break;
    }

    case "conversation.item.truncated":
      entries.get(e.item_id)?.classList.add("cut");
      break;

    case "error":
      showError(`${e.error.code || e.error.type}: ${e.error.message}`);
      break;
  }
  updateState();
}

// --- connect / disconnect ------------------------------------------------------------------------

async function connect() {
  const key = $("key").value.trim();
  sessionStorage.setItem("vita.apiKey", key); // sessionStorage only: gone when the tab closes
  setConnected(true);
  try {
    await startAudio();
  } catch (e) {
    showError(`Microphone: ${e.message}`);
    teardown();
    return;
  }
  // Relative to the page, so it also works behind a reverse proxy under a path prefix; wss on https.
  const url = new URL("v1/realtime", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  // Browsers cannot set an Authorization header on a WebSocket: the key rides as a subprotocol.
  const protocols = ["realtime"];
  if (key) protocols.push(`openai-insecure-api-key.${key}`);
  try {
    ws = new WebSocket(url, protocols);
  } catch (e) {
    showError(`Cannot connect: ${e.message}`);
    teardown();
    return;
  }
  ws.onopen = () => {
    updateState();
    if ($("camera").checked) startCamera();
  };
  ws.onmessage = (m) => onEvent(JSON.parse(m.data));
  ws.onerror = () => {}; // onclose follows, with the reason
  ws.onclose = (e) => {
    if (e.code !== 1000 || e.reason) showError(`Connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
    teardown();
  };
  updateState();
}

function teardown() {
  if (ws) {
    ws.onclose = null;
    if (ws.readyState <= WebSocket.OPEN) ws.close(1000);
    ws = null;
  }
  stopCamera();
  micStream?.getTracks().forEach((t) => t.stop());
  micStream = null;
  audioCtx?.close();
  audioCtx = null;
  playback = null;
  flushWaiters.splice(0).forEach((resolve) => resolve());
  userSpeaking = responding = paused = false;
  vitaState.speaking = false;
  noticesShown.clear();
  $("mic-level").value = 0;
  setConnected(false);
  updateState();
}

$("key").value = sessionStorage.getItem("vita.apiKey") || "";
$("connect-form").onsubmit = (ev) => {
  ev.preventDefault();
  if (!ws) connect();
};
$("disconnect").onclick = teardown;
$("camera").onchange = () => ($("camera").checked ? startCamera() : stopCamera());
$("text-form").onsubmit = (ev) => {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!text || !ws || ws.readyState !== WebSocket.OPEN) return;
  send({ type: "vita.text.append", text });
  addEntry("user", text);
  $("text").value = "";
};
updateState();
