"""Gradient sync on flat buffers vs per-tensor all-reduce, and GPipe vs 1F1B, each beside its baseline in one run.

``dp`` (every rank of a dp group of ``--world-size``): the parameter list of a BERT encoder (``--layers`` pre-LN
layers of width ``--hidden``, 16 tensors per layer) with random gradients, averaged over the group by

* ``per_tensor``: one blocking ``all_reduce`` per gradient tensor (what a naive loop does; the baseline),
* ``per_tensor_async``: one async ``all_reduce`` per tensor, all started before any is waited on,
* ``fused``: :class:`DataParallel.sync_gradients` on the flat buffers of ``fused_params`` (``--bucket-mb`` buckets).

``dp_overlap``: a whole training step of that encoder (2 accumulated micro-batches) with the bucketed all-reduce
after the backward pass (baseline) and started from gradient hooks during it (``overlap_grad_reduce=True``).

``pp`` (pp = ``--world-size``): the same kind of stack, split with ``stage_layer_range``, one training step over
``--micro-batches`` micro-batches with GPipe and with 1F1B. Reports the step time and the activation memory each
stage held at its peak (``max_in_flight`` micro-batches x the stage's saved-activation bytes per micro-batch,
measured with ``torch.autograd.graph.saved_tensors_hooks``). The single-process baseline runs the unsplit stack over
the same micro-batches on rank 0 before the pipeline runs (on this 2-core CPU the pipeline cannot be faster: the
point of the row is memory, and that the schedule adds little time).

``distributed_optimizer`` (dp = ``--world-size``): the protein BERT (``--opt-layers`` layers of width
``--opt-hidden``) trained as the pretraining trains it, in fp32 and in bf16 (bf16 parameters, float32 main
parameters), with and without ``--use-distributed-optimizer``: the optimizer-state bytes each rank holds (float32
main parameters and AdamW's two moments, counted from the tensors themselves; the float32 gradient buffer and the
model's parameters beside them, which the distributed optimizer does not shard), the bytes each rank sends per
step for the gradient and parameter sync (all-reduce 2 (n - 1) / n x the fp32 gradients; reduce-scatter (n - 1) /
n x the fp32 gradients + all-gather (n - 1) / n x the parameters in their dtype), the median step time (forward,
backward, sync, step), and the largest difference between their parameters after the timed steps.

``pp_bubble`` (one launch of pp processes per ``--bubble-pp``, default 2 and 4): the same stack cut into pp stages
(1F1B) and into ``--virtual-chunks`` model chunks per rank (interleaved 1F1B), one step over ``--micro-batches``
micro-batches. Per rank, the idle fraction (pipeline bubble) two ways:

* ``modelled``: :func:`~megatron_protein.parallel.pipeline.simulate_plans` replays both schedules with one device
  per stage, a layer's forward and backward taking the times measured on rank 0 alone in the same run (messages
  free). This is the bubble a real pipeline of dedicated devices would see; the formula is ``(pp - 1) / M`` of the
  ideal time for 1F1B and ``(pp - 1) / (v M)`` interleaved.
* ``measured``: ``1 - (time in forward and backward steps) / step time`` on this machine. With more processes than
  cores (pp = 4 on 2 cores) the ranks share the cores, so this measures the operating system's scheduling more
  than the schedule's bubble; it is reported for completeness.

``sp_memory`` (one launch of 2 processes, tp = 2): a protein BERT (``--sp-layers`` layers of width ``--hidden``,
``--sp-seq-length`` tokens, micro-batch ``--micro-batch-size``, dropout 0.1, dense prediction) with and without
``sequence_parallel``: the activation memory one micro-batch holds until its backward on each rank (bytes autograd
saves, parameters excluded, measured with ``saved_tensors_hooks``), the tensor a pipeline stage would send, and
the step time (forward, backward) of both in the same run.

Every timed repetition runs the cases back to back after a barrier, so a busy machine slows them alike; the JSON
gives medians. Run::

    python bench/pp_dp.py                         # spawns 2 local processes, then 2 and 4 for the bubble rows
    python bench/pp_dp.py --world-size 4 --reps 5 --output bench/results/pp_dp.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _launch import run_spawned
from megatron_protein.parallel import scg
from megatron_protein.parallel.dp import DataParallel
from megatron_protein.parallel.pipeline import (run_pipeline, simulate_plans, stage_layer_range,
                                                virtual_stage_layer_range)


class Layer(nn.Module):
    """A pre-LN transformer layer's parameter layout (16 tensors) with an MLP-only compute path."""

    def __init__(self, hidden):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.dense_h_to_4h = nn.Linear(hidden, 4 * hidden)
        self.dense_4h_to_h = nn.Linear(4 * hidden, hidden)
        self.extra = nn.ParameterList([nn.Parameter(torch.zeros(hidden)) for _ in range(4)])

    def forward(self, x):
        q, _, v = self.query_key_value(self.input_layernorm(x)).chunk(3, dim=-1)
        x = x + self.dense(torch.tanh(q) * v)
        return x + self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(self.post_attention_layernorm(x))))


