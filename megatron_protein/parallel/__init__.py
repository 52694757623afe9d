"""The shared parallel core: one process-group builder (scg), autograd-aware collectives, tensor-parallel layers,
pipeline schedules (pipeline), data parallelism over flat buffers (dp, fused_params).

Model code imports from here (or from the submodules) and never calls ``torch.distributed`` itself::

    from megatron_protein.parallel import scg, collectives, tensor_parallel
    pg = scg.init_process_group([("dp", None), ("tp", 2)])
    layer = tensor_parallel.ColumnParallelLinear(1024, 4096, gather_output=False, groups=pg)
"""
from . import collectives, dp, fused_params, pipeline, random, scg, tensor_parallel
from . import bp, dap  # after dp: both use its param-group all-reduce
from .collectives import (AsyncHandle, CollectiveShapeError, all_gather, all_gather_async, all_reduce_async,
                          all_to_all,
                          all_to_all_async, broadcast, copy_to_group, gather_from_group, gather_from_group_async,
                          reduce_from_group,
                          reduce_from_group_, reduce_scatter_to_group, scatter_to_group)
from .random import get_rng_tracker, model_parallel_seed
from .scg import ParallelConfigError, ParallelGroups, current, init_process_group
from .tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, pad_vocab_size,
                              vocab_parallel_cross_entropy, vocab_parallel_logits)

__all__ = [
    "scg", "collectives", "tensor_parallel", "random", "pipeline", "dp", "fused_params", "dap", "bp",
    "init_process_group", "current", "ParallelGroups", "ParallelConfigError",
    "copy_to_group", "reduce_from_group", "reduce_from_group_", "scatter_to_group", "gather_from_group",
    "reduce_scatter_to_group",
    "all_gather", "all_to_all", "broadcast", "all_to_all_async", "all_reduce_async", "gather_from_group_async",
    "all_gather_async", "AsyncHandle",
    "CollectiveShapeError",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "vocab_parallel_logits", "pad_vocab_size", "model_parallel_seed", "get_rng_tracker",
]
