"""GPU job: CommVQ codebooks for the embedded SmolLM2-135M at 1 and 2 bits, EM vs E2E, held-out relative MSE.

SmolLM2-135M-Instruct (30 layers, 3 KV heads, head_dim 64): key bits are ``12 R / 64``, so R=11 gives 2.06 bits and
R=5 gives 0.94 bits ("1 bit"). The steps are the ``pressroom-train commvq`` steps, called in-process:

1. collect pre-RoPE KV of the training split of ``--train-corpus`` (default the essays; keys, values, queries) and of
   the essays' held-out split (keys, values), in ``--seq-len`` sequences, capped at ``--train-tokens`` /
   ``--heldout-tokens``;
2. per bit width: EM key codebooks for every layer, value codecs for every layer, native codebook, held-out
   relative MSE per layer (keys and values);
3. per bit width: E2E key codebooks for every layer, held-out relative MSE per layer;
4. the native codebooks (EM with value codecs stored in fp16, E2E keys only) copied under ``--codebooks``.

Caps (tokens, EM iterations, E2E and value steps) are recorded in the JSON; a ``--deadline-s`` stops starting new
layers so the job ends inside the GPU session's 8 minutes; the JSON is written after every phase.

    source benchmarks/gpu_env.sh
    python benchmarks/commvq_train_smollm2.py --output $OUT/commvq_smollm2.json --codebooks $OUT/commvq_smollm2
    TRITON_INTERPRET=1 python benchmarks/commvq_train_smollm2.py --smoke --output /tmp/commvq_smollm2_smoke.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bits", default="2,1")
    p.add_argument("--methods", default="em,e2e")
    p.add_argument(
        "--train-corpus",
        default="pg_essays",
        help="the codebooks' training text: a corpus of pressroom.evaluation.corpora.load_corpus, its train split "
        "(default pg_essays; e.g. pg_essays+DIR adds a folder of .txt files after the essays, such as the novels of "
        "benchmarks/export_austen.py); the held-out MSE is always on the essays' held-out split",
    )
    p.add_argument("--train-tokens", type=int, default=65536)
    p.add_argument("--heldout-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--em-steps", type=int, default=40, help="EM iterations per residual (reference: 100)")
    p.add_argument("--key-query-weight", type=float, default=None, help="key distance weights (default: the library's)")
    p.add_argument("--e2e-steps", type=int, default=300)
    p.add_argument("--e2e-batch", type=int, default=512)
    p.add_argument("--e2e-lr", type=float, default=2e-2)
    p.add_argument("--value-steps", type=int, default=1000, help="value codec steps (the library default)")
    p.add_argument("--value-lr", type=float, default=1e-2)
    p.add_argument("--value-window", type=int, default=256)
    p.add_argument(
        "--value-ls-rounds",
        type=int,
        default=None,
        help="least-squares codebook rounds after the value training (default: the library's; 0: none)",
    )
    p.add_argument("--deadline-s", type=float, default=440.0, help="start no new layer after this many seconds")
    p.add_argument("--workdir", default=None, help="KV shards and intermediate files (default: a temp dir)")
    p.add_argument("--codebooks", default=None, help="where to copy the native codebooks (default: none)")
    p.add_argument("--output", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (TRITON_INTERPRET=1): checks the script")
    p.add_argument("--allow-cpu", action="store_true", help="the real job on the CPU, PyTorch references (slow)")
    args = p.parse_args(argv)
    device, use_triton = "cuda", None
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
        device, use_triton = "cpu", True
        args.model, args.train_tokens, args.heldout_tokens, args.seq_len = "tiny-llama", 128, 64, 64
        args.em_steps, args.e2e_steps, args.e2e_batch, args.value_steps, args.value_window = 2, 3, 64, 3, 32
    elif not torch.cuda.is_available() and args.allow_cpu:
        device, use_triton = "cpu", False
    elif not torch.cuda.is_available():
        sys.exit(
            "commvq_train_smollm2.py needs a CUDA GPU (or --smoke on the CPU with TRITON_INTERPRET=1, or --allow-cpu)"
        )
    cpu_label = "cpu (smoke test, Triton interpreter)" if args.smoke else "cpu (PyTorch references)"
    import tempfile

    import transformers
    import triton

    from pressroom.evaluation.atomic import atomic_write_json
    from pressroom.evaluation.models import load_model
    from pressroom.presses.commvq_codebooks import CommVQCodebooks, residuals_for_bits
    from pressroom.training.commvq import (
        ValueConfig,
        assemble,
        collect,
        compute_scales,
        evaluate_heldout,
        native_dir,
        read_meta,
        train_keys_layer,
        train_values_layer,
    )
    from pressroom.training.commvq_em import DEFAULT_KEY_QUERY_WEIGHT, E2EConfig, EMConfig

    t_start = time.time()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="commvq_smollm2_"))
    bits_list = [int(b) for b in args.bits.split(",")]
    methods = args.methods.split(",")
    vcfg = ValueConfig(steps=args.value_steps, window=args.value_window, lr=args.value_lr)
    if args.value_ls_rounds is not None:
        vcfg.ls_rounds = args.value_ls_rounds
    result: dict = {
        "benchmark": "commvq_train_smollm2",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_label,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "model": args.model,
        "corpus": f"{args.train_corpus} (train split for codebooks); pg_essays (heldout split for the MSE)",
        "caps": {
            "train_tokens": args.train_tokens,
            "heldout_tokens": args.heldout_tokens,
            "seq_len": args.seq_len,
            "em_iterations_per_residual": args.em_steps,
            "em_key_tokens": args.train_tokens,
            "e2e_steps": args.e2e_steps,
            "e2e_batch": args.e2e_batch,
            "e2e_lr": args.e2e_lr,
            "value_steps": args.value_steps,
            "value_lr": args.value_lr,
            "value_window": args.value_window,
            "value_ls_rounds": vcfg.ls_rounds,
            "value_batch_windows": 8,
            "deadline_s": args.deadline_s,
        },  # fmt: skip
        "phases": {},
        "heldout": {},
        "incomplete": [],
    }

    def save() -> None:
        result["wall_s"] = time.time() - t_start
        atomic_write_json(args.output, result)

    def late() -> bool:
        return time.time() - t_start > args.deadline_s

    # 1. collection
    t0 = time.time()
    model, tok = load_model(args.model, device=device)
    result["phases"]["model_load_s"] = time.time() - t0
    t0 = time.time()
    collect(model, tok, work, args.train_corpus, "train", args.train_tokens, args.seq_len, True, args.model)
    collect(model, tok, work, "pg_essays", "heldout", args.heldout_tokens, args.seq_len, False, args.model)
    meta = read_meta(work / "kv" / "train")
    result["collected"] = {
        "train_tokens": meta["tokens"],
        "heldout_tokens": read_meta(work / "kv" / "heldout")["tokens"],
    }
    del model
    compute_scales(work)
    result["phases"]["collect_s"] = time.time() - t0
    print(f"collected {result['collected']} in {result['phases']['collect_s']:.1f} s", flush=True)
    layers = range(meta["num_layers"])
    result["shape"] = {"layers": meta["num_layers"], "kv_heads": meta["num_kv_heads"], "head_dim": meta["head_dim"]}
    result["residuals"] = {b: residuals_for_bits(b, meta["head_dim"]) for b in bits_list}
    save()

    qw = DEFAULT_KEY_QUERY_WEIGHT if args.key_query_weight is None else args.key_query_weight
    result["caps"]["key_query_weight"] = qw
    em = EMConfig(n_steps=args.em_steps)
    e2e = E2EConfig(steps=args.e2e_steps, batch=args.e2e_batch, lr=args.e2e_lr)
    order = [(b, m) for m in methods for b in bits_list]  # all EM first: the paper's method has priority
    for bits, method in order:
        key = f"{bits}bit_{method}"
        t0 = time.time()
        done = []
        for layer in layers:
            if late():
                result["incomplete"].append(f"{key}: keys stopped before layer {layer} (deadline)")
                break
            done.append(
                train_keys_layer(
                    work, layer, bits, method, args.train_tokens, device, em, e2e, use_triton, query_weight=qw
                )
            )
        result["phases"][f"{key}_keys_s"] = time.time() - t0
        result["phases"][f"{key}_keys_layers"] = done
        print(f"{key}: keys of {len(done)} layers in {result['phases'][f'{key}_keys_s']:.1f} s", flush=True)
        save()
        if len(done) < meta["num_layers"]:
            continue
        if method == methods[0]:
            t0 = time.time()
            for layer in layers:
                if late():
                    result["incomplete"].append(f"{bits}bit values stopped before layer {layer} (deadline)")
                    break
                train_values_layer(work, layer, bits, args.train_tokens, device, vcfg)
            result["phases"][f"{bits}bit_values_s"] = time.time() - t0
        t0 = time.time()
        assemble(work, bits, method, args.model)
        result["heldout"][key] = evaluate_heldout(work, bits, method, args.heldout_tokens, device, use_triton)
        result["phases"][f"{key}_eval_s"] = time.time() - t0
        print(
            f"{key}: held-out keys {result['heldout'][key]['keys_rel_mse_mean']:.4f}, values "
            f"{result['heldout'][key]['values_rel_mse_mean']} (refined: "
            f"{result['heldout'][key]['values_rel_mse_refined_mean']}) (t={time.time() - t_start:.0f} s)",
            flush=True,
        )
        save()

    # summary table: per layer, EM vs E2E, keys and values
    table = []
    for key, res in result["heldout"].items():
        bits, method = key.split("bit_")
        for layer, k in enumerate(res["keys_rel_mse"]):
            v = res["values_rel_mse"][layer] if res["values_rel_mse"] else None
            table.append({"bits": int(bits), "method": method, "layer": layer, "keys_rel_mse": k, "values_rel_mse": v})
    result["table"] = table
    result["summary"] = {
        key: {"keys_rel_mse_mean": res["keys_rel_mse_mean"], "values_rel_mse_mean": res["values_rel_mse_mean"],
              "values_rel_mse_refined_mean": res["values_rel_mse_refined_mean"], "key_bits": res["key_bits"],
              "residuals": res["residuals"]}
        for key, res in result["heldout"].items()
    }  # fmt: skip
    save()

    if args.codebooks:
        for key in result["heldout"]:
            bits, method = key.split("bit_")
            books = CommVQCodebooks.load(native_dir(work, int(bits), method))
            if method != "em":
                books.values = None  # value codecs are the same for both key methods; keep one copy
            books.save_native(Path(args.codebooks) / f"{bits}bit" / method, values_dtype=torch.float16)
        result["codebooks"] = str(args.codebooks)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    save()
    print({k: v for k, v in result["summary"].items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
