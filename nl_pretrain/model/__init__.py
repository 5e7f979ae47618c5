from nl_pretrain.model.model import LanguageModel  # noqa: F401
