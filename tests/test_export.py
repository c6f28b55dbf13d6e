"""Branch export: each branch loads with plain torch in a process that cannot import groupnet and gives the logits
of branch k inside the grouped model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from groupnet.eval import main as eval_main
from groupnet.models import build_model
from groupnet.train import main
from helpers.train_runs import load_ckpt, quick

LOADER = textwrap.dedent("""
    import sys

    class NoGroupnet:  # make any import of groupnet fail: the programs must not need it
        def find_spec(self, name, path=None, target=None):
            if name == "groupnet" or name.startswith("groupnet."):
                raise ImportError("groupnet is blocked in this process")
            return None

    sys.meta_path.insert(0, NoGroupnet())
    import torch

    folder, k = sys.argv[1], int(sys.argv[2])
    x = torch.load(folder + "/input.pt", weights_only=True)
    outs = []
    for i in range(k):
        branch = torch.export.load(f"{folder}/export/branch_{i}.pt2").module()
        outs.append(branch(x))
        outs.append(branch(x[:1]))  # another batch size: the batch dimension is dynamic
    torch.save(outs, folder + "/outputs.pt")
    assert not any(m == "groupnet" or m.startswith("groupnet.") for m in sys.modules)
""")


def test_exported_branches_match_the_grouped_model_without_groupnet(tmp_path):
    out = tmp_path / "run"
    k = 3
    assert main(quick(out, "--epochs", "1", "--branches", str(k), "--export-branches")) == 0
    meta = json.loads((out / "export" / "meta.json").read_text())
    assert (meta["branches"], meta["in_channels"], meta["image_size"], meta["num_classes"]) == (k, 1, 8, 10)

    ckpt = load_ckpt(out / "last.pt")
    model = build_model("small_cnn", branches=k, num_classes=10, in_channels=1)
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grouped = model(x)  # one shared view to every branch: (5, K*10)
    torch.save(x, out / "input.pt")

    proc = subprocess.run([sys.executable, "-c", LOADER, str(out), str(k)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = torch.load(out / "outputs.pt", weights_only=True)
    for i in range(k):
        full, single = outputs[2 * i], outputs[2 * i + 1]
        expected = grouped[:, i * 10 : (i + 1) * 10]
        assert torch.allclose(full, expected, rtol=1e-5, atol=1e-5), (i, (full - expected).abs().max())
        assert torch.allclose(single, expected[:1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[2])  # the branches are different networks


def test_eval_cli_exports_from_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(quick(out, "--epochs", "1")) == 0
    assert not (out / "export").exists()
    assert eval_main([str(out), "--export-branches"]) == 0
    assert sorted(p.name for p in (out / "export").iterdir()) == ["branch_0.pt2", "branch_1.pt2", "meta.json"]
