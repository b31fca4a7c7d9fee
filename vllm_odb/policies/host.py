"""Host values onto the device without waiting for it.

``torch.tensor(values, device="cuda")`` copies from pageable host memory and then synchronises the
stream, so the host waits for every kernel queued before it (in the engine sampler: the whole
forward) and launches the rest of the step only afterwards, with the GPU idle in between. A pinned
staging copy sent ``non_blocking`` keeps the stream order and lets the host run ahead; torch's
pinned allocator holds the staging memory until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(values, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` (a list of numbers or a numpy array) as a ``dtype`` tensor on ``device``."""
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
