"""Audio sources and signal processing: capture, line simulator, levels, DTMF."""
