"""`export --to hf`: a Hugging Face model directory of the folded model.

    OUT/config.json           GPT2Config or LlamaConfig (hf_layout), written by transformers
    OUT/model.safetensors     the weights, written by safetensors
    OUT/tokenizer.json        the run's Hugging Face tokenizer file (copied, with the
                              tokenizer_config.json / special_tokens_map.json next to it), or the
                              byte tokenizer as a tokenizers BPE without merges over the 256
                              byte symbols (id = byte value, NUL = end of document)
    OUT/tokenizer_config.json

so that `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load
it without custom code.
"""
from __future__ import annotations

import json
import os
import shutil

from ..data.tokenizers import BYTE_EOD, HuggingFaceTokenizerFile
from .fold import fold_gates, is_tied
from .hf_layout import hf_config, shape_from_megatron, to_hf
from .output import on_writer, staged_directory

WEIGHTS = "model.safetensors"
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
BYTE_VOCAB = 256


def export_hf(model, checkpoint, out: str, tokenizer_file: str | None = None) -> str:
    """Fold the gates of the loaded gated `model` (of `checkpoint`, a source.GatedCheckpoint;
    tensor-parallel size 1) and write the Hugging Face directory `out` (collective: rank 0
    writes; atomic). `tokenizer_file`: the run's --tokenizer-file (None: the byte tokenizer).

    UnsupportedArchitectureError when no supported architecture expresses the model;
    ValueError when the tokenizer does not fit the vocabulary."""
    state = fold_gates(model)
    shape = shape_from_megatron(checkpoint.model, model.config, is_tied(state))
    tensors = to_hf(shape, state)
    eod, tokenizer_vocab, eos_token = _tokenizer_facts(tokenizer_file)
    if tokenizer_vocab > shape.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but the model's "
                         f"vocabulary only {shape.vocab_size}: not the tokenizer of this run")
    config = hf_config(shape, eod, model.config.params_dtype)
    with staged_directory(out) as tmp:
        on_writer(lambda: _write(tmp, config, tensors, tokenizer_file, eos_token,
                                 shape.seq_length))
    return os.path.abspath(out)


def _tokenizer_facts(tokenizer_file: str | None) -> tuple:
    """(end-of-document id, vocabulary size, end-of-document token) of the run's tokenizer."""
    from tokenizers import Tokenizer

    if tokenizer_file is None:
        return BYTE_EOD, BYTE_VOCAB, _byte_symbols()[BYTE_EOD]
    tokenizer = HuggingFaceTokenizerFile(tokenizer_file)
    eos = Tokenizer.from_file(tokenizer_file).id_to_token(tokenizer.eod)
    return tokenizer.eod, tokenizer.vocab_size, eos


def _byte_symbols() -> dict:
    """{byte: its symbol}: GPT-2's byte-level alphabet."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _write(directory: str, config, tensors: dict, tokenizer_file, eos_token: str,
           seq_length: int) -> None:
    from safetensors.torch import save_file

    config.save_pretrained(directory)
    save_file({key: value.cpu() for key, value in tensors.items()},
              os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    if tokenizer_file is None:
        write_byte_tokenizer(directory)
    else:
        shutil.copyfile(tokenizer_file, os.path.join(directory, "tokenizer.json"))
        side = [os.path.join(os.path.dirname(tokenizer_file), n) for n in TOKENIZER_SIDE_FILES]
        for path in filter(os.path.isfile, side):
            shutil.copyfile(path, os.path.join(directory, os.path.basename(path)))
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token,
                  "bos_token": eos_token, "model_max_length": seq_length}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=1)
            f.write("\n")


def write_byte_tokenizer(directory: str) -> None:
    """tokenizer.json of megatron_wesar's byte tokenizer: token id = byte value (GPT-2's
    byte-level symbols, no merges), NUL (id 0) = end of document."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    tokenizer = Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(BYTE_VOCAB)},
                                     merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))

