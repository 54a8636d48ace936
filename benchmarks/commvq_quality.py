"""CommVQ quality on the embedded model: held-out perplexity and synthetic needle tasks, next to fp16 and
transformers' ``QuantizedCache`` (HQQ backend) at the same bits.

Perplexity protocol (the decode path, token by token): ``--segments`` non-overlapping pieces of the held-out essays
(``load_corpus("pg_essays", split="heldout")``), each ``--context`` tokens of context prefilled into the cache, then
``--eval`` tokens teacher-forced one at a time; the NLL of those tokens is averaged. Caches compared: fp16
``DynamicCache``; ``CommVQCache`` at 1 and 2 bits (the context coded after its prefill, as kvpress compresses after
prefill; a 128-token full-precision window); ``QuantizedCache(backend="hqq", nbits=1|2, residual_length=128,
q_group_size=64)``. Bytes held after the context are recorded for each.

Needles: the synthetic tasks at ``--needle-length`` tokens through :class:`pressroom.evaluation.run.Runner` for no
press and :class:`~pressroom.presses.CommVQPress` at 1 and 2 bits (results directories under ``--runs-dir``; with
``--ablation`` also :class:`~pressroom.presses.commvq_ablation_press.CommVQAblationPress` with only the keys, then
only the values coded, to attribute a loss to one side), and
through kvpress's pipeline with ``cache=QuantizedCache(hqq)`` (the Runner takes presses, not caches), scored the same
way. ``--query-aware`` runs the needles in kvpress's ``query_aware`` mode instead: each question joins its context
before the prefill, so the question is read in full precision during the prefill and only the generated tokens read
the coded cache (the protocol of the CommVQ reference's needle script, which prefills context and question in one
pass); without it, kvpress's default: the context is compressed first and the question reads the codes.

HQQ must be installed (``pip install hqq``; pure Python, it runs without its optional CUDA extension), except with
``--skip-hqq``.

    source benchmarks/gpu_env.sh
    python benchmarks/commvq_quality.py --codebooks CODEBOOK_DIR --output $OUT/commvq_quality.json
    TRITON_INTERPRET=1 python benchmarks/commvq_quality.py --smoke --output /tmp/commvq_quality_smoke.json  # CPU
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels.commvq_beam import check_beam
from pressroom.kernels.commvq_encode import PRECISIONS
from pressroom.presses import CommVQCache, CommVQPress
from pressroom.presses.commvq_ablation_press import SIDES, CommVQAblationPress
from pressroom.presses.commvq_cache import DEFAULT_VALUE_REFINE, check_exact_layers
from pressroom.presses.commvq_codebooks import CommVQCodebooks, ValueCodec, model_kv_shape

NEEDLE_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "passkey", "vt"]


def random_books(config, bits: int) -> CommVQCodebooks:
    """Random but valid codebooks (smoke runs only: they measure nothing)."""
    layers, heads, head_dim = model_kv_shape(config)
    r = max(1, round(bits * head_dim / 12))
    theta = torch.randn(layers, heads, r, 128, head_dim // 2) * 0.1
    return CommVQCodebooks(
        "random",
        bits,
        r,
        head_dim,
        layers,
        heads,
        theta,
        values=[ValueCodec(heads * head_dim, bits) for _ in range(layers)],
    )


def held_bytes(cache) -> int:
    """Bytes a cache holds: ``memory_bytes()`` for ours; for transformers' caches every tensor reachable from the
    layers' attributes, including those inside tuples / dicts (HQQ keeps its scales and zeros in a meta dict)."""
    if cache is None:
        return 0
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes())
    seen: set[int] = set()

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() in seen or obj.numel() == 0:
                return 0
            seen.add(obj.data_ptr())
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(walk(o) for o in obj)
        if isinstance(obj, dict):
            return sum(walk(o) for o in obj.values())
        return 0

    return sum(walk(list(vars(layer).values())) for layer in cache.layers)


def quantized_cache(model, bits: int, group: int):
    from transformers import QuantizedCache

    return QuantizedCache(backend="hqq", config=model.config, nbits=bits, residual_length=128, q_group_size=group)


