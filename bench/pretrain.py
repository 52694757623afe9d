"""Training throughput, model-FLOP utilisation and peak memory of the protein BERT next to its peers.

For each config (``small``: hidden 256, 4 layers, 4 heads, batch 8 x 256; ``base``: hidden 768, 12 layers, 12 heads,
batch 4 x 512) the same training step (forward, masked-LM loss on 15% of positions, backward, AdamW step) is timed
for, in this one process and on the same thread count:

- ``megatron_protein``: our ProteinBertModel at TP=1 (the production code path of pretraining, sparse prediction
  included: the last layer and the MLM head at the masked positions only) with dropout 0.1 like BERT,
  ``megatron_protein_nodropout`` with dropout 0 like ESM2 (which has none), and
  ``megatron_protein_nodropout_allpositions``, the same with ``--no-sparse-prediction``; in fp32, and in bf16 as
  ``--bf16`` trains (bf16 parameters, float32 main parameters and gradient accumulation in the
  :class:`~megatron_protein.training.mixed_precision_optimizer.MixedPrecisionOptimizer`), plus
  ``megatron_protein_nodropout_autocast``, the same model as ``--bf16 --autocast`` runs it (float32 parameters
  under ``torch.autocast``, what ``--bf16`` did before);
- Hugging Face ``transformers.BertForMaskedLM`` and ``EsmForMaskedLM`` (sdpa attention), and fair-esm's ``ESM2``,
  randomly initialised at the same sizes (vocab 33 for ESM's alphabet, 30 + padding for ours, 30 for BERT), bf16
  by autocast (their training scripts' way).

Model FLOPs per step follow Narayanan et al. 2021 (Megatron-LM, appendix), without recompute:
``72 B s L h^2 (1 + s / (6 h)) + 6 B s h V`` for B sequences of s tokens, L layers, hidden h, vocabulary V.
MFU divides the achieved model FLOP/s by this machine's measured fp32 matmul rate (``torch.mm`` of 2048 x 2048
on the same threads), the fair ceiling for a CPU; bf16 runs are also divided by the measured bf16 matmul rate (on a
CPU with AVX512-BF16 about four times the fp32 one), their own ceiling. Each rate is the best of many timed
repetitions, measured before and after every timing: on a busy core a single or median measurement understates
the rate and inflates MFU. Model FLOPs are the dense model's, for every
model: sparse prediction skips about 0.7 / L of them, so its MFU counts work the step does not do; the
``_allpositions`` run's MFU is the hardware-efficiency figure. Throughput is timed in this one process, all models built side
by side and stepped in rotating rounds (a load change on a shared machine hits all alike); tokens/s is from the
best step of each, the median is reported too.
Peak memory cannot be attributed inside one process (freed CPU memory stays resident), so each model's peak is
measured in a fresh child process: the peak resident set size during its training steps above the level before
the model was built, sampled every 2 ms.

Ratio to fair-esm ESM2 and its spread (``--ratio-repeats N``, default 3): ESM2's step time moves with the
allocator's state of the process it runs in, so the ratio of ours (dropout 0, bf16 as ``--bf16`` trains; and fp32)
to ESM2 is measured again in N fresh processes, each timing only those two in rotating rounds, and reported as
min / median / max over them.

With ``--compile-layers``, ``megatron_protein_compiled`` and ``megatron_protein_nodropout_compiled`` are ours with
``BertConfig.compile_layers`` (each layer's non-matmul work through one ``torch.compile``d chain,
``megatron_protein/kernels/compiled.py``); their first warm-up step includes the compilation, reported as
``compile_seconds`` (first step minus the best step) with the number of steps after which it has paid for itself
against the eager model of the same dropout (``break_even_steps``).

Profile (``--profile``): one step of each of our dropout-0 models (eager; in bf16 with main parameters and under
autocast; compiled) under ``torch.profiler``, summarised as the share of the operators' self CPU time in matmuls,
copies (casts, layout changes), elementwise work (pointwise, softmax, LayerNorm, reductions), inductor's fused
kernels, the optimizer and the rest (:func:`classify_op`), with the ``aten::copy_`` calls of the step.

    python bench/pretrain.py [--configs small base] [--steps 5] [--threads 2] [--peers bert esm esm2]
                             [--ratio-repeats 3] [--compile-layers] [--profile]

Prints one JSON object (also written to --output when given), with ``uptime`` before and after.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

CONFIGS = {
    "small": dict(hidden=256, layers=4, heads=4, batch=8, seq=256),
    "base": dict(hidden=768, layers=12, heads=12, batch=4, seq=512),
}


class PeakRSS:
    """Peak resident set size (bytes) while the block runs, sampled by a thread from /proc/self/statm."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_above_base(self) -> int:
        return self.peak - self.base


