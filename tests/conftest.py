"""Make the shared test helpers (tests/distributed.py) importable as top-level modules."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
