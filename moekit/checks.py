"""Field checks shared by every config: one error format,

    Owner.field=value: constraint; fix

so a bad value is one line naming the field, the value, what is wrong and what to do.
"""

from __future__ import annotations

import math


def bad(owner: str, name: str, value, constraint: str, fix: str) -> ValueError:
    """The one error format for a bad config value."""
    return ValueError(f"{owner}.{name}={value!r}: {constraint}; {fix}")


def is_int(value) -> bool:
    """An int that is not a bool (TOML ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


FLOAT32_MAX = 3.4028234663852886e38


def is_real(value) -> bool:
    """A finite int or float that is not a bool, and that float32 can hold (values become
    float32 tensors: 1e39 would overflow to inf there)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= FLOAT32_MAX)


def check_int(owner: str, name: str, value, minimum: int = 1, fix: str | None = None) -> None:
    """``value`` must be an integer >= ``minimum``."""
    if not is_int(value) or value < minimum:
        raise bad(owner, name, value, f"must be an integer >= {minimum}",
                  fix or f"set {name} to an integer >= {minimum}")


def check_real(owner: str, name: str, value, low: float | None = None, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False, fix: str) -> None:
    """``value`` must be a finite number in the range given (open or closed at each end)."""
    ok = is_real(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = (f" in {lo}, {hi}" if low is not None and high is not None
                 else f" {'>' if low_open else '>='} {low:g}" if low is not None
                 else f" {'<' if high_open else '<='} {high:g}" if high is not None else "")
        huge = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > FLOAT32_MAX
        raise bad(owner, name, value, f"must be a finite number{where}"
                  + (" that float32 can hold (|x| <= 3.4e38)" if huge else ""), fix)


def check_choice(owner: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise bad(owner, name, value, f"is not one of {choices}", "pick one of those")


def check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise bad(owner, name, value, "must be true or false", f"set {name} to true or false")


def require_float(model, verb: str) -> None:
    """Transformations that read or write float weights refuse a quantized model: one line."""
    if getattr(model.cfg, "quant", None) is not None:
        raise ValueError(f"{verb}: the model is quantized (model.quant={model.cfg.quant}); {verb} the "
                         "full-precision model, then quantize the result")


def require_fixed_k(moe, verb: str, why: str, fix: str, allowed: tuple[str, ...] = ()) -> None:
    """Transformations that cannot carry a dynamic number of experts per token (``MoEConfig.
    dynamic_k`` other than "none" and not in ``allowed``) refuse it: one line naming the field,
    its value, why and the fix. ``moe`` is an MoEConfig or None (a dense model: nothing to refuse)."""
    mode = getattr(moe, "dynamic_k", "none")
    if mode != "none" and mode not in allowed:
        raise ValueError(f"{verb}: model.moe.dynamic_k={mode!r} {why}; {fix}")


def shorten(text: str, n: int = 40) -> str:
    """``text``, cut to ``n`` characters with an ellipsis (a value quoted in an error line)."""
    return text if len(text) <= n else text[:n] + "..."
