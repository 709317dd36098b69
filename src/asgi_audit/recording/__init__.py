"""The recording room: from a finished exchange to the local spool.

Owns the hand-off protocol (``Recorder``, ``MemoryRecorder``), the spool writer thread
(``SpoolRecorder``), redaction steps, the spool's segments, locks and checkpoints, the
batch frames, and how bodies are packed (zstd when it pays).

May import the capture room (the records it is handed, the settings' types) and the
shared modules; never shipping, sinks or the CLI.
"""
