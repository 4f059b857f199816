"""Backend choice shared by every kernel family: "auto" | "triton" | "torch", with an environment override."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_TRUE = ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division for launch grids: triton.cdiv / next_power_of_2 are ConstexprFunctions in recent
    Triton (~3 us per call), and eager launch wrappers call them dozens of times per layer."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def env_mode(name: str, default: str = "auto") -> str:
    """An on/off/auto switch from the environment -> "on" | "off" | "auto" (1/true/yes/on, 0/false/no/off, auto);
    anything else is a ValueError naming the variable, so a typo fails at start-up instead of passing silently."""
    raw = os.environ.get(name, default).strip().lower() or default
    if raw in _TRUE:
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    if raw == "auto":
        return raw
    raise ValueError(f"{name}={raw!r}; expected 1/on, 0/off or auto")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def resolve(name: str, device: torch.device | str, env_var: str, what: str) -> str:
    """-> "triton" | "torch". "auto" (overridable by env `env_var`) means Triton on CUDA when triton imports,
    torch elsewhere; Triton on CPU needs TRITON_INTERPRET=1 set before Python starts."""
    if name not in BACKENDS:
        raise ValueError(f"unknown {what} backend {name!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if name == "auto":
        name = os.environ.get(env_var, "auto").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"{env_var}={name!r}; expected one of {BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{what} backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not interpreter_on():
            raise RuntimeError(f"{what} backend 'triton' on device {device.type!r} needs the Triton interpreter: "
                               "set TRITON_INTERPRET=1 before starting Python (slow; tiny models only), "
                               "or use backend 'torch'")
    return name
