"""The registry's compiled history append and row encoding, if built
(``broker.registry._speedups``, from broker/registry/_speedups.c).

Every change appends an entry to its device's history
(``history.append_entry``), and every commit encodes each changed device's
row (``database.encode_row``): about 2 and 1.4 us in Python, a tenth of
the broker's work per update. Importing this module installs the
compiled ones. Each does its usual case in C and hands every other to the
Python code, which stays the reference: the same bytes either way
(tests/registry/test_speedups.py).

Without the extension, or with ``SSP_BROKER_PURE_PYTHON`` set (the one
switch for every compiled path), the Python code runs and
``unavailable_reason`` says why.
"""

import os

from broker.ssp.speedups import PURE_PYTHON_VARIABLE

from . import database, history
from .model import Device
from .values import FrozenMap

__all__ = ["compiled", "unavailable_reason"]


def _load():
    """None once the compiled functions are installed, else why not."""
    if os.environ.get(PURE_PYTHON_VARIABLE):
        return f"{PURE_PYTHON_VARIABLE} is set"
    try:
        from broker.registry import _speedups
    except ImportError as error:
        return f"broker.registry._speedups is not built ({error})"
    _speedups.setup(
        history_class=history.History, frozen_map_class=FrozenMap, device_class=Device,
        appended=history.History.appended, encode_device=database.encode_device,
        json_per_byte=history.JSON_PER_BYTE, entry_overhead=history.ENTRY_OVERHEAD,
        heads=history._HEADS, float64_tag=database.TAG_FLOAT64)
    history.install_compiled_append(_speedups.append_entry)
    database.install_compiled_encode(_speedups.encode_device)
    return None


unavailable_reason = _load()
#: Whether the compiled functions are in use.
compiled = unavailable_reason is None
