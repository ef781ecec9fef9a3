from __future__ import annotations

import dataclasses
import random

from linerec_contract.identity import DeviceKey
from linerec_contract.segment import SealedSegment, seal_segment
from linerec_contract.trust import DeviceTrust
from linerec_contract.verify import ChainIssue, audit_chain

from .conftest import ChainMaker
from .helpers import DEVICE, make_input, speechish

AgePair = tuple[str, str]


def _trust(key: DeviceKey, device: str = DEVICE) -> dict[str, DeviceTrust]:
    """``device`` trusts exactly ``key`` (enrolled), as central's enrolment record says."""
    return {device: DeviceTrust.of_keys(device, [key.public_b64])}


def _kinds(issues: list[ChainIssue]) -> list[tuple[str, int]]:
    return [(i.kind, i.seq) for i in issues]


def _reseal(seg: SealedSegment, key: DeviceKey, recipient: str, **over: object) -> SealedSegment:
    """Seal a segment at ``seg``'s position with different fields (prev, key, content...)."""
    args: dict[str, object] = {
        "device_id": seg.device_id, "seq": seg.seq,
        "prev_manifest_sha256": seg.manifest["prev_manifest_sha256"],
        "recipients": [recipient], "key": key, "codec": "zstd-pcm",
    }
    inp = make_input(speechish(0.01, seed=99), part=seg.manifest["part"],
                     call_id=str(over.pop("call_id", "call-x")),
                     gaps=over.pop("gaps", []))
    args.update(over)
    return seal_segment(inp, **args)  # type: ignore[arg-type]


def test_clean_chain_in_any_order(make_chain: ChainMaker, device_key: DeviceKey) -> None:
    chain = make_chain(6)
    shuffled = chain[:]
    random.Random(1).shuffle(shuffled)
    assert audit_chain(shuffled, _trust(device_key)) == []


def test_removed_segment_is_a_gap(make_chain: ChainMaker, device_key: DeviceKey) -> None:
    chain = make_chain(6)
    issues = audit_chain(chain[:2] + chain[4:], _trust(device_key))
    assert _kinds(issues) == [("gap", 2)]
    assert "2..3" in issues[0].detail and "not announced" in issues[0].detail


def test_gap_reason_announced_later(make_chain: ChainMaker, device_key: DeviceKey,
                                    age_pair: AgePair) -> None:
    chain = make_chain(3)
    announced = _reseal(chain[2], device_key, age_pair[1], seq=3,
                        gaps=[{"reason": "outbox-full", "lost_seq": [2, 2], "frames": 80}],
                        prev_manifest_sha256="0" * 64)
    issues = audit_chain(chain[:2] + [announced], _trust(device_key))
    assert _kinds(issues) == [("gap", 2)] and "outbox-full" in issues[0].detail


def test_leading_gap_and_window(make_chain: ChainMaker, device_key: DeviceKey) -> None:
    keys = _trust(device_key)
    chain = make_chain(5)
    assert _kinds(audit_chain(chain[2:], keys)) == [("gap", 0)]
    assert audit_chain(chain[2:], keys, start_seq=None) == []


def test_replay_of_old_segment(make_chain: ChainMaker, device_key: DeviceKey) -> None:
    chain = make_chain(5)
    issues = audit_chain(chain + [chain[1]], _trust(device_key))
    assert _kinds(issues) == [("replay", 1)]


def test_conflicting_duplicate(make_chain: ChainMaker, device_key: DeviceKey,
                               age_pair: AgePair) -> None:
    chain = make_chain(5)
    other = _reseal(chain[3], device_key, age_pair[1], call_id="call-y")
    issues = audit_chain(chain + [other], _trust(device_key))
    assert ("duplicate", 3) in _kinds(issues)


def test_link_to_wrong_position_is_reordered(make_chain: ChainMaker, device_key: DeviceKey,
                                             age_pair: AgePair) -> None:
    chain = make_chain(5)
    swapped = _reseal(chain[3], device_key, age_pair[1],
                      prev_manifest_sha256=chain[1].manifest_sha256)
    issues = audit_chain(chain[:3] + [swapped], _trust(device_key))
    assert _kinds(issues) == [("reordered", 3)] and "seq 1" in issues[0].detail


def test_broken_link(make_chain: ChainMaker, device_key: DeviceKey, age_pair: AgePair) -> None:
    chain = make_chain(5)
    broken = _reseal(chain[3], device_key, age_pair[1], prev_manifest_sha256="ab" * 32)
    issues = audit_chain(chain[:3] + [broken] + chain[4:],
                         _trust(device_key))
    # seq 3 links nowhere; seq 4 links to the original seq 3, which is not present
    assert _kinds(issues) == [("bad-link", 3), ("bad-link", 4)]


