"""How a module's parameters split across tensor-parallel ranks, declared by the module itself.

A model class sets ``tp_plan = {attribute: style}`` for its own parameters and for the children it
wants split as a whole; :func:`nl_pretrain.parallel.tensor.shard_plan` walks the model with it.
Every parameter must be covered: a module with parameters of its own and no ``tp_plan`` is an error
(not a silently replicated tensor). Children a plan does not name are walked in turn. Names of
variants a module does not build (e.g. the static projections of an adaptive SMT layer) may stay in
its plan. The model code never imports any parallel library; this file only names the styles.
"""
COLUMN = "column"          # nn.Linear whose output channels are head-major: each rank keeps a block of heads
ROW = "row"                # nn.Linear that reads heads: each rank keeps the matching input columns
HEADS = "heads"            # every tensor below (parameter or child module) is sliced by head along dim 0
VOCAB = "vocab"            # nn.Embedding: each rank keeps a block of vocabulary rows
REPLICATED = "replicated"  # the same full tensor on every rank
HEAD_SLICE = "head_slice"  # an identity child that tensor parallelism makes "this rank's heads of z"
