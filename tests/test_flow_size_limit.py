"""SD3's learned position embedding covers a fixed number of patches: a larger size is a one-line
error before sampling, not diffusers' ValueError as a traceback."""

from __future__ import annotations

from flow_fixtures import TinyFlowModel
from huabi.cli.main import main
from huabi.models.transformer_families import TransformerFamily as F


def test_sd3_size_beyond_the_position_embedding_is_one_line(tmp_path, capsys):
    model = TinyFlowModel(F.SD35_MEDIUM)
    path = model.write_all_in_one(tmp_path / "sd3.5_medium-tiny.safetensors")
    limit = 2 * int(model.transformer.config.pos_embed_max_size) * 8
    code = main(["generate", "a lighthouse", "--model", str(path), "--size", f"{limit + 16}x64", "--steps", "1",
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"huabi: error: size: {limit + 16}x64 is larger than this model's position embedding covers "
                   f"(at most {limit} px per side)")
    assert main(["generate", "a lighthouse", "--model", str(path), "--size", f"{limit}x64", "--steps", "1",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