def matmul_flops_per_second(threads: int, n: int = 2048, reps: int = 10, dtype=torch.float32) -> float:
    """This machine's matmul rate: ``torch.mm`` of two n x n matrices, the best of ``reps`` repetitions (the
    fastest repetition is the one least disturbed by other load)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load average " + ", ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def model_flops_per_step(cfg: dict, vocab: int) -> float:
    b, s, h, layers = cfg["batch"], cfg["seq"], cfg["hidden"], cfg["layers"]
    return 72 * b * s * layers * h * h * (1 + s / (6 * h)) + 6 * b * s * h * vocab


# ---------------------------------------------------------------------------------------------------- models
def build_ours(cfg: dict, dropout: float = 0.1, sparse_prediction: bool = True, compile_layers: bool = False,
               main_params_dtype=None):
    """Ours as the pretraining builds it. ``main_params_dtype`` (bf16): the model in that dtype with the
    mixed-precision optimizer (``--bf16``); None: float32 parameters and torch AdamW (fp32, ``--autocast``)."""
    from megatron_protein.models.bert import BertConfig, ProteinBertModel, masked_lm_loss, predicted_labels
    from megatron_protein.parallel import scg
    from megatron_protein.parallel.tensor_parallel import model_parallel_seed
    from megatron_protein.training.mixed_precision_optimizer import MixedPrecisionOptimizer, build_data_parallel
    from megatron_protein.training.optimizer import OptimConfig, build_optimizer

    groups = scg.init_process_group([("dp", None), ("pp", 1), ("tp", 1)])
    model_parallel_seed(1234, groups)
    config = BertConfig(num_layers=cfg["layers"], hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
                        max_position_embeddings=cfg["seq"], hidden_dropout=dropout, attention_dropout=dropout,
                        compile_layers=compile_layers)
    model = ProteinBertModel(config, groups)
    if main_params_dtype is None:
        model.build_optimizer = lambda: build_optimizer(model, OptimConfig(lr=1e-4))  # the pretraining optimizer
    else:
        ddp = build_data_parallel(model, groups, overlap_grad_reduce=False, use_distributed_optimizer=False)
        optimizer = MixedPrecisionOptimizer(ddp, OptimConfig(lr=1e-4), main_params_dtype, groups)
        model.build_optimizer = lambda: optimizer
        model.runs_in = main_params_dtype  # no autocast around it

    def loss_fn(tokens, labels):
        predicted = labels != -100
        if sparse_prediction:  # what pretraining runs (train_loop.Pretrainer): last layer + head at masked positions
            logits = model(tokens, None, prediction_mask=predicted)
            loss, _ = masked_lm_loss(logits, *predicted_labels(labels, predicted), groups)
        else:
            logits = model(tokens, None)
            loss, _ = masked_lm_loss(logits, labels, predicted.float(), groups)
        return loss
    return model, loss_fn, config.padded_vocab_size(1)


def build_hf_bert(cfg: dict):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=30, hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                        num_attention_heads=cfg["heads"], intermediate_size=4 * cfg["hidden"],
                        max_position_embeddings=cfg["seq"], hidden_act="gelu", attn_implementation="sdpa")
    model = BertForMaskedLM(config)

    def loss_fn(tokens, labels):
        return model(input_ids=tokens, labels=labels).loss
    return model, loss_fn, 30


def build_hf_esm(cfg: dict):
    from transformers import EsmConfig, EsmForMaskedLM

    config = EsmConfig(vocab_size=33, hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                       num_attention_heads=cfg["heads"], intermediate_size=4 * cfg["hidden"],
                       max_position_embeddings=cfg["seq"] + 2, position_embedding_type="rotary",
                       pad_token_id=1, mask_token_id=32, token_dropout=False, attn_implementation="sdpa")
    model = EsmForMaskedLM(config)

    def loss_fn(tokens, labels):
        return model(input_ids=tokens, labels=labels).loss
    return model, loss_fn, 33


def build_fair_esm2(cfg: dict):
    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = esm.model.esm2.ESM2(num_layers=cfg["layers"], embed_dim=cfg["hidden"], attention_heads=cfg["heads"],
                                alphabet=alphabet, token_dropout=False)

    def loss_fn(tokens, labels):
        logits = model(tokens)["logits"]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return model, loss_fn, len(alphabet)


def build_ours_without_dropout(cfg: dict, **kwargs):
    """Ours with dropout 0, like fair-esm's ESM2 (which has no dropout at all): the like-for-like comparison."""
    return build_ours(cfg, dropout=0.0, **kwargs)


