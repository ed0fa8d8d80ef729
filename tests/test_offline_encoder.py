"""The instruction encoder: offline model lookup, order-aware pooling, caching."""

from __future__ import annotations

import numpy as np
import pytest

from kalm.offline.encoder import (
    CachedEncoder,
    EncoderNotFoundError,
    load_encoder,
    minilm_model_dir,
    shared_encoder,
)

SWAPPED = ["Push the red ball behind the blue ball", "Push the blue ball behind the red ball"]


def test_minilm_ships_inside_site_packages():
    assert (minilm_model_dir() / "model.safetensors").is_file()


def test_default_encoder_separates_swapped_roles_better_than_mean_pooling():
    segmented = shared_encoder("minilm-seg3").encode(SWAPPED)
    pooled = shared_encoder("minilm").encode(SWAPPED)
    assert segmented.shape == (2, 3 * pooled.shape[1])
    np.testing.assert_allclose(np.linalg.norm(segmented, axis=1), 1.0, atol=1e-5)
    assert float(segmented[0] @ segmented[1]) < float(pooled[0] @ pooled[1]) - 0.02


def test_cache_file_serves_repeated_texts_without_the_model(tmp_path):
    cache = tmp_path / "emb.safetensors"
    first = shared_encoder("minilm", cache).encode(SWAPPED)
    # A fresh cache object reading only the file: the model is not consulted.
    class Unusable:
        name, dim = "minilm", first.shape[1]

        def encode(self, texts):
            raise AssertionError(f"re-encoded {texts}")

    again = CachedEncoder(Unusable(), cache).encode(SWAPPED[::-1])
    np.testing.assert_array_equal(again, first[::-1])


def test_a_text_gets_the_same_vector_whatever_was_encoded_with_it():
    """Batched, a vector depends on the other texts' padding (in the 7th digit), which
    made two runs train different policies from the same data."""
    model = load_encoder("minilm-seg3")
    text = "Push the red ball to the left of the blue ball"
    crowd = ["hi", "a much longer sentence with many more tokens than the others, to force padding", text]
    alone = CachedEncoder(model).encode([text])[0]
    np.testing.assert_array_equal(CachedEncoder(model).encode(crowd)[2], alone)
    np.testing.assert_array_equal(CachedEncoder(model).encode(crowd[1:])[1], alone)


def test_cache_entries_are_keyed_by_encoder_name(tmp_path):
    cache = tmp_path / "emb.safetensors"
    shared_encoder("minilm", cache).encode(SWAPPED)
    segmented = shared_encoder("minilm-seg3", cache).encode(SWAPPED)
    assert segmented.shape[1] == 3 * 384


def test_unknown_and_missing_encoders_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder 'bert'"):
        load_encoder("bert")
    with pytest.raises(EncoderNotFoundError, match="does not exist"):
        load_encoder(f"st:{tmp_path / 'nowhere'}")


def test_a_text_gets_the_same_vector_on_any_number_of_threads():
    """A pool worker whose first job evaluated a cached policy encoded on two threads,
    and its later jobs trained on those vectors: two fresh runs gave different policies."""
    import torch

    model = load_encoder("minilm-seg3")
    texts = ["push the red ball behind the blue ball", "can you move the green ball to the left of the cyan ball",
             "make the purple ball be in front of the red ball"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CachedEncoder(model).encode(texts)
        torch.set_num_threads(2)
        two = CachedEncoder(model).encode(texts)
        assert torch.get_num_threads() == 2  # the caller's setting is left as it was
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(two, one)


def test_texts_encoded_into_a_file_are_preloaded_without_the_model(tmp_path, monkeypatch):
    """The pipeline encodes every instruction once (split between processes) and each
    policy job preloads the file: the vectors are those encoding gives, and the model is
    never asked again."""
    from kalm.offline import encoder as module

    texts = ["push the red ball behind the blue ball", "move the green ball left of the cyan ball", "a third text"]
    path = tmp_path / "embeddings.safetensors"
    assert module.encode_to_file("minilm", texts + texts[:1], path, workers=2, progress=False, chunk_size=2) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.safetensors"]
    expected = CachedEncoder(load_encoder("minilm")).encode(texts)

    monkeypatch.setattr(module, "_MEMORY", {})
    assert module.preload_embeddings("minilm", path) == 3

    class Unusable:
        name, dim = "minilm", expected.shape[1]

        def encode(self, texts):
            raise AssertionError(f"re-encoded {texts}")

    preloaded = CachedEncoder(Unusable(), memory=module._MEMORY["minilm"]).encode(texts)
    np.testing.assert_array_equal(preloaded, expected)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        module.preload_embeddings("minilm", tmp_path / "missing.safetensors")
