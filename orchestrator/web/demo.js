// cascade demo page: OpenAI's Realtime WebRTC protocol with plain browser APIs.
// Flow: POST demo/token -> ek_ key; microphone -> RTCPeerConnection + data channel
// "oai-events"; POST the offer SDP to v1/realtime/calls; the answer SDP comes back in the
// 201 body and the call id in Location. Events arrive as JSON on the data channel.
// window.cascadeDemo exposes the page state to tests (tests/orchestrator/test_web_demo.py).
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    connect: $('connect'), hangup: $('hangup'), mute: $('mute'), status: $('status'),
    notice: $('notice'), log: $('log'), scroller: $('scroller'), empty: $('empty'),
    userLive: $('user-live'), latency: $('latency'), v2v: $('v2v'),
    micMeter: $('mic-meter'), micLevel: $('mic-level'), agent: $('agent'),
  };
  const RAW_MIC = new URLSearchParams(location.search).get('raw') === '1';
  const TOKEN_URL = new URL('demo/token', document.baseURI);
  const CALLS_URL = new URL('v1/realtime/calls', document.baseURI);
  const SESSION = {
    type: 'realtime',
    audio: { input: { turn_detection: { type: 'server_vad', create_response: true,
                                        interrupt_response: true } } },
    cascade: { timings: true },
  };
  const MAX_EVENTS = 200;
  const DROP_GRACE_MS = 3000;
  const RETRY_DELAYS_MS = [500, 1000, 2000, 4000, 8000, 8000];
  const ICE_WAIT_MS = 1500;
  const CONNECT_TIMEOUT_MS = 15000;
  const STATUS_TEXT = {
    idle: 'Not connected', connecting: 'Connecting…', connected: 'Connected',
    reconnecting: 'Reconnecting…', error: 'Error',
  };
  const STAGES = [
    ['endpoint_ms', 'End of turn', 'k-endpoint'],
    ['final_transcript_ms', 'Transcript', 'k-transcript'],
    ['llm_first_token_ms', 'First token', 'k-llm'],
    ['first_audio_ms', 'First audio', 'k-audio'],
  ];

  const demo = {
    state: 'idle', turns: [], events: [], session: { id: null, resumeToken: null },
    callId: null, remoteLevel: () => rms(media.remoteAnalyser),
  };
  window.cascadeDemo = demo;

  const media = { ctx: null, mic: null, micAnalyser: null, remoteAnalyser: null,
                  remoteSource: null, audio: null };
  let call = null;        // {pc, dc, key, id}
  let wanted = false;     // the user wants to be connected (false after hang-up)
  let dropTimer = null;
  let reconnectingIn = -1; // the generation whose reconnect loop runs, if any
  let attempts = 0;       // reconnect attempts since a channel last opened
  let connects = 0;       // connect/hang-up generation: a stale reconnect loop stops
  let meterRunning = false;
  let noticeTimer = null;
  const views = new Map(); // turn -> {user, assistant} <li> elements

  // ---------------------------------------------------------------- status and notices
  function setState(state, message) {
    demo.state = state;
    ui.status.dataset.state = state;
    ui.status.textContent = STATUS_TEXT[state];
    const live = state === 'connecting' || state === 'connected' || state === 'reconnecting';
    ui.connect.disabled = live;
    ui.hangup.disabled = !live;
    ui.mute.disabled = !media.mic;
    if (message !== undefined) notify(message, state === 'error' ? 'error' : 'info');
  }

  // A notice stays until replaced, or for hideAfterMs (server errors during a call).
  function notify(message, kind = 'error', hideAfterMs = 0) {
    clearTimeout(noticeTimer);
    if (message && hideAfterMs) noticeTimer = setTimeout(() => notify(''), hideAfterMs);
    ui.notice.textContent = message;
    ui.notice.dataset.kind = kind;
    ui.notice.hidden = !message;
  }

  class HttpError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }
  class HungUp extends Error {}  // the user hung up while a call was being set up

  async function failure(res) {
    let code = null, message = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      code = body.error?.code ?? null;
      message = body.error?.message ?? message;
    } catch { /* not JSON: keep the status line */ }
    return new HttpError(res.status, code, message);
  }

  // ---------------------------------------------------------------- connecting
  async function connect() {
    connects += 1;
    attempts = 0;
    wanted = true;
    notify('');
    setState('connecting');
    try {
      await openMic();
      await startCall(false);
    } catch (err) {
      const hungUp = !wanted || err instanceof HungUp;
      wanted = false;
      teardownCall();
      stopMic();
      if (hungUp) setState('idle'); else setState('error', err.message || String(err));
    }
  }

  async function openMic() {
    if (media.mic) return;
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error('The microphone needs a secure page: open it as http://localhost:<port>/ '
        + 'or over HTTPS.');
    }
    const processing = !RAW_MIC;
    const stream = await navigator.mediaDevices.getUserMedia({ audio: {
      echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing,
    } });
    media.mic = stream;
    media.ctx = media.ctx || new AudioContext();
    await media.ctx.resume();
    media.micAnalyser = analyserFor(stream);
    if (!meterRunning) { meterRunning = true; requestAnimationFrame(drawMeters); }
  }

  function stopMic() {
    media.mic?.getTracks().forEach((t) => t.stop());
    media.mic = null;
    media.micAnalyser = null;
    ui.mute.setAttribute('aria-pressed', 'false');
  }

  async function fetchKey() {
    const res = await fetch(TOKEN_URL, { method: 'POST', cache: 'no-store' });
    if (!res.ok) throw await failure(res);
    return (await res.json()).value;
  }

  async function startCall(resume) {
    const key = await fetchKey();
    if (!wanted) throw new HungUp();
    const pc = new RTCPeerConnection();
    const dc = pc.createDataChannel('oai-events');
    const current = { pc, dc, key, id: null, watchdog: null };
    call = current;
    current.watchdog = setTimeout(() => {
      if (call === current && dc.readyState !== 'open') connectionLost('the connection timed out');
    }, CONNECT_TIMEOUT_MS);
    const [track] = media.mic.getAudioTracks();
    pc.addTrack(track, media.mic);
    pc.ontrack = (e) => attachRemote(e.streams[0] || new MediaStream([e.track]));
    pc.onconnectionstatechange = () => onPeerState(current);
    dc.onopen = () => onChannelOpen(current);
    dc.onclose = () => { if (call === current) connectionLost('the data channel closed'); };
    dc.onmessage = (e) => onMessage(e.data);
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    const url = new URL(CALLS_URL);
    if (resume && demo.session.id && demo.session.resumeToken) {
      url.searchParams.set('session_id', demo.session.id);
      url.searchParams.set('resume_token', demo.session.resumeToken);
    }
    const res = await fetch(url, { method: 'POST', body: pc.localDescription.sdp,
      headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/sdp' } });
    if (!res.ok) throw await failure(res);
    current.id = (res.headers.get('Location') || '').split('/').pop() || null;
    if (call !== current) { closeCall(current); throw new HungUp(); }
    demo.callId = current.id;
    await pc.setRemoteDescription({ type: 'answer', sdp: await res.text() });
  }

  // The server does not trickle, so candidates gathered in time go in the offer; a
  // browser that gathers slowly still connects through peer-reflexive candidates.
  function iceGathered(pc) {
    if (pc.iceGatheringState === 'complete') return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ICE_WAIT_MS);
      pc.addEventListener('icegatheringstatechange', () => {
        if (pc.iceGatheringState === 'complete') { clearTimeout(timer); resolve(); }
      });
    });
  }

  function onChannelOpen(current) {
    if (call !== current) return;
    attempts = 0;
    send({ type: 'session.update', session: SESSION });
    setState('connected');
    notify('');
  }

  function onPeerState(current) {
    if (call !== current) return;
    const state = current.pc.connectionState;
    if (state === 'connected') {
      clearTimeout(dropTimer);
      dropTimer = null;
    } else if (state === 'failed') {
      connectionLost('the connection failed');
    } else if (state === 'disconnected' && dropTimer === null) {
      dropTimer = setTimeout(() => {
        dropTimer = null;
        if (call === current && current.pc.connectionState !== 'connected') {
          connectionLost('the connection dropped');
        }
      }, DROP_GRACE_MS);
    }
  }

  // Bounded retries with backoff (reset once a channel opens again); the same session
  // resumes, so the log just continues.
  async function connectionLost(reason) {
    const generation = connects;
    if (!wanted || reconnectingIn === generation) return;
    reconnectingIn = generation;
    setState('reconnecting', `Reconnecting: ${reason}.`);
    teardownCall();
    let resume = true;
    while (attempts < RETRY_DELAYS_MS.length) {
      await sleep(RETRY_DELAYS_MS[attempts++]);
      if (!wanted || generation !== connects) break;  // hung up (and maybe connected anew)
      try {
        await startCall(resume);
        reconnectingIn = -1;
        return;
      } catch (err) {
        teardownCall();
        if (['session_not_found', 'invalid_resume_token'].includes(err.code)) resume = false;
        notify(`Reconnecting: ${err.message || err}`, 'info');
      }
    }
    if (reconnectingIn === generation) reconnectingIn = -1;
    if (wanted && generation === connects) {
      wanted = false;
      stopMic();
      setState('error', 'Could not reconnect. Press Connect to start again.');
    }
  }

  function teardownCall() {
    const old = call;
    call = null;
    clearTimeout(dropTimer);
    dropTimer = null;
    if (old) closeCall(old);
  }

  function closeCall(old) {
    clearTimeout(old.watchdog);
    old.dc.onclose = old.dc.onmessage = old.dc.onopen = null;
    old.pc.onconnectionstatechange = old.pc.ontrack = null;
    old.pc.close();
    if (old.id) {  // tell the server now rather than waiting for its ICE timeout
      fetch(new URL(`${old.id}/hangup`, `${CALLS_URL}/`), { method: 'POST',
        headers: { Authorization: `Bearer ${old.key}` } }).catch(() => {});
    }
  }

  function hangup() {
    connects += 1;
    wanted = false;
    teardownCall();
    stopMic();
    setLive(null);
    setState('idle');
  }

  function toggleMute() {
    const track = media.mic?.getAudioTracks()[0];
    if (!track) return;
    track.enabled = !track.enabled;
    ui.mute.setAttribute('aria-pressed', String(!track.enabled));
    ui.mute.setAttribute('aria-label', track.enabled ? 'Mute microphone' : 'Unmute microphone');
    ui.mute.title = ui.mute.getAttribute('aria-label');
  }

  function send(event) {
    if (call?.dc.readyState === 'open') call.dc.send(JSON.stringify(event));
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ---------------------------------------------------------------- audio
  function attachRemote(stream) {
    if (!media.audio) {  // an element must play the stream, or WebAudio hears silence
      media.audio = new Audio();
      media.audio.autoplay = true;
      document.body.append(media.audio);
    }
    media.audio.srcObject = stream;
    media.audio.play().catch(() => {});
    media.remoteSource?.disconnect();
    media.remoteSource = media.ctx.createMediaStreamSource(stream);
    media.remoteAnalyser = media.ctx.createAnalyser();
    media.remoteAnalyser.fftSize = 1024;
    media.remoteSource.connect(media.remoteAnalyser);
  }

  function analyserFor(stream) {
    const analyser = media.ctx.createAnalyser();
    analyser.fftSize = 1024;
    media.ctx.createMediaStreamSource(stream).connect(analyser);
    return analyser;
  }

  function rms(analyser) {
    if (!analyser) return 0;
    const samples = new Float32Array(analyser.fftSize);
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    return Math.sqrt(sum / samples.length);
  }

  // dBFS -60..0 mapped to 0..1: speech shows as a lively bar, silence as none.
  const loudness = (level) => Math.max(0, Math.min(1, (20 * Math.log10(level + 1e-9) + 60) / 60));

  function drawMeters() {
    if (!media.mic) {
      ui.micLevel.style.transform = 'scaleX(0)';
      ui.agent.dataset.speaking = 'false';
      meterRunning = false;
      return;
    }
    const track = media.mic.getAudioTracks()[0];
    const mic = track?.enabled ? loudness(rms(media.micAnalyser)) : 0;
    ui.micLevel.style.transform = `scaleX(${mic.toFixed(3)})`;
    ui.micMeter.setAttribute('aria-valuenow', String(Math.round(mic * 100)));
    const agent = loudness(demo.remoteLevel());
    ui.agent.dataset.speaking = String(agent > 0.25);
    ui.agent.style.setProperty('--level', agent.toFixed(3));
    requestAnimationFrame(drawMeters);
  }

  // ---------------------------------------------------------------- server events
  function onMessage(data) {
    let event;
    try { event = JSON.parse(data); } catch { return; }
    demo.events.push(event.type);
    if (demo.events.length > MAX_EVENTS) demo.events.shift();
    const handler = HANDLERS[event.type];
    if (handler) handler(event);
  }

  const HANDLERS = {
    'session.created': (e) => {
      demo.session.id = e.session.id;
      demo.session.resumeToken = e.session.cascade?.resume_token ?? demo.session.resumeToken;
    },
    'input_audio_buffer.speech_started': (e) => { userTurn(e.item_id); setLive(''); },
    'conversation.item.input_audio_transcription.delta': (e) => {
      const turn = userTurn(e.item_id);
      turn.user += e.delta;
      setLive(turn.user);
    },
    'conversation.item.input_audio_transcription.completed': (e) => {
      const turn = userTurn(e.item_id);
      turn.user = e.transcript.trim();
      turn.userFinal = true;
      setLive(null);
      renderUser(turn);
    },
    'conversation.item.input_audio_transcription.failed': (e) => {
      const turn = userTurn(e.item_id);
      turn.userFinal = true;
      setLive(null);
      renderUser(turn, 'Could not transcribe this turn.');
    },
    'response.created': (e) => {
      const open = demo.turns.findLast((t) => !t.responseId);
      const turn = open && open === demo.turns.at(-1) ? open : newTurn(null);
      turn.responseId = e.response.id;
    },
    'response.output_item.added': (e) => {
      const turn = byResponse(e.response_id);
      if (turn && e.item.type === 'message' && !turn.assistantItemId) {
        turn.assistantItemId = e.item.id;
        renderAssistant(turn);
      }
    },
    'response.output_audio_transcript.delta': (e) => assistantDelta(e),
    'response.output_text.delta': (e) => assistantDelta(e),
    'response.output_audio_transcript.done': (e) => assistantFinal(e.item_id, e.transcript),
    'response.output_text.done': (e) => assistantFinal(e.item_id, e.text),
    'conversation.item.truncated': (e) => interrupted(byItem(e.item_id)),
    'output_audio_buffer.cleared': (e) => interrupted(byResponse(e.response_id)),
    'response.done': (e) => {
      const turn = byResponse(e.response.id);
      if (!turn) return;
      const message = (e.response.output || []).find((item) => item.id === turn.assistantItemId);
      const part = message?.content?.[0];
      if (part) assistantFinal(message.id, part.transcript ?? part.text ?? turn.assistant);
      if (e.response.status === 'failed') {
        notify(e.response.status_details?.error?.message || 'The response failed.');
      }
    },
    'cascade.turn.timings': (e) => {
      const turn = byResponse(e.response_id);
      if (turn) { turn.timings = e; renderLatency(); renderAssistant(turn); }
    },
    error: (e) => notify(e.error?.message || 'The server reported an error.', 'error', 8000),
  };

  // ---------------------------------------------------------------- turns
  function newTurn(userItemId) {
    const turn = { userItemId, user: '', userFinal: userItemId === null, responseId: null,
                   assistantItemId: null, assistant: '', timings: null, interrupted: false };
    demo.turns.push(turn);
    views.set(turn, {});
    return turn;
  }

  const userTurn = (id) => demo.turns.find((t) => t.userItemId === id) || newTurn(id);
  const byResponse = (id) => demo.turns.find((t) => t.responseId === id);
  const byItem = (id) => demo.turns.find((t) => t.assistantItemId === id);

  function assistantDelta(e) {
    const turn = byItem(e.item_id);
    if (!turn) return;
    turn.assistant += e.delta;
    renderAssistant(turn);
  }

  function assistantFinal(itemId, text) {
    const turn = byItem(itemId);
    if (!turn || typeof text !== 'string') return;
    turn.assistant = text;  // after a barge-in: only what was heard
    renderAssistant(turn);
  }

  function interrupted(turn) {
    if (!turn || turn.interrupted) return;
    turn.interrupted = true;
    renderAssistant(turn);
  }

  // ---------------------------------------------------------------- rendering
  function setLive(text) {
    ui.userLive.dataset.active = String(text !== null);
    ui.userLive.textContent = text === null ? '' : (text || 'Listening…');
  }

  function bubble(turn, role) {
    const view = views.get(turn);
    if (!view[role]) {
      const li = document.createElement('li');
      li.className = `msg ${role}`;
      const who = document.createElement('span');
      who.className = 'who';
      who.textContent = role === 'user' ? 'You' : 'Assistant';
      const text = document.createElement('p');
      text.className = 'text';
      const meta = document.createElement('span');
      meta.className = 'meta';
      li.append(who, text, meta);
      insertInOrder(turn, role, li);
      view[role] = li;
      ui.empty.hidden = true;
    }
    return view[role];
  }

  // The user's bubble goes before its reply even when the transcript completes later.
  function insertInOrder(turn, role, li) {
    const view = views.get(turn);
    if (role === 'user' && view.assistant) { view.assistant.before(li); return; }
    const later = demo.turns.slice(demo.turns.indexOf(turn) + 1)
      .map((t) => views.get(t)).map((v) => v && (v.user || v.assistant)).find(Boolean);
    if (later) later.before(li); else ui.log.append(li);
  }

  function renderUser(turn, problem) {
    if (!turn.user && !problem) {  // noise with no words: no bubble
      views.get(turn).user?.remove();
      views.get(turn).user = undefined;
      return;
    }
    const li = bubble(turn, 'user');
    li.dataset.itemId = turn.userItemId;
    li.querySelector('.text').textContent = turn.user || problem;
    li.dataset.failed = String(!turn.user);
    scrollDown();
  }

  function renderAssistant(turn) {
    const li = bubble(turn, 'assistant');
    li.dataset.itemId = turn.assistantItemId || '';
    li.dataset.interrupted = String(turn.interrupted);
    const text = turn.assistant || (turn.interrupted ? '(interrupted before speaking)' : '…');
    li.querySelector('.text').textContent = text;
    const meta = [];
    if (turn.interrupted) meta.push('interrupted');
    const v2v = turn.timings?.first_audio_ms;
    if (Number.isFinite(v2v)) meta.push(`${Math.round(v2v)} ms`);
    li.querySelector('.meta').textContent = meta.join(' · ');
    scrollDown();
  }

  function scrollDown() {
    const s = ui.scroller;
    if (s.scrollHeight - s.scrollTop - s.clientHeight < 160) s.scrollTop = s.scrollHeight;
  }

  // Each turn's stage marks as bars from the end of the user's speech, on one scale.
  function renderLatency() {
    const timed = demo.turns.filter((t) => t.timings).slice(-6);
    const last = timed.at(-1)?.timings.first_audio_ms;
    ui.v2v.textContent = Number.isFinite(last) ? String(Math.round(last)) : '–';
    ui.v2v.dataset.ms = Number.isFinite(last) ? String(Math.round(last)) : '';
    const marks = timed.flatMap((t) => STAGES.map(([key]) => t.timings[key]))
      .filter(Number.isFinite);
    const scale = Math.max(500, ...marks);
    ui.latency.replaceChildren(...timed.reverse().map((t) => latencyRow(t, scale)));
  }

  function latencyRow(turn, scale) {
    const li = document.createElement('li');
    li.className = 'turn-latency';
    li.dataset.responseId = turn.responseId;
    const head = document.createElement('p');
    const v2v = turn.timings.first_audio_ms;
    head.textContent = `Turn ${demo.turns.indexOf(turn) + 1}`;
    const total = document.createElement('strong');
    total.textContent = Number.isFinite(v2v) ? `${Math.round(v2v)} ms` : '–';
    head.append(total);
    li.append(head);
    for (const [key, label, cls] of STAGES) {
      const ms = turn.timings[key];
      const row = document.createElement('div');
      row.className = 'stage';
      row.title = `${label}: ${Number.isFinite(ms) ? Math.round(ms) + ' ms' : 'n/a'}`;
      const bar = document.createElement('i');
      bar.className = cls;
      bar.style.width = `${Number.isFinite(ms) ? Math.max(0, ms) / scale * 100 : 0}%`;
      row.append(bar);
      li.append(row);
    }
    return li;
  }

  ui.connect.addEventListener('click', connect);
  ui.hangup.addEventListener('click', hangup);
  ui.mute.addEventListener('click', toggleMute);
  ui.notice.addEventListener('click', () => notify(''));
  setState('idle');
})();
