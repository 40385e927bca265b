"""InternVL's processor (models/internvl/): the tiling, pixels, prompts, prompt batches and eval parse, each against
an independent implementation written here from VLM-R1's InternVL module (its `dynamic_preprocess`, transform,
conversation template and `prepare_model_inputs`), and hand-computed grids for the tie rule."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
from PIL import Image

from vlmr1_jax.models.internvl import prompts
from vlmr1_jax.models.internvl.processor import INTERNVL_PROCESSOR, TOKENS_PER_TILE, build_prompt_batch, tile_bucket
from vlmr1_jax.models.internvl.tiling import choose_grid, count_tiles, max_tiles_for
from vlmr1_jax.processing.tokenizer import qwen2_5_tokenizer

TILE = 448
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
QUESTION = "{Question} First output the thinking process in <think> </think> tags and then output the final answer in <answer> </answer> tags."  # noqa: E501


# ---- the reference: VLM-R1's InternVL algorithm, written from its definition ---------------------------------------
def ref_grid(width: int, height: int, max_num: int, min_num: int = 1) -> tuple[int, int]:
    """`find_closest_aspect_ratio` over the set of (i, j) with min <= i*j <= max, sorted by i*j."""
    ratios = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda r: r[0] * r[1],
    )
    best_diff, best = float("inf"), (1, 1)
    for i, j in ratios:
        diff = abs(width / height - i / j)
        if diff < best_diff:
            best_diff, best = diff, (i, j)
        elif diff == best_diff and width * height > 0.5 * TILE * TILE * i * j:
            best = (i, j)
    return best


def ref_tiles(image: Image.Image, max_num: int) -> np.ndarray:
    """`dynamic_preprocess(use_thumbnail=True)` + ToTensor + ImageNet Normalize, in numpy: [tiles, 3, 448, 448]."""
    i, j = ref_grid(image.width, image.height, max_num)
    resized = image.resize((TILE * i, TILE * j))  # PIL's default filter (bicubic), as VLM-R1 calls it
    crops = []
    for b in range(i * j):
        col, row = b % i, b // i
        crops.append(resized.crop((col * TILE, row * TILE, (col + 1) * TILE, (row + 1) * TILE)))
    if len(crops) != 1:
        crops.append(image.resize((TILE, TILE)))
    out = []
    for crop in crops:
        x = np.asarray(crop).astype(np.float32).transpose(2, 0, 1) / np.float32(255)
        out.append((x - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None])
    return np.stack(out)


def ref_prompt(messages: list[dict], tiles_per_image: list[int]) -> str:
    """VLM-R1's `prepare_prompt` (the internvl2_5 template, MPT separators) then its `<image>` expansion."""
    system = SYSTEM
    if messages[0]["role"] == "system":
        content = messages[0]["content"]
        system = content if isinstance(content, str) else content[0]["text"]
        messages = messages[1:]
    turns = []
    for m in messages:
        c = m["content"]
        turns.append(
            c if isinstance(c, str) else "".join("<image>\n" if x["type"] == "image" else x["text"] for x in c)
        )
    sep, roles = "<|im_end|>\n", ("<|im_start|>user\n", "<|im_start|>assistant\n")
    conversation = [(roles[k % 2], t) for k, t in enumerate(turns)]
    if len(turns) % 2 == 1:
        conversation.append((roles[1], None))
    text = "<|im_start|>system\n" + system + sep
    for role, message in conversation:
        text += role + message + sep if message else role
    for n in tiles_per_image:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 * n + "</img>", 1)
    assert "<image>" not in text
    return text


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (gradients + noise), so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


# ---- tiling ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_num", [1, 2, 6, 12])
def test_grid_choice_matches_vlm_r1_over_many_sizes(max_num):
    sizes = [(w, h) for w in range(16, 3000, 97) for h in range(16, 3000, 89)]
    sizes += [(1000, 800), (800, 640), (896, 448), (1300, 650), (700, 700), (1000, 1000), (4000, 20), (20, 4000)]
    for w, h in sizes:
        assert choose_grid(w, h, max_num) == ref_grid(w, h, max_num), (w, h)
        cols, rows = ref_grid(w, h, max_num)
        assert count_tiles(w, h, max_num) == cols * rows + (cols * rows > 1)


