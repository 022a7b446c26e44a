"""Real-browser check: headless Chromium renders report.html with no console error.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no port,
no extra package): console calls, uncaught exceptions and failed resource loads are collected,
and a full-page screenshot is taken. Skipped when the Debian ``chromium`` package is absent
(``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medcl.data.scenarios import build_scenario
from medcl.reports import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian package `chromium`; .ci/run installs it)",
)
_TIMEOUT_S = 60
_PROBLEMS = ("Runtime.consoleAPICalled", "Runtime.exceptionThrown", "Log.entryAdded")


class _DevTools:
    """Minimal DevTools-protocol client over Chromium's pipe (fd 3: commands, fd 4: replies)."""

    def __init__(self, user_data_dir: Path) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # in the child: the protocol fixes fds 3 and 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)  # both above 4 or harmless
            for src, dst in ((a, 3), (b, 4)):
                os.dup2(src, dst)
                os.set_inheritable(dst, True)  # a no-op dup2 (src == dst) keeps CLOEXEC

        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={user_data_dir}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=wire_fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            if not select.select([self._r], [], [], _TIMEOUT_S)[0]:
                raise RuntimeError(f"chromium sent nothing for {_TIMEOUT_S} s")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._read())

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


def render(url: str, tmp: Path, *, width: int = 1200) -> tuple[Image.Image, list[dict]]:
    """Load ``url``; return a full-page screenshot and every console/exception/log problem."""
    tools = _DevTools(tmp / "chromium-profile")
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            tools.send(domain, session=session)
        tools.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        tools.send("Page.navigate", {"url": url}, session=session)
        tools.wait_for("Page.loadEventFired")
        shot = tools.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=session,
        )
    finally:
        tools.close()
    problems = [
        e
        for e in tools.events
        if e.get("method") in _PROBLEMS
        and not (
            e["method"] == "Runtime.consoleAPICalled"
            and e["params"].get("type") in ("log", "info", "debug")
        )
    ]
    return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB"), problems


def test_console_problems_are_caught(tmp_path):
    """The check itself can fail: a page with errors is reported as such."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body><p>x</p><img src="missing.png">'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>'
    )
    _, problems = render(page.as_uri(), tmp_path)
    kinds = {e["method"] for e in problems}
    assert kinds == set(_PROBLEMS), problems


def _scripted_run(folder: Path) -> Path:
    """A run directory in the layout ``medcl run`` writes, with a scripted scorer's predictions.

    The browser, not the model, is under test here, so nothing is trained (the report of a
    real run is tested in test_report.py); the images are real, so thumbnails render.
    """
    config = {
        "name": "browser",
        "seed": 0,
        "output_dir": str(folder),
        "scenario": {
            "name": "synthetic-sites",
            "num_classes": 3,
            "n_sites": 2,
            "n_train": 2,
            "n_val": 1,
            "n_test": 10,
            "image_size": 16,
        },
        "strategy": {"name": "finetune"},
        "model": {"backbone": "test_resnet"},
    }
    scenario = build_scenario(
        "synthetic-sites", **{k: v for k, v in config["scenario"].items() if k != "name"}
    )
    run_dir = folder / "browser"
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "scenario.json").write_text(json.dumps(scenario.describe()))
    rng = np.random.default_rng(0)
    labels = np.concatenate([e.test.labels.numpy() for e in scenario])
    exp = np.concatenate([np.full(len(e.test), e.index) for e in scenario])
    meta = pd.concat([e.test.meta.assign(experience=e.index) for e in scenario])
    for after in (0, 1):
        logits = rng.normal(0, 1, (labels.size, 3))
        logits[np.arange(labels.size), labels] += 1.5
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        np.savez(
            run_dir / "predictions" / f"after-{after:03d}.npz",
            probs=probs,
            labels=labels,
            experience=exp,
        )
        meta.drop(columns="patient_id").to_csv(run_dir / "predictions" / f"after-{after:03d}.csv")
    metrics = {
        "run": "browser",
        "accuracy_matrix": [[0.8, 0.6], [0.7, 0.75]],
        "summary": {"average_accuracy": 0.725},
        "fit": [
            {"experience": i, "updates": 4, "seconds": 1.0, "images_per_s": 64.0} for i in (0, 1)
        ],
        "compute": {"parameters": 1000, "macs": 20000, "latency_ms_b1": 0.5},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    curves = [
        {
            "experience": e,
            "update": 4 * e + u,
            "offset": u,
            "all_acc": 0.7,
            "old_acc": np.nan if e == 0 else 0.8 - 0.2 * (u < 2),
            "new_acc": 0.5 + 0.1 * u,
        }
        for e in (0, 1)
        for u in range(4)
    ]
    pd.DataFrame(curves).to_csv(run_dir / "curves.csv", index=False)
    return run_dir


def test_report_renders_without_console_errors(tmp_path):
    html = write_report(_scripted_run(tmp_path), n_resamples=50)
    assert html.read_text().count('alt="test image') > 0, "thumbnails are part of the page"
    image, problems = render(html.as_uri(), tmp_path)
    assert problems == [], f"console errors while rendering the report: {problems}"
    pixels = np.asarray(image, dtype=np.float64)
    assert image.size[0] == 1200 and image.size[1] > 3000, "the whole report was laid out"
    assert pixels.std() > 20, "screenshot is blank"
    dark = (pixels.mean(axis=2) < 100).mean()  # text, plots and the header
    assert 0.01 < dark < 0.6
