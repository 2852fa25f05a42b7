"""Peak memory of one SDFT training step on a tiny model with a large vocabulary.

The integration (``sdft.causal_lm_loss``) against the naive path (``model(...).logits`` for
student and teacher, then CE + tau^2 KL on full float32 logits). Each case runs in a fresh
process and reports the growth of its peak RSS over the step, so allocator caches of one case
cannot hide the other's peak.

    python -m bench.memory.hf_memory            # V=65536, D=64, 8 x 512 tokens, CPU fp32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(path: str, vocab: int, hidden: int, batch: int, seq: int) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers as tf

    from sdft import causal_lm_loss
    from sdft.teacher import FrozenCopy

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq)
    student = tf.AutoModelForCausalLM.from_config(config)
    teacher = FrozenCopy(student)
    ids = torch.randint(0, vocab, (batch, seq))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tau = 0.5
    base = _peak_rss_mb()
    start = time.perf_counter()
    if path == "fused":
        loss = causal_lm_loss(student, data, teacher).loss
    else:
        z_s = student(input_ids=ids).logits[:, :-1].float()
        with torch.no_grad():
            z_t = teacher.model(input_ids=ids).logits[:, :-1].float()
        ce = F.cross_entropy(z_s.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        kl = F.kl_div(F.log_softmax(z_s / tau, -1), F.log_softmax(z_t / tau, -1), log_target=True,
                      reduction="none").sum(-1).mean()
        loss = ce + tau**2 * kl
    loss.backward()
    return {"path": path, "loss": float(loss), "seconds": time.perf_counter() - start,
            "peak_rss_growth_mb": _peak_rss_mb() - base}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--case", choices=["fused", "naive"], help="run one case in this process (internal)")
    ap.add_argument("--out", help="write the results JSON here")
    args = ap.parse_args(argv)
    shape = (args.vocab, args.hidden, args.batch, args.seq)
    if args.case:
        print(json.dumps(run_case(args.case, *shape)))
        return
    results = []
    for case in ("naive", "fused"):
        cmd = [sys.executable, "-m", "bench.memory.hf_memory", "--case", case, "--vocab", str(args.vocab), "--hidden",
               str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    naive, fused = results
    summary = {"shape": dict(zip(("vocab", "hidden", "batch", "seq"), shape)), "results": results,
               "memory_ratio": fused["peak_rss_growth_mb"] / naive["peak_rss_growth_mb"],
               "loss_rel_diff": abs(fused["loss"] - naive["loss"]) / abs(naive["loss"])}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
