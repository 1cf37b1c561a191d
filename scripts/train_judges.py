"""Train the judge networks shipped in minigen/weights/ and record their baselines.

    python scripts/train_judges.py                    # both judges, ~ a few minutes on 2 cores
    python scripts/train_judges.py --dataset digits   # one judge; the other's entry is kept
    python scripts/train_judges.py --evaluate         # re-measure the shipped judges (no training)

For each built-in dataset this trains `minigen.judge.Judge` on the train split minus its
last 5,000 images (held out, so the real-vs-real baseline never uses images the judge was
trained on), with light augmentation (random shifts of up to 2 pixels; horizontal flips for
`shapes`, never for digits, which are not mirror-symmetric). Then it measures

* test accuracy on the whole test split (shapes: shape *and* colour right), and
* the real-vs-real baseline: FD, KID and precision/recall between the first n test images
  and the n held-out train images, for n = 1,000 and 5,000. This is the score a perfect
  generator would get at that n, the floor to compare models against,

and writes judge_<name>.pt and judges.json (with the command, seed, date, torch version,
sha256 of each weights file) into minigen/weights/.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import minigen
from minigen import metrics
from minigen.data import from_uint8, load_dataset
from minigen.judge import JUDGE_CONFIGS, WEIGHTS_DIR, Judge, extract_features, save_judge


def augment(x: torch.Tensor, gen: torch.Generator, *, max_shift: int, flip: bool) -> torch.Tensor:
    """Random integer shifts (edge pixels replicated) and optional horizontal flips, per image."""
    n, _, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    out = xp[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (n, c, h, w)
    if flip:
        mirror = torch.rand(n, generator=gen) < 0.5
        out[mirror] = out[mirror].flip(-1)
    return out.contiguous()


@torch.no_grad()
def evaluate(judge: Judge, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> dict:
    judge.eval()
    heads = {name: [] for name in judge.config.heads}
    for i in range(0, len(images_u8), batch_size):
        for name, pred in judge.predict_heads(from_uint8(images_u8[i : i + batch_size])).items():
            heads[name].append(pred)
    heads = {k: torch.cat(v) for k, v in heads.items()}
    target = judge.split_labels(labels)
    combined = judge.combine_labels(heads)
    return {
        "test_accuracy": float((combined == labels).double().mean()),
        "test_accuracy_per_head": {k: float((heads[k] == target[k]).double().mean()) for k in heads},
    }


def measure(judge: Judge, name: str, test, x_hold: torch.Tensor, args) -> tuple[dict, dict]:
    """Test accuracy on the whole test split, and the real-vs-real baselines."""
    result = evaluate(judge, test.images, test.labels)
    print(f"[{name}] test accuracy {result['test_accuracy']:.4%} {result['test_accuracy_per_head']}", flush=True)

    # real-vs-real: test[:n] vs held-out train[-n:], at the two sample sizes we report FD at
    f_test = extract_features(judge, from_uint8(test.images[: max(args.baseline_sizes)]))
    f_hold = extract_features(judge, from_uint8(x_hold))
    baseline = {}
    for n in args.baseline_sizes:
        a, b = f_test[:n], f_hold[-n:]
        fd = metrics.frechet_distance(a, b)
        kid_mean, kid_std = metrics.kid(a, b, subset_size=min(1000, n), num_subsets=100, seed=args.seed)
        precision, recall = metrics.precision_recall(a, b, k=3)
        baseline[str(n)] = {"fd": fd, "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": min(1000, n),
                            "precision": precision, "recall": recall}
        print(f"[{name}] real-vs-real n={n}: FD {fd:.4f}  KID {kid_mean:.2e} ± {kid_std:.1e}  "
              f"P {precision:.3f} R {recall:.3f}", flush=True)
    return result, baseline


def _provenance() -> dict:
    """When and with what a record was measured."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__, "minigen_version": minigen.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def re_measure(name: str, args, entry: dict) -> dict:
    """--evaluate: the shipped judge's test accuracy and baselines on the images this minigen
    draws now (the judge itself is not retrained; its training record is kept)."""
    import matplotlib
    import PIL

    from minigen.judge import load_judge

    train = load_dataset(name, split="train")
    test = load_dataset(name, split="test")
    # the judge that --out holds (the shipped one, sha256-checked, by default)
    shipped = Path(args.out).resolve() == WEIGHTS_DIR.resolve()
    judge = load_judge(name) if shipped else load_judge(name, path=Path(args.out) / entry["file"])
    result, baseline = measure(judge, name, test, train.images[-args.holdout:], args)
    return {**entry, **result, "real_vs_real": baseline,
            "evaluated": {"command": f"python scripts/train_judges.py --evaluate --dataset {name}", **_provenance(),
                          # digits are drawn with matplotlib's fonts through Pillow's FreeType:
                          # another version of either can move a few pixels, and these figures
                          "pillow": PIL.__version__, "matplotlib": matplotlib.__version__}}


