"""The compact model file: mask packing, sizes by hand, round trips, and damaged files."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mome_rec.cli import main
from mome_rec.config import Config, SchemaConfig
from mome_rec.data.batches import make_batch
from mome_rec.data.preprocess import Preprocessor
from mome_rec.data.reader import iter_record_batches
from mome_rec.errors import InputError
from mome_rec.export import export_model, pack_mask, read_model_file, unpack_mask, write_model_file
from mome_rec.inference import build_inference_model, compare_with_trained, load_model
from mome_rec.model import build_model
from mome_rec.modules import OVER_ARCHS
from mome_rec.restore import TrainedModel, load_trained_model
from mome_rec.sizes import size_report

REPO = Path(__file__).resolve().parents[1]

TINY_MOME = [
    "data.synthetic.train_rows=2000",
    "data.synthetic.validation_rows=500",
    "data.synthetic.test_rows=1000",
    "train.epochs=2",
    "train.neuron_epochs=1",
    "train.batch_size=256",
    "model.embedding_dim=4",
    "model.hidden_dims=[16,8]",
    "model.num_experts=2",
    "model.tower_dims=[4]",
]

@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Train the tiny MoME once and return its run folder; its data cache is ``RUN/../cache``.

    The train job runs in a child process so that its process group stays out of the test process.
    """
    base = tmp_path_factory.mktemp("tiny_mome")
    out = base / "run"
    env = dict(os.environ, MOME_REC_CACHE=str(base / "cache"))
    command = [sys.executable, "-m", "mome_rec", "train", "--config", "configs/synthetic.yaml", "--out", str(out)]
    result = subprocess.run(command + TINY_MOME, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ------------------------------------------------------------------ packing


def test_pack_mask_bits_and_fractional_entries():
    mask = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.25, 1.0, 1.0, 0.0, 0.0, 0.75, 1.0])
    bits, index, values = pack_mask(mask)
    # Non-zero entries 1, 2, 3, 5, 6, 7 -> 2 + 4 + 8 + 32 + 64 + 128 = 238; entries 10, 11 -> 4 + 8 = 12.
    assert bits.tolist() == [238, 12]
    assert index.dtype == torch.int32
    assert index.tolist() == [2, 5, 10]
    assert values.tolist() == [0.5, 0.25, 0.75]
    assert torch.equal(unpack_mask(bits, index, values, [3, 4]), mask.view(3, 4))


def test_unpack_mask_rejects_wrong_length():
    bits, index, values = pack_mask(torch.ones(12))
    with pytest.raises(ValueError):
        unpack_mask(bits, index, values, [5, 4])


# ----------------------------------------------------- models with chosen weights


def tiny_preprocessor() -> Preprocessor:
    schema = SchemaConfig(sparse=["a", "b", "c"], dense=["x", "y"], labels=["click", "buy"], row_id="id")
    vocabularies = {"a": [1, 2, 3], "b": [5, 7], "c": list(range(10))}
    return Preprocessor(schema, vocabularies, {"x": 0.0, "y": 1.0}, {"x": 1.0, "y": 2.0})


def tiny_model(over_arch: str):
    """A ranking model with 3 tables of 4 dims, 2 dense features, hidden [8, 6], 3 experts, towers [5]."""
    torch.manual_seed(0)
    config = Config()
    config.model.over_arch = over_arch
    config.model.embedding_dim = 4
    config.model.hidden_dims = [8, 6]
    config.model.num_experts = 3
    config.model.tower_dims = [5]
    preprocessor = tiny_preprocessor()
    model = build_model(config.model, preprocessor.table_sizes(), 2, 2)
    with torch.no_grad():
        # Training-like BatchNorm statistics and scales, so that folding has something to fold.
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.weight.normal_()
                module.bias.normal_()
    return model, config, preprocessor


