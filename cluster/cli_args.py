"""Argument types shared by the ``dsaserve`` subcommands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def id_list(text: str) -> tuple[int, ...]:
    """``0,42,7`` → (0, 42, 7)."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def device_arg(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether the device exists is checked when it is used)."""
    from workers.model.device import check_device_name

    try:
        return check_device_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
