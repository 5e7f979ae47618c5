"""The transformers config of an nl-pretrain export (``config.json``; loaded by ``AutoConfig`` with
``trust_remote_code=True``).

``nl_model`` is the run's whole ``model:`` section (:class:`nl_pretrain.config.ModelConfig` as a dict),
so the exported model is built by the same code that trained it. The usual transformers names
(``vocab_size``, ``hidden_size``, ...) are copies for tools that read them.
"""
from transformers import PretrainedConfig


class NLPretrainConfig(PretrainedConfig):
    model_type = "nl_pretrain"

    def __init__(self, nl_model=None, **kwargs):
        self.nl_model = dict(nl_model or {})
        m = self.nl_model
        for hf_name, ours in (("vocab_size", "vocab_size"), ("hidden_size", "d_model"),
                              ("num_hidden_layers", "n_layers"), ("num_attention_heads", "n_heads"),
                              ("max_position_embeddings", "max_seq_len")):
            if ours in m:
                kwargs[hf_name] = m[ours]
        # the tied lm head is the embedding itself (no second tensor), so transformers has nothing to tie
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