def _timed(fn) -> float:
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _log(pg, message):
    if pg.rank == 0:
        print(f"[bench pp_dp] {message}", file=sys.stderr, flush=True)


def bench_dp(args, pg) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*[Layer(args.hidden) for _ in range(args.layers)])
    params = list(model.parameters())
    ddp = DataParallel(model, groups=pg, bucket_numel=int(args.bucket_mb * 2 ** 20) // 4)
    group, world = pg.group("dp"), pg.size("dp")
    grads = [torch.randn_like(p) for p in params]

    def per_tensor():
        for g in grads:
            g.div_(world)
            dist.all_reduce(g, group=group)

    def per_tensor_async():
        handles = []
        for g in grads:
            g.div_(world)
            handles.append(dist.all_reduce(g, group=group, async_op=True))
        for h in handles:
            h.wait()

    def fused():
        ddp.sync_gradients()

    cases = {"per_tensor": per_tensor, "per_tensor_async": per_tensor_async, "fused": fused}
    times = {name: [] for name in cases}
    for rep in range(args.warmup + args.reps):
        if rep % 5 == 0:
            _log(pg, f"dp: repetition {rep}/{args.warmup + args.reps}")
        for name, fn in cases.items():
            t = _timed(fn)
            if rep >= args.warmup:
                times[name].append(t)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ddp.remove_hooks()
    return {"num_tensors": len(params), "num_params": sum(p.numel() for p in params),
            "grad_mb": round(sum(p.numel() for p in params) * 4 / 2 ** 20, 2),
            "num_buckets": len(ddp.fused.buckets),
            **{f"{name}_ms_median": round(v, 2) for name, v in ms.items()},
            "speedup_fused_vs_per_tensor": round(ms["per_tensor"] / ms["fused"], 2),
            "speedup_fused_vs_per_tensor_async": round(ms["per_tensor_async"] / ms["fused"], 2)}


def bench_dp_overlap(args, pg) -> dict:
    """A whole step (forward, backward of 2 accumulated micro-batches, sync) with the all-reduce after backward
    (baseline) and overlapped with the last backward through gradient hooks."""
    g = torch.Generator().manual_seed(2)
    shape = (args.micro_batch_size, args.seq_length, args.hidden)
    micro_batches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(2)]
    replicas = {}
    for overlap in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*[Layer(args.hidden) for _ in range(args.layers)])
        replicas[overlap] = (model, DataParallel(model, groups=pg, bucket_numel=int(args.bucket_mb * 2 ** 20) // 4,
                                                 overlap_grad_reduce=overlap))

    def step(overlap):
        model, ddp = replicas[overlap]
        ddp.zero_grad()
        for i, (x, y) in enumerate(micro_batches):
            context = ddp.no_sync() if i == 0 else contextlib.nullcontext()
            with context:
                F.mse_loss(model(x), y).backward()
        ddp.sync_gradients()

    times = {False: [], True: []}
    for rep in range(args.warmup + args.reps):
        for overlap in (False, True):
            t = _timed(lambda: step(overlap))
            if rep >= args.warmup:
                times[overlap].append(t)
    _log(pg, "dp overlap done")
    grads_equal = all(torch.equal(a.grad, b.grad) for a, b in zip(replicas[False][0].parameters(),
                                                                  replicas[True][0].parameters()))
    after, overlapped = (1e3 * statistics.median(times[k]) for k in (False, True))
    return {"step_ms_median_sync_after_backward": round(after, 1), "step_ms_median_overlapped": round(overlapped, 1),
            "speedup": round(after / overlapped, 3), "same_gradients": grads_equal}


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, stage_input, mb):
        h = mb["x"] if stage_input is None else stage_input
        for layer in self.layers:
            h = layer(h)
        return h


