from nl_pretrain.optim.optimizer import (ModelOptimizer, SlowLevels, build_optimizer, lr_at,  # noqa: F401
                                         optimizer_groups, param_role)
