"""Optional ed25519 signatures for adapter files (the `cryptography` package).

A signature is ``FILE.sig`` beside the adapter: the base64 ed25519 signature of the file's bytes.
Trusted public keys (base64 of the 32 raw bytes) are listed in the config's ``trusted_keys``.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgelora.errors import AdapterError
from edgelora.files import check_regular_file


class SignatureError(AdapterError):
    pass


def sig_path(file: Path) -> Path:
    return file.with_name(file.name + ".sig")


def keygen(private_path: Path) -> str:
    """Write a new private key (PEM, mode 600) and return the public key to trust (base64)."""
    if os.path.lexists(private_path):
        raise SignatureError(f"{private_path} already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:  # no such folder, not writable, name too long
        raise SignatureError(f"{private_path}: cannot create the key file ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    except OSError as exc:  # disk full: no half-written key left behind
        private_path.unlink(missing_ok=True)
        raise SignatureError(f"{private_path}: cannot write the key ({exc.strerror})") from None
    return public_key_b64(key)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    check_regular_file(Path(path), "(the --key)")  # a FIFO would block, /dev/zero never end
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an ed25519 key")
    return key


def sign(file: Path, private_key: Path) -> Path:
    """Write FILE.sig; an existing .sig is replaced only if it holds a signature."""
    from edgelora.convert.errors import ConvertError
    from edgelora.convert.outputs import atomic_output, check_target

    file = Path(file)
    check_regular_file(file)
    key = load_private_key(private_key)
    out = sig_path(file)
    try:
        check_target(out, "", is_ours=_is_signature, ours="a signature", hint="move it away to sign again")
        signature = base64.b64encode(key.sign(file.read_bytes())).decode()
        with atomic_output(out) as tmp:
            tmp.write_text(signature + "\n")
    except ConvertError as exc:
        raise SignatureError(str(exc)) from None
    except OSError as exc:
        raise SignatureError(f"{file}: cannot read it ({exc.strerror})") from None
    return out


def _is_signature(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return len(base64.b64decode(fh.read(200).strip(), validate=True)) == 64  # ed25519
    except (OSError, ValueError):
        return False


HOW_TO_TRUST = ("add the signer's public key (printed by `edgelora adapters keygen`) to trusted_keys "
                "in the config (`edgelora config show` prints where)")


def verify(file: Path, trusted_keys: list[str], *, required: bool, data: bytes | None = None) -> str | None:
    """Check FILE.sig against the trusted keys. Returns the key that signed it, or None when nothing
    asks for a check (signatures not required and no trusted keys: a .sig is then not read).
    Raises SignatureError otherwise. ``data``: the bytes to check (default: FILE's)."""
    file = Path(file)
    sig = sig_path(file)
    if not required and not trusted_keys:
        return None
    if not sig.exists():
        if required:
            raise SignatureError(f"{file} has no signature ({sig.name}) and signatures are required")
        return None
    if not sig.is_file():
        raise SignatureError(f"{sig}: not a regular file")
    if not trusted_keys:
        raise SignatureError(f"{file}: signatures are required but no trusted_keys are configured; {HOW_TO_TRUST}")
    try:
        signature = base64.b64decode(sig.read_text(errors="strict").strip(), validate=True)
    except (ValueError, OSError):
        raise SignatureError(f"{sig}: not a base64 signature") from None
    data = file.read_bytes() if data is None else data
    for b64 in trusted_keys:
        try:
            Ed25519PublicKey.from_public_bytes(base64.b64decode(b64)).verify(signature, data)
            return b64
        except (InvalidSignature, ValueError):
            continue
    raise SignatureError(f"{file}: signature {sig.name} does not match any trusted key; if you trust its signer, "
                         f"{HOW_TO_TRUST}")
