"""The HDF5 feature cache: exact, resumable, rebuilt on change, verifiable, readable from workers."""

import filecmp
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import storage.feature_cache
from ituning.backbones import BackboneSpec, load_vision_encoder
from ituning.data import worker_start_method
from ituning.encoding import EncodeSettings, split_preprocess
from ituning.images import open_rgb
from ituning.standins import save_vision_standin
from pipeline.features import (
    FeatureSettings, build_feature_cache, build_shard, encoder_cache_dir, encoder_slug, encode_features,
    find_feature_entry, precision_key, split_cache_dir,
)
from storage.feature_cache import ENTRY_NAME, FeatureReader
from storage.feature_checks import verify_feature_cache
from storage.image_lists import image_list_fingerprint
from storage.scenes import random_scene, render_scene
from tests.shard_damage import overwrite_tokens_in_place, truncate

IMAGES = 13
SETTINGS = FeatureSettings(shard_size=5, encode=EncodeSettings(batch_size=2, num_workers=0))


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> BackboneSpec:
    return BackboneSpec(vision_model=save_vision_standin(tmp_path_factory.mktemp("vision"), seed=0),
                        vision_pretrained=None)


@pytest.fixture(scope="module")
def encoder(spec):
    return load_vision_encoder(spec)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[str, Path]]:
    folder, rng = tmp_path_factory.mktemp("images"), random.Random(0)
    listed = []
    for index in range(IMAGES):
        path = folder / f"{index:04d}.jpg"
        render_scene(random_scene(rng), size=rng.choice((64, 80, 96))).save(path, quality=90)
        listed.append((f"{index:04d}", path))
    return listed


@pytest.fixture(scope="module")
def reference(images, spec, encoder, tmp_path_factory) -> Path:
    """An uninterrupted build: what every other way of building must reproduce byte for byte."""
    return build_feature_cache(images, spec, tmp_path_factory.mktemp("reference"), SETTINGS, encoder=encoder).parent


def assert_same_cache(built: Path, reference: Path):
    names = sorted(path.name for path in reference.iterdir())
    assert sorted(path.name for path in built.iterdir()) == names
    for name in names:
        assert filecmp.cmp(built / name, reference / name, shallow=False), name


def as_built_before_checksums(cache: Path):
    """A cache as versions before shard checksums wrote it: no .sha256 files, none in the entry point."""
    for path in cache.glob("shard-*.h5.sha256"):
        path.unlink()
    manifest = json.loads((cache / ENTRY_NAME).read_text())
    for shard in manifest["shards"]:
        del shard["sha256"]
    (cache / ENTRY_NAME).write_text(json.dumps(manifest))


def direct_tokens(encoder, images, device="cpu") -> dict[str, torch.Tensor]:
    """The encoder run directly, float16, in the cache's batches (2 images, never across a shard of 5)."""
    tokens = {}
    with torch.inference_mode():
        for shard_start in range(0, len(images), 5):
            shard = images[shard_start : shard_start + 5]
            for start in range(0, len(shard), 2):
                batch = shard[start : start + 2]
                pixels = torch.stack([encoder.preprocess(open_rgb(path)) for _, path in batch]).to(device)
                tokens.update(zip([image_id for image_id, _ in batch], encoder(pixels).half().cpu()))
    return tokens