def train_one(name: str, args) -> tuple[Judge, dict]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train = load_dataset(name, split="train")
    test = load_dataset(name, split="test")
    if len(train) <= args.holdout:
        raise ValueError(f"{name}: train split has {len(train)} images, not more than --holdout {args.holdout}")
    x_train, y_train = train.images[: -args.holdout], train.labels[: -args.holdout]
    x_hold = train.images[-args.holdout :]

    judge = Judge(JUDGE_CONFIGS[name])
    # shapes' label must decompose into the shape and colour attributes, or the heads learn nonsense
    if train.attributes is not None and set(judge.config.heads) <= set(train.attributes):
        split = judge.split_labels(train.labels)
        for head in judge.config.heads:
            if not torch.equal(split[head], train.attributes[head].long()):
                raise RuntimeError(f"{name}: label does not decompose into the '{head}' attribute as expected")

    steps_per_epoch = len(x_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    flip = name == "shapes"
    print(f"[{name}] {sum(p.numel() for p in judge.parameters()):,} params, {len(x_train):,} train images, "
          f"{args.epochs} epochs x {steps_per_epoch} steps", flush=True)

    t0 = time.time()
    judge.train()
    step = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            x = augment(from_uint8(x_train[idx]), gen, max_shift=2, flip=flip)
            targets = judge.split_labels(y_train[idx])
            logits = judge(x)
            loss = sum(F.cross_entropy(logits[k], targets[k]) for k in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0 or step == total:
                print(f"[{name}] epoch {epoch + 1} step {step}/{total} loss {loss.item():.4f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
    train_seconds = time.time() - t0
    judge.eval().requires_grad_(False)

    result, baseline = measure(judge, name, test, x_hold, args)
    info = {
        **result,
        "test_images": len(test),
        "train_images": len(x_train),
        "feature_dim": judge.config.feature_dim,
        "params": sum(p.numel() for p in judge.parameters()),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "train_seconds": round(train_seconds, 1),
        "real_vs_real": baseline,
        "real_vs_real_sets": f"first n test images vs the last n train images (the last {args.holdout} "
                             "train images are held out of judge training)",
    }
    return judge, info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(JUDGE_CONFIGS), action="append",
                   help="which judge(s) to train (repeatable); default: all")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--baseline-sizes", type=int, nargs="+", default=[1000, 5000])
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--evaluate", action="store_true",
                   help="re-measure the shipped judges' accuracy and baselines without retraining them")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if max(args.baseline_sizes) > args.holdout:
        p.error("--baseline-sizes must not exceed --holdout")

    json_path = args.out / "judges.json"
    record = json.loads(json_path.read_text()) if json_path.exists() else {}
    for name in args.dataset or sorted(JUDGE_CONFIGS):
        if args.evaluate:
            if name not in record:
                p.error(f"--evaluate: no {name} judge recorded in {json_path}; train it first")
            record[name] = re_measure(name, args, record[name])
            json_path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
            continue
        judge, info = train_one(name, args)
        path = args.out / f"judge_{name}.pt"
        save_judge(judge, path)
        data = path.read_bytes()
        record[name] = {
            "file": path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            **info,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None
                       else "python scripts/train_judges.py " + " ".join(argv),
            "seed": args.seed,
            **_provenance(),
        }
        print(f"[{name}] wrote {path} ({len(data) / 1e6:.2f} MB)", flush=True)
        json_path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