def _loss(output, mb):
    return F.mse_loss(output, mb["y"])


def _saved_bytes(stage, stage_input, mb) -> int:
    """Bytes autograd saves for backward in one micro-batch's forward through ``stage`` (plus the loss)."""
    total = 0
    parameters = {p.data_ptr() for p in stage.parameters()}

    def pack(t):
        nonlocal total
        if t.data_ptr() not in parameters:  # weights are saved too, but they are not activation memory
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(stage_input, mb)
        _loss(out, mb)
    return total


def bench_pp(args, pg) -> dict:
    pp, rank = pg.size("pp"), pg.rank_in("pp")
    torch.manual_seed(0)
    all_layers = [Layer(args.hidden) for _ in range(args.layers)]
    g = torch.Generator().manual_seed(1)
    shape = (args.micro_batch_size, args.seq_length, args.hidden)
    micro_batches = [{"x": torch.randn(shape, generator=g), "y": torch.randn(shape, generator=g)}
                     for _ in range(args.micro_batches)]
    stage = Stack([all_layers[i] for i in stage_layer_range(args.layers, pp, rank)])
    stage_input = None if rank == 0 else torch.randn(shape, requires_grad=True)
    per_micro_batch = _saved_bytes(stage, stage_input, micro_batches[0])

    result = {"micro_batches": args.micro_batches, "activation_shape": list(shape), "pp": pp}
    if rank == 0:
        full = Stack(all_layers)
        full_bytes = _saved_bytes(full, None, micro_batches[0])

        def single_process():
            for mb in micro_batches:
                (_loss(full(None, mb), mb) / len(micro_batches)).backward()

        single_process()
        times = [_timed_local(single_process) for _ in range(args.reps)]
        result["baseline_single_process"] = {
            "step_ms_median": round(1e3 * statistics.median(times), 1),
            # Plain gradient accumulation frees each micro-batch's graph after its backward.
            "peak_saved_activation_mb": round(full_bytes / 2 ** 20, 2)}
    dist.barrier()
    for schedule in ("gpipe", "1f1b"):
        stats = {}
        times = []
        for rep in range(args.warmup + args.reps):
            t = _timed(lambda: run_pipeline(stage, micro_batches, _loss, shape, schedule=schedule, groups=pg,
                                            stats=stats))
            if rep >= args.warmup:
                times.append(t)
        _log(pg, f"pp: {schedule} done")
        peaks = [None] * pp
        dist.all_gather_object(peaks, {"max_in_flight": stats["max_in_flight"],
                                       "peak_saved_activation_mb": round(
                                           stats["max_in_flight"] * per_micro_batch / 2 ** 20, 2)},
                               group=pg.group("pp"))
        result[schedule] = {"step_ms_median": round(1e3 * statistics.median(times), 1), "per_stage": peaks}
    return result


def _layer_times(args, layer) -> tuple[float, float]:
    """Median forward and backward seconds of one layer on one micro-batch, in this process alone."""
    shape = (args.micro_batch_size, args.seq_length, args.hidden)
    x = torch.randn(shape, requires_grad=True)
    forwards, backwards = [], []
    for rep in range(args.warmup + args.reps):
        start = time.perf_counter()
        y = layer(x)
        middle = time.perf_counter()
        y.backward(torch.ones_like(y))
        end = time.perf_counter()
        if rep >= args.warmup:
            forwards.append(middle - start)
            backwards.append(end - middle)
    return statistics.median(forwards), statistics.median(backwards)