def segment_nll(model, ids: torch.Tensor, make_cache, context: int, n_eval: int) -> tuple[float, int, int]:
    """Sum of NLL over the ``n_eval`` tokens after ``context`` (teacher forced one at a time), count, bytes."""
    cache = make_cache()
    with torch.no_grad():
        out = model(ids[:, :context], past_key_values=cache)
        held = held_bytes(cache)
        logits = out.logits[:, -1]
        total = 0.0
        for t in range(context, context + n_eval):
            total += float(torch.nn.functional.cross_entropy(logits.float(), ids[:, t]))
            logits = model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1]
    return total, n_eval, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--codebooks", help="codebook directory (holding 1bit/ and 2bit/, or pass --codebooks-1/-2)")
    ap.add_argument("--codebooks-1", help="1-bit codebook directory (default: --codebooks with bits=1)")
    ap.add_argument("--codebooks-2", help="2-bit codebook directory (default: --codebooks with bits=2)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="CommVQ / HQQ bit widths")
    ap.add_argument(
        "--n-sink", type=int, nargs="+", default=[0, 4], help="CommVQ: first tokens kept in full precision (each value)"
    )
    ap.add_argument("--needle-length", type=int, default=4096)
    ap.add_argument("--needle-samples", type=int, default=3)
    ap.add_argument(
        "--needle-seed",
        type=int,
        default=0,
        help="seed of the needle tasks (another seed: other needles and haystacks)",
    )
    ap.add_argument("--runs-dir", default=None, help="Runner results (default: beside --output)")
    ap.add_argument("--skip-needles", action="store_true")
    ap.add_argument("--skip-hqq", action="store_true", help="no QuantizedCache(hqq) baseline (e.g. measured already)")
    ap.add_argument(
        "--ablation",
        action="store_true",
        help="also needles with only the keys, then only the values, CommVQ-coded (CommVQAblationPress: no savings)",
    )
    ap.add_argument(
        "--value-refine",
        type=int,
        nargs="+",
        default=[DEFAULT_VALUE_REFINE],
        help="CommVQ value_refine settings to run (greedy bit flips per token; 0: the reference's value coding)",
    )
    ap.add_argument(
        "--encode-precision",
        nargs="+",
        default=["ieee"],
        choices=list(PRECISIONS),
        help="CommVQ encode_precision settings to run (the key search's dots and the value encoder's matmuls)",
    )
    ap.add_argument(
        "--exact-layers",
        nargs="+",
        default=["none"],
        help="CommVQ exact_layers settings to run: 'none' (every layer coded) or layer indices joined by '+' "
        "(e.g. 18 or 15+18), kept in full precision",
    )
    ap.add_argument(
        "--key-beam",
        type=int,
        nargs="+",
        default=[1],
        help="CommVQ key_beam settings to run (code sequences kept per key by the key encoder; 1: the greedy search)",
    )
    ap.add_argument(
        "--pin-ratio",
        type=float,
        nargs="+",
        default=[0.0],
        help="CommVQ pin_ratio settings to run (share of the prefill kept exact, chosen by the observation window's "
        "attention; 0: none)",
    )
    ap.add_argument("--pin-span", type=int, default=1, help="CommVQ pin_span of the pin_ratio settings")
    ap.add_argument("--skip-ppl", action="store_true", help="needles only (e.g. a second job)")
    ap.add_argument(
        "--needles-of",
        choices=["all", "fp16", "commvq"],
        default="all",
        help="which needle runs: all, only the fp16 baseline (no codebooks needed), or all but fp16 (e.g. processes "
        "sharing one --runs-dir in parallel); fp16 and commvq need --skip-ppl",
    )
    ap.add_argument(
        "--query-aware",
        action="store_true",
        help="needles in kvpress's query_aware mode: the question joins the context before the prefill",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: tiny-llama, random codebooks")
    args = ap.parse_args()
    if args.needles_of != "all" and not args.skip_ppl:
        ap.error("--needles-of fp16 / commvq needs --skip-ppl (the perplexity table is relative to fp16)")
    if args.needles_of == "fp16":
        args.bits, args.skip_hqq = [], True
    if args.smoke:
        args.model, args.context, args.eval, args.segments = "tiny-llama", 200, 3, 1
        args.needle_length, args.needle_samples = 256, 1
    elif args.bits and not (args.codebooks or all(getattr(args, f"codebooks_{b}") for b in args.bits)):
        ap.error("--codebooks (or --codebooks-1 / --codebooks-2 for each of --bits) is required (except with --smoke)")
    import transformers
    import triton

    from pressroom.evaluation import tasks as tasks_mod
    from pressroom.evaluation.corpora import corpus_tokens
    from pressroom.evaluation.run import EvalConfig, Runner, make_query_aware

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    out_path = Path(args.output)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out_path.with_suffix("").parent / (out_path.stem + "_runs")
    result: dict = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "model": args.model,
        "dtype": dtype,
        "smoke": args.smoke,
        "commvq_n_sink": args.n_sink,
        "commvq_value_refine": args.value_refine,
        "commvq_encode_precision": args.encode_precision,
        "commvq_key_beam": args.key_beam,
        "commvq_pin_ratio": args.pin_ratio,
        "commvq_pin_span": args.pin_span,
        "needles_query_aware": args.query_aware,
        "perplexity": {"context": args.context, "eval_tokens_per_segment": args.eval, "segments": args.segments},
        "needles": {},
    }
    save = lambda: atomic_write_json(out_path, result)  # noqa: E731
    runner = Runner()
    pipe = runner.pipeline(args.model, device, dtype, False)
    model, tok = pipe.model, pipe.tokenizer
    _, _, head_dim = model_kv_shape(model.config)
    books = {}
    for bits in args.bits:
        if args.smoke:
            books[bits] = random_books(model.config, bits)
        else:
            path = getattr(args, f"codebooks_{bits}") or args.codebooks
            books[bits] = CommVQCodebooks.load(path, bits=bits)
        books[bits].validate(model.config)
    result["codebooks"] = {str(b): {"R": bk.residuals, "key_bits": bk.key_bits} for b, bk in books.items()}

    def commvq_name(
        bits: int, n_sink: int, refine: int, precision: str = "ieee", exact: tuple = (), beam: int = 1, pin: float = 0.0
    ) -> str:
        name = f"commvq_{bits}bit" + (f"_sink{n_sink}" if n_sink else "")
        name += f"_refine{refine}" if refine != DEFAULT_VALUE_REFINE else ""
        name += f"_{precision}" if precision != "ieee" else ""
        name += f"_beam{beam}" if beam != 1 else ""
        name += f"_pin{pin:g}" + (f"_span{args.pin_span}" if args.pin_span != 1 else "") if pin else ""
        return name + (f"_exact{'+'.join(map(str, exact))}" if exact else "")

    exact_settings = [
        () if e == "none" else check_exact_layers(e, model.config.num_hidden_layers) for e in args.exact_layers
    ]
    for kb in args.key_beam:
        check_beam(kb)
    settings = [
        (b, ns, vr, ep, ex, kb, pr)
        for b in args.bits
        for ns in args.n_sink
        for vr in args.value_refine
        for ep in args.encode_precision
        for ex in exact_settings
        for kb in args.key_beam
        for pr in args.pin_ratio
    ]
    caches = {"fp16": lambda: None}
    for b, ns, vr, ep, ex, kb, pr in settings:
        if pr:  # pins are chosen by the press at prefill: needles only
            continue
        caches[commvq_name(b, ns, vr, ep, ex, kb)] = lambda b=b, ns=ns, vr=vr, ep=ep, ex=ex, kb=kb: CommVQCache(
            model.config, books[b], bits=b, window=128, n_sink=ns, value_refine=vr, encode_precision=ep,
            exact_layers=ex, key_beam=kb,
        )  # fmt: skip
    for b in () if args.skip_hqq else args.bits:
        caches[f"hqq_{b}bit"] = lambda b=b: quantized_cache(model, b, min(64, head_dim))
    if not args.skip_ppl:
        ids_all = corpus_tokens(tok, "pg_essays", split="heldout").to(model.device)
        seg = args.context + args.eval
        n_seg = min(args.segments, ids_all.numel() // seg)
        from transformers import DynamicCache

        for name, make in caches.items():
            make_cache = make if name != "fp16" else DynamicCache
            t = time.perf_counter()
            total = count = held = 0
            for s in range(n_seg):
                ids = ids_all[s * seg : (s + 1) * seg][None]
                nll, n, held = segment_nll(model, ids, make_cache, args.context, args.eval)
                total, count = total + nll, count + n
            result["perplexity"][name] = {
                "ppl": math.exp(total / max(1, count)),
                "tokens": count,
                "bytes_after_context": held,
                "seconds": time.perf_counter() - t,
            }
            save()
        fp = result["perplexity"]["fp16"]["ppl"]
        for name in caches:
            result["perplexity"][name]["vs_fp16"] = result["perplexity"][name]["ppl"] / fp - 1
        save()
    if args.skip_needles:
        print(result)
        return

    tasks = ["niah_single"] if args.smoke else NEEDLE_TASKS
    base = dict(
        dataset="synthetic",
        data_dir=str(args.needle_length),
        model=args.model,
        tasks=tasks,
        n_samples=args.needle_samples,
        seed=args.needle_seed,
        device=device,
        dtype=dtype,
        output_dir=str(runs_dir),
        max_new_tokens=8 if args.smoke else None,
        query_aware=args.query_aware,
    )
    presses: list[tuple[str, CommVQPress | None]] = [("fp16", None)] if args.needles_of != "commvq" else []
    for b, ns, vr, ep, ex, kb, pr in settings:
        kw = dict(codebooks=books[b], bits=b, window=128, n_sink=ns, value_refine=vr, encode_precision=ep, key_beam=kb)
        kw.update(pin_ratio=pr, pin_span=args.pin_span)
        presses.append((commvq_name(b, ns, vr, ep, ex, kb, pr), CommVQPress(**kw, exact_layers=ex)))
        for side in SIDES if args.ablation and not ex else ():
            name = f"{commvq_name(b, ns, vr, ep, beam=kb)}_{side}_only"
            presses.append((name, CommVQAblationPress(**kw, coded=side)))
    for name, press in presses:
        sink = f",n_sink={press.n_sink}" if press is not None and press.n_sink else ""
        sink += f",value_refine={press.value_refine}" if press is not None else ""
        if press is not None and press.encode_precision != "ieee":
            sink += f",encode_precision={press.encode_precision}"
        if press is not None and press.exact_layers:
            sink += f",exact_layers={'+'.join(map(str, press.exact_layers))}"
        if press is not None and press.key_beam != 1:
            sink += f",key_beam={press.key_beam}"
        if press is not None and press.pin_ratio:
            sink += f",pin_ratio={press.pin_ratio:g},pin_span={press.pin_span}"
        if press is None:
            spec = "no_press"
        elif isinstance(press, CommVQAblationPress):
            spec = f"commvq_ablation:bits={press.bits},coded={press.coded}{sink}"
        else:
            spec = f"commvq:bits={press.bits}{sink}"
        cfg = EvalConfig(press_name=spec, **base)
        run_dir = runner.run(cfg, press=press)
        import json

        result["needles"][name] = {
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "stats": json.loads((run_dir / "stats.json").read_text()),
            "results_dir": str(run_dir),
        }
        save()
    # QuantizedCache(hqq): kvpress's pipeline cannot remove an answer from an HQQ cache (its quantized tensors are
    # tuples), so the context is prefilled once and each question answered from a copy, with the pipeline's own
    # preprocessing and greedy decoding
    import copy

    from kvpress import KVPressTextGenerationPipeline

    for bits in () if args.skip_hqq else args.bits:
        cfg = EvalConfig(press_name="no_press", **base)
        df = runner.dataset(cfg, tok)
        if args.query_aware:  # as the Runner does for the presses
            make_query_aware(df)
        df["predicted_answer"] = None
        with torch.inference_mode():
            for context, group in df.groupby("context", sort=False):
                max_new = cfg.max_new_tokens or int(group["max_new_tokens"].iloc[0])
                inputs = pipe.preprocess(
                    context, group["question"].tolist(), group["answer_prefix"].iloc[0], max_context_length=10**10
                )
                ctx = inputs["context_ids"].to(model.device)
                prefilled = quantized_cache(model, bits, min(64, head_dim))
                model.model(input_ids=ctx, past_key_values=prefilled)
                answers = []
                for q_ids in inputs["questions_ids"]:
                    answers.append(
                        KVPressTextGenerationPipeline.generate_answer(
                            pipe, q_ids.to(model.device), copy.deepcopy(prefilled), ctx.shape[1], max_new
                        )
                    )
                df.loc[group.index, "predicted_answer"] = answers
        result["needles"][f"hqq_{bits}bit"] = {"metrics": tasks_mod.score_predictions(df)}
        save()
    print(result)


if __name__ == "__main__":
    main()
