"""`python -m megatron_wesar.megatron_lm`: Megatron-LM's pretrain_gpt.py with WeSaR."""
from .entry import main

if __name__ == "__main__":
    main()