def build_ours_without_dropout_all_positions(cfg: dict, **kwargs):
    """Ours without dropout and without sparse prediction (``--no-sparse-prediction``: the last layer and the MLM
    head at every position, as the peers compute them): what sparse prediction is worth."""
    return build_ours(cfg, dropout=0.0, sparse_prediction=False, **kwargs)


def build_ours_compiled(cfg: dict, **kwargs):
    """Ours (dropout 0.1) with every layer's training forward through one torch.compile'd chain."""
    return build_ours(cfg, compile_layers=True, **kwargs)


def build_ours_without_dropout_compiled(cfg: dict, **kwargs):
    """Ours with dropout 0 and compiled layers."""
    return build_ours(cfg, dropout=0.0, compile_layers=True, **kwargs)


#: Eager twin of each compiled model (the baseline of its compile time's break-even).
EAGER_TWIN = {"megatron_protein_compiled": "megatron_protein",
              "megatron_protein_nodropout_compiled": "megatron_protein_nodropout"}

#: Operators counted as elementwise work (pointwise, softmax, LayerNorm, reductions) by :func:`classify_op`.
ELEMENTWISE = ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::where", "gelu", "aten::neg", "aten::exp",
               "aten::log", "aten::sum", "aten::fill_", "aten::zero_", "aten::uniform_", "aten::lt",
               "aten::masked_fill", "aten::erf", "aten::rsqrt", "aten::sqrt", "aten::pow", "aten::amax",
               "aten::max", "aten::mean", "aten::tanh", "softmax", "layer_norm", "aten::lerp", "aten::addcmul")


def classify_op(name: str) -> str:
    """The class of a profiled operator: matmul, copy, elementwise, inductor_fused, optimizer or other."""
    if name.startswith(("cpp_fused", "Torch-Compiled Region", "## Call CompiledFxGraph")) or "fused_" in name and \
            not name.startswith("aten::"):
        return "inductor_fused"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm") or "mkldnn" in name:
        return "matmul"
    if name in ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack",
                "aten::_unsafe_view", "aten::index", "aten::index_put_", "aten::gather", "aten::scatter_add_"):
        return "copy"
    if "adam" in name.lower() or name.startswith("aten::_foreach"):
        return "optimizer"
    if any(part in name for part in ELEMENTWISE):
        return "elementwise"
    return "other"


def profile_summary(step) -> dict:
    """Share of the operators' self CPU time per :func:`classify_op` class over one training step."""
    from torch.profiler import ProfilerActivity, profile
    import torch._inductor.config as inductor_config
    inductor_config.cpp.enable_kernel_profile = True   # fused kernels appear by name (no recompile needed:
    with profile(activities=[ProfilerActivity.CPU]) as prof:   # the flag only adds record_function markers)
        seconds, _ = step()
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    copies = 0
    for event in prof.key_averages():
        category = classify_op(event.key)
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total
        counts[category] = counts.get(category, 0) + event.count
        if event.key == "aten::copy_":
            copies += event.count
    total = sum(totals.values()) or 1.0
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"step_seconds_profiled": seconds,
            "share": {k: round(v / total, 3) for k, v in sorted(totals.items())},
            "calls": counts, "copy_calls": copies,
            "top_ops": [[e.key, round(e.self_cpu_time_total / 1e3, 1)] for e in top]}


