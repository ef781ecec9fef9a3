"""The shipped broker configuration (``broker_conf/``) and how to fill it in.

Box and central agree on the broker's rules as they agree on the topics: ``mosquitto.conf.in``
(mutual TLS; certificate CN = user name = client id; CRL; packet bound), ``mosquitto.acl``
(each box confined to its own subtree, in each topic's direction) and ``fleet_acl.c``, the
mosquitto plugin refusing subscriptions a box has no business making (anything outside its
subtree, every ``$share/...`` filter). The box's private broker (``appliance.sync.broker``) and
central's ``appliance-central fleet broker-config`` both render them from here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from linerec_contract.errors import DependencyError
from linerec_contract.protocol import MAX_PACKET_BYTES, TOPIC_ROOT

CONF_DIR = Path(__file__).parent / "broker_conf"
CONF_TEMPLATE = CONF_DIR / "mosquitto.conf.in"
ACL_FILE = CONF_DIR / "mosquitto.acl"
PLUGIN_SOURCE = CONF_DIR / "fleet_acl.c"
PLUGIN_ENV = "APPLIANCE_FLEET_ACL_PLUGIN"
CENTRAL_PREFIX = "central-*"


def plugin_path() -> Path:
    """The compiled ``fleet_acl`` plugin: ``$APPLIANCE_FLEET_ACL_PLUGIN``, or built once from
    the shipped source with the C compiler and mosquitto's plugin headers, cached per user."""
    override = os.environ.get(PLUGIN_ENV)
    if override:
        if not os.path.isfile(override):
            raise DependencyError(f"{PLUGIN_ENV}={override} does not exist (the compiled "
                                  f"fleet_acl plugin, a .so file)")
        return Path(override)
    source = PLUGIN_SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "line-recorder"
    target = cache / f"fleet_acl-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise DependencyError("cannot build the broker's fleet_acl plugin: no C compiler "
                              "(apt-get install gcc mosquitto-dev libmosquitto-dev)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{target.name}.{os.getpid()}.tmp"
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(PLUGIN_SOURCE)],
        capture_output=True, text=True, check=False)
    if built.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = (built.stderr.strip().splitlines() or ["no output"])[0]
        raise DependencyError(f"cannot build the broker's fleet_acl plugin ({first}): install "
                              f"mosquitto-dev and libmosquitto-dev")
    os.replace(tmp, target)  # a cache: rebuilt when missing, so no fsync is needed
    return target


def render_acl(central_users: tuple[str, ...]) -> str:
    """The shipped ACL, with a ``user`` block for every named central user beyond ``central``
    (prefixes such as ``central-*`` are granted by the fleet_acl plugin)."""
    text = ACL_FILE.read_text()
    for user in central_users:
        if not user.endswith("*") and f"\nuser {user}\n" not in text:
            text += f"\nuser {user}\ntopic readwrite {TOPIC_ROOT}/#\n"
    return text


def render_config(*, port: int, host: str, ca: Path, cert: Path, key: Path, crl: Path,
                  acl: Path, plugin: Path, central_users: tuple[str, ...]) -> str:
    """The shipped ``mosquitto.conf.in`` with its placeholders filled in."""
    values = {
        "PORT": str(port), "HOST": host, "CA_FILE": str(ca), "CERT_FILE": str(cert),
        "KEY_FILE": str(key), "CRL_FILE": str(crl), "ACL_FILE": str(acl),
        "PLUGIN": str(plugin), "TOPIC_ROOT": TOPIC_ROOT, "CENTRAL_USERS": ",".join(central_users),
        "MAX_PACKET_BYTES": str(MAX_PACKET_BYTES),
    }
    text = CONF_TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text
