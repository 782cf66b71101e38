"""Provider secrets at rest: AES-256-GCM under a key from INFERBUS_SECRETS_KEY or the data directory.

The key is 32 bytes, base64 in the environment (`INFERBUS_SECRETS_KEY`), or generated once into
`<data_dir>/secrets/provider-secrets.key` (0600). Each value is sealed with a fresh nonce and its row's
identity (model, version, name) as authenticated data; `key_id` names the key that sealed it, so a
value sealed under another key is reported as such rather than decrypted into garbage.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_FILE = "provider-secrets.key"
# Parameter names that hold credentials: refused as plain params (they would be stored and shown).
SECRET_WORDS = ("key", "token", "secret", "password", "authorization", "credential")


class Sealed(NamedTuple):
    nonce: bytes
    ciphertext: bytes
    key_id: str


class VaultError(Exception):
    pass


def looks_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


class Vault:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise VaultError("the provider secrets key must be 32 bytes (base64 in INFERBUS_SECRETS_KEY)")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(key).hexdigest()[:12]

    @classmethod
    def open(cls, env_key: str, data_dir: Path) -> Vault:
        """The key from `env_key` (base64) when set, else the data directory's key file (made on first use)."""
        if env_key:
            try:
                return cls(base64.b64decode(env_key, validate=True))
            except binascii.Error as exc:
                raise VaultError("INFERBUS_SECRETS_KEY is not valid base64") from exc
        path = data_dir / "secrets" / KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(secrets.token_bytes(32)).decode())
        return cls(base64.b64decode(path.read_text().strip()))

    def seal(self, value: str, model: str, version: str, name: str) -> Sealed:
        nonce = secrets.token_bytes(12)
        return Sealed(nonce, self._aead.encrypt(nonce, value.encode(), _aad(model, version, name)), self.key_id)

    def unseal(self, sealed: Sealed, model: str, version: str, name: str) -> str:
        if sealed.key_id != self.key_id:
            raise VaultError(f"secret {name!r} of {model}/{version} was sealed with another key ({sealed.key_id})")
        try:
            return self._aead.decrypt(sealed.nonce, sealed.ciphertext, _aad(model, version, name)).decode()
        except InvalidTag as exc:
            raise VaultError(f"secret {name!r} of {model}/{version} does not decrypt (tampered?)") from exc


def _aad(model: str, version: str, name: str) -> bytes:
    return f"{model}\0{version}\0{name}".encode()
