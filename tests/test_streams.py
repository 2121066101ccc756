"""kexue_jax.streams: named random streams instead of seed offsets."""
import zlib

import jax
import numpy as np
import pytest

from kexue_jax import streams


def test_stream_id_is_the_crc32_of_the_name():
    assert streams.stream_id("mlm_validation") == zlib.crc32(b"mlm_validation") & 0x7FFFFFFF
    assert streams.stream_id("a") != streams.stream_id("b")
    with pytest.raises(ValueError, match="non-empty str"):
        streams.stream_id("")


def test_stream_key_is_fold_in_of_the_id_then_each_index():
    key = jax.random.PRNGKey(3)
    want = jax.random.fold_in(jax.random.fold_in(key, streams.stream_id("resample_draw")), 4)
    np.testing.assert_array_equal(jax.random.key_data(streams.stream_key(key, "resample_draw", 4)),
                                  jax.random.key_data(want))
    draws = {tuple(np.asarray(jax.random.key_data(streams.stream_key(key, "resample_draw", r)))) for r in range(5)}
    assert len(draws) == 5  # one key per draw


def test_stream_seed_is_seedsequence_and_streams_of_nearby_seeds_do_not_collide():
    want = int(np.random.SeedSequence([0, streams.stream_id("fine_tune")]).generate_state(1)[0]) & 0x7FFFFFFF
    assert streams.stream_seed(0, "fine_tune") == want and 0 <= want < 2 ** 31
    # the offsets this replaces collided: seed 0's "seed + 11" was seed 11's own seed
    seeds = {streams.stream_seed(s, name) for s in range(64) for name in ("fine_tune", "mlm_validation")}
    assert len(seeds) == 128 and not seeds & set(range(64))
    with pytest.raises(ValueError, match="non-negative"):
        streams.stream_seed(-1, "fine_tune")
