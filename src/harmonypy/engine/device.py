"""Choice of torch device and floating-point type."""

from __future__ import annotations

import numpy as np
import torch

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "single": torch.float32,
    "double": torch.float64,
}


def available_devices() -> list[str]:
    """Names of the device kinds usable in this process, best first."""
    names = []
    if torch.cuda.is_available():
        names.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn the ``device`` argument of :func:`run_harmony` into a ``torch.device``.

    ``None`` picks CUDA, then Apple MPS, then the CPU. A device that exists in
    torch but not on this machine is refused with the list of what is there.
    """
    available = available_devices()
    if device is None:
        return torch.device(available[0])
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device.strip().lower())
        except (RuntimeError, ValueError):
            raise ValueError(
                f"device={device!r} is not a device name; expected None, 'cpu', "
                f"'cuda', 'cuda:N', 'mps' or a torch.device (available here: "
                f"{', '.join(available)})"
            ) from None
    else:
        raise TypeError(
            f"device must be None, a string ('cpu', 'cuda', 'cuda:N', 'mps') or a "
            f"torch.device, not {type(device).__name__} ({device!r}); available here: "
            f"{', '.join(available)}"
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"device={str(dev)!r} is not supported; expected 'cpu', 'cuda' or 'mps' "
            f"(available here: {', '.join(available)})"
        )
    if dev.type not in available:
        raise ValueError(
            f"device={str(dev)!r} was requested but is not available on this machine "
            f"(available here: {', '.join(available)})"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={str(dev)!r} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """Floating-point type of the computation: float32 unless float64 is asked for.

    Parameters
    ----------
    dtype : None, str, torch.dtype or NumPy dtype-like
        ``None``/'float32'/'single'/``torch.float32``/``np.float32``, or
        'float64'/'double'/``torch.float64``/``np.float64``/``float``.
    device : torch.device
        float64 is refused on Apple MPS, which has none.
    """
    expected = "expected None, 'float32' or 'float64' (or the torch/numpy float types)"
    if dtype is None:
        resolved = torch.float32
    elif isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.strip().lower().replace("torch.", "") in _DTYPES:
        resolved = _DTYPES[dtype.strip().lower().replace("torch.", "")]
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            if isinstance(dtype, str):
                raise ValueError(f"dtype={dtype!r} is not supported; {expected}") from None
            raise TypeError(f"dtype={dtype!r} is not a type; {expected}") from None
        if name not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; {expected}")
        resolved = _DTYPES[name]
    if resolved not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype!r} is not supported; {expected}")
    if resolved == torch.float64 and device.type == "mps":
        raise ValueError(
            "dtype='float64' is not supported on Apple MPS devices; use dtype='float32' "
            "or device='cpu'"
        )
    return resolved
