"""``appliance verify SEGMENT...``: signatures, payload hashes and chain continuity on the box."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from linerec_contract.errors import FormatError, VerificationError


def verify_command(paths: list[Path], public_b64: str, *, as_json: bool) -> int:
    from linerec_contract.segment import SealedSegment, decode_wire
    from linerec_contract.trust import DeviceTrust
    from linerec_contract.verify import audit_chain, verify_segment

    results: list[dict[str, Any]] = []
    good: list[SealedSegment] = []
    for path in paths:
        try:
            seg = decode_wire(path.read_bytes())
            verify_segment(seg, public_b64)
        except OSError as err:
            results.append({"file": str(path), "ok": False, "error": f"cannot read: {err.strerror}"})
            continue
        except (FormatError, VerificationError) as err:
            results.append({"file": str(path), "ok": False, "error": str(err)})
            continue
        good.append(seg)
        results.append({"file": str(path), "ok": True, "seq": seg.seq})
    # The key given is trusted for the devices of the segments it verified, each on its own.
    trust = {s.device_id: DeviceTrust.of_keys(s.device_id, [public_b64]) for s in good}
    issues = audit_chain(good, trust)
    ok = all(r["ok"] for r in results) and not issues
    if as_json:
        print(json.dumps({"ok": ok, "segments": results,
                          "chain": [i.__dict__ for i in issues]}, indent=2))
    else:
        for r in results:
            print(f"{'OK  ' if r['ok'] else 'FAIL'} {r['file']}  "
                  f"{('seq ' + str(r['seq'])) if r['ok'] else r['error']}")
        for issue in issues:
            print(f"CHAIN {issue.kind} at seq {issue.seq}: {issue.detail}")
        print("all segments verified" if ok else "verification FAILED")
    return 0 if ok else 1
