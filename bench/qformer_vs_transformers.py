"""Q-Former speed, ours against transformers' Blip2QFormerModel, same weights, one run.

    .venv/bin/python bench/qformer_vs_transformers.py [--layers 12] [--batch 4] [--repeats 5]

Prints the median time of each pass for both and the ratio (transformers / ours: > 1 means
ours is faster). BLIP-2 sizes by default: 768 wide, 32 queries, 257 image tokens of width 1408.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

from qformer.convert.qformer_layouts import load_transformers_qformer
from timing import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Blip2QFormerConfig(num_hidden_layers=args.layers, use_qformer_text_input=True, vocab_size=30523)
    ref = Blip2QFormerModel(config).to(args.device).eval()
    embeddings = Blip2TextEmbeddings(config).to(args.device).eval()
    ours = load_transformers_qformer(ref, embeddings).to(args.device).eval()

    b, q, t = args.batch, 32, args.text
    queries = torch.randn(b, q, 768, device=args.device) * 0.02
    image = torch.randn(b, 257, 1408, device=args.device)
    ids = torch.randint(1000, 30000, (b, t), device=args.device)
    mask = torch.ones(b, q + t, dtype=torch.long, device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    cases = {
        "query pass, forward (no grad)": (
            lambda: ref(query_embeds=queries, encoder_hidden_states=image),
            lambda: ours(query_embeds=queries, encoder_hidden_states=image),
            False,
        ),
        "ITM pass [queries; text], forward + backward": (
            lambda: ref(
                query_embeds=embeddings(input_ids=ids, query_embeds=queries),
                query_length=q,
                attention_mask=mask,
                encoder_hidden_states=image,
            ),
            lambda: ours(input_ids=ids, query_embeds=queries, attention_mask=mask, encoder_hidden_states=image),
            True,
        ),
    }
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.layers} layers, batch {b}, {q} queries, {t} text tokens, 257 image tokens")
    print(f"{'pass':<46} {'transformers':>13} {'qformer':>10} {'ratio':>7}")
    for name, (run_ref, run_ours, backward) in cases.items():
        def timed(run):
            def step():
                if backward:
                    run().last_hidden_state.float().pow(2).mean().backward()
                else:
                    with torch.no_grad():
                        run()
                sync()
            return median_seconds(step, args.repeats)

        t_ref, t_ours = timed(run_ref), timed(run_ours)
        print(f"{name:<46} {t_ref * 1e3:>10.1f} ms {t_ours * 1e3:>7.1f} ms {t_ref / t_ours:>6.2f}x")


if __name__ == "__main__":
    main()
