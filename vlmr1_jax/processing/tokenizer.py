"""Qwen2.5 tokenizer without transformers: a `tokenizers` BPE, the special tokens and the Jinja chat template.

Folders follow the HF hub layout (tokenizer.json and/or vocab.json + merges.txt, a 4.x-format
tokenizer_config.json, chat_template.json), so what `save` writes loads with `transformers.AutoTokenizer` and
vLLM, and `load` reads official release folders. The vendored Qwen2.5 files (tokenizer_files/qwen2_5 beside this
module, see PROVENANCE.md there) hold no tokenizer.json (11 MB); it is built from vocab.json + merges.txt at load
time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, pre_tokenizers, trainers

QWEN2_5_DIR = Path(__file__).resolve().parent / "tokenizer_files" / "qwen2_5"

# Qwen2's pre-tokenizer regex (single digits, letter runs, punctuation runs, whitespace), hub tokenizer.json layout.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
_PIPELINE = {
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
            _BYTE_LEVEL,
        ],
    },
    "post_processor": _BYTE_LEVEL,
    "decoder": _BYTE_LEVEL,
}
_BPE_OPTIONS = {
    "type": "BPE",
    "dropout": None,
    "unk_token": None,
    "continuing_subword_prefix": "",
    "end_of_word_suffix": "",
    "fuse_unk": False,
    "byte_fallback": False,
    "ignore_merges": False,
}
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> Any:
    """json.load with an error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON ({err})") from err


def _read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """tokenizer_config.json and the chat template (chat_template.jinja, else chat_template.json, else the
    config's chat_template) of a HF tokenizer folder."""
    config = _read_json(folder / "tokenizer_config.json")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").exists():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    else:
        template = config.get("chat_template")
    if not isinstance(template, str):
        raise ValueError(
            f"{folder}: no chat template (chat_template.jinja, chat_template.json or "
            f"tokenizer_config.json 'chat_template')"
        )
    return config, template


def _read_merges(path: Path) -> list[list[str]]:
    """merges.txt lines 'a b' (after the '#version' header) -> [[a, b], ...]."""
    merges = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if (lineno == 1 and line.startswith("#version")) or not line:
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'left right', got {line!r}")
            merges.append(pair)
    return merges


def _added_tokens_json(added_tokens_decoder: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """tokenizer_config `added_tokens_decoder` -> tokenizer.json `added_tokens`, ordered by id."""
    return [
        {"id": int(i), "content": t["content"], **{k: bool(t.get(k, False)) for k in _ADDED_TOKEN_FLAGS}}
        for i, t in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0]))
    ]


def _bpe_backend(vocab: dict[str, int], merges: list[list[str]], added: list[dict[str, Any]]) -> tokenizers.Tokenizer:
    """A Qwen2 byte-level BPE `tokenizers.Tokenizer`, assembled as a hub-format tokenizer.json."""
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        **_PIPELINE,
        "model": {**_BPE_OPTIONS, "vocab": vocab, "merges": merges},
    }
    return tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


