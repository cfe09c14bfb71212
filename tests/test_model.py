import pytest
import torch
from torch.testing import assert_close

from ituning.model import ITuningConfig, ITuningModule, MLPWithITuning, count_trainable, trainable_parameters
from tests.conftest import VISUAL_WIDTH, random_visual, tiny_captioner, tiny_language_model


def language_model_loss(model, visual, tokens):
    return model(tokens, visual=visual, labels=tokens).loss


def test_only_module_parameters_receive_gradients():
    model = tiny_captioner()
    language_model_loss(model, random_visual(), torch.randint(0, 100, (2, 7))).backward()
    for name, parameter in model.named_parameters():
        if ".ituning." in name:
            assert parameter.requires_grad and parameter.grad is not None, name
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_frozen_weights_are_bit_identical_after_an_optimizer_step():
    model = tiny_captioner(ITuningConfig())  # the default zero-initialised W_o
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    modules_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    language_model_loss(model, random_visual(), torch.randint(0, 100, (2, 7))).backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name
    assert any(not torch.equal(p, modules_before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable_parameters(model)}


@pytest.mark.parametrize("drop_first", [0, 1, 2])
def test_dropping_removes_exactly_the_first_k_modules(drop_first):
    model = tiny_captioner(ITuningConfig(drop_first=drop_first), n_layer=3)
    assert sorted(model.wrapped_layers) == list(range(drop_first, 3))
    for index, block in enumerate(model.language_model.transformer.h):
        assert isinstance(block.mlp, MLPWithITuning) == (index >= drop_first)
    per_module = count_trainable(ITuningModule(32, VISUAL_WIDTH, 16, ITuningConfig()))
    assert count_trainable(model) == (3 - drop_first) * per_module


def test_dropping_every_layer_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        tiny_captioner(ITuningConfig(drop_first=3), n_layer=3)


def test_module_shapes_follow_the_paper():
    module = ITuningModule(d_model=32, d_visual=VISUAL_WIDTH, bottleneck=16, config=ITuningConfig())
    assert module.query.weight.shape == (16, 32) and module.key.weight.shape == (16, VISUAL_WIDTH)
    assert module.value.weight.shape == (16, VISUAL_WIDTH) and module.output.weight.shape == (32, 16)
    assert tiny_captioner().bottleneck == 16  # d_model / 2


def test_zero_initialised_modules_leave_the_language_model_unchanged():
    language_model = tiny_language_model()
    tokens = torch.randint(0, 100, (2, 6))
    expected = language_model(tokens).logits
    from ituning.model import ITuningCaptioner

    model = ITuningCaptioner(language_model, VISUAL_WIDTH, ITuningConfig())
    assert_close(model(tokens, visual=random_visual()).logits, expected, rtol=0, atol=0)


def test_without_visual_memory_the_model_is_the_plain_language_model():
    model = tiny_captioner()
    tokens = torch.randint(0, 100, (2, 6))
    blind = model(tokens).logits
    assert not torch.allclose(model(tokens, visual=random_visual()).logits, blind)
    for block in model.language_model.transformer.h:
        block.mlp = block.mlp.mlp
    assert_close(model.language_model(tokens).logits, blind, rtol=0, atol=0)


def test_different_images_give_different_predictions():
    model = tiny_captioner()
    tokens = torch.randint(0, 100, (1, 6)).expand(2, -1)
    logits = model(tokens, visual=random_visual(2)).logits
    assert not torch.allclose(logits[0], logits[1])


def test_beams_sharing_an_image_memory_equal_repeated_memory():
    module = ITuningModule(32, VISUAL_WIDTH, 16, ITuningConfig(zero_init_output=False))
    visual, beams = random_visual(2), 3
    x = torch.randn(2 * beams, 4, 32)
    shared = module(x, module.visual_memory(visual))
    repeated = module(x, module.visual_memory(visual.repeat_interleave(beams, dim=0)))
    assert_close(shared, repeated)


def test_equation_five_by_hand():
    config = ITuningConfig(zero_init_output=False, scale=2.5)
    module = ITuningModule(32, VISUAL_WIDTH, 16, config)
    with torch.no_grad():
        module.output_bias.normal_()
    x, visual = torch.randn(1, 3, 32), random_visual(1)
    q, k, v = module.query(x), module.key(visual), module.value(visual)
    scores = torch.softmax(q @ k.transpose(1, 2) / 16**0.5, dim=-1)
    expected = 2.5 * (scores @ v) @ module.output.weight.T + module.output_bias
    assert_close(module(x, module.visual_memory(visual)), expected)
    assert_close(module.attention_weights(x, module.visual_memory(visual)), scores)
