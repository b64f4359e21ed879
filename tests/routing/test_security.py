"""API key storage and comparison (the HTTP behaviour is in test_resilience.py's auth matrix)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service.security import KeyChecker, load_api_keys


def test_keys_from_env_and_file_are_kept_only_as_digests(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\n  file-key  \n\nenv-key\n")
    digests = load_api_keys(["env-key", " "], keys_file)
    assert len(digests) == 2  # duplicates and blanks dropped
    assert hashlib.sha256(b"file-key").digest() in digests
    assert all(isinstance(d, bytes) and len(d) == 32 for d in digests)
    assert b"file-key" not in b"".join(digests)


def test_checker_accepts_only_configured_keys() -> None:
    checker = KeyChecker(load_api_keys(["k1", "k2"], None))
    assert len(checker) == 2
    assert checker.check("k1") and checker.check("k2")
    assert not checker.check("k3")
    assert not checker.check("")
    assert not checker.check(None)
    assert not checker.check("k1 ")


def test_no_keys_means_open_and_unreadable_file_fails_loudly(tmp_path: Path) -> None:
    assert len(KeyChecker(load_api_keys([], None))) == 0
    with pytest.raises(OSError):
        load_api_keys([], tmp_path / "missing")