def bench_bubble(args) -> dict:
    """1F1B against interleaved 1F1B on pp = world size: per-rank idle fraction, modelled and measured."""
    torch.set_num_threads(1)
    pg = scg.init_process_group([("pp", None)])
    pp, rank = pg.size("pp"), pg.rank_in("pp")
    torch.manual_seed(0)
    all_layers = [Layer(args.hidden) for _ in range(args.layers)]
    g = torch.Generator().manual_seed(1)
    shape = (args.micro_batch_size, args.seq_length, args.hidden)
    micro_batches = [{"x": torch.randn(shape, generator=g), "y": torch.randn(shape, generator=g)}
                     for _ in range(args.micro_batches)]
    layer_times = None
    if rank == 0:   # the others wait at the barrier, so rank 0 has the cores to itself
        layer_times = _layer_times(args, all_layers[0])
    dist.barrier()
    out = {"pp": pp, "micro_batches": args.micro_batches, "layers": args.layers, "virtual_chunks": args.virtual_chunks}
    for name, chunks in (("1f1b", 1), ("interleaved", args.virtual_chunks)):
        stages = [Stack([all_layers[i] for i in virtual_stage_layer_range(args.layers, pp, chunks, rank, c)])
                  for c in range(chunks)]
        steps = stages[0] if chunks == 1 else stages
        idle, times = [], []
        for rep in range(args.warmup + args.reps):
            stats = {}
            dist.barrier()
            run_pipeline(steps, micro_batches, _loss, shape, groups=pg, stats=stats)
            if rep >= args.warmup:
                idle.append(1.0 - (stats["forward_seconds"] + stats["backward_seconds"]) / stats["seconds"])
                times.append(stats["seconds"])
        per_rank = [None] * pp
        dist.all_gather_object(per_rank, {"idle_fraction": round(statistics.median(idle), 3),
                                          "step_ms": round(1e3 * statistics.median(times), 1)}, group=pg.group("pp"))
        _log(pg, f"pp{pp} {name} done")
        entry = {"measured_per_rank": per_rank}
        if rank == 0:
            forward, backward = layer_times
            per_chunk = args.layers // (pp * chunks)
            modelled = simulate_plans("1f1b", pp, args.micro_batches, chunks,
                                      forward_time=lambda r, c: forward * per_chunk,
                                      backward_time=lambda r, c: backward * per_chunk)
            entry["modelled_per_rank"] = [round(m["idle_fraction"], 3) for m in modelled]
            entry["modelled_step_ms"] = round(1e3 * modelled[0]["step"], 1)
            bubble = (pp - 1) / (chunks * args.micro_batches)   # bubble time over ideal time (Narayanan et al.)
            entry["formula_idle_fraction"] = round(bubble / (1 + bubble), 3)
        out[name] = entry
    if rank == 0:
        out["layer_forward_ms"], out["layer_backward_ms"] = (round(1e3 * t, 2) for t in layer_times)
    return out


