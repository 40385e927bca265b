"""InternVL's processor against transformers' native one (`InternVLProcessor` + GotOcr2's PIL image processor,
loaded from our exported preprocessor_config.json and tokenizer): the same tiles, pixels and prompt ids.

Both tilings choose the same grid (the same candidates, ratio rule and tie rule; only the order of grids with one
tile count differs, which never decides), so every image size is a case where they agree."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor
from transformers.processing_utils import ProcessorMixin

from vlmr1_jax.models.internvl import prompts
from vlmr1_jax.models.internvl.processor import INTERNVL_PROCESSOR, build_prompt_batch
from vlmr1_jax.processing.tokenizer import qwen2_5_tokenizer

TILE = 448
SIZES = [(640, 480), (1000, 800), (300, 900), (448, 448), (1300, 650), (60, 700)]


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Our tokenizer (with InternVL's tokens) and preprocessor config, saved and loaded by transformers."""
    folder = tmp_path_factory.mktemp("internvl_processor")
    ours = qwen2_5_tokenizer().with_special_tokens(
        INTERNVL_PROCESSOR.added_tokens, **INTERNVL_PROCESSOR.tokenizer_config
    )
    ours.save(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(INTERNVL_PROCESSOR.hf_preprocessor_config(None)))
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    # transformers checks even an absent video processor's class, which needs torchvision (not a test dependency).
    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            ProcessorMixin,
            "check_argument_for_proper_class",
            lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg),
        )
        processor = InternVLProcessor(
            image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(folder), image_seq_length=256
        )
    return ours, processor


@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_pixels_match_native_pil_processor(native, max_tiles):
    _, processor = native
    images = [photo(w, h, seed=w + h) for w, h in SIZES]
    out = processor.image_processor(images=images, max_patches=max_tiles, return_tensors="np")
    ours = [INTERNVL_PROCESSOR.preprocess_image(im, min_pixels=0, max_pixels=max_tiles * TILE * TILE) for im in images]
    assert list(out["num_patches"]) == [g[0] for _, g in ours]
    np.testing.assert_allclose(out["pixel_values"], np.concatenate([px for px, _ in ours]), rtol=0, atol=1e-5)


def test_prompt_ids_and_pixels_match_native_processor(native):
    ours_tokenizer, processor = native
    problems = ["the red circle", "the two squares, left one"]
    images = [[photo(1000, 800, 1)], [photo(300, 900, 2), photo(640, 480, 3)]]
    # transformers' chat template writes `<IMG_CONTEXT>\n` per image, which its processor expands.
    texts = [
        prompts.render_conversation(prompts.build_messages(p, len(ims), "rec"), image="<IMG_CONTEXT>\n")
        for p, ims in zip(problems, images)
    ]
    out = processor(text=texts, images=[im for ims in images for im in ims], max_patches=6, return_tensors="np")
    encoded = [
        ours_tokenizer.encode(INTERNVL_PROCESSOR.render_prompt(ours_tokenizer, p, len(ims), "rec"))
        for p, ims in zip(problems, images)
    ]
    processed = [
        [INTERNVL_PROCESSOR.preprocess_image(im, min_pixels=0, max_pixels=6 * TILE * TILE) for im in ims]
        for ims in images
    ]
    cfg = types.SimpleNamespace(
        image_token_id=ours_tokenizer.token_to_id("<IMG_CONTEXT>"),
        num_image_token=256,
        vision=types.SimpleNamespace(image_size=TILE),
    )
    batch = build_prompt_batch(encoded, processed, cfg, pad_id=ours_tokenizer.pad_id)
    for p in range(len(texts)):
        theirs = out["input_ids"][p][out["attention_mask"][p] == 1]
        np.testing.assert_array_equal(batch.input_ids[p][batch.attention_mask[p] == 1], theirs)
    hf = INTERNVL_PROCESSOR.hf_model_inputs(batch)
    np.testing.assert_allclose(hf["pixel_values"], out["pixel_values"], rtol=0, atol=1e-5)