#: The dropout each peer trains with at its defaults (fair-esm's ESM2 has no dropout layers).
PEER_DROPOUT = {"bert": 0.1, "esm": 0.1, "esm2": 0.0}

BUILDERS = {"megatron_protein": build_ours, "megatron_protein_nodropout": build_ours_without_dropout,
            "megatron_protein_nodropout_allpositions": build_ours_without_dropout_all_positions,
            "megatron_protein_nodropout_autocast": build_ours_without_dropout,
            "megatron_protein_compiled": build_ours_compiled,
            "megatron_protein_nodropout_compiled": build_ours_without_dropout_compiled,
            "bert": build_hf_bert, "esm": build_hf_esm, "esm2": build_fair_esm2}
#: Ours in bf16 as ``--bf16`` trains it (bf16 parameters, float32 main parameters); the ``_autocast`` variant
#: and the peers run bf16 by autocast.
OURS_MAIN_PARAMS = ("megatron_protein", "megatron_protein_nodropout", "megatron_protein_nodropout_allpositions",
                    "megatron_protein_compiled", "megatron_protein_nodropout_compiled")
#: What --profile profiles (each where it runs).
PROFILED = ("megatron_protein_nodropout", "megatron_protein_nodropout_autocast", "megatron_protein_nodropout_compiled")


def prepare(name: str, cfg: dict, dtype: str) -> dict:
    """Build ``name`` at ``cfg``'s size with its optimizer and a fixed MLM batch; return a one-step closure."""
    torch.manual_seed(0)
    if dtype == "bf16" and name in OURS_MAIN_PARAMS:
        model, loss_fn, vocab = BUILDERS[name](cfg, main_params_dtype=torch.bfloat16)
    else:
        model, loss_fn, vocab = BUILDERS[name](cfg)
    model.train()
    # Ours: the pretraining optimizer (no decay on biases/norms, fused AdamW); peers: torch's default AdamW, what
    # their own training scripts build.
    optimizer = (model.build_optimizer() if hasattr(model, "build_optimizer")
                 else torch.optim.AdamW(model.parameters(), lr=1e-4))
    g = torch.Generator().manual_seed(0)
    # Residue ids valid in every vocabulary (5..24 are letters in IUPAC and in ESM's alphabet).
    tokens = torch.randint(5, 25, (cfg["batch"], cfg["seq"]), generator=g)
    labels = torch.where(torch.rand(tokens.shape, generator=g) < 0.15, tokens, torch.full_like(tokens, -100))

    own_dtype = getattr(model, "runs_in", None)  # bf16 parameters: no autocast

    def step() -> tuple[float, float]:
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" and own_dtype is None
                    else torch.autocast("cpu", enabled=False))
        start = time.perf_counter()
        with autocast:
            loss = loss_fn(tokens, labels)
        loss.backward()
        if own_dtype is not None:
            optimizer.ddp.sync_gradients()  # dp = 1: no communication, the main_grad bookkeeping only
        optimizer.step()
        if own_dtype is None:
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.zero_grad()  # the float32 main-gradient buffers
        return time.perf_counter() - start, loss.item()

    return {"model": model, "optimizer": optimizer, "step": step, "vocab": vocab,
            "parameters": sum(p.numel() for p in model.parameters())}


def peak_memory_alone(name: str, cfg: dict, dtype: str, threads: int) -> float:
    """MiB of resident memory above the pre-build level while building ``name`` and running two steps (run this in
    a fresh process: freed CPU memory stays resident, so it cannot be attributed inside a shared one)."""
    torch.set_num_threads(threads)
    with PeakRSS() as memory:
        prepared = prepare(name, cfg, dtype)
        for _ in range(2):
            prepared["step"]()
    return memory.peak_above_base / 2 ** 20


