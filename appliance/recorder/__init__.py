"""The recorder: per-line call detection and segmenting of the ring's audio into calls."""
