"""The notebooks under experiments/notebooks execute top to bottom on CPU with small settings.

Adding a notebook = one entry in NOTEBOOKS: its file, the figures it must save, and a check of
its outputs.
"""
import math
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "experiments" / "notebooks"


def _final_bpd_below(bound):
  def check(text):
    match = re.findall(r"final bpd: (\S+)", text)
    assert match, "the notebook printed no 'final bpd: ...' line"
    bpd = float(match[-1])
    assert math.isfinite(bpd) and 0.0 < bpd < bound, bpd
  return check


def _swirl_check(text):
  """The held-out bound below uniform (6 bits/dim) and, within 4 standard errors, not below the
  data's entropy: an ELBO is an upper bound on the NLL, whose mean is at least the entropy."""
  _final_bpd_below(math.log2(64))(text)
  bpd, se, entropy = map(float, re.findall(r"final bpd: (\S+) ± (\S+), entropy (\S+)", text)[-1])
  assert abs(entropy - 4.93) < 0.01 and bpd > entropy - 4 * se, (bpd, se, entropy)


def _cifar10_check(text):
  _final_bpd_below(10.0)(text)
  # 72 = 64 + 8: the last, shorter batch is evaluated too (the full split's 1,017 lost 57).
  assert "ELBO on 72 test images" in text, re.findall(r".*ELBO on.*", text)


NOTEBOOKS = [
    pytest.param("vdm_2d.ipynb",
                 ["2d_data.png", "2d_training.png", "2d_gamma.png", "2d_samples.png",
                  "2d_diffusion_loss_vs_t.png"],
                 _swirl_check, id="vdm_2d", marks=pytest.mark.ci_once),
    # Trains 40 steps at 32x32 and compiles a dozen programs: ~1-2 min on 2 CPU cores.
    pytest.param("vdm_cifar10.ipynb",
                 ["cifar10_training.png", "cifar10_samples.png", "cifar10_schedule.png",
                  "cifar10_diffusion_loss_vs_t.png"],
                 _cifar10_check, id="vdm_cifar10", marks=pytest.mark.slow),
]


def _stream_text(nb):
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")


@pytest.mark.parametrize("name, figures, check", NOTEBOOKS)
def test_notebook_executes(name, figures, check, tmp_path, monkeypatch):
  monkeypatch.setenv("VDM_NOTEBOOK_SMALL", "1")
  monkeypatch.delenv("VDM_CHECKPOINT_WORKDIR", raising=False)  # train, do not load a checkpoint
  monkeypatch.setenv("VDM_FIGURES_DIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute()
  for fig in figures:
    path = tmp_path / fig
    assert path.is_file() and path.stat().st_size > 1000, f"{name} did not save {fig}"
  check(_stream_text(nb))
