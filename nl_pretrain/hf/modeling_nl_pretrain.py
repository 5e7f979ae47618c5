"""The transformers model of an nl-pretrain export (``AutoModelForCausalLM`` with
``trust_remote_code=True``).

It wraps :class:`nl_pretrain.model.LanguageModel` (so the ``nl-pretrain`` package must be installed
where the export is loaded; docs/INFERENCE.md): the logits are those of the training code.
``generate()`` decodes on our recurrent path: the prompt is prefilled (chunk-parallel), then each new
token is one step from the carried state (``nl_state``, a
:class:`nl_pretrain.infer.decode.DecodeState`: constant in size for attention-free families, a KV
cache for attention), which computes exactly the training-time function. Greedy search and
sampling work; beam search does not (the state cannot be reordered). Batches must not be padded (a
recurrent memory has no padding mask): one prompt, or prompts of equal length.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_nl_pretrain import NLPretrainConfig


def model_config(nl_model: dict):
    """The :class:`nl_pretrain.config.ModelConfig` of a ``config.json``'s ``nl_model`` section."""
    from nl_pretrain.config import build_config
    return build_config({"model": dict(nl_model), "data": {"seq_len": nl_model["max_seq_len"]}}).model


@dataclass
class NLPretrainOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    nl_state: Optional[Any] = None          # the recurrent state after these tokens (use_cache=True)


class NLPretrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NLPretrainConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: NLPretrainConfig):
        super().__init__(config)
        from nl_pretrain.model.model import LanguageModel
        self.model = LanguageModel(model_config(config.nl_model))
        self.post_init()

    def _init_weights(self, module):
        pass        # LanguageModel initialises itself; from_pretrained then loads every tensor

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, nl_state=None, use_cache=None, **kwargs):
        """Without ``nl_state``: the full forward over ``input_ids`` (and, with ``use_cache=True``, the
        state after them: the prefill). With it: ``input_ids (B, 1)`` is one step from that state."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nl-pretrain models take no padding (attention_mask has zeros): pass one prompt, "
                             "or prompts of equal length")
        from nl_pretrain.infer import decode
        if nl_state is not None:
            logits, nl_state = decode.step(self.model, input_ids[:, -1], nl_state)
            logits = logits[:, None]
        elif use_cache:
            B, T = input_ids.shape
            logits, nl_state = decode.prefill(self.model, input_ids, torch.full((B,), T, dtype=torch.long,
                                                                                device=input_ids.device))
        else:
            logits = self.model(input_ids)
        loss = None
        if labels is not None:       # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return NLPretrainOutput(loss=loss, logits=logits, nl_state=nl_state)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, nl_state=None, use_cache=True,
                                      **kwargs):
        if nl_state is not None:               # every token after the prompt: one step
            return {"input_ids": input_ids[:, -1:], "nl_state": nl_state}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        model_kwargs["nl_state"] = outputs.nl_state
        return model_kwargs
