// What cascade's real-browser tests load into a page: the official OpenAI Agents SDK
// (realtime), unmodified, and one scenario that drives it the way an application does.
//
// window.agentsRealtime     the SDK's classes (RealtimeAgent, RealtimeSession,
//                           OpenAIRealtimeWebRTC) and the bundled version
// window.cascadeAgentsTest  run(config): connect with an ephemeral key, let the fake
//                           microphone speak one turn, wait for the spoken reply, report
//
// The page does not measure what it hears itself: the test injects a probe (see
// tests/support/browser.py) that taps every RTCPeerConnection's remote audio.
import {
  OpenAIRealtimeWebRTC,
  RealtimeAgent,
  RealtimeSession,
} from '@openai/agents-realtime';

// Replaced at build time with the version found in node_modules (build.mjs).
// eslint-disable-next-line no-undef
const version = __AGENTS_REALTIME_VERSION__;

window.agentsRealtime = { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession, version };

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function describe(error) {
  if (error instanceof Error) return `${error.name}: ${error.message}`;
  try {
    return JSON.stringify(error);
  } catch {
    return String(error);
  }
}

// A history item as plain JSON: role, status and the text of each content part.
function flatItem(item) {
  const parts = (item.content ?? []).map((part) => ({
    type: part.type,
    text: part.text ?? part.transcript ?? null,
  }));
  return { itemId: item.itemId, type: item.type, role: item.role ?? null,
    status: item.status ?? null, content: parts };
}

/**
 * One spoken turn through the SDK, as an application holds it:
 *   config.apiKey        an ek_ key its backend minted (POST /v1/realtime/client_secrets)
 *   config.url           the server's /v1/realtime/calls URL
 *   config.instructions  the agent's instructions
 *   config.timeoutMs     how long to wait for the reply to finish after connecting
 *   config.speechTimeoutMs  give up sooner when the server has not heard speech by then
 * Resolves with what happened (never rejects: failures are in `errors`).
 */
async function run(config) {
  // Times are the page's performance.now() in ms, the probe's clock too.
  const now = () => Math.round(performance.now());
  const marks = {};
  const mark = (name) => {
    if (!(name in marks)) marks[name] = now();
  };
  const events = [];
  const errors = [];
  const transcripts = { user: [], assistant: {} };
  let history = [];
  let audioStopped = false;
  let responseDone = false;

  const audioElement = document.createElement('audio');
  audioElement.autoplay = true;
  document.body.append(audioElement);

  const agent = new RealtimeAgent({ name: 'Cascade browser test', instructions: config.instructions });
  const transport = new OpenAIRealtimeWebRTC({ audioElement });
  const session = new RealtimeSession(agent, { transport });

  session.on('transport_event', (event) => {
    const t = now();
    events.push([t, event.type]);
    mark(`event:${event.type}`);
    if (event.type === 'conversation.item.input_audio_transcription.completed') {
      transcripts.user.push(event.transcript);
    } else if (event.type === 'response.output_audio_transcript.delta') {
      transcripts.assistant[event.item_id] = (transcripts.assistant[event.item_id] ?? '')
        + event.delta;
    } else if (event.type === 'response.done') {
      responseDone = true;
    } else if (event.type === 'output_audio_buffer.stopped') {
      audioStopped = true;
    } else if (event.type === 'error') {
      errors.push(`server error event: ${JSON.stringify(event.error ?? event)}`);
    }
  });
  session.on('history_updated', (items) => {
    history = items.map(flatItem);
  });
  session.on('error', (error) => {
    errors.push(`session error: ${describe(error.error ?? error)}`);
  });

  mark('connect_start');
  try {
    await session.connect({ apiKey: config.apiKey, url: config.url });
    mark('connected');
  } catch (error) {
    errors.push(`connect failed: ${describe(error)}`);
  }
  const callId = transport.callId ?? null;
  if ('connected' in marks) {
    const connected = performance.now();
    const deadline = connected + config.timeoutMs;
    const speechDeadline = connected + (config.speechTimeoutMs ?? config.timeoutMs);
    while (!(responseDone && audioStopped) && performance.now() < deadline) {
      if (!('event:input_audio_buffer.speech_started' in marks)
          && performance.now() > speechDeadline) {
        errors.push(`the server reported no speech within ${config.speechTimeoutMs} ms`);
        break;
      }
      await sleep(50);
    }
    // The history is completed by conversation.item.retrieve round trips; give them a moment.
    await sleep(300);
    mark('finished');
  }
  const status = transport.status;
  try {
    session.close();
  } catch (error) {
    errors.push(`close failed: ${describe(error)}`);
  }
  return {
    version, callId, status, marks, events, errors, transcripts, history,
    responseDone, audioStopped,
  };
}

window.cascadeAgentsTest = { run };
