// avatarhub preview: joins the room as a viewer, shows the avatar, lets you speak to it.
// window.preview holds what the page knows (read by the browser test).
"use strict";
(async () => {
  const { Room, RoomEvent, Track, ConnectionState } = LivekitClient;
  const $ = (id) => document.getElementById(id);
  const state = (window.preview = {
    state: "connecting", errors: [], avatarTracks: [], fps: 0, width: 0, height: 0,
    codec: null, mic: false, sample: false, lastRpc: null, phase: null,
  });
  const say = (text, error = false) => {
    $("message").textContent = text;
    $("message").className = error ? "error" : "";
    if (error) state.errors.push(text);
  };

  const config = await (await fetch("/config.json")).json();
  $("avatar-name").textContent = config.name;
  const room = new Room({ adaptiveStream: false, dynacast: false });

  room.on(RoomEvent.TrackSubscribed, (track, publication, participant) => {
    if (participant.identity !== config.avatar) return;
    state.avatarTracks.push(track.kind);
    if (track.kind === Track.Kind.Video) {
      track.attach($("video"));
    } else {
      const audio = track.attach();
      document.body.appendChild(audio);
    }
  });
  room.on(RoomEvent.ConnectionStateChanged, (s) => { state.state = s; $("f-state").textContent = s; });
  room.on(RoomEvent.ParticipantDisconnected, (p) => {
    if (p.identity === config.avatar) say("the avatar left the room", true);
  });

  // one published microphone track, fed by a Web Audio graph: your microphone, the sample, or
  // silence. The avatar lip-syncs this participant's microphone (the join-room flow's listen_to).
  let audio = null;
  async function ensureTrack() {
    if (audio) return audio;
    const context = new AudioContext({ sampleRate: 48000 });
    const destination = context.createMediaStreamDestination();
    audio = { context, destination, mic: null, micStream: null, sample: null };
    await room.localParticipant.publishTrack(destination.stream.getAudioTracks()[0], {
      source: Track.Source.Microphone, name: "preview-microphone",
    });
    return audio;
  }

  $("mic").onclick = async () => {
    try {
      const a = await ensureTrack();
      if (a.mic) {
        a.mic.disconnect();
        a.micStream.getTracks().forEach((t) => t.stop());
        a.mic = a.micStream = null;
      } else {
        a.micStream = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        });
        a.mic = a.context.createMediaStreamSource(a.micStream);
        a.mic.connect(a.destination);
      }
      state.mic = !!a.mic;
      $("mic").setAttribute("aria-pressed", String(state.mic));
      $("mic").textContent = state.mic ? "Microphone on" : "Microphone";
    } catch (err) {
      say(`microphone: ${err.message || err}`, true);
    }
  };

  let sampleBuffer = null;
  $("sample").onclick = async () => {
    try {
      const a = await ensureTrack();
      if (!sampleBuffer) {
        const bytes = await (await fetch("/sample.wav")).arrayBuffer();
        sampleBuffer = await a.context.decodeAudioData(bytes);
      }
      if (a.sample) a.sample.stop();
      const source = a.context.createBufferSource();
      source.buffer = sampleBuffer;
      source.connect(a.destination);
      source.onended = () => { if (a.sample === source) { a.sample = null; state.sample = false; } };
      a.sample = source;
      state.sample = true;
      source.start();
    } catch (err) {
      say(`sample speech: ${err.message || err}`, true);
    }
  };

  function gestureButtons(names) {
    const box = $("gestures");
    box.replaceChildren();
    for (const name of names) {
      const button = document.createElement("button");
      button.className = "secondary";
      button.textContent = name;
      button.dataset.gesture = name;
      button.onclick = async () => {
        try {
          const answer = await room.localParticipant.performRpc({
            destinationIdentity: config.avatar,
            method: "trigger_dynamics",
            payload: JSON.stringify({ action: name }),
            responseTimeout: 10000,
          });
          state.lastRpc = JSON.parse(answer);
          const ok = state.lastRpc.status === "success";
          say(ok ? `gesture ${name} sent` : `gesture ${name}: ${state.lastRpc.message || answer}`, !ok);
        } catch (err) {
          state.lastRpc = { success: false, error: String(err.message || err) };
          say(`gesture ${name}: ${err.message || err}`, true);
        }
      };
      box.appendChild(button);
    }
  }
  gestureButtons(config.gestures);

  // figures: what this browser receives (getStats), and the renderer's own counters (/status)
  let previous = null;
  async function receiveFigures() {
    const avatar = room.remoteParticipants.get(config.avatar);
    if (!avatar) return;
    for (const publication of avatar.trackPublications.values()) {
      if (!publication.track || publication.kind !== Track.Kind.Video) continue;
      const report = await publication.track.getRTCStatsReport();
      if (!report) continue;
      const codecs = {};
      report.forEach((s) => { if (s.type === "codec") codecs[s.id] = s.mimeType; });
      report.forEach((s) => {
        if (s.type !== "inbound-rtp") return;
        const now = performance.now();
        if (previous) {
          state.fps = (s.framesDecoded - previous.frames) / ((now - previous.at) / 1000);
        }
        previous = { frames: s.framesDecoded, at: now };
        state.width = s.frameWidth || 0;
        state.height = s.frameHeight || 0;
        state.codec = codecs[s.codecId] || null;
        $("f-fps").textContent = `${state.fps.toFixed(1)} FPS`;
        $("f-size").textContent = state.width ? `${state.width}×${state.height}` : "–";
        $("f-codec").textContent = state.codec || "–";
      });
    }
  }

  const mb = (n) => `${(n / 1048576).toFixed(1)} MB`;
  async function statusFigures() {
    let status;
    try {
      status = await (await fetch("/status")).json();
    } catch (err) {
      say("the preview command has stopped", true);
      return false;
    }
    state.phase = status.phase;
    const d = status.download;
    $("download").hidden = status.phase !== "downloading";
    if (status.phase === "downloading") {
      $("download-bar").max = d.total || 1;
      $("download-bar").value = d.total ? d.bytes : 0;
      $("download-text").textContent =
        `downloading ${status.avatar}: ${mb(d.bytes)}${d.total ? " of " + mb(d.total) : ""} at ${mb(d.rate)}/s`;
    } else if (status.phase === "loading") {
      say(`loading ${status.avatar}…`);
    } else if (status.phase === "failed") {
      say(status.error, true);
      return false;
    } else if (status.phase === "ready" && $("message").textContent.startsWith("loading")) {
      say("");
    }
    if (status.render) {
      $("f-frames").textContent = String(status.render.frames);
      $("f-late").textContent = `${status.render.late} / ${status.render.skipped}`;
      $("f-lag").textContent = `${status.render.lag_ms} ms`;
    }
    return true;
  }

  async function tick() {
    const going = await statusFigures();
    if (room.state === ConnectionState.Connected) await receiveFigures();
    if (going) setTimeout(tick, 1000);
  }

  try {
    await room.connect(config.url, config.token);
    $("mic").disabled = $("sample").disabled = false;
  } catch (err) {
    state.state = "error";
    say(`could not join the room: ${err.message || err}`, true);
  }
  tick();
})();
