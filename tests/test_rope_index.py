"""`get_rope_index` against hand-computed position tables (reference semantics, docs/facts.md: Position ids).

Every expected array below was worked out by hand from those rules (text runs count up; a vision item
puts T, H, W at `next + floor(t * tokens_per_second * spg)`, `next + row`, `next + col`; the next chunk starts at
the chunk's max + 1), never from the code under test. Token ids follow the tiny config: image 150, video 151,
vision_start 152, vision_end 153; `X` is an ordinary text token and `P` a pad.
"""

from __future__ import annotations

import numpy as np
import pytest

from vlmr1_jax.models.qwen2_5_vl.rope import get_rope_index

IMG, VID, VS, VE, X, P = 150, 151, 152, 153, 7, 0
IDS = dict(
    image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, spatial_merge_size=2, tokens_per_second=2.0
)


def rope(ids, mask=None, images=(), videos=(), spg=None):
    return get_rope_index(np.asarray([ids] if np.ndim(ids) == 1 else ids), mask, images, videos, spg, **IDS)


def test_text_only_is_arange_on_all_axes():
    pos, delta = rope([X] * 5)
    assert pos.shape == (3, 1, 5)
    np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2, 3, 4]] * 3)
    np.testing.assert_array_equal(delta, [0])


def test_two_images_in_one_row():
    # X X VS [img (1,4,6): 2x3 merged] VE X VS [img (1,2,4): 1x2 merged] VE X
    ids = [X, X, VS] + [IMG] * 6 + [VE, X, VS] + [IMG] * 2 + [VE, X]
    pos, delta = rope(ids, images=[(1, 4, 6), (1, 2, 4)])
    expected = [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9, 9, 11, 12],  # T
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9, 9, 11, 12],  # H
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],  # W
    ]
    np.testing.assert_array_equal(pos[:, 0], expected)
    np.testing.assert_array_equal(delta, [12 + 1 - 16])


# Worked example: 4 text tokens, then a video grid (4,4,4) (2x2 merged per frame), then text.
VIDEO_ROW = [X, X, X, VS] + [VID] * 16 + [VE, X]
VIDEO_CASES = {
    # spg: (T of the 4 frames, first position after the video)
    0.25: ([4, 4, 5, 5], 6),  # interval 0.5: floor(0, .5, 1, 1.5) -- 4.57's int cast would give all zeros
    0.5: ([4, 5, 6, 7], 8),  # interval 1
    1.0: ([4, 6, 8, 10], 11),  # interval 2: the reference example (5.23 would restart text at 6)
    2.0: ([4, 8, 12, 16], 17),  # interval 4
}


@pytest.mark.parametrize("spg", sorted(VIDEO_CASES))
def test_video_temporal_positions_and_text_after_video(spg):
    frame_t, nxt = VIDEO_CASES[spg]
    pos, delta = rope(VIDEO_ROW, videos=[(4, 4, 4)], spg=[spg])
    t = [0, 1, 2, 3] + [ft for ft in frame_t for _ in range(4)] + [nxt, nxt + 1]
    h = [0, 1, 2, 3] + [4, 4, 5, 5] * 4 + [nxt, nxt + 1]
    w = [0, 1, 2, 3] + [4, 5, 4, 5] * 4 + [nxt, nxt + 1]
    np.testing.assert_array_equal(pos[:, 0], [t, h, w])
    np.testing.assert_array_equal(delta, [nxt + 2 - len(VIDEO_ROW)])


def test_missing_second_per_grid_ts_means_one_second():
    pos, _ = rope(VIDEO_ROW, videos=[(4, 4, 4)], spg=None)
    np.testing.assert_array_equal(pos[0, 0, 4:20:4], [4, 6, 8, 10])


def test_wide_video_next_text_follows_spatial_max():
    # X VS [video (2,8,8): 4x4 merged per frame, spg 1 -> T 2, 4] VE: H/W reach 2+3=5 > T max 4, so next is 6.
    ids = [X, VS] + [VID] * 32 + [VE]
    pos, delta = rope(ids, videos=[(2, 8, 8)], spg=[1.0])
    rows = np.repeat(np.arange(4), 4)
    cols = np.tile(np.arange(4), 4)
    np.testing.assert_array_equal(
        pos[:, 0],
        [
            [0, 1] + [2] * 16 + [4] * 16 + [6],
            [0, 1] + list(2 + rows) * 2 + [6],
            [0, 1] + list(2 + cols) * 2 + [6],
        ],
    )
    np.testing.assert_array_equal(delta, [7 - 35])


def test_left_padded_batch_with_image_and_video():
    # Row 0 (6 pads): X VS [img (1,2,4)] VE X.  Row 1: X VS [img (1,4,4)] VE VS [video (2,2,2), spg 2] VE X.
    # Images are consumed across the batch in order: row 0's grid first.
    row0 = [P] * 6 + [X, VS, IMG, IMG, VE, X]
    row1 = [X, VS] + [IMG] * 4 + [VE, VS, VID, VID, VE, X]
    mask = np.array([[0] * 6 + [1] * 6, [1] * 12])
    pos, delta = rope([row0, row1], mask, images=[(1, 2, 4), (1, 4, 4)], videos=[(2, 2, 2)], spg=[2.0])
    valid = mask.astype(bool)
    np.testing.assert_array_equal(
        pos[:, 0, valid[0]],
        [
            [0, 1, 2, 2, 4, 5],
            [0, 1, 2, 2, 4, 5],
            [0, 1, 2, 3, 4, 5],
        ],
    )
    np.testing.assert_array_equal(
        pos[:, 1],
        [
            [0, 1, 2, 2, 2, 2, 4, 5, 6, 10, 11, 12],
            [0, 1, 2, 2, 3, 3, 4, 5, 6, 6, 11, 12],
            [0, 1, 2, 3, 2, 3, 4, 5, 6, 6, 11, 12],
        ],
    )
    # Decode: delta = max + 1 - valid length, so the next token of each row sits at max + 1.
    np.testing.assert_array_equal(delta, [6 - 6, 13 - 12])
    np.testing.assert_array_equal(mask.sum(1) + delta, [6, 13])


def test_padding_does_not_change_valid_positions():
    ids = [X, VS] + [IMG] * 6 + [VE, X]
    ref, ref_delta = rope(ids, images=[(1, 4, 6)])
    padded = np.array([[P] * 3 + ids])
    mask = np.array([[0] * 3 + [1] * len(ids)])
    pos, delta = rope(padded, mask, images=[(1, 4, 6)])
    np.testing.assert_array_equal(pos[:, :, 3:], ref)
    np.testing.assert_array_equal(delta, ref_delta)


def test_more_image_items_than_grids():
    ids = [X, VS, IMG, IMG, VE, VS, IMG, IMG, VE]
    with pytest.raises(ValueError, match="more image items"):
        rope(ids, images=[(1, 2, 4)])


def test_more_video_items_than_grids():
    ids = [X, VS, VID, VID, VE]
    with pytest.raises(ValueError, match="more video items"):
        rope(ids, images=[(1, 2, 4)])


def test_grid_larger_than_its_tokens():
    ids = [X, VS, IMG, IMG, VE]  # the grid (1,4,6) claims 6 tokens
    with pytest.raises(ValueError, match="row 0"):
        rope(ids, images=[(1, 4, 6)])
