"""The saved form of :class:`~megatron_protein.training.mixed_precision_optimizer.MixedPrecisionOptimizer`'s state,
and its conversion to a ``torch.optim.AdamW`` state, for the readers below the training package.

The optimizer (``--bf16`` / ``--fp16`` / ``--use-distributed-optimizer``) saves its float32 main parameters and AdamW
moments as *pieces*: ``(lo, hi, exp_avg, exp_avg_sq)`` ranges of each flattened named parameter, one shard per dp
rank with the distributed optimizer. The converter and the reshard tool read such states without building the
optimizer (and without importing the training package): they need only the format tag, the error type and
:func:`torch_adamw_state_by_order`, which live here so that both the optimizer and those tools import them from one
place below both.
"""
from __future__ import annotations

import torch

#: ``format`` of :meth:`MixedPrecisionOptimizer.state_dict` (so a reader can tell it from a torch optimizer's).
STATE_FORMAT = "megatron_protein.mixed_precision_optimizer"
STATE_VERSION = 1


class OptimizerStateError(ValueError):
    """A saved optimizer state does not fit this optimizer (other parameters, shapes or an incomplete shard set)."""


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def torch_adamw_state_by_order(states: list[dict], model_state: dict[str, torch.Tensor], order: list[str],
                               no_decay) -> dict:
    """The saved shards of a :class:`MixedPrecisionOptimizer` as one ``torch.optim.AdamW`` ``state_dict`` of the
    parameters ``model_state`` (name -> tensor, for the shapes), numbered as the pretraining's torch AdamW numbers
    them: the ``decay`` group then the ``no_decay`` one (``no_decay(name, tensor)``), each in ``order``. What the
    reshard tool carries to other TP/PP degrees. Every parameter must be covered whole."""
    by_name: dict[str, list] = {}
    for state in states:
        for name, entries in state["pieces"].items():
            by_name.setdefault(name, []).extend(entries)
    step = int(states[0]["step"])
    settings = {g.get("name"): {k: v for k, v in g.items() if k != "params"} for g in states[0]["param_groups"]}
    torch_state, param_groups, index = {}, [], 0
    for kind in ("decay", "no_decay"):
        names = [n for n in order if (kind == "no_decay") == bool(no_decay(n, model_state[n]))]
        if not names:
            continue
        indices = []
        for name in names:
            numel = model_state[name].numel()
            exp_avg, exp_avg_sq, covered = torch.zeros(numel), torch.zeros(numel), []
            for lo, hi, a, b in by_name.get(name, ()):
                exp_avg[lo:hi].copy_(a)
                exp_avg_sq[lo:hi].copy_(b)
                covered.append((lo, hi))
            if merged_ranges(covered) != [(0, numel)]:
                raise OptimizerStateError(f"the saved optimizer shards do not cover all of {name!r}")
            shape = model_state[name].shape
            torch_state[index] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg.view(shape),
                                  "exp_avg_sq": exp_avg_sq.view(shape)}
            indices.append(index)
            index += 1
        param_groups.append({**settings.get(kind, {"name": kind}), "params": indices})
    return {"state": torch_state, "param_groups": param_groups}
