"""Ring journal tests."""
