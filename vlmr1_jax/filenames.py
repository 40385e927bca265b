"""File names of HF model folders, our releases and import checkpoints (a leaf module: written here once)."""

from __future__ import annotations

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
INDEX_FILE = "model.safetensors.index.json"  # sharded weights: tensor name -> shard file
SINGLE_FILE = "model.safetensors"  # unsharded weights
CHECKSUMS_FILE = "checksums.json"  # name -> dtype, shape, sha256 of every tensor of a folder (import checkpoints)
RELEASE_MARKER = ".vlmr1-release"  # written into every folder we export: the only kind --overwrite may replace
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.json"
# Every tokenizer file a release may carry (copied byte for byte from the tokenizer source).
TOKENIZER_FILES = (
    "tokenizer.json",
    TOKENIZER_CONFIG_FILE,
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    CHAT_TEMPLATE_FILE,
    "chat_template.jinja",
)
