"""Central side: receiver, archive store, index and the tools central IT uses."""