def time_interleaved(names: list[str], cfg: dict, dtype: str, steps: int, warmup: int,
                     profile: bool = False) -> dict:
    """Time every model in rounds, one step each per round in rotating order, so that a change in the machine's load
    hits all of them alike; report the best and the median step time of each (and the first warm-up step, which
    includes a compilation)."""
    prepared = {name: prepare(name, cfg, dtype) for name in names}
    first_step: dict[str, float] = {}
    for name in names:
        for i in range(warmup):
            seconds, _ = prepared[name]["step"]()
            if i == 0:
                first_step[name] = seconds
    times: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, float] = {}
    for round_index in range(steps):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            seconds, losses[name] = prepared[name]["step"]()
            times[name].append(seconds)
    tokens_per_step = cfg["batch"] * cfg["seq"]
    results = {}
    for name in names:
        best, median = min(times[name]), statistics.median(times[name])
        flops = model_flops_per_step(cfg, prepared[name]["vocab"])
        results[name] = {"tokens_per_s": tokens_per_step / best, "tokens_per_s_median": tokens_per_step / median,
                         "seconds_per_step_best": best, "seconds_per_step_median": median,
                         "model_tflops_per_s": flops / best / 1e12, "parameters": prepared[name]["parameters"],
                         "last_loss": losses[name], "first_step_seconds": first_step.get(name)}
    for name, twin in EAGER_TWIN.items():
        if name in results and twin in results and first_step.get(name) is not None:
            compile_seconds = first_step[name] - results[name]["seconds_per_step_best"]
            saved = results[twin]["seconds_per_step_best"] - results[name]["seconds_per_step_best"]
            results[name]["compile_seconds"] = compile_seconds
            results[name]["break_even_steps"] = compile_seconds / saved if saved > 0 else None
    if profile:
        for name in names:
            if name in PROFILED:
                results[name]["profile"] = profile_summary(prepared[name]["step"])
    del prepared
    gc.collect()
    return results


