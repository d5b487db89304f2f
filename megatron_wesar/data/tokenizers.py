"""Tokenizers usable by megatron-core's datasets: a byte-level one, and a local Hugging Face
`tokenizer.json` when the `tokenizers` package is installed."""
from __future__ import annotations

from megatron.core.tokenizers import MegatronTokenizerBase

BYTE_EOD = 0  # NUL never occurs in text; it ends every document


class ByteTokenizer(MegatronTokenizerBase):
    """UTF-8 bytes as tokens (vocabulary 256); NUL is the end-of-document token."""

    def __init__(self):
        super().__init__(path="", config={})

    def tokenize(self, text: str) -> list[int]:
        """UTF-8 bytes of `text`, without NUL bytes."""
        return list(text.encode("utf-8").replace(b"\0", b""))

    def detokenize(self, ids) -> str:
        """Text of byte ids (invalid UTF-8 replaced)."""
        return bytes(int(i) for i in ids if i != BYTE_EOD).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> dict:
        return {bytes([i]).decode("latin-1"): i for i in range(256)}

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def eod(self) -> int:
        return BYTE_EOD

    @property
    def unique_identifiers(self) -> dict:
        """What identifies this tokenizer in megatron's dataset index cache keys."""
        return {"class": type(self).__name__}

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("the byte tokenizer has no chat template")


class HuggingFaceTokenizerFile(MegatronTokenizerBase):
    """A local Hugging Face `tokenizer.json`, through the `tokenizers` package."""

    EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(
                "--tokenizer-file needs the `tokenizers` package: pip install tokenizers"
            ) from err
        super().__init__(path=path, config={})
        self._tok = Tokenizer.from_file(path)
        ids = [self._tok.token_to_id(t) for t in self.EOD_CANDIDATES]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(
                f"{path}: no end-of-document token found (looked for {self.EOD_CANDIDATES})"
            )
        self._eod = ids[0]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        """Text of token ids."""
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict:
        return self._tok.get_vocab()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def unique_identifiers(self) -> dict:
        """What identifies this tokenizer in megatron's dataset index cache keys."""
        return {"class": type(self).__name__, "path": self.path}

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat templates are not used for pretraining")


def build_tokenizer(tokenizer_file: str | None = None) -> MegatronTokenizerBase:
    """The byte tokenizer, or the Hugging Face tokenizer file when one is given."""
    return ByteTokenizer() if tokenizer_file is None else HuggingFaceTokenizerFile(tokenizer_file)
