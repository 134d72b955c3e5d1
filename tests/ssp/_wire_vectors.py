"""Loads the recorded datagram vectors kept beside the tests (tests/*.json)."""

import json
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent


def load(name: str) -> dict:
    """Parse tests/<name> (mosh-datagrams.json or broker-framing.json)."""
    with open(_TESTS / name, encoding="utf-8") as f:
        return json.load(f)


def mosh() -> dict:
    return load("mosh-datagrams.json")


def broker() -> dict:
    return load("broker-framing.json")