@pytest.mark.parametrize(
    ("size", "max_num", "grid"),
    [
        # Square: (1,1), (2,2), (3,3) tie on the ratio; a later grid wins while area > 0.5 * 448^2 * tiles.
        ((600, 600), 12, (1, 1)),  # 360000 <= 401408 (2x2's half area)
        ((700, 700), 12, (2, 2)),  # 490000 > 401408, <= 903168 (3x3's)
        ((1000, 1000), 12, (3, 3)),  # 1000000 > 903168
        ((1000, 1000), 6, (2, 2)),  # 3x3 is over the budget
        # 2:1: (2,1) and (4,2) tie; (4,2)'s half area is 802816.
        ((1200, 600), 12, (2, 1)),
        ((1300, 650), 12, (4, 2)),
        # Aspect 1.25 with 6 tiles: 1 (1x1, 2x2) and 1.5 (3x2) are equally far; later grids win by area.
        ((500, 400), 6, (1, 1)),
        ((800, 640), 6, (2, 2)),  # 512000 > 401408, <= 602112 (3x2's half area)
        ((1000, 800), 6, (3, 2)),  # 800000 > 602112: the 1.5 grid, though the 1.0 grids came first
    ],
)
def test_tie_rule_by_hand(size, max_num, grid):
    assert choose_grid(*size, max_num) == grid


def test_tiles_pixels_and_thumbnail_match_vlm_r1():
    # 3:2 is a 3x2 grid; 1.25 ties 3x2 by area (see above); 3:1 keeps 3x1 (6x2 needs twice the area); 1:14 -> 1x12.
    for (w, h), max_num, tiles in [((300, 200), 6, 7), ((1000, 800), 6, 7), ((900, 300), 12, 4), ((50, 700), 12, 13)]:
        image = photo(w, h, seed=w)
        pixels, grid = INTERNVL_PROCESSOR.preprocess_image(image, min_pixels=0, max_pixels=max_num * TILE * TILE)
        assert grid == (tiles,) and pixels.shape == (tiles, 3, TILE, TILE) and pixels.dtype == np.float32
        np.testing.assert_allclose(pixels, ref_tiles(image, max_num), rtol=0, atol=1e-6)
        assert INTERNVL_PROCESSOR.image_grid(h, w, min_pixels=0, max_pixels=max_num * TILE * TILE) == grid
        assert INTERNVL_PROCESSOR.image_tokens(grid) == 256 * tiles
    # uint8 arrays (grey or RGB) take the same path as PIL images
    grey = np.asarray(photo(500, 300).convert("L"))
    from_array, _ = INTERNVL_PROCESSOR.preprocess_image(grey, min_pixels=0, max_pixels=6 * TILE * TILE)
    np.testing.assert_array_equal(from_array, ref_tiles(Image.fromarray(grey).convert("RGB"), 6))


def test_tile_budget_is_max_pixels_over_a_tile():
    assert max_tiles_for(6 * TILE * TILE) == 6
    assert max_tiles_for(6 * TILE * TILE + TILE) == 6
    assert max_tiles_for(12845056) == 64  # Qwen's default budget, 16384 tokens: 64 tiles of 256
    assert INTERNVL_PROCESSOR.default_max_pixels == 12 * TILE * TILE
    with pytest.raises(ValueError, match=r"data.max_pixels=1000: .* max_anyres_num \* 200704"):
        INTERNVL_PROCESSOR.image_grid(500, 500, min_pixels=0, max_pixels=1000)


# ---- prompts --------------------------------------------------------------------------------------------------------
def expand(ids: list[int], tiles: list[int], context: int) -> list[int]:
    it = iter(tiles)
    return [x for t in ids for x in ([t] * 256 * next(it) if t == context else [t])]


@pytest.fixture(scope="module")
def tokenizer():
    return qwen2_5_tokenizer().with_special_tokens(
        INTERNVL_PROCESSOR.added_tokens, **INTERNVL_PROCESSOR.tokenizer_config
    )


def test_tokenizer_gets_internvl_tokens_after_qwen_ones(tokenizer):
    base = qwen2_5_tokenizer()
    # InternVL2.5/3's Qwen2.x releases: <img> 151665, </img> 151666, <IMG_CONTEXT> 151667 (its image_token_id).
    assert [tokenizer.token_to_id(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "</box>")] == [
        151665,
        151666,
        151667,
        151673,
    ]
    assert tokenizer.vocab_size == base.vocab_size + 9 and base.vocab_size == 151665  # the vendored one is untouched
    assert tokenizer.encode("<img><IMG_CONTEXT></img>") == [151665, 151667, 151666]
    # EOS = the template separator's token, the Qwen tokenizer's own eos
    assert tokenizer.eos_ids[0] == tokenizer.token_to_id("<|im_end|>") == tokenizer.token_to_id(prompts.EOS_TOKEN)
    again = tokenizer.with_special_tokens(INTERNVL_PROCESSOR.added_tokens)
    assert again.vocab_size == tokenizer.vocab_size and again.token_to_id("<IMG_CONTEXT>") == 151667


