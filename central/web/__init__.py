"""Central's web application for QA and compliance: search, listen, export with proof, access log."""
