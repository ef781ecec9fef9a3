"""Edge call-recording appliance: capture -> ring journal -> recorder -> sealer -> outbox -> uplink."""

__version__ = "0.1.0"
