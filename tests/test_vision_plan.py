"""`plan_vision` / `vision_gather_indices` against an independent numpy model of HF's window algorithm.

The reference below follows transformers' window algorithm (docs/facts.md: Vision tower): step 2 (per-patch
(h, w) positions), step 3 (`widx`, `cu_window_seqlens` with unique_consecutive) and step 5 (`cu_seqlens`, one
segment per item and temporal patch).
Our plan gives every window a fixed number of slots; once its pad slots are dropped it must be exactly HF's
window-ordered sequence.
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmr1_jax.models.qwen2_5_vl.vision_plan import plan_vision, vision_gather_indices, window_bucket

M = 2  # spatial_merge_size
UNIT = M * M


def hf_window_index(grids, ws):
    """HF `get_window_index`: merged-unit permutation `widx` and `cu_window_seqlens` (patch units)."""
    widx, cu, base = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // M, w // M
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = ws - gh % ws, ws - gw % ws
        nh, nw = (gh + ph) // ws, (gw + pw) // ws
        pad = np.full((t, gh + ph, gw + pw), -100)
        pad[:, :gh, :gw] = idx
        pad = pad.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
        seqlens = (pad != -100).sum((2, 3)).ravel()
        flat = pad.ravel()
        widx.extend(flat[flat != -100] + base)
        cu.extend(np.cumsum(seqlens) * UNIT + cu[-1])
        base += t * gh * gw
    cu = np.asarray(cu)
    keep = np.concatenate([[True], cu[1:] != cu[:-1]])  # torch.unique_consecutive
    return np.asarray(widx), cu[keep]


def hf_cu_seqlens(grids):
    return np.concatenate([[0], np.cumsum(np.repeat([h * w for _, h, w in grids], [t for t, _, _ in grids]))])


def hf_hw_positions(grids):
    """Processor-order (row, col) of every patch (step 2)."""
    out = []
    for t, h, w in grids:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = [p.reshape(h // M, M, w // M, M).transpose(0, 2, 1, 3).ravel() for p in (hpos, wpos)]
        out.append(np.tile(np.stack(blocks, axis=1), (t, 1)))
    return np.concatenate(out)


def window_ordered(x, widx):
    """Apply HF's permutation of merged units (groups of UNIT rows) to a per-patch array."""
    return x.reshape(len(x) // UNIT, UNIT, *x.shape[1:])[widx].reshape(x.shape)


GRID_SETS = [[(1, 8, 12)], [(1, 6, 10)], [(2, 4, 6)], [(1, 4, 4)], [(1, 8, 12), (1, 6, 10), (2, 4, 6), (1, 4, 4)]]


@pytest.mark.parametrize("window_merged", [2, 4])
@pytest.mark.parametrize("grids", GRID_SETS, ids=lambda g: "+".join("x".join(map(str, x)) for x in g))
def test_plan_matches_hf_window_order(grids, window_merged):
    n = sum(t * h * w for t, h, w in grids)
    rng = np.random.default_rng(0)
    pixels = np.concatenate(
        [
            np.arange(n, dtype=np.float32)[:, None],  # column 0 = source row id
            rng.standard_normal((n, 5)).astype(np.float32),
        ],
        axis=1,
    )
    plan = plan_vision(pixels, grids, spatial_merge_size=M, window_merged=window_merged, bucket=False)
    widx, cu_window = hf_window_index(grids, window_merged)
    cu_frames = hf_cu_seqlens(grids)

    assert plan.slots == window_merged**2 * UNIT
    valid = plan.frame_ids >= 0
    assert valid.sum() == n
    # Pad slots carry nothing.
    assert not plan.pixel_values[~valid].any()
    # 1. Patch order: HF's window order of merged units, each expanded to its 4 patches.
    hf_patch_order = (widx[:, None] * UNIT + np.arange(UNIT)).ravel()
    np.testing.assert_array_equal(plan.pixel_values[valid, 0].astype(np.int64), hf_patch_order)
    np.testing.assert_array_equal(plan.pixel_values[valid], pixels[hf_patch_order])
    # 2. Windows: valid slots come first in each window and their counts are HF's window seqlens.
    per_window = valid.reshape(plan.num_windows, plan.slots)
    counts = per_window.sum(1)
    assert all((row[:c].all() and not row[c:].any()) for row, c in zip(per_window, counts))
    np.testing.assert_array_equal(counts, np.diff(cu_window))
    # 3. Frames: one id per (item, temporal patch), the segments of HF's cu_seqlens in window order.
    segment = np.searchsorted(cu_frames, np.arange(n), side="right") - 1
    np.testing.assert_array_equal(plan.frame_ids[valid], segment)
    assert all(
        len(set(plan.frame_ids[w * plan.slots : (w + 1) * plan.slots][per_window[w]])) == 1
        for w in range(plan.num_windows)
    )  # a window never spans two frames
    # 4. Rotary positions: step 2's (h, w) permuted into window order.
    np.testing.assert_array_equal(plan.hw_positions[valid], window_ordered(hf_hw_positions(grids), widx))
    # 5. Un-permute: HF restores processor order with argsort(widx) over the window-ordered merged tokens;
    # our tower output has one row per 4 slots (pads included), so map HF's window rank to our row.
    real_rows = np.flatnonzero(plan.frame_ids[::UNIT] >= 0)
    np.testing.assert_array_equal(plan.merged_index, real_rows[np.argsort(widx)])
    assert plan.tokens_per_item == tuple(t * h * w // UNIT for t, h, w in grids)


def test_hf_reference_sanity():
    """The reference itself on a case small enough to check by hand: grid (1,4,6) -> merged 2x3, windows 2x2."""
    widx, cu = hf_window_index([(1, 4, 6)], 2)
    # merged grid [[0,1,2],[3,4,5]]: window 0 = cols 0-1, window 1 = col 2.
    np.testing.assert_array_equal(widx, [0, 1, 3, 4, 2, 5])
    np.testing.assert_array_equal(cu, [0, 16, 24])


@pytest.mark.parametrize(
    "n, bucket",
    [(0, 4), (1, 4), (4, 4), (5, 8), (8, 8), (9, 16), (33, 64), (64, 64), (65, 96), (96, 96), (97, 128), (129, 160)],
)
def test_window_bucket(n, bucket):
    assert window_bucket(n) == bucket


def test_bucketed_and_forced_window_counts():
    grids = [(1, 8, 12), (1, 6, 10)]
    real = plan_vision(None, grids, window_merged=2, bucket=False).num_windows
    assert real == 6 + 6  # (4x6 merged -> 2x3 windows) + (3x5 merged -> 2x3 windows)
    assert plan_vision(None, grids, window_merged=2).num_windows == 16
    forced = plan_vision(None, grids, window_merged=2, num_windows=20)
    assert forced.num_windows == 20 and (forced.frame_ids[12 * 16 :] == -1).all()
    with pytest.raises(ValueError, match="num_windows=11"):
        plan_vision(None, grids, window_merged=2, num_windows=11)


def test_plan_errors():
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        plan_vision(None, [(1, 4, 5)])
    with pytest.raises(ValueError, match="pixel_values has 10 rows but the grids need 16"):
        plan_vision(np.zeros((10, 3), np.float32), [(1, 4, 4)])


def _ids_with_placeholders():
    """Two rows; images (1,4,6) [6 tokens] and (1,2,4) [2], video (2,2,4) [4]; row 0 has one image and the video."""
    img, vid, x = 150, 151, 7
    row0 = [x] + [img] * 6 + [x] + [vid] * 4 + [x, x]
    row1 = [x, x, x, x] + [img] * 2 + [x] * 8
    return np.array([row0, row1]), img, vid


def test_vision_gather_indices_row_major_per_modality():
    ids, img, vid = _ids_with_placeholders()
    grids = [(1, 4, 6), (1, 2, 4), (2, 2, 4)]  # images first, then videos (processor order)
    n = sum(t * h * w for t, h, w in grids)
    plan = plan_vision(np.arange(n, dtype=np.float32)[:, None], grids, window_merged=2)
    gather = vision_gather_indices(ids, plan, image_token_id=img, video_token_id=vid, num_image_items=2)
    # Merged token id (processor order, over all items) carried by each row of the tower output; pads -1.
    first = plan.pixel_values[::UNIT, 0].astype(np.int64)
    token_of_row = np.where(plan.frame_ids[::UNIT] >= 0, first // UNIT, -1)
    picked = np.where(gather >= 0, token_of_row[gather], -1)
    np.testing.assert_array_equal(
        picked,
        [
            [-1, 0, 1, 2, 3, 4, 5, -1, 8, 9, 10, 11, -1, -1],
            [-1, -1, -1, -1, 6, 7, -1, -1, -1, -1, -1, -1, -1, -1],
        ],
    )


@pytest.mark.parametrize("drop, kind", [(150, "image"), (151, "video")])
def test_vision_gather_indices_count_mismatch(drop, kind):
    ids, img, vid = _ids_with_placeholders()
    ids[0, np.flatnonzero(ids[0] == drop)[0]] = 7
    plan = plan_vision(None, [(1, 4, 6), (1, 2, 4), (2, 2, 4)], window_merged=2)
    with pytest.raises(ValueError, match=f"placeholder tokens in input_ids but the {kind} grids give"):
        vision_gather_indices(ids, plan, image_token_id=img, video_token_id=vid, num_image_items=2)
