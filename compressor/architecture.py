"""What kind of model a config or a module is: causal LM or not, and which class builds it.

One place for the questions that loading, the factored format and factorization each ask.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_architecture(config: Any) -> bool:
    """The config names a language-model-head architecture (``LlamaForCausalLM``, ``GPT2LMHeadModel``)."""
    names = getattr(config, "architectures", None) or []
    return any(name.endswith(_CAUSAL_SUFFIXES) for name in names)


def model_class(config: Any, causal: bool | None = None) -> type:
    """The class to build a model of ``config`` with.

    With ``causal`` unset: the saved architecture's own class where transformers has it (so a
    checkpoint loads into exactly the model that wrote it), else the Auto class that matches it.
    With ``causal`` set: ``AutoModelForCausalLM`` or ``AutoModel``.
    """
    import transformers

    if causal is None:
        for name in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, name, None)
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                return cls
        causal = is_causal_architecture(config)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def has_lm_head(model: nn.Module) -> bool:
    """The model maps hidden states to vocabulary logits (so it has a next-token loss)."""
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None
