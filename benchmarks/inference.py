"""Inference throughput of exported models: PyTorch vs TorchScript vs onnxruntime.

DynaMMo (one merged adapter set: the backbone runs once) against ACL (one adapter set per
experience: the backbone runs T times) after T = 3 and 10 experiences, at batch 1 and 64.
Structure only (no training; throughput does not depend on the weights): each strategy grows
through ``T`` class-incremental experiences (2 classes each), its deployable model is wrapped in
:class:`medcl.export.ExportModule` (normalisation + softmax + routing, what every export stores)
and exported with :func:`medcl.export.export_torchscript` / :func:`medcl.export.export_onnx`
(both verified against PyTorch to 1e-4 on export). Each adapter set gets seeded noise so the
sets differ as trained ones do (identical copies could be merged by graph optimisers). Inputs
are seeded random [0, 1] images of the scenario's shape. Each cell is the best of ``--repeats`` timed runs after one warm-up, each
run lasting at least ``--min-seconds``. Writes ``benchmarks/results/inference.{json,md}``.

    python benchmarks/inference.py [--backbone resnet18] [--image-size 28] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from medcl.export import ExportModule, export_onnx, export_torchscript
from medcl.models.backbones import create_backbone
from medcl.strategies import ExperienceInfo, create_strategy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results


def images_per_s(fn, x: torch.Tensor, *, repeats: int, min_seconds: float) -> float:
    """Best-of-``repeats`` throughput of ``fn(x)``; each timed run loops for ``min_seconds``."""
    fn(x)  # warm-up (TorchScript profiling executor, onnxruntime allocations)
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn(x)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        best = max(best, n * len(x) / dt)
    return best


def runtimes(module: ExportModule, meta: dict, folder: Path) -> dict:
    """``name -> fn(x)`` for PyTorch eager, TorchScript and onnxruntime."""
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        ts = torch.jit.load(str(export_torchscript(module, meta, folder / "m.ts")))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(
        str(export_onnx(module, meta, folder / "m.onnx")), opts, providers=["CPUExecutionProvider"]
    )

    def no_grad(m):
        def fn(x):
            with torch.no_grad():
                return m(x)

        return fn

    return {
        "pytorch": no_grad(module),
        "torchscript": no_grad(ts),
        "onnxruntime": lambda x: sess.run(None, {"image": x.numpy()}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--experiences", type=int, nargs="+", default=[3, 10])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = [args.channels, args.image_size, args.image_size]
    meta = {"input_shape": shape}
    rows = []
    for method in ("dynammo", "acl"):
        for T in args.experiences:
            torch.manual_seed(args.seed)
            bb = create_backbone(args.backbone, in_chans=args.channels, small_input=True)
            strategy = create_strategy(method, bb, backbone_init="checkpoint")
            for t in range(T):
                strategy.grow(ExperienceInfo(t, f"exp-{t}", t, (2 * t, 2 * t + 1), 2 * (t + 1)))
            with torch.no_grad():  # trained sets differ; identical copies could be deduplicated
                for aset in strategy.adapter_sets:
                    for w in aset.parameters():
                        w.add_(0.01 * torch.randn_like(w))
            strategy.merge_adapters()
            module = ExportModule(strategy.deployable_model()).eval()
            with tempfile.TemporaryDirectory() as tmp:
                fns = runtimes(module, meta, Path(tmp))
                for bs in args.batch_sizes:
                    g = torch.Generator().manual_seed(args.seed)
                    x = torch.rand((bs, *shape), generator=g)
                    for name, fn in fns.items():
                        ips = images_per_s(
                            fn, x, repeats=args.repeats, min_seconds=args.min_seconds
                        )
                        row = {"method": method, "T": T, "batch": bs, "runtime": name}
                        rows.append(row | {"images_per_s": ips})
                        if not args.quiet:
                            print(f"{method:8s} T={T:2d} batch={bs:3d} {name:12s} {ips:9.1f} img/s")
    columns = ["method", "T", "batch", "runtime", "images_per_s"]
    md = (
        f"# Inference throughput ({args.backbone}, input {tuple(shape)}, "
        f"{args.threads} CPU thread(s))\n\n"
        "DynaMMo merged (backbone once) vs ACL unmerged (backbone once per experience); "
        "untrained weights, exported models verified to 1e-4 against PyTorch.\n\n"
        + markdown_table(rows, columns)
        + "\n\nShared, loaded CPU machine: single timed runs vary by about +-20 %; compare "
        "DynaMMo with ACL (3x and 10x the backbone passes), not runtimes within 20 %.\n"
    )
    path = write_results("inference", {"args": vars(args), "rows": rows}, md)
    if not args.quiet:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