def test_tokens_round_trip_bit_exactly(images, spec, encoder, tmp_path):
    settings = FeatureSettings(shard_size=5, encode=EncodeSettings(batch_size=2, num_workers=2))
    reader = FeatureReader(build_feature_cache(images, spec, tmp_path, settings, encoder=encoder))
    assert reader.image_ids == [image_id for image_id, _ in images] and len(reader) == IMAGES
    for image_id, expected in direct_tokens(encoder, images).items():
        assert reader[image_id].dtype == np.float16
        assert np.array_equal(reader[image_id], expected.numpy())
    blocks = list(reader.shard_blocks())  # the whole cache at once, shard by shard
    assert [len(ids) for ids, _ in blocks] == [5, 5, 3]  # 13 images, shards of 5
    for ids, tokens in blocks:
        assert all(np.array_equal(tokens[row], reader[image_id]) for row, image_id in enumerate(ids))
    assert reader.attrs["encoder_name"] == spec.vision_model
    assert reader.attrs["image_size"] == [64, 64] and reader.attrs["encoder_pretrained"] == ""
    assert reader.attrs["image_list_fingerprint"] == image_list_fingerprint(images)
    with h5py.File(tmp_path / "shard-00000.h5", "r") as handle:
        assert handle["tokens"].chunks == (1, 65, 128)
        assert handle.attrs["encoder_name"] == spec.vision_model and handle.attrs["assigned_images"] == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pipeline_matches_the_encoder_under_bf16_autocast(images, spec, tmp_path):
    encoder = load_vision_encoder(spec, "cuda")
    encode = EncodeSettings(batch_size=2, num_workers=2, device="cuda", precision="bfloat16")
    reader = FeatureReader(build_feature_cache(images, spec, tmp_path, FeatureSettings(5, encode), encoder=encoder))
    assert reader.attrs["compute_precision"] == "bfloat16"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = direct_tokens(encoder, images, "cuda")
    for image_id, tokens in expected.items():
        torch.testing.assert_close(torch.from_numpy(reader[image_id]), tokens, rtol=1e-2, atol=1e-2)


def test_workers_send_bytes_and_the_device_step_gives_the_same_pixels(images, encoder):
    transform, blank, finish = split_preprocess(encoder.preprocess, (64, 64))
    assert finish is not None and blank.dtype == torch.uint8
    decoded = [open_rgb(path) for _, path in images[:3]]
    sent = torch.stack([transform(image) for image in decoded])  # (3, 3, 64, 64) uint8
    assert sent.dtype == torch.uint8
    expected = torch.stack([encoder.preprocess(image) for image in decoded])
    torch.testing.assert_close(finish(sent), expected, rtol=0, atol=0)
    whole, _, no_step = split_preprocess(lambda image: torch.zeros(3, 64, 64), (64, 64))
    assert no_step is None and whole(decoded[0]).dtype == torch.float32


def test_unreadable_files_are_counted_and_the_run_goes_on(images, spec, encoder, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0][1].read_bytes()[:200])
    listed = images + [("9998", broken), ("9999", tmp_path / "gone.jpg")]
    report = encode_features(listed, spec, tmp_path / "cache", SETTINGS, encoder=encoder)
    assert sorted(report.unreadable) == ["9998", "9999"] and "no such file" in report.unreadable["9999"]
    reader = FeatureReader(report.entry)
    assert len(reader) == IMAGES and "9998" not in reader and sorted(reader.unreadable) == ["9998", "9999"]
    verified = verify_feature_cache(report.entry, [image_id for image_id, _ in listed])
    assert verified.ok, verified.problems
    assert verified.rows == IMAGES and len(verified.unreadable) == 2


@pytest.mark.slow
def test_run_killed_mid_shard_resumes_to_identical_files(images, spec, encoder, reference, tmp_path):
    out = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        import ituning
        from ituning.backbones import BackboneSpec, VisionEncoder
        from ituning.encoding import EncodeSettings, split_preprocess
        from pipeline.features import FeatureSettings, build_feature_cache

        forward, calls = VisionEncoder.forward, []
        def dying_forward(self, pixels):
            calls.append(1)
            if len(calls) == 5:  # shard 0's three batches, then one batch into shard 1
                time.sleep(1.0)  # let the writer put that batch into the temporary file
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(self, pixels)
        VisionEncoder.forward = dying_forward
        images = [(path.stem, path) for path in sorted(Path({str(images[0][1].parent)!r}).glob("*.jpg"))]
        settings = FeatureSettings(shard_size=5, encode=EncodeSettings(batch_size=2, num_workers=1))
        build_feature_cache(images, BackboneSpec({spec.vision_model!r}, None), Path({str(out)!r}), settings)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(path.name for path in out.iterdir())
    temp = [name for name in left if name.startswith("shard-00001.h5.tmp-")]
    assert len(temp) == 1 and left == sorted(["shard-00000.h5", "shard-00000.h5.sha256", *temp,
                                              *(f"shard-0000{k}.h5.lock" for k in range(3))])  # the dead run's
    report = encode_features(images, spec, out, SETTINGS, encoder=encoder)  # takes over its locks at once
    assert report.reused_shards == [0] and report.encoded_shards == [1, 2]
    assert_same_cache(out, reference)


