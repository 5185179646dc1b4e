"""A throwaway GCS service account: a freshly generated RSA key whose token_uri is a closed loopback port, so
nothing may ever try to reach Google with it. The tests share it through the `service_account` fixture."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class ServiceAccount:
    json: str
    email: str
    public_key: rsa.RSAPublicKey


def make_service_account() -> ServiceAccount:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    email = "tester@fake-project.iam.gserviceaccount.com"
    data = {
        "type": "service_account", "project_id": "fake-project", "private_key_id": uuid.uuid4().hex,
        "private_key": pem, "client_email": email, "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",
    }
    return ServiceAccount(json.dumps(data), email, key.public_key())
