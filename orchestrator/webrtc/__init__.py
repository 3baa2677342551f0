"""WebRTC transport (OpenAI Realtime over WebRTC): signalling routes, one peer connection
per call, and the media adapters that plug a call into the transport-independent session
core (``orchestrator.realtime.RealtimeSession``)."""
