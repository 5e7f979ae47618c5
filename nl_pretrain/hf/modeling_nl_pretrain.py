"""The transformers model of an nl-pretrain export (``AutoModelForCausalLM`` with
``trust_remote_code=True``).

It wraps :class:`nl_pretrain.model.LanguageModel` (so the ``nl-pretrain`` package must be installed
where the export is loaded; docs/INFERENCE.md): the logits are those of the training code. There is
no cache: ``generate()`` runs the full forward over the prompt and the tokens produced so far at
every step (exact, O(T^2) in the number of tokens; ``nl-pretrain generate`` is the recurrent path).
Batches must not be padded (a recurrent memory has no padding mask): one prompt, or prompts of
equal length.
"""
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_nl_pretrain import NLPretrainConfig


def model_config(nl_model: dict):
    """The :class:`nl_pretrain.config.ModelConfig` of a ``config.json``'s ``nl_model`` section."""
    from nl_pretrain.config import build_config
    return build_config({"model": dict(nl_model), "data": {"seq_len": nl_model["max_seq_len"]}}).model


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

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nl-pretrain models take no padding (attention_mask has zeros): pass one prompt, "
                             "or prompts of equal length")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:       # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
