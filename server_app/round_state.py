"""The round checkpoint a run resumes from: global model, round, strategy state.

Written with ``torch.save`` and read with ``weights_only=True``: the file's
path comes from the tracking database, so reading it must never run code (a
pickle can). Strategy state holds NumPy arrays and Flower ``ArrayRecord``s;
they are stored as tagged tensors and rebuilt on load.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from client_app.files import write_file_atomically
from client_app.trainer import serialized
from server_app.config import ConfigError

ROUND_STATE = "round_state.pt"
# Written by older versions as a pickle; never loaded (it could run code).
LEGACY_ROUND_STATE = "round_state.pkl"

_NDARRAY = "__ndarray__"
_ARRAYRECORD = "__arrayrecord__"
_NPSCALAR = "__npscalar__"


def _encode(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        tensors = value.to_torch_state_dict()
        return {_ARRAYRECORD: {k: v.detach().cpu() for k, v in tensors.items()}}
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return {_NPSCALAR: torch.from_numpy(np.asarray(value).copy())}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy()
        if set(value) == {_NPSCALAR}:
            return value[_NPSCALAR].numpy()[()]
        if set(value) == {_ARRAYRECORD}:
            return ArrayRecord(value[_ARRAYRECORD])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def save_round_state(
    path: Path, arrays: ArrayRecord, round_number: int, extra: dict[str, Any]
) -> None:
    """Write the global model, the round and strategy state, atomically."""
    state = {
        "round": round_number,
        "state_dict": {k: v.cpu() for k, v in arrays.to_torch_state_dict().items()},
        **_encode(extra),
    }
    write_file_atomically(path, serialized(state))


def load_round_state(path: Path) -> dict[str, Any]:
    """Read and check a round checkpoint; raise ConfigError naming what is wrong."""
    if not path.is_file():
        legacy = path.with_name(LEGACY_ROUND_STATE)
        if legacy.is_file():
            raise ConfigError(
                f"{legacy} is a round checkpoint in the old pickle format, which is "
                "not loaded because a pickle can run code; this run cannot be resumed"
            )
        raise ConfigError(
            f"no round checkpoint at {path}; the run cannot be resumed (it stopped "
            "before its first round completed, or its outputs were moved)"
        )
    if not zipfile.is_zipfile(path):
        raise ConfigError(
            f"{path} is not a readable round checkpoint (not a file written by "
            "torch.save); the run cannot be resumed"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        text = str(exc).strip()
        if "Weights only load failed" in text:
            # A pickle of objects a round checkpoint never holds: maybe code.
            raise ConfigError(
                f"{path} holds objects a round checkpoint never holds; it is not "
                "loaded (loading it could run code) and the run cannot be resumed"
            ) from None
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
        raise ConfigError(
            f"{path} is not a readable round checkpoint ({reason}); the run "
            "cannot be resumed"
        ) from None
    round_number = state.get("round") if isinstance(state, dict) else None
    weights = state.get("state_dict") if isinstance(state, dict) else None
    if (
        not isinstance(round_number, int)
        or round_number < 1
        or not isinstance(weights, dict)
        or not all(isinstance(v, torch.Tensor) for v in weights.values())
    ):
        raise ConfigError(
            f"{path} is not a fedpneumo round checkpoint (it needs a round >= 1 and "
            "the model's tensors); the run cannot be resumed"
        )
    return _decode(state)