@functools.lru_cache(maxsize=8)
def _compile_template(template: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (sandboxed, trim/lstrip blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class Tokenizer:
    """A fast BPE tokenizer plus its HF tokenizer_config and chat template; encode/decode/render, save/load."""

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any], chat_template: str):
        """`config` is the 4.x tokenizer_config.json content; its added_tokens_decoder and chat_template keys
        are ignored (they come from `backend` and `chat_template`)."""
        self.backend = backend
        self.config = {k: v for k, v in config.items() if k not in ("added_tokens_decoder", "chat_template")}
        self.chat_template = chat_template

    # ---- loading and saving -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | PathLike) -> Tokenizer:
        """Read a HF tokenizer folder: tokenizer.json if present, else vocab.json + merges.txt +
        tokenizer_config.json's added tokens; chat template from chat_template.jinja/.json or the config."""
        folder = Path(path)
        config, chat_template = _read_config(folder)
        if (folder / "tokenizer.json").exists():
            try:
                backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as err:  # tokenizers raises a bare Exception on bad files
                raise ValueError(f"{folder / 'tokenizer.json'}: cannot load ({err})") from err
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            added = _added_tokens_json(config.get("added_tokens_decoder", {}))
            backend = _bpe_backend(_read_json(folder / "vocab.json"), _read_merges(folder / "merges.txt"), added)
        else:
            raise ValueError(f"{folder}: needs tokenizer.json or vocab.json + merges.txt")
        return cls(backend, config, chat_template)

    def save(self, path: str | PathLike) -> None:
        """Write tokenizer.json, vocab.json + merges.txt (BPE), tokenizer_config.json (4.x format, read by
        transformers 4.x and 5.x) and chat_template.json into `path`."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        spec = json.loads(self.backend.to_str())
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        model = spec["model"]
        if model["type"] == "BPE":
            vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
            (folder / "vocab.json").write_text(
                json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
            )
            merges = (" ".join(m) if isinstance(m, list) else m for m in model["merges"])
            (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
        added = {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in spec["added_tokens"]
        }
        config = {**self.config, "added_tokens_decoder": added, "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(
            json.dumps(dict(sorted(config.items())), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        (folder / "chat_template.json").write_text(
            json.dumps({"chat_template": self.chat_template}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )

    def with_special_tokens(self, tokens: Sequence[str], **config: Any) -> Tokenizer:
        """A copy with `tokens` added as special tokens (new ones take the next ids, in order; present ones keep
        theirs) and `config` merged into tokenizer_config (a model family's tokens, e.g. InternVL's `<img>`)."""
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return Tokenizer(backend, {**self.config, **config}, self.chat_template)

    # ---- ids ------------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        """Id of a token string; KeyError if it is not in the vocabulary."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may have more rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.token_to_id(self.config["pad_token"])

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Generation stops on <|im_end|> (the configured eos) and <|endoftext|>."""
        return tuple(dict.fromkeys(self.token_to_id(t) for t in (self.config["eos_token"], "<|endoftext|>")))

    @property
    def image_pad_id(self) -> int:
        return self.token_to_id("<|image_pad|>")

    @property
    def video_pad_id(self) -> int:
        return self.token_to_id("<|video_pad|>")

    @property
    def vision_start_id(self) -> int:
        return self.token_to_id("<|vision_start|>")

    @property
    def vision_end_id(self) -> int:
        return self.token_to_id("<|vision_end|>")

    # ---- text -----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added and special tokens in the text stay atomic."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Iterable[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, add_vision_id: bool = False
    ) -> str:
        """Render `messages` with the chat template, passing the same variables transformers passes."""
        special = {k: self.config[k] for k in _NAMED_SPECIAL if self.config.get(k) is not None}
        return _compile_template(self.chat_template).render(
            messages=list(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
            **special,
        )


@functools.cache
def qwen2_5_tokenizer() -> Tokenizer:
    """The vendored offline Qwen2.5(-VL) tokenizer (151,665 ids). Cached: treat it as read-only."""
    return Tokenizer.load(QWEN2_5_DIR)


def build_compact_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """A small byte-level BPE trained on `corpus` (for the CPU demo) with Qwen2's pre-tokenizer (one digit per
    token), then the 22 Qwen2.5 added tokens appended, and the Qwen2.5 config and chat template.

    `vocab_size` counts the added tokens; it is an upper bound (a small corpus may support fewer merges).
    Training is deterministic for the same corpus."""
    config, chat_template = _read_config(QWEN2_5_DIR)
    added = _added_tokens_json(config["added_tokens_decoder"])
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(added):
        raise ValueError(
            f"vocab_size must be at least {len(byte_alphabet) + len(added)} "
            f"(256 bytes + {len(added)} added tokens), got {vocab_size}"
        )
    backend = _bpe_backend({}, [], [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=byte_alphabet,
        special_tokens=[],
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    for token in added:
        flags = {k: token[k] for k in _ADDED_TOKEN_FLAGS}
        (backend.add_special_tokens if token["special"] else backend.add_tokens)(
            [AddedToken(token["content"], **flags)]
        )
    return Tokenizer(backend, config, chat_template)
