"""kvboost-rag-bench: the benchmark of kvboost-rag, kept out of the core package.

Nothing here is on the data path; the core (:mod:`kvboost_rag`) never imports it. One module per job:

| module | job |
|---|---|
| :mod:`.metrics` | answer metrics (SQuAD normalization, token F1, contains-answer), mean with a 95% CI |
| :mod:`.datasets` | JSONL corpus / queries, the built-in pydoc dataset, MiniLM + FAISS retrieval |
| :mod:`.multihop` | the generated multi-hop suite (``--suite multihop``): one- and two-hop questions, accuracy by hops, agreement with the full prefill |
| :mod:`.levers` | candidate selection rules measured before any joins the core registry (``--selections``, ``--variant``) |
| :mod:`.random_models` | randomly initialized models of public shapes, random-token text (speed only) |
| :mod:`.runner` | the measurements: methods, prompts, :class:`~.runner.Bench`, summaries, drivers |
| :mod:`.report` | the text table and the PNG plots (TTFT vs context, ratio curve, accuracy-speed frontier) |
| :mod:`.cli` | ``kvboost-rag bench`` / ``python -m kvboost_rag_bench`` |
| :mod:`.testing` | tiny random-weight models, in-memory tokenizers and a chat template for tests |

Importing the package imports nothing heavy; torch is imported by the functions that need it.
"""
