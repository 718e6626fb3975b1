"""``KVBoostLLM``: string-in/string-out LangChain LLM over the same engine as ``ChatKVBoost``.

For chains that build one flat prompt string. Warmed documents pasted into the prompt verbatim
are found by the engine's automatic detection, so their KV is reused with no extra wiring.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM, LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from kvboost_rag.frameworks import options as integration
from kvboost_rag.serve.streaming import TokenStream

from ._base import CheckedBatch, KVBoostParams, response_metadata, usage_metadata
from .retrieved import retrieved_documents


class KVBoostLLM(CheckedBatch, BaseLLM, KVBoostParams):
    """Completion-style LLM; share a model with the chat class via ``KVBoostLLM(engine=chat.load_engine())``.

    ``chat_template=True`` wraps each prompt as one user turn of the tokenizer's chat template,
    which instruction-tuned models answer far better than raw text; the default sends the prompt
    as is (plain completion). ``response_format`` (bound or per call) constrains the answer to JSON
    / a JSON schema, so it always parses.
    """

    chat_template: bool = False

    @property
    def _llm_type(self) -> str:
        return "kvboost"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_label, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "strategy": self.strategy, "chat_template": self.chat_template}

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "kvboost"
        model = kwargs.get("model")
        params["ls_model_name"] = model if isinstance(model, str) else self.model_label
        return params

    def _prepare(self, prompt: str, stop: Optional[list[str]], kwargs: dict, run_manager: Any = None) -> TokenStream:
        """The engine stream of one prompt. ``response_format`` (``.bind(response_format=...)`` or a
        call argument; ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
        {"schema": ...}}``, a JSON schema or a pydantic class) constrains the answer as in
        :class:`ChatKVBoost` (:func:`kvboost_rag.frameworks.options.response_format_constraint`); an
        unsupported value is an error."""
        kwargs = dict(kwargs)
        constraint = integration.response_format_constraint(kwargs.pop("response_format", None),
                                                            owner=type(self).__name__)
        gen_kwargs = self._generation_kwargs(stop, kwargs)
        engine = self.load_engine()
        if self.chat_template:
            prompt = engine.chat_segments([{"role": "user", "content": prompt}])
        documents = retrieved_documents(run_manager)  # the chain's documents pasted into the prompt
        if documents:
            prompt = integration.mark_documents(prompt, documents, engine)
        return engine.stream(prompt, **integration.constrained_kwargs(gen_kwargs, constraint, engine=engine, prompt=prompt))

    def _generation(self, result: Any) -> Generation:
        info = response_metadata(result, self.model_label)
        info["usage_metadata"] = usage_metadata(result)
        return Generation(text=result.text, generation_info=info)

    def _llm_output(self, results: list) -> dict:
        """Summed usage across prompts (what LangChain's token-usage callbacks read)."""
        return {
            "model_name": self.model_label,
            "token_usage": {
                "prompt_tokens": sum(r.prompt_tokens for r in results),
                "completion_tokens": sum(r.completion_tokens for r in results),
                "total_tokens": sum(r.prompt_tokens + r.completion_tokens for r in results),
                "cache_read_tokens": sum(r.reused_tokens for r in results),
            },
        }

    def _generate(self, prompts: list[str], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        results = []
        for prompt in prompts:
            stream = self._prepare(prompt, stop, kwargs, run_manager)
            for delta in stream:
                if run_manager:
                    run_manager.on_llm_new_token(delta)
            results.append(stream.result)
        return LLMResult(generations=[[self._generation(r)] for r in results], llm_output=self._llm_output(results))

    def _stream(self, prompt: str, stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        stream = self._prepare(prompt, stop, kwargs, run_manager)
        for delta in stream:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=self._generation(stream.result).generation_info)

    async def _aprepare(self, prompt: str, stop: Optional[list[str]], kwargs: dict,
                        run_manager: Any = None) -> TokenStream:
        await self.aload_engine()  # a lazy load takes seconds: keep it off the event loop
        return self._prepare(prompt, stop, kwargs, run_manager)

    async def _agenerate(self, prompts: list[str], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        results = []
        for prompt in prompts:
            stream = await self._aprepare(prompt, stop, kwargs, run_manager)
            async for delta in stream:
                if run_manager:
                    await run_manager.on_llm_new_token(delta)
            results.append(stream.result)
        return LLMResult(generations=[[self._generation(r)] for r in results], llm_output=self._llm_output(results))

    async def _astream(self, prompt: str, stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        stream = await self._aprepare(prompt, stop, kwargs, run_manager)
        async for delta in stream:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=self._generation(stream.result).generation_info)
