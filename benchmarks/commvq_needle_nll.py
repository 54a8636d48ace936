"""Which layers and which side of a CommVQ-coded cache cost the needle answers: teacher-forced answer likelihood.

The needle gap of CommVQ at 2 bits (README: about 7 points at 4k tokens, most of it in ``niah_multivalue``) is
measured by greedy answers, 12 to 24 questions a task, so one question moves a task by 4 to 8 points. This
diagnostic uses a continuous measure instead: the negative log-likelihood of the reference answer, teacher-forced
after the question, with the cache's layers each exact or replaced by CommVQ's reconstruction (keys, values or
both; :class:`~pressroom.presses.CommVQAblationPress`, which keeps the sinks and the full-precision window exact as
the coded cache does).

Per sample, the context and question are prefilled twice (the reference's protocol: the question is in the prefill),
once plain and once with every layer coded (``coded="both"``); each layer's attention inputs do not depend on how the
other layers are coded (the prefill attends over exact keys and values, the coding happens after it), so every mix of
exact and coded layers is assembled from these two caches. Then for each mix the answer prefix and the reference
answer (the values joined by ``", "``) are teacher-forced, and the answer tokens' NLL is summed. Mixes: exact; every
layer coded (both sides, keys only, values only); each layer alone coded (both sides); every layer but one coded;
each group of ``--group-size`` layers coded; every layer but one group coded.

Writes ``--output`` (JSON, atomically, after each sample; a rerun with the same output resumes after the samples
already there). ``--smoke``: a tiny random model and random codebooks on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from pressroom.evaluation.atomic import atomic_write_json
from pressroom.kernels.commvq_beam import check_beam
from pressroom.presses.commvq_ablation_press import CommVQAblationPress
from pressroom.presses.commvq_cache import check_exact_layers
from pressroom.presses.commvq_codebooks import CommVQCodebooks


def answer_nll(model, layers_kv: list[tuple[torch.Tensor, torch.Tensor]], follow: torch.Tensor, n_answer: int) -> float:
    """Summed NLL of the last ``n_answer`` tokens of ``follow`` [1, T], fed after a cache holding ``layers_kv``."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers_kv):
        cache.update(k, v, i)
    logits = model(follow, past_key_values=cache).logits[0].float()  # [T, vocab]
    targets = follow[0, -n_answer:]
    pred = logits[-n_answer - 1 : -1]
    return float(torch.nn.functional.cross_entropy(pred, targets, reduction="sum"))


