"""Leaving WeSaR behind after training (docs/export.md): fold every gate into its matrix and
write a plain Megatron checkpoint or a Hugging Face model; and the reverse, a WeSaR run started
from a pretrained ungated Hugging Face model.

    source           the gated model a WeSaR checkpoint holds, rebuilt from its description
    fold             W = gate * W_bar over every logical matrix, and W_bar = W / gate
    megatron_format  the ungated megatron-core GPTModel's dist checkpoint
    hf_layout        GPT-2 / Llama: which architecture, and how every tensor maps
    hf               the Hugging Face directory (config, safetensors, tokenizer)
    hf_import        a Hugging Face model as iteration 0 of a WeSaR run
    output           directories written whole or not at all
    commands         `megatron-wesar export` / `import`
"""
