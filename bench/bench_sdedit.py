"""SDEdit's realism-faithfulness trade-off (issue 13; Meng et al. 2022, fig. 3): noise held-out MNIST digits to
strength s and denoise them with the unconditional model of bench_inpainting.py, then plot the domain FID of the
results against the training digits (realism; difflab.metrics.domain's 128-d classifier features, comparable
only within this plot) against their mean L2 distance to the inputs (faithfulness).

Usage (after `bench_inpainting.py train-uncond`):
    python bench/bench_sdedit.py --threads 2          # writes docs/img/sdedit_tradeoff.png and a JSON line
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "bench_inpaint" / "generation")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "sdedit_tradeoff.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.metrics.domain import load_mnist, train_digit_classifier
    from difflab.metrics.frechet import frechet_distance
    from difflab.pipelines.edit import Img2ImgPipeline

    images, labels = load_mnist(args.data_dir)
    classifier = train_digit_classifier(images[:8000], labels[:8000], heldout=500).eval()

    def features(x: torch.Tensor) -> np.ndarray:  # x in [-1, 1], (N, 1, 28, 28)
        with torch.no_grad():
            return classifier((x.clamp(-1, 1) + 1) / 2)[0].double().numpy()

    def fid(a: np.ndarray, b: np.ndarray) -> float:
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    train_x = torch.from_numpy(images[:8000].astype(np.float32) / 127.5 - 1)[:, None]
    reference = features(train_x)
    inputs = torch.from_numpy(images[9000:9000 + args.images].astype(np.float32) / 127.5 - 1)[:, None]
    pipe = Img2ImgPipeline.from_pretrained(args.model)
    rows = []
    for s in STRENGTHS:
        out = torch.cat([pipe(inputs[i:i + 100], s, args.steps, args.sampler, seed=i, progress=False).samples
                         for i in range(0, len(inputs), 100)])
        l2 = float((out - inputs).flatten(1).norm(dim=1).mean())
        rows.append({"strength": s, "domain_fid": round(fid(features(out), reference), 3), "l2": round(l2, 3)})
        print(rows[-1], flush=True)
    inputs_fid = fid(features(inputs), reference)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([r["l2"] for r in rows], [r["domain_fid"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"s={r['strength']:g}", (r["l2"], r["domain_fid"]), textcoords="offset points", xytext=(4, 4))
    ax.axhline(inputs_fid, ls="--", c="grey", label=f"the inputs themselves ({inputs_fid:.2f})")
    ax.set_xlabel("mean L2 distance to the input (faithfulness: lower is closer)")
    ax.set_ylabel("domain FID to training digits")
    ax.set_title("SDEdit on MNIST: realism vs faithfulness")
    ax.legend()
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(json.dumps({"date": datetime.date.today().isoformat(), "sampler": args.sampler, "steps": args.steps,
                      "images": args.images, "inputs_domain_fid": round(inputs_fid, 3), "rows": rows}))


if __name__ == "__main__":
    main()