def _child(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def ratio_in_fresh_process(cfg: dict, dtype: str, steps: int, warmup: int, threads: int) -> dict:
    """Tokens/s of ours (dropout 0) and fair-esm's ESM2 timed in rotating rounds in this (fresh) process."""
    torch.set_num_threads(threads)
    runs = time_interleaved(["megatron_protein_nodropout", "esm2"], cfg, dtype, steps, warmup)
    return {name: runs[name]["tokens_per_s"] for name in runs}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--peers", nargs="*", default=["bert", "esm", "esm2"], choices=["bert", "esm", "esm2"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step of every model each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio-repeats", type=int, default=3,
                        help="fresh processes timing ours against fair-esm ESM2 again (0: none)")
    parser.add_argument("--compile-layers", action="store_true",
                        help="add ours with compiled layers (megatron_protein[_nodropout]_compiled)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step of ours (dropout 0: eager, autocast, compiled): share of matmul, "
                             "copies, elementwise, ...")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-model peak-memory child processes")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = max(matmul_flops_per_second(args.threads, reps=20) for _ in range(2))
    bf16_peak = max(matmul_flops_per_second(args.threads, reps=20, dtype=torch.bfloat16) for _ in range(2))
    report = {"benchmark": "pretrain", "torch": torch.__version__, "threads": args.threads,
              "date": time.strftime("%Y-%m-%d %H:%M"), "uptime_before": uptime(),
              "measured_fp32_matmul_tflops": peak / 1e12, "measured_bf16_matmul_tflops": bf16_peak / 1e12,
              "configs": {}}
    from megatron_protein import kernels
    base_names = ["megatron_protein", "megatron_protein_nodropout", "megatron_protein_nodropout_allpositions"]
    for config_name in args.configs:
        cfg = CONFIGS[config_name]
        entry = {"shape": cfg, "runs": {}}
        for dtype in args.dtypes:
            names = (base_names + (["megatron_protein_nodropout_autocast"] if dtype == "bf16" else [])
                     + (["megatron_protein_compiled", "megatron_protein_nodropout_compiled"] if args.compile_layers
                        else []) + args.peers)
            # The matmul rates are re-measured around every timing and the best kept, so that a loaded machine
            # cannot make the ceiling look low (and MFU high).
            runs = time_interleaved(names, cfg, dtype, args.steps, args.warmup, profile=args.profile)
            peak = max(peak, matmul_flops_per_second(args.threads, reps=20))
            if dtype == "bf16":
                bf16_peak = max(bf16_peak, matmul_flops_per_second(args.threads, reps=20, dtype=torch.bfloat16))
            report["measured_fp32_matmul_tflops"] = peak / 1e12
            report["measured_bf16_matmul_tflops"] = bf16_peak / 1e12
            for name in names:
                run = runs[name]
                run["precision"] = ("fp32" if dtype == "fp32" else
                                    "bf16 parameters + fp32 main" if name in OURS_MAIN_PARAMS else "bf16 autocast")
                run["mfu_vs_measured_fp32_matmul"] = run["model_tflops_per_s"] * 1e12 / peak
                run["measured_fp32_matmul_tflops"] = peak / 1e12
                if dtype == "bf16":  # the ceiling of a bf16 step is the machine's bf16 matmul rate
                    run["mfu_vs_measured_bf16_matmul"] = run["model_tflops_per_s"] * 1e12 / bf16_peak
                if not args.no_memory:
                    run["peak_memory_mib"] = _child(peak_memory_alone, name, cfg, dtype, args.threads)
                entry["runs"][f"{name}/{dtype}"] = run
                mfu = run.get("mfu_vs_measured_bf16_matmul", run["mfu_vs_measured_fp32_matmul"])
                print(f"[bench/pretrain] {config_name} {name}/{dtype}: {run['tokens_per_s']:.0f} tokens/s "
                      f"(median {run['tokens_per_s_median']:.0f}), MFU {mfu:.1%} of the {dtype} matmul rate"
                      + (f", peak {run['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in run else ""),
                      file=sys.stderr, flush=True)
            peers = {p: runs[p]["tokens_per_s"] for p in args.peers}
            if peers:
                fastest = max(peers, key=peers.get)
                # Like for like: ours with the fastest peer's dropout setting (ESM2 has none, the HF models 0.1).
                ours = "megatron_protein_nodropout" if PEER_DROPOUT[fastest] == 0.0 else "megatron_protein"
                entry[f"speedup_vs_fastest_peer_{dtype}"] = {
                    "peer": fastest, "peer_dropout": PEER_DROPOUT[fastest], "ours": ours,
                    "ratio": runs[ours]["tokens_per_s"] / peers[fastest],
                    "ratio_ours_with_dropout_0.1": runs["megatron_protein"]["tokens_per_s"] / peers[fastest]}
            for name, twin in EAGER_TWIN.items():
                if name in runs:   # compiled layers against the same model eager, in the same rounds
                    entry[f"compiled_speedup_{dtype}_{twin}"] = (runs[name]["tokens_per_s"]
                                                                 / runs[twin]["tokens_per_s"])
            entry[f"sparse_prediction_speedup_{dtype}"] = (
                runs["megatron_protein_nodropout"]["tokens_per_s"]
                / runs["megatron_protein_nodropout_allpositions"]["tokens_per_s"])
            if dtype == "bf16":
                entry["bf16_main_params_speedup_vs_autocast"] = (
                    runs["megatron_protein_nodropout"]["tokens_per_s"]
                    / runs["megatron_protein_nodropout_autocast"]["tokens_per_s"])
            if args.ratio_repeats > 0 and "esm2" in args.peers:
                repeats = [_child(ratio_in_fresh_process, cfg, dtype, args.steps, args.warmup, args.threads)
                           for _ in range(args.ratio_repeats)]
                ratios = sorted(r["megatron_protein_nodropout"] / r["esm2"] for r in repeats)
                esm2 = sorted(r["esm2"] for r in repeats)
                entry[f"ratio_vs_esm2_over_fresh_processes_{dtype}"] = {
                    "runs": repeats, "ratio_min": ratios[0], "ratio_median": statistics.median(ratios),
                    "ratio_max": ratios[-1], "esm2_tokens_per_s_min": esm2[0], "esm2_tokens_per_s_max": esm2[-1]}
                print(f"[bench/pretrain] {config_name} {dtype}: ours / ESM2 over {len(ratios)} fresh processes "
                      f"{ratios[0]:.2f} - {ratios[-1]:.2f}", file=sys.stderr, flush=True)
        report["configs"][config_name] = entry
    report["uptime_after"] = uptime()
    report["kernel_fallbacks"] = kernels.dispatch.fallbacks()
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.output)
    return report


if __name__ == "__main__":
    main()
