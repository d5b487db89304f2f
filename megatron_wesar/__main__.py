"""`python -m megatron_wesar` is the `megatron-wesar` command."""
import sys

from .cli import main

sys.exit(main())