def bench_sp_memory(args) -> dict:
    """Activation memory per rank and step time of a protein BERT at tp = 2 with and without sequence
    parallelism (dense prediction, dropout 0.1)."""
    from megatron_protein.models.bert import BertConfig, ProteinBertModel, masked_lm_loss
    from megatron_protein.parallel.tensor_parallel import (all_reduce_sequence_parallel_gradients,
                                                           model_parallel_seed, sequence_parallel_parameters)
    torch.set_num_threads(1)
    pg = scg.init_process_group([("tp", None)])
    tp = pg.size("tp")
    b, s, h = args.micro_batch_size, args.sp_seq_length, args.hidden
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 25, (b, s), generator=g)
    labels = torch.where(torch.rand(b, s, generator=g) < 0.15, tokens, torch.full_like(tokens, -100))
    out = {"tp": tp, "layers": args.sp_layers, "hidden": h, "seq_length": s, "micro_batch_size": b}
    models = {}
    for sp in (False, True):
        model_parallel_seed(1, pg)
        config = BertConfig(num_layers=args.sp_layers, hidden_size=h, num_attention_heads=max(tp, h // 64),
                            max_position_embeddings=s, hidden_dropout=0.1, attention_dropout=0.1,
                            sequence_parallel=sp)
        models[sp] = ProteinBertModel(config, pg).train()

    def step(sp, hook=None):
        model = models[sp]
        context = (torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t) if hook is not None
                   else contextlib.nullcontext())
        with context:
            logits = model(tokens, None)
            loss, _ = masked_lm_loss(logits, labels, (labels != -100).float(), pg)
        loss.backward()
        all_reduce_sequence_parallel_gradients(sequence_parallel_parameters(model), pg)
        model.zero_grad(set_to_none=True)

    for sp in (False, True):
        params = {p.data_ptr() for p in models[sp].parameters()}
        saved = {"bytes": 0}

        def pack(t, params=params, saved=saved):
            if t.data_ptr() not in params:
                saved["bytes"] += t.numel() * t.element_size()
            return t

        step(sp, pack)
        times = [_timed(lambda: step(sp)) for _ in range(args.warmup + args.reps)][args.warmup:]
        out["with_sp" if sp else "without_sp"] = {
            "saved_activation_mib_per_rank": round(saved["bytes"] / 2 ** 20, 2),
            "pipeline_message_mib": round(b * (s // tp if sp else s) * h * 4 / 2 ** 20, 3),
            "step_ms_median": round(1e3 * statistics.median(times), 1)}
        _log(pg, f"sp_memory sequence_parallel={sp} done")
    out["activation_ratio_sp_over_plain"] = round(out["with_sp"]["saved_activation_mib_per_rank"]
                                                  / out["without_sp"]["saved_activation_mib_per_rank"], 3)
    return out


def _timed_local(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_distributed_optimizer(args, pg) -> dict:
    """Optimizer-state memory per rank and step cost with and without the distributed optimizer (module doc)."""
    from megatron_protein.models.bert import BertConfig, ProteinBertModel, masked_lm_loss, predicted_labels
    from megatron_protein.parallel.tensor_parallel import model_parallel_seed
    from megatron_protein.training.mixed_precision_optimizer import MixedPrecisionOptimizer, build_data_parallel
    from megatron_protein.training.optimizer import OptimConfig

    dp = pg.size("dp")
    g = torch.Generator().manual_seed(5 + pg.rank_in("dp"))
    tokens = torch.randint(5, 25, (args.micro_batch_size, args.seq_length), generator=g)
    labels = torch.where(torch.rand(tokens.shape, generator=g) < 0.15, tokens, torch.full_like(tokens, -100))
    result = {"dp": dp, "hidden": args.opt_hidden, "layers": args.opt_layers}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cases = {}
        for distributed in (False, True):
            model_parallel_seed(1, pg)
            config = BertConfig(num_layers=args.opt_layers, hidden_size=args.opt_hidden,
                                num_attention_heads=max(1, args.opt_hidden // 64),
                                max_position_embeddings=args.seq_length, hidden_dropout=0.0, attention_dropout=0.0)
            model = ProteinBertModel(config, pg)
            ddp = build_data_parallel(model, pg, overlap_grad_reduce=False, use_distributed_optimizer=distributed)
            ddp.broadcast_parameters()
            optimizer = MixedPrecisionOptimizer(ddp, OptimConfig(lr=1e-4), dtype, pg)
            cases[distributed] = (model, ddp, optimizer)

        def step(distributed):
            model, ddp, optimizer = cases[distributed]
            optimizer.zero_grad()
            predicted = labels != -100
            logits = model(tokens, None, prediction_mask=predicted)
            loss, _ = masked_lm_loss(logits, *predicted_labels(labels, predicted), pg)
            loss.backward()
            ddp.sync_gradients()
            norm, finite = optimizer.grad_norm_and_finite(loss)
            optimizer.clip_(1.0, norm)
            optimizer.step()

        times = {False: [], True: []}
        for rep in range(args.warmup + args.reps):
            for distributed in (False, True):
                t = _timed(lambda: step(distributed))
                if rep >= args.warmup:
                    times[distributed].append(t)
        _log(pg, f"distributed optimizer: {precision} done")
        # The two differ only in how the global norm's partial sums are added (float64), hence in the last bit of
        # a clipping coefficient at most.
        diff = max(float((a.float() - b.float()).abs().max())
                   for a, b in zip(cases[False][0].parameters(), cases[True][0].parameters()))
        entry = {"max_abs_parameter_difference_after_steps": diff}
        for distributed, (model, ddp, optimizer) in cases.items():
            numel = sum(p.numel() for p in model.parameters())
            sizes = optimizer.state_bytes()
            param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            grad_bytes = sizes["grad_buffer"]
            if distributed:
                sent = (dp - 1) / dp * (grad_bytes + param_bytes)
            else:
                sent = 2 * (dp - 1) / dp * grad_bytes
            entry["with" if distributed else "without"] = {
                "parameters": numel,
                "optimizer_state_mib_per_rank": round(sizes["optimizer_state"] / 2 ** 20, 2),
                "main_params_mib": round(sizes["main_params"] / 2 ** 20, 2),
                "adam_moments_mib": round(sizes["adam_moments"] / 2 ** 20, 2),
                "grad_buffer_mib": round(grad_bytes / 2 ** 20, 2),
                "model_params_mib": round(param_bytes / 2 ** 20, 2),
                "bytes_per_param_per_rank": round((sizes["optimizer_state"] + grad_bytes + param_bytes) / numel, 2),
                "sync_mib_sent_per_rank_per_step": round(sent / 2 ** 20, 2),
                "step_ms_median": round(1e3 * statistics.median(times[distributed]), 1)}
        entry["optimizer_state_ratio_with_vs_without"] = round(
            entry["with"]["optimizer_state_mib_per_rank"] / entry["without"]["optimizer_state_mib_per_rank"], 3)
        result[precision] = entry
    return result


def _bench(args) -> dict:
    torch.set_num_threads(1)
    out = {"benchmark": "pp_dp", "world_size": None, "torch": torch.__version__, "layers": args.layers,
           "hidden": args.hidden, "reps": args.reps}
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    with open("/proc/loadavg") as f:
        out["load_average_before"] = f.read().split()[:3]
    pg = scg.init_process_group([("dp", None)])
    out["world_size"] = pg.world_size
    out["backend"] = pg.backend
    sections = set(args.sections)
    if "dp" in sections:
        out["dp"] = bench_dp(args, pg)
    if "dp_overlap" in sections:
        out["dp_overlap"] = bench_dp_overlap(args, pg)
    if "distributed_optimizer" in sections:
        out["distributed_optimizer"] = bench_distributed_optimizer(args, pg)
    pg = scg.init_process_group([("pp", None)])
    if "pp" in sections:
        out["pp"] = bench_pp(args, pg)
    with open("/proc/loadavg") as f:
        out["load_average_after"] = f.read().split()[:3]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bubble-pp", type=int, nargs="*", default=[2, 4],
                        help="pipeline sizes of the 1F1B / interleaved bubble rows (one launch each; none: skip)")
    parser.add_argument("--virtual-chunks", type=int, default=2, help="model chunks per rank, interleaved rows")
    parser.add_argument("--sp-layers", type=int, default=4)
    parser.add_argument("--sp-seq-length", type=int, default=512)
    parser.add_argument("--no-sp-memory", action="store_true", help="skip the sequence-parallel memory rows")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--bucket-mb", type=float, default=4.0, help="DP bucket size in MiB (float32)")
    parser.add_argument("--opt-hidden", type=int, default=256, help="width of the distributed-optimizer model")
    parser.add_argument("--opt-layers", type=int, default=4)
    parser.add_argument("--sections", nargs="+", default=["dp", "dp_overlap", "distributed_optimizer", "pp"],
                        choices=["dp", "dp_overlap", "distributed_optimizer", "pp"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--world-size", type=int, default=2, help="processes to spawn when not under torchrun")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        raise SystemExit("bench/pp_dp.py launches its own processes (several launches of different sizes); run it "
                         "with python, not torchrun")
    result = run_spawned(_bench, args, args.world_size)
    result["pp_bubble"] = {f"pp{pp}": run_spawned(bench_bubble, args, pp) for pp in args.bubble_pp}
    if not args.no_sp_memory:
        result["sp_memory"] = run_spawned(bench_sp_memory, args, 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.output + ".tmp", args.output)

if __name__ == "__main__":
    main()
