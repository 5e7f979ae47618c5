from nl_pretrain.optim.optimizer import ModelOptimizer, lr_at  # noqa: F401
