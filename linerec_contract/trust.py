"""Which key may sign segment N of device D: the one trust policy of intake, index, export and audit.

A device's keys come from two sources:

* **enrolled** keys: what an operator enrolled for the device at central (the current key and
  keys it replaced with ``enroll --replace``, kept so older segments still verify);
* **rotations** the box announced itself: a manifest at seq ``s``, signed by a key trusted at
  ``s``, may carry ``next_signing_key``. From seq ``s + 1`` on the announced key may sign, and
  the announcing key is *retired*: its signatures after ``s`` are refused, enrolled or not
  (a box whose old key leaked must not be impersonated with it after rotating).

Keys are bound to their device: a key trusted for device A is never trusted for device B, even
when both records sit in the same home. Nothing here reads files; central keeps the rotations
it has learnt in the device's enrolment record, the audit learns them again from the chain.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from linerec_contract.errors import VerificationError
from linerec_contract.identity import key_id_for_public


class UntrustedKey(VerificationError):
    """The key a segment names may not sign that segment (unknown, foreign or retired)."""


@dataclass(frozen=True)
class Rotation:
    """A key rotation the box announced in its verified segment ``at_seq``."""

    at_seq: int
    new_key_id: str
    new_public_b64: str
    old_key_id: str  # the key that signed the announcing segment, retired after ``at_seq``

    def to_record(self) -> list[Any]:
        return [self.new_key_id, self.new_public_b64, self.at_seq, self.old_key_id]

    @classmethod
    def from_record(cls, record: Any) -> Rotation:
        """The inverse of :meth:`to_record` (ValueError/TypeError when malformed)."""
        new_key_id, public_b64, at_seq, old_key_id = record
        if not isinstance(at_seq, int) or isinstance(at_seq, bool) or at_seq < 0:
            raise ValueError(f"rotation seq must be a non-negative integer, got {at_seq!r}")
        if key_id_for_public(str(public_b64)) != new_key_id:
            raise ValueError(f"rotation key id {new_key_id!r} does not match its public key")
        return cls(at_seq, str(new_key_id), str(public_b64), str(old_key_id))


@dataclass(frozen=True)
class DeviceTrust:
    """The keys that may sign one device's segments, and from which seq on."""

    device_id: str
    enrolled: tuple[tuple[str, str], ...]  # (key_id, public_b64), operator-enrolled
    rotations: tuple[Rotation, ...] = ()

    @classmethod
    def of_keys(cls, device_id: str, public_keys: Iterable[str]) -> DeviceTrust:
        """Trust for ``device_id`` with these enrolled public keys (base64) and no rotation."""
        return cls(device_id, tuple((key_id_for_public(p), p) for p in public_keys))

    def public_key(self, key_id: str, seq: int) -> str:
        """The public key that may sign segment ``seq`` as ``key_id``; :class:`UntrustedKey`
        with a one-line reason otherwise."""
        enrolled = dict(self.enrolled)
        public = enrolled.get(key_id)
        retired_at: int | None = None
        # The latest rotation before ``seq`` that concerns this key decides.
        for rot in sorted(self.rotations, key=lambda r: r.at_seq):
            if rot.at_seq >= seq:
                break
            if rot.new_key_id == key_id:
                public, retired_at = rot.new_public_b64, None
            elif rot.old_key_id == key_id:
                public, retired_at = None, rot.at_seq
        if public is not None:
            return public
        if retired_at is not None:
            raise UntrustedKey(
                f"key {key_id} of {self.device_id} was retired by the rotation announced at seq "
                f"{retired_at}; it may not sign seq {seq}"
            )
        later = [r.at_seq for r in self.rotations if r.new_key_id == key_id]
        if later:
            raise UntrustedKey(
                f"key {key_id} of {self.device_id} was announced at seq {min(later)}; it may "
                f"sign only later segments, not seq {seq}"
            )
        raise UntrustedKey(f"key {key_id} is not a trusted key of device {self.device_id}")

    def may_sign(self, key_id: str, seq: int) -> bool:
        try:
            self.public_key(key_id, seq)
        except UntrustedKey:
            return False
        return True

    def announcement(self, manifest: dict[str, Any]) -> Rotation | None:
        """The rotation a verified manifest of this device announces, None if none (or known)."""
        nxt = manifest.get("next_signing_key")
        if not isinstance(nxt, dict):
            return None
        seq, old = int(manifest["seq"]), str(manifest["signing_key_id"])
        rot = Rotation(seq, str(nxt["key_id"]), str(nxt["public_b64"]), old)
        if rot.new_key_id == old or rot in self.rotations:
            return None
        return rot

    def with_rotation(self, rot: Rotation) -> DeviceTrust:
        if rot in self.rotations:
            return self
        return replace(self, rotations=(*self.rotations, rot))