@pytest.mark.parametrize("tiles", [[1], [7], [5, 1]])
def test_prompt_ids_match_vlm_r1(tokenizer, tiles):
    problem = "Please provide the bounding box of the region this sentence describes: <ref>the red circle</ref>"
    text = INTERNVL_PROCESSOR.render_prompt(tokenizer, problem, len(tiles), "rec")
    context = tokenizer.token_to_id("<IMG_CONTEXT>")
    ours = expand(tokenizer.encode(text), tiles, context)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}] * len(tiles) + [{"type": "text", "text": QUESTION.format(Question=problem)}],
        }
    ]
    assert ours == tokenizer.encode(ref_prompt(messages, tiles))
    assert INTERNVL_PROCESSOR.prompt_messages(problem, len(tiles), "rec")[0]["content"][-1]["text"] == (
        QUESTION.format(Question=problem)
    )


def test_every_task_type_uses_the_default_template_and_custom_ones_pass_through():
    for task in ("rec", "ic", "odLength", "gui", None):
        assert prompts.question_template(task) == QUESTION
    assert prompts.question_template("{Question} Answer in JSON.") == "{Question} Answer in JSON."


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You are a box finder."}, {"role": "user", "content": "Find it."}],
        [
            {"role": "system", "content": [{"type": "text", "text": "Boxes only."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
        ],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "c"}]},
        ],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ],
)
def test_conversation_system_turn_and_turns(messages):
    images = sum(isinstance(m["content"], list) and sum(x["type"] == "image" for x in m["content"]) for m in messages)
    tiles = [1] * images
    expected = ref_prompt(messages, tiles)
    rendered = prompts.render_conversation(messages)
    for n in tiles:
        rendered = rendered.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 * n + "</img>", 1)
    assert rendered == expected


def test_unknown_content_entry_is_named():
    with pytest.raises(ValueError, match="unsupported entry type 'video'"):
        prompts.render_conversation([{"role": "user", "content": [{"type": "video"}]}])


# ---- prompt batches -------------------------------------------------------------------------------------------------
CFG = types.SimpleNamespace(image_token_id=151667, num_image_token=256, vision=types.SimpleNamespace(image_size=TILE))
PAD = 151643


def constant_tiles(start: int, n: int) -> np.ndarray:
    """n tiles whose every pixel holds its global tile number (to trace where each token's row comes from)."""
    return np.broadcast_to(np.arange(start, start + n, dtype=np.float32)[:, None, None, None], (n, 3, TILE, TILE))


