import random

import numpy as np

from storage.scenes import BACKGROUNDS, COLOURS, describe, random_scene, render_scene


def test_captions_are_true_of_the_rendered_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        captions = describe(scene, rng)
        assert len(captions) == 5 and len(set(captions)) >= 4
        for group in scene.groups:
            assert all(group.colour in caption and group.shape in caption for caption in captions)
        pixels = np.asarray(render_scene(scene, size=96)).reshape(-1, 3)
        for group in scene.groups:  # every named colour is actually drawn
            assert (np.abs(pixels - COLOURS[group.colour]).sum(axis=1) == 0).any()
        assert (np.abs(pixels - BACKGROUNDS[scene.background]).sum(axis=1) == 0).any()


def test_scenes_are_reproducible_from_a_seed():
    first = [random_scene(random.Random(7)) for _ in range(3)]
    assert first == [random_scene(random.Random(7)) for _ in range(3)]
    assert describe(first[0], random.Random(1)) == describe(first[0], random.Random(1))


def test_articles_agree_with_the_colour():
    rng = random.Random(3)
    captions = [c for _ in range(300) for c in describe(random_scene(rng), rng)]
    assert not any(" a orange" in f" {c}" for c in captions)
    assert any(c.startswith("an orange") for c in captions)
