"""An S3 stand-in for the storage-backend tests: moto's server mode on a free loopback port.

No S3 service can run on our machines, so moto's server (``moto[server]``, an HTTP server that
speaks the S3 API, with versioning and Object Lock) stands in for it. Central talks to it
through boto3 exactly as to a real endpoint (``storage.endpoint_url``).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "central-test",
    "AWS_SECRET_ACCESS_KEY": "central-test-secret",
    "AWS_DEFAULT_REGION": "eu-central-1",
}


@dataclass
class S3Stand:
    endpoint: str

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="eu-central-1",
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def bucket(self, *, object_lock: bool) -> str:
        name = f"rec-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(
            Bucket=name, ObjectLockEnabledForBucket=object_lock,
            CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
        return name

    def toml(self, bucket: str, **extra: str) -> str:
        lines = ['[storage]', 'backend = "s3"', f'bucket = "{bucket}"',
                 f'endpoint_url = "{self.endpoint}"', 'region = "eu-central-1"']
        lines += [f'{k} = "{v}"' for k, v in extra.items()]
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Stand]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # boto3 in this process and in receiver processes
    try:
        yield S3Stand(f"http://{host}:{port}")
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
