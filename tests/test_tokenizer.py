"""vlmr1_jax.processing.tokenizer against transformers' AutoTokenizer, published Qwen2.5 ids and the provenance record.

transformers builds its own Qwen2Tokenizer pipeline from vocab.json + merges.txt, so it is an independent reference
for ids, decodes and chat rendering (the 5.x AutoProcessor renders through the same function; it cannot be built
here because its video processor needs torchvision).
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import tokenizers
from transformers import AutoTokenizer

from vlmr1_jax.models.qwen2_5_vl.prompts import build_messages
from vlmr1_jax.processing.tokenizer import QWEN2_5_DIR, Tokenizer, build_compact_tokenizer, qwen2_5_tokenizer

# PROVENANCE.md: sha256 of the vendored files.
VENDORED_SHA256 = {
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
    "tokenizer_config.json": "6d54e7aba54bedac2ebb2206015e65171e6b2a5534b0e3167c8b794510db6636",
    "chat_template.json": "94174d7176c52a7192f96fc34eb2cf23c7c2059d63cdbfadca1586ba89731fb7",
}
# docs/facts.md: Tokenizer: (id, content, special) of the 22 Qwen2.5 added tokens.
ADDED_TOKENS = [
    (151643 + i, name, i < 14)
    for i, name in enumerate(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ]
    )
]
# Ids of the published Qwen2.5 tokenizer.
KNOWN_IDS = [
    ("Hello world", [9707, 1879]),
    ("Hello, world!", [9707, 11, 1879, 0]),
    (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n",
        [151644, 872, 198, 151652, 151655, 151653, 3838, 374, 304, 279, 2168, 30, 151645, 198],
    ),
]
SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCXYZ",
    "0123456789",
    " \n\t",
    ".,;:!?[](){}<>\"'-_/\\",
    "中文字符测试图片框左上右下",
    "日本語のテキスト",
    "éèêëàçñöüß",
    "😀🚀🎉",
    "Привет мир",
]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>", "<tool_call>", "<think>", "</answer>"]


def _random_text(rng: random.Random, max_len: int = 40) -> str:
    parts = []
    for _ in range(rng.randint(1, max_len)):
        if rng.random() < 0.08:
            parts.append(rng.choice(SPECIALS))
        else:
            parts.append("".join(rng.choice(rng.choice(ALPHABETS)) for _ in range(rng.randint(1, 6))))
    return "".join(parts)


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return qwen2_5_tokenizer()


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(QWEN2_5_DIR)


def _hf_ids(hf, messages, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- vendored files ------------------------------------------------------------------------------------------
def test_vendored_files_match_provenance():
    for name, digest in VENDORED_SHA256.items():
        assert hashlib.sha256((QWEN2_5_DIR / name).read_bytes()).hexdigest() == digest, name
    total = sum(p.stat().st_size for p in QWEN2_5_DIR.iterdir())
    assert total < 6_000_000


def test_vendored_vocab_and_merges_are_consistent():
    vocab = json.loads((QWEN2_5_DIR / "vocab.json").read_text(encoding="utf-8"))
    raw = (QWEN2_5_DIR / "merges.txt").read_bytes()
    assert b"\r" not in raw
    lines = raw.decode("utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 151_388
    assert sorted(vocab.values()) == list(range(151_643))
    # GPT-2 style BPE: merge i creates token 256 + i.
    assert all(vocab["".join(line.split(" "))] == 256 + i for i, line in enumerate(lines[1:]))


def test_vendored_config(ours):
    config = json.loads((QWEN2_5_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = config["added_tokens_decoder"]
    assert [(int(i), t["content"], t["special"]) for i, t in decoder.items()] == ADDED_TOKENS
    assert config["additional_special_tokens"] == [name for _, name, _ in ADDED_TOKENS[1:14]]
    assert (config["eos_token"], config["pad_token"], config["bos_token"], config["model_max_length"]) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
        131072,
    )
    template = json.loads((QWEN2_5_DIR / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    assert template == config["chat_template"] == ours.chat_template


# ---- ids --------------------------------------------------------------------------------------------------------
def test_known_ids_and_special_ids(ours):
    for text, ids in KNOWN_IDS:
        assert ours.encode(text) == ids
    assert ours.vocab_size == 151_665
    assert (ours.pad_id, ours.eos_ids) == (151643, (151645, 151643))
    assert (ours.image_pad_id, ours.video_pad_id, ours.vision_start_id, ours.vision_end_id) == (
        151655,
        151656,
        151652,
        151653,
    )
    assert all(ours.encode(name) == [i] for i, name, _ in ADDED_TOKENS)
    assert len(ours.encode("<think>")) > 1  # an added token in Qwen3, plain text in Qwen2.5
    with pytest.raises(KeyError, match="nope"):
        ours.token_to_id("<nope>")


def test_encode_decode_match_hf_on_random_text(ours, hf):
    rng = random.Random(0)
    texts = [_random_text(rng) for _ in range(300)]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    batch = [ours.encode(t) for t in texts[:20]]
    assert ours.batch_decode(batch) == hf.batch_decode(batch, skip_special_tokens=True)


# ---- chat template ----------------------------------------------------------------------------------------------
CHATS = {
    "single_image": [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": "Where is the red circle?"}],
        }
    ],
    "multi_image": [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image", "image": "x.png"},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ],
    "text_only": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}],
    "string_content": [{"role": "user", "content": "plain string"}],
    "system_and_assistant": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "<think> x </think><answer>1</answer>"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And?"}]},
    ],
}


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_chat_template_matches_hf(ours, hf, name, add_vision_id):
    messages = CHATS[name]
    for generation_prompt in (True, False):
        expected = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, add_vision_id=add_vision_id
        )
        assert ours.apply_chat_template(messages, generation_prompt, add_vision_id=add_vision_id) == expected
    rendered = ours.apply_chat_template(messages, add_vision_id=add_vision_id)
    assert ours.encode(rendered) == _hf_ids(hf, messages, add_vision_id=add_vision_id)


def test_single_image_rendering_by_hand(ours):
    expected = (
        SYSTEM_TURN + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Where is the red circle?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ours.apply_chat_template(CHATS["single_image"]) == expected
    assert ours.apply_chat_template(CHATS["multi_image"], add_vision_id=True).count("Picture 2: ") == 1


def test_random_vlmr1_samples_match_hf(ours, hf):
    rng = random.Random(1)
    for _ in range(20):
        num_images = rng.randint(0, 4)
        messages = build_messages(_random_text(rng, 25), num_images, rng.choice(["rec", "ic", "odLength", None]))
        rendered = ours.apply_chat_template(messages)
        assert rendered == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = ours.encode(rendered)
        assert ids == _hf_ids(hf, messages)
        problem_pads = messages[0]["content"][-1]["text"].count("<|image_pad|>")
        assert ids.count(ours.image_pad_id) == num_images + problem_pads


# ---- save / load ------------------------------------------------------------------------------------------------
def test_save_load_round_trip(ours, tmp_path):
    ours.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat_template.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    for name, digest in VENDORED_SHA256.items():  # the hub-format files come back byte for byte
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>框 12 ü😀<|im_end|>"
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert backend.encode(text, add_special_tokens=False).ids == ours.encode(text)
    reloaded = Tokenizer.load(tmp_path)
    assert reloaded.encode(text) == ours.encode(text) and reloaded.config == ours.config
    assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


def test_load_names_the_folder_when_files_are_missing(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    with pytest.raises(ValueError, match=r"vocab\.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        Tokenizer.load(tmp_path)


# ---- compact demo tokenizer -------------------------------------------------------------------------------------
DEMO_CORPUS = [
    f"<think> the {c} {s} </think><answer>[{x},{y},{x + 20},{y + 30}]</answer>"
    for c in ("red", "green", "blue", "yellow")
    for s in ("circle", "square", "triangle")
    for x, y in ((3, 41), (17, 88), (60, 5))
]


@pytest.fixture(scope="module")
def compact() -> Tokenizer:
    return build_compact_tokenizer(DEMO_CORPUS, vocab_size=320)


def test_compact_is_deterministic_and_bounded(compact):
    assert build_compact_tokenizer(DEMO_CORPUS, vocab_size=320).backend.to_str() == compact.backend.to_str()
    assert compact.vocab_size <= 320
    added = compact.backend.get_added_tokens_decoder()
    assert [(i, t.content, t.special) for i, t in sorted(added.items())] == [
        (compact.vocab_size - 22 + k, name, special) for k, (_, name, special) in enumerate(ADDED_TOKENS)
    ]
    with pytest.raises(ValueError, match="at least 278"):
        build_compact_tokenizer(DEMO_CORPUS, vocab_size=277)


def test_compact_round_trips_and_keeps_specials_atomic(compact):
    rng = random.Random(2)
    for text in DEMO_CORPUS[:5] + [_random_text(rng) for _ in range(50)]:
        assert compact.decode(compact.encode(text), skip_special_tokens=False) == text
    for _, name, _ in ADDED_TOKENS:
        assert compact.encode(name) == [compact.token_to_id(name)]
    digits = compact.encode("[1234]")
    assert [compact.decode([i]) for i in digits] == ["[", "1", "2", "3", "4", "]"]
    assert len(compact.encode(DEMO_CORPUS[0])) < len(DEMO_CORPUS[0].encode("utf-8")) / 2  # it did learn merges
    assert compact.chat_template == qwen2_5_tokenizer().chat_template
    assert (compact.pad_id, compact.eos_ids) == (
        compact.token_to_id("<|endoftext|>"),
        (compact.token_to_id("<|im_end|>"), compact.pad_id),
    )


def test_compact_save_load_and_hf(compact, tmp_path):
    compact.save(tmp_path)
    reloaded = Tokenizer.load(tmp_path)
    hf_compact = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf_compact) == compact.vocab_size
    messages = build_messages("the red circle", 1, "rec")
    rendered = compact.apply_chat_template(messages)
    assert rendered == hf_compact.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = compact.encode(rendered)
    assert ids == reloaded.encode(rendered) == _hf_ids(hf_compact, messages)
    assert ids.count(compact.image_pad_id) == 1
    assert hf_compact.decode(ids, skip_special_tokens=True) == compact.decode(ids)
