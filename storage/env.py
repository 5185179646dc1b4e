"""Reading the environment: the one reader, with one set of rules, for every variable of the worker.

`server.config.WorkerConfig` and `storage.config.StorageConfig` both read through `EnvReader`; each passes the
error it raises (`ConfigError`, `StorageNotConfiguredError`). It lives in `storage`, the lower layer, so that
storage never imports the server. It imports nothing of the project.

Rules:
- A value is stripped; an empty or blank value counts as unset (RunPod's console keeps empty rows).
- Integers are plain decimal: an optional sign and the digits 0-9 (`1_000`, `1e3`, `0x10`, `2.0` are refused).
- Numbers are decimal, exponent notation allowed (`2.5`, `1e-3`), finite (`nan` and `inf` are refused), ASCII,
  without `_`.
- Choices are case-insensitive and come back in their canonical spelling.
- Flags are `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`, any case.
- Every bad value raises the caller's error with ONE message shape, which names the variable and the value
  (quoted, cut short so that a pasted blob cannot flood the log):
  `MAX_CONCURRENCY must be an integer >= 1, got '0'`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import NoReturn, TypeVar

_INTEGER = re.compile(r"[+-]?[0-9]+")
FLAG_TRUE = ("1", "true", "yes", "on")
FLAG_FALSE = ("0", "false", "no", "off")

D = TypeVar("D")


def shown(value: str) -> str:
    """A bad value as it goes into a message: quoted, and cut to 80 characters."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


class EnvReader:
    """Reads and checks one variable at a time from `env`; a bad value raises `error(message)`."""

    def __init__(self, env: Mapping[str, str], error: Callable[[str], Exception]) -> None:
        self._env = env
        self._error = error

    def fail(self, name: str, rule: str, value: str) -> NoReturn:
        """Raise the one message shape: `{name} must be {rule}, got {value}`."""
        raise self._error(f"{name} must be {rule}, got {shown(value)}")

    def raw(self, name: str) -> str | None:
        """The stripped value, or None when the variable is unset or blank."""
        value = self._env.get(name)
        if value is None or not str(value).strip():
            return None
        return str(value).strip()

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        rule = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
        if not _INTEGER.fullmatch(value):
            self.fail(name, rule, value)
        try:
            number = int(value, 10)
        except ValueError:  # more digits than Python converts
            self.fail(name, rule, value)
        if number < minimum or (maximum is not None and number > maximum):
            self.fail(name, rule, value)
        return number

    def number(
        self, name: str, default: float, *, minimum: float, maximum: float | None = None, exclusive: bool = False,
        rule: str | None = None,
    ) -> float:
        """A finite number >= minimum (> minimum when `exclusive`), and <= maximum when one is given. `rule`
        replaces the generated wording of the error (a variable that also takes a word, such as `off`)."""
        value = self.raw(name)
        if value is None:
            return default
        if rule is None:
            low = f"{'>' if exclusive else '>='} {minimum:g}"
            rule = f"a number {low}" if maximum is None else f"a number {low} and <= {maximum:g}"
        number = math.nan
        if value.isascii() and "_" not in value:
            try:
                number = float(value)
            except ValueError:
                pass
        too_low = number <= minimum if exclusive else number < minimum
        if not math.isfinite(number) or too_low or (maximum is not None and number > maximum):
            self.fail(name, rule, value)
        return number

    def choice(self, name: str, default: D, choices: tuple[str, ...], *, upper: bool = False) -> str | D:
        """One of `choices` (compared lower case, or upper case with `upper`), canonical; `default` when unset."""
        value = self.raw(name)
        if value is None:
            return default
        canonical = value.upper() if upper else value.lower()
        if canonical not in choices:
            self.fail(name, f"one of {', '.join(choices)}", value)
        return canonical

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in FLAG_TRUE:
            return True
        if lowered in FLAG_FALSE:
            return False
        self.fail(name, f"one of {', '.join(FLAG_TRUE + FLAG_FALSE)}", value)
