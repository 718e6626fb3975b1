from langchain_kvboost import __all__

EXPECTED_ALL = [
    "ChatKVBoost",
    "KVBoostLLM",
    "DocumentsPrompt",
    "documents_to_message",
    "document_block",
    "is_document_block",
    "render_document",
    "warm_documents",
    "message_to_engine",
    "DOCUMENT_FLAG",
    "__version__",
]


def test_all_imports() -> None:
    assert sorted(EXPECTED_ALL) == sorted(__all__)


def test_version_is_the_installed_distribution() -> None:
    from importlib import metadata

    import langchain_kvboost

    assert langchain_kvboost.__version__ == metadata.version("langchain-kvboost")
