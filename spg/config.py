"""Checks of a model config's fields by name, shared by the model families' config classes
(`spg.wav2vec2.model.ModelConfig`, `spg.whisper.model.WhisperConfig`). Standard library only,
so a model file that imports it stays copyable with this one file beside it."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["check_config_fields"]


def check_config_fields(config: object, *, positive_ints: tuple = (), non_negative_ints: tuple = (),
                        probabilities: tuple = (), positive_floats: tuple = (), bools: tuple = (),
                        choices: Optional[dict] = None, positive_int_lists: tuple = (),
                        optional_size_lists: tuple = (), optional_nested_size_lists: tuple = ()) -> None:
    """Type and range checks of a config's fields by name, for configs read from files
    (a null, a string or a negative size there should be refused, not crash later).
    optional_size_lists: None, or a list of non-negative ints (one per layer);
    optional_nested_size_lists: None, or a list (per layer) of lists of non-negative ints."""
    def fail(name: str, expected: str) -> ValueError:
        return ValueError(f"{name}={getattr(config, name)!r}: expected {expected}")

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: object) -> bool:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value)

    for name in positive_ints:
        if not (is_int(getattr(config, name)) and getattr(config, name) > 0):
            raise fail(name, "a positive integer")
    for name in non_negative_ints:
        if not (is_int(getattr(config, name)) and getattr(config, name) >= 0):
            raise fail(name, "a non-negative integer")
    for name in probabilities:
        if not (is_number(getattr(config, name)) and 0 <= getattr(config, name) <= 1):
            raise fail(name, "a probability in [0, 1]")
    for name in positive_floats:
        if not (is_number(getattr(config, name)) and getattr(config, name) > 0):
            raise fail(name, "a positive number")
    for name in bools:
        if not isinstance(getattr(config, name), bool):
            raise fail(name, "true or false")
    for name, allowed in (choices or {}).items():
        if getattr(config, name) not in allowed:
            raise fail(name, "one of " + ", ".join(repr(a) for a in allowed))
    for name in positive_int_lists:
        value = getattr(config, name)
        if not (isinstance(value, (list, tuple)) and value and all(is_int(v) and v > 0 for v in value)):
            raise fail(name, "a non-empty list of positive integers")
    def sizes(value: object) -> bool:
        return isinstance(value, (list, tuple)) and all(is_int(v) and v >= 0 for v in value)

    for name in optional_size_lists:
        if not (getattr(config, name) is None or sizes(getattr(config, name))):
            raise fail(name, "null or a list of non-negative integers")
    for name in optional_nested_size_lists:
        value = getattr(config, name)
        if not (value is None or isinstance(value, (list, tuple)) and all(sizes(item) for item in value)):
            raise fail(name, "null or a list (one per layer) of lists of non-negative integers")
