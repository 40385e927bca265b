"""Host-side layout of vision patches for the jitted tower: padded windows, frame segments, merged-token order.

HF permutes merged units (2x2 patch groups) into window order and runs variable-length attention per window. We lay
the patches out the same way but give every window a fixed number of slots (64 for the released models), so window
attention is a reshape to `[windows, 64, D]` and full attention is a dense mask over frame ids. Pad slots are invalid:
they never attend and are never attended. The window count is padded to a bucket so XLA compiles a few programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class VisionPlan:
    """Arrays for `VisionTower.__call__` plus the host-side map back to processor order."""

    pixel_values: np.ndarray  # [windows * slots, patch_dim] float32, padded window layout
    hw_positions: np.ndarray  # [windows * slots, 2] int32, (row, col) of each patch in its frame
    frame_ids: np.ndarray  # [windows * slots] int32, one id per (item, temporal patch); -1 = pad slot
    frame_index: np.ndarray  # [frames, frame_slots] int32: the slots of each frame; N (one past the end) = pad
    merged_index: np.ndarray  # [n_merged] int32: processor-order merged token -> row of the tower's output
    tokens_per_item: tuple[int, ...]  # merged tokens of each item, in item order
    slots: int  # patch slots per window

    @property
    def num_windows(self) -> int:
        return self.frame_ids.shape[0] // self.slots

    def device_inputs(self) -> dict[str, np.ndarray]:
        """The arrays the jitted tower takes (static shapes)."""
        return {
            "pixel_values": self.pixel_values,
            "hw_positions": self.hw_positions,
            "frame_ids": self.frame_ids,
            "frame_index": self.frame_index,
        }


def window_bucket(num_windows: int, minimum: int = 4) -> int:
    """Round a count up to a bucket: powers of two up to 64, then multiples of 32."""
    n = max(num_windows, minimum)
    if n <= 64:
        return 1 << (n - 1).bit_length()
    return -(-n // 32) * 32


def plan_vision(
    pixel_values: np.ndarray | None,
    grid_thw: Sequence[Sequence[int]],
    *,
    spatial_merge_size: int = 2,
    window_merged: int = 4,
    bucket: bool = True,
    num_windows: int | None = None,
) -> VisionPlan:
    """Lay out the patches of all items (images and videos, processor order) into padded windows.

    `pixel_values` is the processor's concatenation [sum t*h*w, patch_dim] (None: plan only, zero pixels);
    `window_merged` is the window side in merged units (window_size // merge // patch). `num_windows` forces the
    padded window count (e.g. to share one compiled program), else it is bucketed.
    """
    m = spatial_merge_size
    unit = m * m
    slots = window_merged * window_merged * unit
    windows: list[np.ndarray] = []  # per window: source patch rows (processor order)
    positions: list[np.ndarray] = []
    frames: list[int] = []
    tokens_per_item = []
    base, frame_id = 0, 0
    for t, h, w in (tuple(int(x) for x in g) for g in grid_thw):
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of spatial_merge_size {m}")
        gh, gw = h // m, w // m
        tokens_per_item.append(t * gh * gw)
        sub_r, sub_c = np.divmod(np.arange(unit), m)  # patch offsets inside a merged unit (row-major)
        for ti in range(t):
            for r0 in range(0, gh, window_merged):
                for c0 in range(0, gw, window_merged):
                    ur, uc = (
                        a.ravel()
                        for a in np.meshgrid(
                            np.arange(r0, min(r0 + window_merged, gh)),
                            np.arange(c0, min(c0 + window_merged, gw)),
                            indexing="ij",
                        )
                    )
                    unit_rows = base + (ti * gh * gw + ur * gw + uc) * unit
                    windows.append((unit_rows[:, None] + np.arange(unit)).ravel())
                    positions.append(
                        np.stack([(ur[:, None] * m + sub_r).ravel(), (uc[:, None] * m + sub_c).ravel()], axis=1)
                    )
                    frames.append(frame_id)
            frame_id += 1
        base += t * h * w
    real = len(windows)
    padded = num_windows if num_windows is not None else (window_bucket(real) if bucket else real)
    if padded < real:
        raise ValueError(f"num_windows={padded} is smaller than the {real} windows these grids need")
    total = padded * slots
    source = np.full((total,), -1, np.int64)
    hw = np.zeros((total, 2), np.int32)
    frame_ids = np.full((total,), -1, np.int32)
    for i, (rows, pos, fid) in enumerate(zip(windows, positions, frames)):
        source[i * slots : i * slots + len(rows)] = rows
        hw[i * slots : i * slots + len(rows)] = pos
        frame_ids[i * slots : i * slots + len(rows)] = fid
    valid = source >= 0
    if pixel_values is not None:
        pixel_values = np.asarray(pixel_values, np.float32)
        if pixel_values.shape[0] != base:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but the grids need {base}")
        laid_out = np.zeros((total, pixel_values.shape[1]), np.float32)
        laid_out[valid] = pixel_values[source[valid]]
    else:
        laid_out = np.zeros((total, 0), np.float32)
    # Merged token k of the tower output covers slots [4k, 4k+4); map processor-order units to it.
    unit_source = source[::unit]
    merged_index = np.empty((base // unit,), np.int32)
    merged_index[unit_source[unit_source >= 0] // unit] = np.flatnonzero(unit_source >= 0)
    return VisionPlan(
        laid_out,
        hw,
        frame_ids,
        frame_slot_index(frames, padded, slots, bucket),
        merged_index,
        tuple(tokens_per_item),
        slots,
    )


def frame_slot_index(window_frames: Sequence[int], num_windows: int, slots: int, bucket: bool) -> np.ndarray:
    """[frames, frame_slots] slot indices of each frame (its windows are contiguous), padded with the index one
    past the end. Full-attention blocks attend within these rows only: cost per frame, not per batch."""
    frames = np.asarray(window_frames, np.int64)
    counts = np.bincount(frames, minlength=int(frames.max()) + 1) if frames.size else np.zeros((0,), np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rows = max(len(counts), 1)
    width = int(counts.max()) if counts.size else 1
    if bucket:
        rows, width = window_bucket(rows, 1), window_bucket(width, 1)
    index = np.full((rows, width * slots), num_windows * slots, np.int32)
    for f, (start, count) in enumerate(zip(starts, counts)):
        index[f, : count * slots] = np.arange(start * slots, (start + count) * slots)
    return index


def vision_gather_indices(
    input_ids: np.ndarray, plan: VisionPlan, *, image_token_id: int, video_token_id: int, num_image_items: int
) -> np.ndarray:
    """[B, L] row of the tower output for every placeholder token (-1 elsewhere).

    The plan holds the batch's images first (processor order) and then its videos; placeholders are filled
    row-major over (batch, sequence), separately per modality, exactly like HF's `masked_scatter`.
    """
    input_ids = np.asarray(input_ids)
    gather = np.full(input_ids.shape, -1, np.int32)
    image_tokens = sum(plan.tokens_per_item[:num_image_items])
    for token_id, offset, count in (
        (image_token_id, 0, image_tokens),
        (video_token_id, image_tokens, len(plan.merged_index) - image_tokens),
    ):
        where = input_ids == token_id
        found = int(where.sum())
        if found != count:
            kind = "image" if token_id == image_token_id else "video"
            raise ValueError(f"{found} {kind} placeholder tokens in input_ids but the {kind} grids give {count}")
        gather[where] = plan.merged_index[offset : offset + count]
    return gather