def test_failure_mid_shard_leaves_no_partial_shard(images, spec, encoder, reference, tmp_path, monkeypatch):
    forward, calls = type(encoder).forward, []

    def failing_forward(self, pixels):
        calls.append(1)
        if len(calls) == 6:  # the last batch of shard 1
            raise RuntimeError("device lost")
        return forward(self, pixels)

    monkeypatch.setattr(type(encoder), "forward", failing_forward)
    with pytest.raises(RuntimeError, match="device lost"):
        encode_features(images, spec, tmp_path, SETTINGS, encoder=encoder)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shard-00000.h5", "shard-00000.h5.sha256"]
    monkeypatch.undo()
    encode_features(images, spec, tmp_path, SETTINGS, encoder=encoder)
    assert_same_cache(tmp_path, reference)


def test_non_finite_tokens_stop_the_shard_and_are_never_written(images, spec, encoder, tmp_path, monkeypatch):
    forward, calls = type(encoder).forward, []

    def overflowing_forward(self, pixels):
        calls.append(1)
        tokens = forward(self, pixels)
        return torch.full_like(tokens, float("inf")) if len(calls) == 5 else tokens  # shard 1's second batch

    monkeypatch.setattr(type(encoder), "forward", overflowing_forward)
    with pytest.raises(RuntimeError, match="shard writer failed") as failure:
        encode_features(images, spec, tmp_path, SETTINGS, encoder=encoder)
    assert "non-finite tokens for ['0007', '0008']" in str(failure.value.__cause__)
    assert "non-finite tokens" in str(failure.value)  # the cause is in the message a command line shows
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shard-00000.h5", "shard-00000.h5.sha256"]


def test_float32_storage_keeps_the_encoder_output_exactly(images, spec, encoder, tmp_path):
    settings = FeatureSettings(shard_size=4, encode=EncodeSettings(batch_size=4, num_workers=0, dtype="float32"))
    reader = FeatureReader(build_feature_cache(images[:4], spec, tmp_path, settings, encoder=encoder))
    with torch.inference_mode():
        direct = encoder(torch.stack([encoder.preprocess(open_rgb(path)) for _, path in images[:4]]))
    assert reader.attrs["dtype"] == "float32"
    torch.testing.assert_close(torch.from_numpy(np.stack([reader[i] for i, _ in images[:4]])), direct,
                               rtol=0, atol=0)


def test_shards_built_separately_equal_one_build_and_are_then_reused(images, spec, encoder, reference, tmp_path):
    for shard in (2, 0):
        build_shard(shard, images, spec, tmp_path, SETTINGS, encoder=encoder)
    assert not (tmp_path / ENTRY_NAME).exists()  # shard 1 is still missing
    report = encode_features(images, spec, tmp_path, SETTINGS, shards=[1], encoder=encoder)
    assert report.encoded_shards == [1] and report.entry == tmp_path / ENTRY_NAME
    assert_same_cache(tmp_path, reference)
    again = encode_features(images, spec, tmp_path, SETTINGS, encoder=encoder)
    assert again.encoded_shards == [] and again.reused_shards == [0, 1, 2] and not again.discarded_stale


