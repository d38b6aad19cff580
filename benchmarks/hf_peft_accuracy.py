"""The accuracy study's LoRA, trained by Hugging Face transformers + peft instead.

docs/accuracy.md compares LARS with the engine's own LoRA. This script asks whether
that LoRA is a fair stand-in for the one people use: it trains SmolLM2-135M with
transformers + peft (torch, CPU) on the very rows `minilars finetune` trains on
(same tokenization, padding, loss mask, batch order) and scores the held-out
questions with the same greedy decoding and the same scorer. Two recipes:

    minilars  the study's: alpha = 2r, warm-up min(4, steps // 10), cosine to 0.1 lr,
              AdamW (0.9, 0.999, eps 1e-8, no weight decay), clip 1.0
    hf        HF Trainer's defaults: peft's alpha = r, no warm-up, linear decay to 0,
              AdamW as above, clip 1.0

    python benchmarks/hf_peft_accuracy.py --study runs/study-personal --task personal --recipe minilars

Needs `pip install transformers peft` beside minilars (not minilars dependencies).
Weights come from the local model cache (`minilars models pull smollm2-135m`).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="a `minilars study accuracy` output directory")
    p.add_argument("--task", default="personal")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", choices=["minilars", "hf"], default="minilars")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for eval.jsonl and result.json")
    return p.parse_args(argv)


def lr_at(args, step: int) -> float:
    """The learning rate of step `step` under the chosen recipe."""
    if args.recipe == "hf":
        return args.lr * (1 - step / args.steps)
    from minilars.train import TrainConfig

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup=min(4, args.steps // 10))
    return cfg.lr_at(step)


def build_llama(name: str, torch, transformers):
    """LlamaForCausalLM with the weights minilars loads for `name` (tied head)."""
    from minilars.models import load_model_weights

    cfg, state, _ = load_model_weights(name, np.float32)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                                                strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    return model


def build_model(args, torch, transformers, peft):
    """LlamaForCausalLM with the minilars-loaded weights, wrapped in peft LoRA."""
    model = build_llama(args.model, torch, transformers)
    alpha = 2 * args.rank if args.recipe == "minilars" else args.rank
    lora = peft.LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=PROJECTIONS)
    torch.manual_seed(args.seed)
    return peft.get_peft_model(model, lora)


def main(argv=None) -> int:
    args = parse_args(argv)
    import peft
    import torch
    import transformers

    from minilars.data import IGNORE, batch_indices, load_dataset, make_rows, pad_id_of, parse_record, stop_ids_of
    from minilars.data import tokenize
    from minilars.evaluate import load_tokenizer, read_items, score, summarize

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task_dir = Path(args.study) / "runs" / args.task
    tokenizer = load_tokenizer(args.model)
    dataset = load_dataset(task_dir / "finetune.jsonl", tokenizer, 0.1, args.seed)
    rows = make_rows(dataset.train, args.seq_len, pad_id_of(tokenizer), "pad", args.seed)
    model = build_model(args, torch, transformers, peft)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{dataset.describe()}; {len(rows)} rows of {args.seq_len}; "
          f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable; recipe {args.recipe}", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(args.steps):
        idx = batch_indices(len(rows), args.batch_size, args.seed, step)
        tokens = torch.from_numpy(rows.tokens[idx])
        targets = torch.from_numpy(rows.targets[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        logits = model(input_ids=tokens).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  lr {lr_at(args, step):.2e}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    train_s = time.perf_counter() - started

    model.eval()
    stop = sorted(stop_ids_of(tokenizer))
    scored = []
    with open(out / "eval.jsonl", "w") as f:
        for item in read_items(task_dir / "heldout.jsonl"):
            prompt = tokenize(parse_record(item.record, item.where), tokenizer).prompt_ids
            with torch.no_grad():
                ids = model.generate(input_ids=torch.tensor([list(prompt)]), max_new_tokens=args.max_new_tokens,
                                     do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
            new = [t for t in ids[0, len(prompt):].tolist() if t not in stop]
            s = score(item, tokenizer.decode(new, skip_special_tokens=True))
            scored.append(s)
            f.write(json.dumps(s.row()) + "\n")
    summary = summarize(scored)
    result = {"recipe": args.recipe, "lr": args.lr, "steps": args.steps, "batch_size": args.batch_size,
              "final_train_loss": losses[-1], "train_s": train_s, "summary": summary.as_dict(),
              "transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{args.task} hf+peft lora ({args.recipe}): {summary.text()}; final train loss {losses[-1]:.4f}; "
          f"train {train_s:.0f} s", flush=True)
    return 0 if math.isfinite(losses[-1]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
