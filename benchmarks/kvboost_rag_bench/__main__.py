"""``python -m kvboost_rag_bench``: the same as ``kvboost-rag bench``."""
import sys

from kvboost_rag_bench.cli import main

sys.exit(main())
