"""The technician's self-test: hardware, line, storage, clock and network checks.

Each check is a small unit in this package (its catalogue, thresholds and hints are written
down for technicians in ``hw-tests/``). :func:`run_selftest` runs them and returns a typed
:class:`SelftestResult`; ``appliance selftest`` prints it, keeps the last one on disk and walks
the technician through the steps that need their hands (the loopback test plug).
"""

from appliance.selftest.model import CheckResult, SelftestResult, Verdict
from appliance.selftest.runner import CHECKS, check_names, run_selftest, run_unattended
from appliance.selftest.store import last_result_path, load_last_result

__all__ = [
    "CHECKS",
    "CheckResult",
    "SelftestResult",
    "Verdict",
    "check_names",
    "last_result_path",
    "load_last_result",
    "run_selftest",
    "run_unattended",
]