def mixes(
    n_layers: int, group: int, keep: list[tuple[int, ...]] | None = None, only_keep: bool = False
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Name -> (layers whose keys are coded, layers whose values are coded); the rest is exact.

    ``keep``: sets of layers left exact, every other layer coded (the caches of ``CommVQPress(exact_layers=...)``),
    named ``all_but_<i+j>``, each also with only the set's keys exact (its values coded: ``..._keys_exact``) and only
    its values exact (``..._values_exact``), which tells which side those layers need; ``only_keep``: those and the
    exact / all-coded references only.
    """
    every = tuple(range(n_layers))
    out = {"exact": ((), ()), "all_both": (every, every)}
    for kept in keep or ():
        rest = tuple(i for i in every if i not in kept)
        name = f"all_but_{'+'.join(map(str, kept))}"
        out[name] = (rest, rest)
        out[f"{name}_keys_exact"] = (rest, every)
        out[f"{name}_values_exact"] = (every, rest)
    out.update({"all_keys": (every, ()), "all_values": ((), every)})
    if only_keep:
        return out
    for i in every:
        out[f"layer{i}"] = ((i,), (i,))
    for i in every:  # what keeping one layer exact recovers
        rest = tuple(j for j in every if j != i)
        out[f"all_but_layer{i}"] = (rest, rest)
    for g in range(0, n_layers, group):
        members = tuple(range(g, min(n_layers, g + group)))
        rest = tuple(i for i in every if i not in members)
        out[f"group{g}-{members[-1]}"] = (members, members)
        out[f"all_but_group{g}-{members[-1]}"] = (rest, rest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codebooks", help="CommVQ codebook directory (pressroom-train commvq), required unless --smoke")
    ap.add_argument("--bits", type=int, default=2, choices=[1, 2])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="niah_multivalue")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--encode-precision", default="half")
    ap.add_argument("--group-size", type=int, default=5)
    ap.add_argument(
        "--keep",
        nargs="+",
        default=[],
        help="sets of layers left exact, every other coded: layer indices joined by '+' (e.g. 18 18+23)",
    )
    ap.add_argument(
        "--only-keep", action="store_true", help="only the --keep mixes (and exact / all coded / all keys / all values)"
    )
    ap.add_argument(
        "--key-beam",
        type=int,
        nargs="+",
        default=[1],
        help="key encoder beams (CommVQPress key_beam), one coded cache each; the mixes of a beam other than 1 are "
        "named with _beam<k> (default 1: the greedy search)",
    )
    ap.add_argument("--pin-span", type=int, default=1, help="CommVQPress pin_span of the --pin-ratio caches")
    ap.add_argument(
        "--pin-ratio",
        type=float,
        nargs="+",
        default=[0.0],
        help="CommVQPress pin_ratio settings (shares of the prefill kept exact by the observation window's attention), "
        "one coded cache each with every --key-beam; mixes of a ratio other than 0 are named with _pin<ratio>",
    )
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, random codebooks, CPU")
    args = ap.parse_args()
    if not args.smoke and not args.codebooks:
        ap.error("--codebooks is required (except with --smoke)")

    from pressroom.evaluation.run import Runner
    from pressroom.evaluation.tasks import generate_tasks

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    if args.smoke:
        args.model, args.context, args.samples = "tiny-llama", 300, 1
    runner = Runner(progress=False)
    pipe = runner.pipeline(args.model, device, dtype, False)
    model, tok = pipe.model, pipe.tokenizer
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from commvq_quality import random_books  # the quality benchmark's random codebooks (smoke only)

        books = random_books(model.config, args.bits)
    else:
        books = CommVQCodebooks.load(args.codebooks, bits=args.bits)
    books.validate(model.config)
    n_layers = model.config.num_hidden_layers
    keep = [check_exact_layers(k, n_layers) for k in args.keep]
    base = mixes(n_layers, args.group_size, keep, args.only_keep)
    for beam in args.key_beam:
        check_beam(beam)
    # the coded caches: (key beam, pin ratio); name -> (keys coded, values coded, variant); the exact mix once
    variants = [(b, p) for b in dict.fromkeys(args.key_beam) for p in dict.fromkeys(args.pin_ratio)]

    def label(name: str, beam: int, pin: float) -> str:
        if name == "exact":  # one exact mix, whatever the variants
            return name
        return name + ("" if beam == 1 else f"_beam{beam}") + ("" if not pin else f"_pin{pin:g}")

    plan = {
        label(name, beam, pin): (*sides, (beam, pin))
        for beam, pin in variants
        for name, sides in base.items()
        if name != "exact" or (beam, pin) == variants[0]
    }
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "dtype": dtype,
        "task": args.task,
        "context": args.context,
        "bits": args.bits,
        "n_sink": args.n_sink,
        "encode_precision": args.encode_precision,
        "key_beam": list(dict.fromkeys(args.key_beam)),
        "pin_ratio": list(dict.fromkeys(args.pin_ratio)),
        "pin_span": args.pin_span,
        "mixes": {
            k: {"keys_coded": list(v[0]), "values_coded": list(v[1]), "key_beam": v[2][0], "pin_ratio": v[2][1]}
            for k, v in plan.items()
        },
        "samples": [],
    }
    if args.output.exists():  # resume: keep the samples already measured with the same settings
        old = json.loads(args.output.read_text())
        keys = ("model", "task", "context", "bits", "n_sink", "encode_precision", "mixes")
        same = all(old.get(k) == result[k] for k in keys)
        if not same:
            raise SystemExit(f"{args.output} holds another run's settings: pass another --output.")
        result["samples"] = old.get("samples", [])
    df = generate_tasks(tok, [args.task], context_length=args.context, n_samples=args.samples, seed=args.seed)
    done = {s["sample"] for s in result["samples"]}
    t0 = time.time()
    for _, row in tqdm(list(df.iterrows()), desc="samples"):
        sample = int(row["sample"])
        if sample in done:
            continue
        inputs = pipe.preprocess(row["context"] + row["question"], [""], row["answer_prefix"], max_context_length=10**9)
        ctx = inputs["context_ids"].to(model.device)
        prefix = inputs["questions_ids"][0].to(model.device)
        answers = list(row["answer"])
        answer_ids = tok(" " + ", ".join(answers), add_special_tokens=False, return_tensors="pt").input_ids
        follow = torch.cat((prefix, answer_ids.to(model.device)), dim=1)
        with torch.no_grad():
            exact = DynamicCache()
            model(ctx, past_key_values=exact)
            ex = [(layer.keys, layer.values) for layer in exact.layers]
            co = {}
            for beam, pin in variants:
                coded = DynamicCache()
                press = CommVQAblationPress(
                    codebooks=books, bits=args.bits, n_sink=args.n_sink, coded="both",
                    encode_precision=args.encode_precision, key_beam=beam, pin_ratio=pin, pin_span=args.pin_span,
                )  # fmt: skip
                with press(model):
                    model(ctx, past_key_values=coded)
                co[beam, pin] = [(layer.keys, layer.values) for layer in coded.layers]
            nll = {}
            for name, (keys_coded, values_coded, variant) in plan.items():
                kv = []
                for i in range(n_layers):
                    k = co[variant][i][0] if i in keys_coded else ex[i][0]
                    v = co[variant][i][1] if i in values_coded else ex[i][1]
                    kv.append((k, v))
                nll[name] = answer_nll(model, kv, follow, answer_ids.shape[1])
        result["samples"].append(
            {"sample": sample, "depth": float(row["depth"]), "answer_tokens": int(answer_ids.shape[1]), "nll": nll}
        )
        done.add(sample)
        summarize(result)
        result["elapsed_s"] = round(time.time() - t0, 1)
        atomic_write_json(args.output, result)
    summarize(result)
    atomic_write_json(args.output, result)
    print(json.dumps(result["summary"], indent=1)[:3000])


def summarize(result: dict) -> None:
    """Mean answer NLL per mix over the samples, and its increase over the exact cache (with the paired spread)."""
    samples = result["samples"]
    if not samples:
        return
    names = list(samples[0]["nll"])
    summary = {}
    for name in names:
        deltas = [s["nll"][name] - s["nll"]["exact"] for s in samples]
        mean = sum(deltas) / len(deltas)
        sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / max(1, len(deltas) - 1))
        summary[name] = {
            "nll": sum(s["nll"][name] for s in samples) / len(samples),
            "delta_vs_exact": mean,
            "delta_stderr": sd / math.sqrt(len(deltas)),
        }
    result["summary"] = {"n_samples": len(samples), "mixes": summary}


if __name__ == "__main__":
    main()
