"""Fixtures for the central tests: a central home, an enrolled box, and sealed calls."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from central.home import Home, init_home
from linerec_contract.identity import DeviceKey

from .central_helpers import DEVICE, Box


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    return init_home(tmp_path / "central")


@pytest.fixture(scope="session")
def box_key() -> DeviceKey:
    return DeviceKey.generate()


@pytest.fixture()
def box(home: Home, box_key: DeviceKey) -> Box:
    """Box ``box-1``, enrolled at ``home`` and encrypting to its archive key."""
    home.enroll(DEVICE, box_key.public_b64)
    return Box(DEVICE, box_key, home.recipients())


BoxFactory = Callable[[str], Box]


@pytest.fixture()
def make_box(home: Home) -> BoxFactory:
    def build(device_id: str) -> Box:
        key = DeviceKey.generate()
        home.enroll(device_id, key.public_b64)
        return Box(device_id, key, home.recipients())

    return build


from .pg_server import pg_dsn, pg_server  # noqa: E402, F401 - fixtures for the index tests
from .s3_server import s3_server  # noqa: E402, F401 - the S3 stand-in (moto's server mode)
