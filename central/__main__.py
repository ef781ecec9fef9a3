"""``python -m central``: the same as the ``appliance-central`` command."""

from central.cli import main

raise SystemExit(main())
