"""`huabi inspect`: kind, family, dtypes, parameters, hashes, pretty-printed metadata; bad files."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save_file

from huabi.cli.main import main
from huabi.models.formats import read_safetensors
from huabi.models.gguf_io import write_gguf_unet
from huabi.models.inspect import inspect_file, legacy_hash, safetensors_data_hash


def test_checkpoint_facts_and_hashes(tiny_sd2_file, capsys):
    info = inspect_file(tiny_sd2_file)
    tensors = read_safetensors(tiny_sd2_file)[0]
    sha = hashlib.sha256(tiny_sd2_file.read_bytes()).hexdigest()
    assert info["kind"] == "checkpoint" and info["family"] == "sd2" and info["variant"] == "base"
    assert info["prediction"] == "v_prediction (v_pred key)"
    assert info["tensors"] == len(tensors)
    assert info["parameters"] == sum(t.numel() for t in tensors.values() if t.is_floating_point())
    assert info["dtypes"] == {"F32": len(tensors)}
    assert info["size"] == tiny_sd2_file.stat().st_size
    hashes = info["hashes"]
    assert hashes["sha256"] == sha and hashes["Model hash (A1111) / AutoV2"] == sha[:10]
    assert hashes["sha256[:12] (A1111 TI hashes)"] == sha[:12]
    data = tiny_sd2_file.read_bytes()
    assert hashes["AutoV1 (legacy A1111 hash)"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    header_len = int.from_bytes(data[:8], "little")
    assert hashes["AutoV3 (addnet; A1111 Lora hashes)"] == hashlib.sha256(data[8 + header_len:]).hexdigest()[:12]
    assert main(["inspect", str(tiny_sd2_file)]) == 0
    text = capsys.readouterr().out
    assert "family:      sd2 (Stable Diffusion 2.x)" in text and f"  sha256:" in text and sha in text
    assert "prediction:  v_prediction (v_pred key)" in text
    assert main(["inspect", str(tiny_sd2_file), "--json", "--no-hash"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["family"] == "sd2" and "hashes" not in parsed


def test_lora_with_kohya_metadata_is_pretty_printed(tmp_path, capsys):
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(8, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 8),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(8, 768).half(),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 8).half(),
    }
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
        "ss_base_model_version": "sd_v1",
        "ss_tag_frequency": json.dumps({"10_cat": {"cat": 12, "sitting": 3}}),
        "ss_dataset_dirs": json.dumps({"10_cat": {"n_repeats": 10, "img_count": 12}}),
    }
    path = tmp_path / "catlora.safetensors"
    save_file(lora, str(path), metadata=metadata)
    info = inspect_file(path)
    assert info["kind"] == "LoRA/LyCORIS"
    assert info["lora"]["modules"] == {"LoRA/LoCon": 2} and info["lora"]["ranks"] == [8]
    assert info["lora"]["targets"] == ["text encoder", "unet"] and info["lora"]["ss_network_dim"] == "8"
    assert info["dtypes"] == {"F16": 2, "F32": 3}
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "kind:        LoRA/LyCORIS" in text
    # JSON-valued ss_* keys are shown as indented JSON
    assert '  ss_tag_frequency:\n    {\n      "10_cat": {\n        "cat": 12,' in text
    assert "  ss_network_dim: 8" in text


def test_vae_embedding_and_gguf(tiny_sd1_file, tmp_path, capsys):
    tensors = read_safetensors(tiny_sd1_file)[0]
    vae = {k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    assert inspect_file(tmp_path / "vae.safetensors", with_hashes=False)["kind"] == "VAE"
    save_file({"emb_params": torch.randn(3, 768)}, str(tmp_path / "style.safetensors"))
    info = inspect_file(tmp_path / "style.safetensors", with_hashes=False)
    assert info["kind"] == "textual-inversion embedding" and info["embedding"] == {"vectors": 3, "width": 768, "family": "sd1"}
    gguf_path = tmp_path / "unet-Q8_0.gguf"
    write_gguf_unet(tensors, gguf_path, "Q8_0", source="tiny", extra_metadata={"general.name": "tiny"})
    info = inspect_file(gguf_path)
    assert info["kind"] == "GGUF diffusion model (architecture 'sd1')" and info["family"] == "sd1"
    assert info["dtypes"]["Q8_0"] > 0 and info["metadata"]["general.name"] == "tiny"
    assert info["parameters"] == sum(t.numel() for k, t in tensors.items() if k.startswith("model.diffusion_model."))
    assert "AutoV3 (addnet; A1111 Lora hashes)" not in info["hashes"]
    assert main(["inspect", str(gguf_path), "--no-hash"]) == 0
    assert "dtypes:      F16: 2, F32: 149, Q8_0: 57" in capsys.readouterr().out


def test_long_values_are_shortened_unless_full(tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 2)}, str(path), metadata={"ss_long": "y" * 1000})
    assert main(["inspect", str(path), "--no-hash"]) == 0
    assert "(1000 characters; --full shows all)" in capsys.readouterr().out
    assert main(["inspect", str(path), "--no-hash", "--full"]) == 0
    assert "y" * 1000 in capsys.readouterr().out


def test_bad_files_are_one_line_errors(tiny_sd1_file, tmp_path, capsys):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(tiny_sd1_file.read_bytes()[:3000])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"nope" * 10)
    cases = [
        (truncated, "huabi: error: cut.safetensors: not a safetensors file or truncated: header length 53752 does not fit in a 3000-byte file\n"),
        (empty, "huabi: error: empty.safetensors: file is empty (0 bytes)\n"),
        (fake, "huabi: error: fake.gguf: not a GGUF file (does not start with the GGUF magic bytes)\n"),
        (tmp_path / "missing.safetensors", f"huabi: error: inspect: {tmp_path / 'missing.safetensors'}: no such file or folder\n"),
    ]
    for path, message in cases:
        assert main(["inspect", str(path)]) == 2
        assert capsys.readouterr().err == message
    assert legacy_hash(tiny_sd1_file) == hashlib.sha256(tiny_sd1_file.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert len(safetensors_data_hash(tiny_sd1_file)) == 64


def test_a1111_pt_embedding_and_hypernetwork(tmp_path, capsys):
    embedding = tmp_path / "mystyle.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 1024)}, "name": "mystyle",
                "step": 1500, "sd_checkpoint_name": "v2-1_768"}, embedding)
    info = inspect_file(embedding, with_hashes=False)
    assert info["kind"] == "textual-inversion embedding (A1111 .pt)"
    assert info["embedding"] == {"vectors": 2, "width": 1024, "family": "sd2"}
    assert info["metadata"] == {"name": "mystyle", "step": 1500, "sd_checkpoint_name": "v2-1_768"}
    layer = {"linear.0.weight": torch.zeros(1536, 768), "linear.0.bias": torch.zeros(1536),
             "linear.1.weight": torch.zeros(768, 1536), "linear.1.bias": torch.zeros(768)}
    hypernetwork = tmp_path / "hn.pt"
    torch.save({768: [layer, layer], 320: [layer, layer], "name": "hn", "activation_func": "relu"}, hypernetwork)
    info = inspect_file(hypernetwork, with_hashes=False)
    assert info["kind"] == "hypernetwork (A1111 .pt)" and info["hypernetwork"] == {"widths": [320, 768]}
    assert info["tensors"] == 16 and info["metadata"]["activation_func"] == "relu"
    assert main(["inspect", str(hypernetwork), "--no-hash"]) == 0
    assert "kind:        hypernetwork (A1111 .pt)" in capsys.readouterr().out
