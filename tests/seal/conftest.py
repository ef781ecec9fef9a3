"""Fixtures for the sealed-segment tests: keys, identities and small chains."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from linerec_contract.identity import DeviceKey, generate_age_identity
from linerec_contract.segment import SealedSegment, seal_segment

from .helpers import DEVICE, make_input, speechish


@pytest.fixture(scope="session")
def device_key() -> DeviceKey:
    return DeviceKey.generate()


@pytest.fixture(scope="session")
def age_pair() -> tuple[str, str]:
    return generate_age_identity()


@pytest.fixture(scope="session")
def age_pair2() -> tuple[str, str]:
    return generate_age_identity()


ChainMaker = Callable[..., list[SealedSegment]]


@pytest.fixture()
def make_chain(device_key: DeviceKey, age_pair: tuple[str, str]) -> ChainMaker:
    """Seal ``n`` linked segments (zstd-pcm, tiny) for chain tests."""

    def build(n: int, key: DeviceKey | None = None, device: str = DEVICE) -> list[SealedSegment]:
        out: list[SealedSegment] = []
        prev: str | None = None
        for seq in range(n):
            seg = seal_segment(
                make_input(speechish(0.01, seed=seq), part=seq, call_id="call-x"),
                device_id=device, seq=seq, prev_manifest_sha256=prev, recipients=[age_pair[1]],
                key=key or device_key, codec="zstd-pcm",
            )
            out.append(seg)
            prev = seg.manifest_sha256
        return out

    return build
