"""Joint-training upper bound on medmnist-cross3 vs MedMNIST v2's published ResNet-18 (28).

One small-input ResNet-18 is trained from scratch on the union of the PneumoniaMNIST,
BreastMNIST and RetinaMNIST training sets (one 9-class head, medcl's trainer and batch
augmentation), then evaluated per dataset: ACC is the argmax within the dataset's own classes
(task-aware, as in a single-dataset model) and also over all 9 classes (task-agnostic); AUC is
one-vs-rest on the probabilities renormalised over the dataset's classes (sklearn).

Published reference (Yang et al., Scientific Data 2023, Table: ResNet-18 (28), 100 epochs):
ACC 0.854 / 0.863 / 0.524 and AUC 0.944 / 0.901 / 0.717. We train far fewer epochs on 2 CPU cores:
the epoch count is in the results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_root, markdown_table, write_results

from medcl.config import TrainConfig
from medcl.data.experience import Experience
from medcl.data.memory import ReplayMemory
from medcl.data.samples import SampleSet
from medcl.data.scenarios import build_scenario
from medcl.engine.evaluate import predict_proba
from medcl.engine.trainer import fit_experience, seed_everything
from medcl.models.backbones import create_backbone
from medcl.strategies import create_strategy

PUBLISHED = {
    "pneumoniamnist": (0.854, 0.944),
    "breastmnist": (0.863, 0.901),
    "retinamnist": (0.524, 0.717),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    scen = build_scenario("medmnist-cross3", root=data_root(args.root), seed=args.seed)
    union = Experience(
        0,
        "joint",
        0,
        tuple(range(scen.num_classes)),
        "all",
        *(SampleSet.concat([getattr(e, s) for e in scen]) for s in ("train", "val", "test")),
    )
    seed_everything(args.seed)
    strategy = create_strategy("joint", create_backbone("resnet18", in_chans=3, small_input=True))
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=args.lr, augment="light")
    t0 = time.perf_counter()
    stats = fit_experience(
        strategy,
        union,
        past=[],
        num_seen_classes=scen.num_classes,
        memory=ReplayMemory(0),
        cfg=cfg,
        seed=args.seed,
        quiet=args.quiet,
    )
    rows = []
    for exp in scen:
        probs = predict_proba(strategy, exp.test.images).numpy()
        y = exp.test.labels.numpy()
        cls = np.array(exp.classes)
        within = probs[:, cls] / probs[:, cls].sum(1, keepdims=True)
        y_local = np.searchsorted(cls, y)
        auc = (
            roc_auc_score(y_local, within[:, 1])
            if len(cls) == 2
            else roc_auc_score(y_local, within, multi_class="ovr")
        )
        pub_acc, pub_auc = PUBLISHED[exp.name]
        rows.append(
            {
                "dataset": exp.name,
                "acc_task_aware": float((within.argmax(1) == y_local).mean()),
                "acc_all_9": float((probs.argmax(1) == y).mean()),
                "auc": float(auc),
                "published_acc": pub_acc,
                "published_auc": pub_auc,
                "n_test": len(y),
            }
        )
    seconds = time.perf_counter() - t0
    md = (
        f"# Joint upper bound on medmnist-cross3\n\nSmall-input ResNet-18 from scratch, "
        f"{args.epochs} epochs on the union of the three training sets ({len(union.train)} images), "
        f"{stats.updates} updates, {seconds:.0f} s on this machine. Published: MedMNIST v2 "
        "ResNet-18 (28), 100 epochs, one model per dataset.\n\n"
        + markdown_table(
            rows,
            [
                "dataset",
                "acc_task_aware",
                "acc_all_9",
                "auc",
                "published_acc",
                "published_auc",
                "n_test",
            ],
        )
    )
    write_results(
        "joint_upper_bound",
        {"epochs": args.epochs, "updates": stats.updates, "seconds": seconds, "rows": rows},
        md,
    )
    if not args.quiet:
        print(md)


if __name__ == "__main__":
    main()