def test_other_boxes_key_is_bad_signature(make_chain: ChainMaker, device_key: DeviceKey,
                                          age_pair: AgePair) -> None:
    chain = make_chain(5)
    intruder = DeviceKey.generate()
    forged = _reseal(chain[2], intruder, age_pair[1])
    keys = _trust(device_key)
    issues = audit_chain(chain[:2] + [forged] + chain[3:], keys)
    assert ("bad-signature", 2) in _kinds(issues) and ("gap", 2) in _kinds(issues)
    # even when central also knows the intruder's key under its own id, a lie about the
    # signing key id cannot pass
    lie = dataclasses.replace(forged, manifest=dict(forged.manifest,
                                                    signing_key_id=device_key.key_id))
    assert ("bad-signature", 2) in _kinds(audit_chain(chain[:2] + [lie] + chain[3:], keys))


def test_tampered_manifest_and_payload(make_chain: ChainMaker, device_key: DeviceKey) -> None:
    chain = make_chain(4)
    keys = _trust(device_key)
    edited = dataclasses.replace(chain[1], manifest=dict(chain[1].manifest, line="line-9"))
    assert ("bad-signature", 1) in _kinds(audit_chain([chain[0], edited, *chain[2:]], keys))
    damaged = dataclasses.replace(chain[2], payload=chain[2].payload[:-1] + b"\x00")
    assert _kinds(audit_chain([*chain[:2], damaged, chain[3]], keys)) == [("bad-hash", 2)]


def test_key_rotation(device_key: DeviceKey, age_pair: AgePair) -> None:
    new = DeviceKey.generate()
    keys = _trust(device_key)
    segs: list[SealedSegment] = []
    prev: str | None = None
    for seq in range(5):
        key = device_key if seq <= 2 else new
        seg = seal_segment(make_input(speechish(0.01), part=seq), device_id=DEVICE, seq=seq,
                           prev_manifest_sha256=prev, recipients=[age_pair[1]], key=key,
                           codec="zstd-pcm", next_key=new if seq == 2 else None)
        segs.append(seg)
        prev = seg.manifest_sha256
    assert audit_chain(segs, keys) == []
    # without the announcing segment the new key is unknown
    assert ("bad-signature", 3) in _kinds(audit_chain(segs[:2] + segs[3:], keys))
    # the retired key may not sign after the rotation
    late_old = _reseal(segs[4], device_key, age_pair[1])
    issues = audit_chain(segs[:4] + [late_old], keys)
    assert ("bad-signature", 4) in _kinds(issues) and "retired" in issues[-1].detail
    # the announced key may not sign at or before the announcing seq
    early_new = _reseal(segs[1], new, age_pair[1])
    assert ("bad-signature", 1) in _kinds(audit_chain([segs[0], early_new, *segs[2:]], keys))


def test_devices_are_audited_separately(make_chain: ChainMaker, device_key: DeviceKey) -> None:
    other = DeviceKey.generate()
    a = make_chain(3)
    b = make_chain(3, key=other, device="box-0002")
    keys = {**_trust(device_key), **_trust(other, "box-0002")}
    assert audit_chain(a + b, keys) == []
    issues = audit_chain(a + b[1:], keys)
    assert _kinds(issues) == [("gap", 0)] and "box-0002" in issues[0].detail


def test_a_key_never_vouches_for_another_device(make_chain: ChainMaker,
                                                device_key: DeviceKey) -> None:
    """Both devices are enrolled, each with its own key: box-0002's key signing a segment of
    box-0001 is refused (keys are not pooled across devices)."""
    other = DeviceKey.generate()
    a = make_chain(3)
    b = make_chain(3, key=other, device="box-0002")
    keys = {**_trust(device_key), **_trust(other, "box-0002")}
    forged_a = make_chain(3, key=other)  # box-0001's chain, signed with box-0002's key
    issues = audit_chain(a[:1] + forged_a[1:2] + a[2:] + b, keys)
    assert ("bad-signature", 1) in _kinds(issues)
    assert "not a trusted key of device box-0001" in issues[0].detail or any(
        "not a trusted key of device box-0001" in i.detail for i in issues)
    # and a device that is not in the trust map has no key at all
    assert _kinds(audit_chain(b, _trust(device_key))) == [
        ("bad-signature", 0), ("bad-signature", 1), ("bad-signature", 2)]
