"""Sizes in bytes written the way people write them: ``300KB`` (SI, 300,000), ``300KiB`` or ``300K``
(binary, 307,200), ``1.5MB``, ``4G``, or a plain number of bytes. One parser serves every option
that takes a size (``--weight-memory``, ``--max-memory``)."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "B": 1,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int, what: str) -> int:
    """``text`` in bytes (an int is taken as bytes); ``what`` names the option in the error."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        m = _SIZE.fullmatch(str(text))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise UsageError(f"{what} {text!r} is not a size; write e.g. 300KB (300,000 bytes), 300KiB (307,200), "
                             "1.5MB, 4G or a number of bytes")
        value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise UsageError(f"{what} {text!r} is not a positive size; write e.g. 300KB, 1.5MB or a number of bytes")
    return int(value)
