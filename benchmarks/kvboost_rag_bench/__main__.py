"""``python -m kvboost_rag_bench``: the same as ``kvboost-rag bench``."""
import sys

from .cli import main

sys.exit(main())