def test_prompt_batch_layout_and_gather():
    c = CFG.image_token_id
    prompt_ids = [[1, 2, c, 3], [4, c, 5, c, 6, 7], [8, 9]]
    images = [
        [(constant_tiles(0, 1), (1,))],
        [(constant_tiles(1, 5), (5,)), (constant_tiles(6, 1), (1,))],
        [],
    ]
    batch = build_prompt_batch(prompt_ids, images, CFG, pad_id=PAD)
    lengths = [3 + 256, 4 + 256 * 6, 2]
    assert batch.input_ids.shape == (3, 1568) and 1568 % 32 == 0 and max(lengths) <= 1568
    for p, n in enumerate(lengths):
        assert (batch.attention_mask[p, -n:] == 1).all() and (batch.attention_mask[p, :-n] == 0).all()
        assert (batch.input_ids[p, :-n] == PAD).all()
        np.testing.assert_array_equal(batch.positions[:, p, -n:], np.broadcast_to(np.arange(n), (3, n)))
        assert (batch.positions[:, p, :-n] == 1).all()
    assert batch.next_position.tolist() == lengths
    assert batch.input_ids[1, -lengths[1] :].tolist()[:2] == [4, c]
    pixels = batch.vision["pixel_values"]
    assert pixels.shape == (tile_bucket(7), 3, TILE, TILE) == (8, 3, TILE, TILE) and not pixels[7:].any()
    # The k-th context token (row-major) reads row k of the tower: tile k // 256, which holds the right image's tile.
    rows = batch.vision_gather[batch.input_ids == c]
    np.testing.assert_array_equal(rows, np.arange(7 * 256))
    np.testing.assert_array_equal(pixels[rows // TOKENS_PER_TILE, 0, 0, 0], np.repeat(np.arange(7), 256))
    assert (batch.vision_gather[batch.input_ids != c] == -1).all()
    assert batch.image_grids == (((1,),), ((5,), (1,)), ())
    assert batch.batch_axes()["pixel_values"] == 0
    hf = INTERNVL_PROCESSOR.hf_model_inputs(batch)
    assert hf["pixel_values"].shape == (7, 3, TILE, TILE) and hf["position_ids"].dtype == np.int64
    np.testing.assert_array_equal(hf["position_ids"], batch.positions[0])


def test_prompt_batch_forced_sizes_text_only_and_errors():
    c = CFG.image_token_id
    text_only = build_prompt_batch([[1, 2, 3]], [[]], CFG, pad_id=PAD)
    assert text_only.vision == {} and text_only.input_ids.shape == (1, 32)
    assert INTERNVL_PROCESSOR.hf_model_inputs(text_only).keys() == {"position_ids"}
    forced = build_prompt_batch([[c]], [[(constant_tiles(0, 3), (3,))]], CFG, pad_id=PAD, length=800, num_tiles=16)
    assert forced.input_ids.shape == (1, 800) and forced.vision["pixel_values"].shape[0] == 16
    assert build_prompt_batch([[1]], [[]], CFG, pad_id=PAD, num_tiles=8).vision["pixel_values"].shape[0] == 8
    with pytest.raises(ValueError, match=r"prompt 0: 2 image placeholders \(<IMG_CONTEXT>\) but 1 images"):
        build_prompt_batch([[c, c]], [[(constant_tiles(0, 1), (1,))]], CFG, pad_id=PAD)
    with pytest.raises(ValueError, match="does not fit the forced length 100"):
        build_prompt_batch([[c]], [[(constant_tiles(0, 1), (1,))]], CFG, pad_id=PAD, length=100)
    with pytest.raises(ValueError, match="num_tiles=2 is smaller than the 3 tiles"):
        build_prompt_batch([[c]], [[(constant_tiles(0, 3), (3,))]], CFG, pad_id=PAD, num_tiles=2)
    small = types.SimpleNamespace(image_token_id=c, num_image_token=4, vision=types.SimpleNamespace(image_size=56))
    with pytest.raises(ValueError, match=r"tiles of \[448\] px but the model's vision.image_size is 56"):
        build_prompt_batch([[c]], [[(constant_tiles(0, 1), (1,))]], small, pad_id=PAD)


def test_tile_buckets():
    assert [tile_bucket(n) for n in (0, 1, 4, 5, 8, 9, 64, 65, 97)] == [4, 4, 4, 8, 8, 16, 64, 96, 128]


def test_model_frame_is_none_and_preprocessor_config():
    assert INTERNVL_PROCESSOR.model_frame((7,)) is None
    config = INTERNVL_PROCESSOR.hf_preprocessor_config(CFG)
    assert config["size"] == {"height": 448, "width": 448} and config["crop_to_patches"] is True
    assert config["image_mean"] == list(MEAN) and config["image_std"] == list(STD) and config["max_patches"] == 12


# ---- eval hook ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion",
    [
        "<think>x</think><answer>[10, 20, 30, 40]</answer>",
        "<answer>box {[1,2,3,4]} and [5, 6, 7, 8]</answer>",
        "<answer>[1.5, 2, 3, 4]</answer>",
        "<answer>[-1, 2, 3, 4]</answer>",
        "[1, 2, 3, 4] <answer>none</answer> <answer>[9, 9, 9, 9]</answer>",
        "<answer>[1, 2, 3, 4]",
        "<answer>\n[ 1,2, 3,\n4]</answer>",
        "<answer>[1,2,3,\n 4]\n</answer>",
        "no answer",
    ],
)
def test_eval_box_parse_matches_vlm_r1_regexes(completion):
    answer = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    box = re.search(r"\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]", answer.group(1).strip()) if answer else None
    expected = [float(v) for v in box.groups()] if box else [0.0, 0.0, 0.0, 0.0]
    assert prompts.extract_rec_box(completion) == expected
    protocol = INTERNVL_PROCESSOR.rec_eval
    assert protocol["extract_box"](completion) == expected
    assert (protocol["max_new_tokens"], protocol["rescale"], protocol["task_type"]) == (1024, False, "default")


# ---- the recipe -----------------------------------------------------------------------------------------------------
def test_recipe_mirrors_vlm_r1_internvl_script():
    from vlmr1_jax.config import load_config
    from vlmr1_jax.rewards import reward_functions

    cfg, qwen = load_config("rec_internvl_4b"), load_config("rec_3b")
    assert (cfg.model.family, cfg.model.hf_model, cfg.data.task_type) == ("internvl", None, "rec")
    assert (cfg.data.prompts_per_step, cfg.grpo.num_generations, cfg.grpo.beta) == (16, 8, 0.04)
    assert max_tiles_for(cfg.data.max_pixels) == 6  # the script's max_anyres_num
    # learning rate, lengths, epochs, sampling and saving as the Qwen REC recipe
    for section, field in [("optim", "learning_rate"), ("sampling", "max_new_tokens"), ("data", "num_epochs")]:
        assert getattr(getattr(cfg, section), field) == getattr(getattr(qwen, section), field)
    assert cfg.sampling == qwen.sampling and cfg.train.save_every == qwen.train.save_every
    fns = reward_functions(cfg.grpo.reward_funcs, cfg.grpo.reward_options, variants=INTERNVL_PROCESSOR.reward_variants)
    assert list(fns) == ["iou_reward", "format_reward_rec_plain"]