def pruned_mome():
    """MoME after the phase switch: 3 of 14 inputs and 2 of 8 hidden neurons pruned, masks 0, 1 and 0.5 in turn."""
    model, config, preprocessor = tiny_model("mome")
    over_arch = model.over_arch
    with torch.no_grad():
        first = torch.full((14,), 2.0)
        first[[0, 5, 13]] = -1.0
        first[[1, 2]] = 0.5  # frozen neuron masks strictly between 0 and 1 are folded into W
        over_arch.layers[0].neuron_mask_mu.copy_(first)
        second = torch.full((8,), 2.0)
        second[[3, 6]] = -1.0
        over_arch.layers[1].neuron_mask_mu.copy_(second)
        over_arch.start_expert_phase()
        for layer in over_arch.layers:
            pattern = torch.tensor([-1.0, 2.0, 0.5]).repeat(layer.expert_mask_mu.numel() // 3)
            layer.expert_mask_mu.copy_(pattern.view_as(layer.expert_mask_mu))
    model.eval()
    return TrainedModel(model, preprocessor, config, {})


def test_pruned_mome_file_size_by_hand(tmp_path):
    trained = pruned_mome()
    summary = export_model(trained, tmp_path / "model.mome")
    # Embeddings: (4 + 3 + 11) rows x 4 = 72 floats = 288 bytes.
    # Layer 0 keeps 11 inputs and 6 outputs: W 66 + b 6 + BatchNorm 4 * 6 * 3 experts 72 = 144 floats = 576 bytes;
    #   masks 3 x 6 x 11 = 198 entries: 25 bytes of bits + 66 fractional * 8 = 528 bytes.
    # Layer 1, 6 -> 6: W 36 + b 6 + BatchNorm 72 = 114 floats = 456 bytes; masks 108 entries: 14 + 36 * 8 = 288.
    # Kept input indices 11 * 4 = 44; gates Linear(14, 2 * 3) 90 floats = 360; towers 2 * (35 + 20 + 6) * 4 = 488.
    assert summary.model_bytes == 288 + 576 + 25 + 528 + 456 + 14 + 288 + 44 + 360 + 488
    sizes = size_report(trained.model)
    assert summary.model_bytes == round((sizes["deployable"] + sizes["embeddings"]) * 1e6)
    # Vocabularies of at most 9 fit uint8: 3 + 2 + 10 bytes.
    assert summary.vocabulary_bytes == 15
    assert summary.file_bytes == os.path.getsize(tmp_path / "model.mome")
    assert summary.file_bytes == summary.header_bytes + summary.model_bytes + summary.vocabulary_bytes


def test_pruned_mome_round_trip(tmp_path):
    trained = pruned_mome()
    summary = export_model(trained, tmp_path / "model.mome")
    contents = read_model_file(tmp_path / "model.mome")
    layers = contents.header["over_arch"]["layers"]
    assert [(layer["in_features"], layer["out_features"]) for layer in layers] == [(11, 6), (6, 6)]
    assert contents.tensor("over_arch.kept_inputs").tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    assert summary.max_abs_difference < 1e-6
    for fold in (True, False):
        rebuilt = build_inference_model(contents, fold_batch_norm=fold)
        assert compare_with_trained(trained.model, rebuilt, rows=4096, seed=1) < 1e-6


@pytest.mark.parametrize("over_arch", ["mmoe", "base", "mome_n", "mome_w"])
def test_other_over_arch_round_trip(tmp_path, over_arch):
    if over_arch not in OVER_ARCHS:
        pytest.skip(f"over-arch {over_arch} is not registered in this checkout")
    model, config, preprocessor = tiny_model(over_arch)
    model.eval()
    trained = TrainedModel(model, preprocessor, config, {})
    summary = export_model(trained, tmp_path / "model.mome")
    sizes = size_report(model)
    assert summary.model_bytes == round((sizes["deployable"] + sizes["embeddings"]) * 1e6)
    contents = read_model_file(tmp_path / "model.mome")
    assert contents.header["over_arch"]["kind"] == ("module" if over_arch == "mmoe" else "mome")
    for fold in (True, False):
        rebuilt = build_inference_model(contents, fold_batch_norm=fold)
        assert compare_with_trained(model, rebuilt, rows=4096, seed=1) < 1e-6


def test_loaded_preprocessor_equals_original(tmp_path):
    trained = pruned_mome()
    export_model(trained, tmp_path / "model.mome")
    loaded = load_model(tmp_path / "model.mome")
    assert loaded.preprocessor.to_dict() == trained.preprocessor.to_dict()
    assert loaded.tasks == ["click", "buy"]


# ------------------------------------------------------------ trained model


def test_trained_checkpoint_export(trained_run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "model.mome"
    assert main(["export", "--checkpoint", str(trained_run), "--out", str(path)]) == 0

    contents = read_model_file(path)
    sizes = json.loads((trained_run / "metrics.json").read_text())["size_mb"]
    expected = (sizes["deployable"] + sizes["embeddings"]) * 1e6
    header_bytes = path.stat().st_size - contents.header["payload_bytes"]
    weights_bytes = path.stat().st_size - header_bytes - contents.header["vocabulary_bytes"]
    assert abs(weights_bytes - expected) <= 0.01 * expected

    trained = load_trained_model(trained_run)
    loaded = load_model(path)
    keys = list(trained.preprocessor.schema.sparse)
    largest = 0.0
    test_file = next((trained_run.parent / "cache").glob("synthetic-*/test.parquet"))
    columns = trained.preprocessor.columns(with_labels=False)
    with torch.inference_mode():
        for first_row, batch in iter_record_batches(test_file, columns, 256):
            arrays = loaded.preprocessor.transform(batch, test_file, first_row, with_labels=False)
            torch_batch = make_batch(arrays, keys)
            expected_scores = torch.sigmoid(trained.model(torch_batch.dense_features, torch_batch.sparse_features))
            scores = loaded.model.predict(torch.from_numpy(arrays.dense), torch.from_numpy(arrays.sparse))
            largest = max(largest, float((expected_scores - scores).abs().max()))
    assert largest < 1e-6


# ----------------------------------------------------------- damaged files


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-7]
    elif how == "header_cut":
        data = data[:40]
    elif how == "flipped_byte":
        data[-3] ^= 0xFF
    elif how == "wrong_magic":
        data[:8] = b"NOTMOME!"
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "header_cut", "flipped_byte", "wrong_magic", "empty"])
def test_damaged_file_raises_input_error(tmp_path, how):
    path = tmp_path / "model.mome"
    write_model_file(path, {"format_version": 1}, {"weight": torch.arange(12, dtype=torch.float32)})
    damage(path, how)
    with pytest.raises(InputError) as error:
        read_model_file(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_damaged_file_exits_2_with_one_line(tmp_path):
    trained = pruned_mome()
    path = tmp_path / "model.mome"
    export_model(trained, path)
    damage(path, "truncated")
    command = [sys.executable, "-m", "mome_rec", "score", "--model", str(path), "--input", str(path), "--out",
               str(tmp_path / "scores")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert "truncated" in errors[0]
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_exits_2(tmp_path):
    assert main(["export", "--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "m.mome")]) == 2
    assert not (tmp_path / "m.mome").exists()


def test_written_tensors_read_back_exactly(tmp_path):
    tensors = {
        "floats": torch.randn(3, 5),
        "ints": torch.arange(-4, 4, dtype=torch.int64),
        "bits": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
    }
    write_model_file(tmp_path / "t.mome", {"format_version": 1, "note": "x"}, tensors)
    contents = read_model_file(tmp_path / "t.mome")
    assert contents.header["note"] == "x"
    for name, tensor in tensors.items():
        assert contents.tensors[name].dtype == tensor.dtype
        assert torch.equal(contents.tensors[name], tensor)
    assert not list(tmp_path.glob(".*tmp*"))
    for name, entry in contents.header["tensors"].items():
        assert entry["offset"] % tensors[name].element_size() == 0, name


def test_damaged_checkpoint_names_reader_error(trained_run, tmp_path):
    import shutil

    damaged = tmp_path / "best"
    shutil.copytree(trained_run / "checkpoints" / "best", damaged)
    data_file = next(damaged.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:1000])  # what a copy cut short leaves

    with pytest.raises(InputError) as info:
        load_trained_model(damaged)
    message = str(info.value)
    assert message.startswith(f"{damaged}: cannot load checkpoint: ")
    assert "CheckpointException" not in message  # the rank's own error, not DCP's wrapper
    assert "\n" not in message
