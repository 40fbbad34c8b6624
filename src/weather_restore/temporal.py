"""Temporal consistency of a restored clip against its clean clip, and the gate rule that compares two versions on it.

Two errors per clip (the functions live in metrics.py): Lai et al.'s warping error, which needs the TV-L1 flow of
the clean clip (about 0.3 s per 128² flow, two flows per frame pair), and the flow-free flicker error. The flows
of a clean clip are the same for every model that is judged on it, so they are computed once and kept in a
content-addressed cache (a file per clip named by the hash of its clean frames: never stale, safe to delete).
Each figure is reported beside the same figure of the degraded clip (and, for the warping error, of the clean
clip, the flow's own residual), so it has a scale.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the registry's gate imports this module without torch
    import torch

    from weather_restore.metrics import TemporalReference

log = logging.getLogger(__name__)

# Per clip, beside PSNR and SSIM: `<key>` of the restored clip, `input_<key>` of the degraded one.
TEMPORAL_KEYS = ("warp_error", "flicker_error", "input_warp_error", "input_flicker_error", "clean_warp_error")
# The errors a promotion gate may compare (lower is better).
GATED = ("warp_error", "flicker_error")
# Bumped when temporal_reference changes what it computes: older cache files are then ignored.
FLOW_VERSION = "tvl1-fb-1"


class FlowCache:
    """TV-L1 references of clean clips, computed once per distinct clip and kept as `<folder>/<hash>.npz`.

    `folder=None` keeps nothing (every call computes). `computed` and `reused` count what happened, for the log.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.computed = 0
        self.reused = 0

    @staticmethod
    def key(clean: torch.Tensor) -> str:
        frames = np.ascontiguousarray(clean.detach().cpu().float().numpy())
        digest = hashlib.sha256(f"{FLOW_VERSION}{frames.shape}".encode())
        digest.update(frames.tobytes())
        return digest.hexdigest()[:32]

    def reference(self, clean: torch.Tensor) -> TemporalReference:
        """The clean (T, 3, H, W) clip's flows and occlusion masks, from the cache when it holds them."""
        from weather_restore.metrics import TemporalReference, temporal_reference

        path = None if self.folder is None else self.folder / f"{self.key(clean)}.npz"
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    reference = TemporalReference(stored["flows"], stored["masks"].astype(bool))
                self.reused += 1
                return reference
            except (OSError, ValueError, KeyError) as error:  # a damaged file is recomputed and replaced
                log.warning("ignoring the unreadable flow cache file %s (%s)", path, error)
        reference = temporal_reference(clean)
        self.computed += 1
        if path is not None:
            from weather_restore.outputs import atomic_write_bytes

            buffer = io.BytesIO()
            np.savez_compressed(buffer, flows=reference.flows.astype(np.float32), masks=reference.masks)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
        return reference


def clip_errors(
    restored: torch.Tensor, degraded: torch.Tensor, clean: torch.Tensor, reference: TemporalReference
) -> dict[str, float]:
    """TEMPORAL_KEYS of one (T, 3, H, W) clip: the restored clip's errors, the degraded clip's, and the clean clip's
    warping error (its flicker error is zero by definition)."""
    from weather_restore.metrics import flicker_error, warping_error

    restored, degraded, clean = restored.cpu(), degraded.cpu(), clean.cpu()
    return {
        "warp_error": warping_error(restored, reference),
        "flicker_error": flicker_error(restored, clean),
        "input_warp_error": warping_error(degraded, reference),
        "input_flicker_error": flicker_error(degraded, clean),
        "clean_warp_error": warping_error(clean, reference),
    }


def gate_reasons(
    candidate: dict[str, float | None],
    champion: dict[str, float | None],
    weathers: tuple[str, ...],
    tolerance: float | None,
) -> list[str]:
    """Why a candidate fails the temporal rule: for each weather and each of GATED, its error may exceed the
    champion's by at most `tolerance` (relative: 0.1 = 10% worse). `candidate`/`champion` map
    `test_<key>_<weather>` to figures. None (the rule is off) or a champion without the figure: no reasons."""
    if tolerance is None:
        return []
    reasons = []
    for weather in weathers:
        for key in GATED:
            name = f"test_{key}_{weather}"
            new, old = candidate.get(name), champion.get(name)
            if old is None:
                continue
            if new is None:
                reasons.append(f"{weather}: the candidate has no {key} (evaluated before temporal metrics)")
            elif new > old * (1 + tolerance) + 1e-12:
                reasons.append(
                    f"{weather} {key} {new:.3g} is {new / old - 1:+.0%} of the champion's {old:.3g}, more than the "
                    f"{tolerance:.0%} allowed (registry.temporal_tolerance)"
                )
    return reasons