def test_changed_image_list_or_encoder_rebuilds_instead_of_mixing(images, spec, encoder, reference, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    fewer = encode_features(images[:-1], spec, out, SETTINGS, encoder=encoder)
    assert fewer.discarded_stale and fewer.encoded_shards == [0, 1, 2]
    assert FeatureReader(fewer.entry).attrs["image_list_fingerprint"] == image_list_fingerprint(images[:-1])
    # a local encoder re-saved with other weights under the same folder name: only the digest differs
    local = BackboneSpec(save_vision_standin(tmp_path / "vision", seed=0), None)
    partial = encode_features(images, local, tmp_path / "swap", SETTINGS, shards=[0])
    assert partial.entry is None and partial.encoded_shards == [0]
    save_vision_standin(tmp_path / "vision", seed=1)
    rebuilt = encode_features(images, local, tmp_path / "swap", SETTINGS)
    assert rebuilt.discarded_stale and rebuilt.encoded_shards == [0, 1, 2]
    new_reader, old_reader = FeatureReader(rebuilt.entry), FeatureReader(reference / ENTRY_NAME)
    assert new_reader.attrs["encoder_weights_sha256"] != old_reader.attrs["encoder_weights_sha256"]
    assert not np.array_equal(new_reader["0000"], old_reader["0000"])


def test_shard_tasks_after_a_change_keep_one_anothers_work(images, spec, encoder, reference, tmp_path):
    """Parallel shard tasks after the image list changed: when one starts, another has already
    rebuilt shard 0 and is writing shard 1, while the old shards 1 and 2 are still there."""
    out, fewer = tmp_path / "cache", images[:-1]
    encode_features(fewer, spec, out, SETTINGS, shards=[0], encoder=encoder)
    for name in (ENTRY_NAME, "shard-00001.h5", "shard-00002.h5"):
        shutil.copy(reference / name, out / name)
    in_progress = out / "shard-00001.h5.tmp-999999"
    in_progress.write_bytes(b"another task's shard being written")
    rebuilt = (out / "shard-00000.h5").stat().st_mtime_ns
    report = encode_features(fewer, spec, out, SETTINGS, shards=[2], encoder=encoder)
    assert report.discarded_stale and report.encoded_shards == [2] and report.entry is None
    assert (out / "shard-00000.h5").stat().st_mtime_ns == rebuilt and in_progress.exists()
    assert not (out / "shard-00001.h5").exists()  # the old one
    in_progress.unlink()
    finished = encode_features(fewer, spec, out, SETTINGS, shards=[1], encoder=encoder)
    assert finished.entry == out / ENTRY_NAME
    assert_same_cache(out, build_feature_cache(fewer, spec, tmp_path / "whole", SETTINGS, encoder=encoder).parent)


def plant_nan(shard: Path):
    with h5py.File(shard, "r+") as handle:
        handle["tokens"][3, 7, 11] = np.nan


def drop_last_row(shard: Path):
    with h5py.File(shard, "r+") as handle:
        kept = handle["image_ids"].asstr()[:-1]
        handle["tokens"].resize(len(kept), axis=0)
        del handle["image_ids"]
        handle.create_dataset("image_ids", data=list(kept), dtype=h5py.string_dtype())


def duplicate_id(shard: Path):
    with h5py.File(shard, "r+") as handle:
        handle["image_ids"][1] = handle["image_ids"][0]


@pytest.mark.parametrize("damage, message", [
    (plant_nan, "NaN or Inf in 1 row(s): ['0008']"),
    (drop_last_row, "1 usable images without a row: ['0009']"),
    (duplicate_id, "1 duplicate ids: ['0005']"),
])
def test_verify_catches_damage(images, reference, tmp_path, damage, message):
    expected = [image_id for image_id, _ in images]
    assert verify_feature_cache(reference / ENTRY_NAME, expected).ok
    damaged = tmp_path / "cache"
    shutil.copytree(reference, damaged)
    damage(damaged / "shard-00001.h5")
    report = verify_feature_cache(damaged / ENTRY_NAME, expected)
    assert any(message in problem for problem in report.problems), report.problems


def test_verify_compares_ids_with_the_catalog(images, reference):
    expected = [image_id for image_id, _ in images]
    report = verify_feature_cache(reference / ENTRY_NAME, expected[1:] + ["new"])
    assert any("without a row: ['new']" in problem for problem in report.problems)
    assert any("not usable in the split: ['0000']" in problem for problem in report.problems)
    assert not verify_feature_cache(reference / "missing" / ENTRY_NAME, expected).ok


@pytest.mark.parametrize("damage, problem", [
    (truncate, "shard-00001.h5: cannot be read (Unable to synchronously open file (truncated file"),
    (overwrite_tokens_in_place, "shard-00001.h5: checksum mismatch: its bytes changed after it was written"),
])
def test_a_damaged_shard_is_named_by_verify_and_encoded_again_by_the_next_build(images, spec, encoder, reference,
                                                                                tmp_path, damage, problem):
    expected, cache = [image_id for image_id, _ in images], tmp_path / "cache"
    shutil.copytree(reference, cache)
    damage(cache / "shard-00001.h5")
    report = verify_feature_cache(cache / ENTRY_NAME, expected)
    assert len(report.problems) == 1 and report.problems[0].startswith(problem), report.problems
    rebuilt = encode_features(images, spec, cache, SETTINGS, encoder=encoder)
    assert rebuilt.encoded_shards == [1] and rebuilt.reused_shards == [0, 2] and list(rebuilt.damaged) == [
        "shard-00001.h5"]
    assert_same_cache(cache, reference)
    assert verify_feature_cache(cache / ENTRY_NAME, expected).ok


def test_a_part_build_checks_only_its_own_shards(images, spec, encoder, reference, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    overwrite_tokens_in_place(cache / "shard-00002.h5")
    hashed, file_sha256 = [], storage.feature_cache.file_sha256
    monkeypatch.setattr(storage.feature_cache, "file_sha256",
                        lambda path: hashed.append(path.name) or file_sha256(path))
    report = encode_features(images, spec, cache, SETTINGS, shards=[0], encoder=encoder)
    assert hashed == ["shard-00000.h5"] and report.encoded_shards == [] and report.reused_shards == [0]


def test_reading_a_truncated_shard_names_the_file_and_the_command_that_rebuilds_it(reference, tmp_path):
    workspace = tmp_path / "ws"
    cache = workspace / "features" / "coco" / "train" / "local-vision-0-random" / "float32-float16"
    shutil.copytree(reference, cache)
    truncate(cache / "shard-00001.h5")
    reader = FeatureReader(cache / ENTRY_NAME)
    assert reader["0000"].shape == (65, 128)  # the other shards still read
    with pytest.raises(OSError) as failure:
        reader["0005"]
    message = str(failure.value)
    assert message.startswith(f"{cache / 'shard-00001.h5'}: cannot read this feature shard (")
    assert f"ituning features --dataset coco --split train --workspace {workspace} --vision " in message
    loader = DataLoader(TokensById(reader), batch_size=5, num_workers=1,  # the same from a worker process
                        multiprocessing_context=worker_start_method(1))
    with pytest.raises(OSError) as failure:
        list(loader)
    assert str(failure.value).startswith(f"{cache / 'shard-00001.h5'}: cannot read this feature shard (")
    assert "Traceback" not in str(failure.value)


def test_a_cache_without_checksums_still_reads_and_the_next_build_records_them(images, spec, encoder, reference,
                                                                            tmp_path):
    expected, cache = [image_id for image_id, _ in images], tmp_path / "cache"
    shutil.copytree(reference, cache)
    as_built_before_checksums(cache)
    report = verify_feature_cache(cache / ENTRY_NAME, expected)
    assert report.ok and len(report.notes) == 3 and "shard-00000.h5: no checksum recorded" in report.notes[0]
    assert np.array_equal(FeatureReader(cache / ENTRY_NAME)["0007"], FeatureReader(reference / ENTRY_NAME)["0007"])
    again = encode_features(images, spec, cache, SETTINGS, encoder=encoder)
    assert again.encoded_shards == [] and again.reused_shards == [0, 1, 2]
    assert_same_cache(cache, reference)  # the checksum files and the entry point's, as a new build writes them
    assert verify_feature_cache(cache / ENTRY_NAME, expected).notes == []


class TokensById(Dataset):
    def __init__(self, reader: FeatureReader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, index):
        image_id = self.reader.image_ids[index]
        return torch.from_numpy(self.reader[image_id]), os.getpid()


def test_reader_in_dataloader_worker_processes(reference):
    reader = FeatureReader(reference / ENTRY_NAME)
    expected = np.stack([reader[image_id] for image_id in reader.image_ids])  # handles now open in this process
    # started as the pipeline's loaders start theirs: forked only while this process has no other thread
    loader = DataLoader(TokensById(reader), batch_size=3, num_workers=2, multiprocessing_context=worker_start_method(2))
    batches = list(loader)
    read = torch.cat([tokens for tokens, _ in batches]).numpy()
    assert np.array_equal(read, expected)
    assert os.getpid() not in {int(pid) for _, pids in batches for pid in pids}
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._handles == {} and np.array_equal(copy["0004"], expected[4])
    reader.close()


def test_encoder_slug_names_folders_apart():
    assert encoder_slug(BackboneSpec("ViT-B-16", "openai")) == "ViT-B-16-openai"
    assert encoder_slug(BackboneSpec("ViT-B-16", None)) == "ViT-B-16-random"
    first, second = (encoder_slug(BackboneSpec(f"local-dir:/a/{d}/vision", None)) for d in "xy")
    assert first != second and first.startswith("local-vision-") and "/" not in first


CPU = EncodeSettings(batch_size=2, num_workers=0)  # auto: float32 on the CPU
BF16 = EncodeSettings(batch_size=2, num_workers=0, precision="bfloat16")  # what auto picks on a bf16 GPU


def test_the_device_decides_the_precision_folder(monkeypatch):
    assert precision_key(EncodeSettings(device="cpu")) == "float32-float16"
    assert precision_key(EncodeSettings(device="cpu", dtype="float32")) == "float32-float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert precision_key(EncodeSettings(device="cuda:1")) == "bfloat16-float16"
    assert precision_key(EncodeSettings(device="cuda", precision="float16")) == "float16-float16"


def test_caches_of_two_precisions_live_side_by_side(images, spec, encoder, reference, tmp_path):
    """Encoding on another device builds that precision's cache and leaves the first one alone;
    going back reuses the first one as it is."""
    cpu_dir, bf16_dir = (split_cache_dir(tmp_path, "coco", "train", spec, encode) for encode in (CPU, BF16))
    assert cpu_dir.parent == bf16_dir.parent == encoder_cache_dir(tmp_path, "coco", "train", spec)
    assert (cpu_dir.name, bf16_dir.name) == ("float32-float16", "bfloat16-float16")
    cpu = encode_features(images, spec, cpu_dir, FeatureSettings(5, CPU), encoder=encoder)
    bf16 = encode_features(images, spec, bf16_dir, FeatureSettings(5, BF16), encoder=encoder)
    assert not bf16.discarded_stale and bf16.encoded_shards == [0, 1, 2]
    assert FeatureReader(bf16.entry).attrs["compute_precision"] == "bfloat16"
    assert_same_cache(cpu_dir, reference)
    again = encode_features(images, spec, cpu_dir, FeatureSettings(5, CPU), encoder=encoder)
    assert again.encoded_shards == [] and again.reused_shards == [0, 1, 2] and not again.discarded_stale
    assert find_feature_entry(tmp_path, "coco", "train", spec, CPU) == cpu.entry
    assert find_feature_entry(tmp_path, "coco", "train", spec, BF16) == bf16.entry


def test_a_reader_without_its_precision_takes_the_most_precise_finished_cache(images, spec, encoder, reference,
                                                                              tmp_path):
    cpu_dir = split_cache_dir(tmp_path, "coco", "train", spec, CPU)
    assert find_feature_entry(tmp_path, "coco", "train", spec, CPU) == cpu_dir / ENTRY_NAME  # where it would be
    bf16 = encode_features(images, spec, split_cache_dir(tmp_path, "coco", "train", spec, BF16),
                            FeatureSettings(5, BF16), encoder=encoder)
    shutil.copytree(reference, cpu_dir)
    (cpu_dir / ENTRY_NAME).unlink()  # unfinished: not read
    assert find_feature_entry(tmp_path, "coco", "train", spec, CPU) == bf16.entry
    float32 = replace(CPU, dtype="float32")
    exact = encode_features(images, spec, split_cache_dir(tmp_path, "coco", "train", spec, float32),
                             FeatureSettings(5, float32), encoder=encoder)
    assert find_feature_entry(tmp_path, "coco", "train", spec, replace(CPU, precision="float16")) == exact.entry


def test_a_cache_of_the_earlier_layout_is_found_then_moved_into_its_precision(images, spec, encoder, reference,
                                                                               tmp_path):
    """Before precision folders, a split's cache lay in the encoder folder itself."""
    earlier = encoder_cache_dir(tmp_path, "coco", "train", spec)
    shutil.copytree(reference, earlier)  # built on the CPU: float32-float16
    as_built_before_checksums(earlier)
    cpu_dir, bf16_dir = (split_cache_dir(tmp_path, "coco", "train", spec, encode) for encode in (CPU, BF16))
    assert find_feature_entry(tmp_path, "coco", "train", spec, CPU) == earlier / ENTRY_NAME
    bf16 = encode_features(images, spec, bf16_dir, FeatureSettings(5, BF16), encoder=encoder)
    assert bf16.encoded_shards == [0, 1, 2]
    assert (earlier / ENTRY_NAME).is_file() and len(list(earlier.glob("shard-*.h5"))) == 3  # untouched
    assert find_feature_entry(tmp_path, "coco", "train", spec, CPU) == earlier / ENTRY_NAME
    assert find_feature_entry(tmp_path, "coco", "train", spec, BF16) == bf16.entry
    cpu = encode_features(images, spec, cpu_dir, FeatureSettings(5, CPU), encoder=encoder)
    assert cpu.encoded_shards == [] and cpu.reused_shards == [0, 1, 2] and cpu.entry == cpu_dir / ENTRY_NAME
    assert sorted(path.name for path in earlier.iterdir()) == sorted([cpu_dir.name, bf16_dir.name])
    assert_same_cache(cpu_dir, reference)
    assert find_feature_entry(tmp_path, "coco", "train", spec, CPU) == cpu.entry


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="needs a bf16 GPU")
def test_switching_between_gpu_and_cpu_keeps_both_caches(images, spec, encoder, reference, tmp_path):
    cuda = EncodeSettings(batch_size=2, num_workers=0, device="cuda")
    gpu_dir, cpu_dir = (split_cache_dir(tmp_path, "coco", "train", spec, encode) for encode in (cuda, CPU))
    assert (gpu_dir.name, cpu_dir.name) == ("bfloat16-float16", "float32-float16")
    gpu_encoder = load_vision_encoder(spec, "cuda")
    gpu = encode_features(images, spec, gpu_dir, FeatureSettings(5, cuda), encoder=gpu_encoder)
    cpu = encode_features(images, spec, cpu_dir, FeatureSettings(5, CPU), encoder=encoder)
    back = encode_features(images, spec, gpu_dir, FeatureSettings(5, cuda), encoder=gpu_encoder)
    assert back.encoded_shards == [] and not back.discarded_stale and not cpu.discarded_stale
    assert FeatureReader(gpu.entry).attrs["compute_precision"] == "bfloat16"
    assert_same_cache(cpu_dir, reference)


def test_the_same_weights_with_another_activation_are_another_cache(spec, images):
    """OpenAI's CLIP runs QuickGELU: its weights under plain GELU give other tokens, so a cache built
    before the activation was right must not pass for one built after."""
    from open_clip.transformer import QuickGELU

    from pipeline.features import cache_identity

    encoder, quick = load_vision_encoder(spec), load_vision_encoder(spec)
    for module in quick.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.GELU):
                setattr(module, name, QuickGELU())
    assert any(isinstance(module, QuickGELU) for module in quick.modules())
    plain, changed = cache_identity(encoder, images, SETTINGS), cache_identity(quick, images, SETTINGS)
    assert plain["encoder_weights_sha256"] == changed["encoder_weights_sha256"]
    assert plain != changed and plain["encoder_layers"] != changed["encoder_layers"]
