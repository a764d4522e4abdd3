"""fastgen.nn.GroupedQuantizer: groups of channels quantized on their own, shared or
separate codebooks, against per-group float64 nearest codes."""
import pytest
import torch

from fastgen.nn import FSQ, GroupedQuantizer, VectorQuantizer


def test_shared_codebook_is_each_groups_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(32, 4))
    layer = GroupedQuantizer(vq, groups=3).eval()
    x = torch.randn(5, 7, 12)
    out = layer(x)
    parts = x.double().reshape(-1, 3, 4)
    want = torch.cdist(parts.reshape(-1, 4), vq.codebook.double()).argmin(1).reshape(5, 7, 3)
    assert torch.equal(out.indices, want)
    torch.testing.assert_close(out.quantized, vq.codebook[want].reshape(5, 7, 12))
    torch.testing.assert_close(layer.decode_indices(out.indices), out.quantized)


def test_separate_codebooks_and_losses_per_group():
    torch.manual_seed(1)
    parts = [VectorQuantizer(16, 3) for _ in range(2)]
    for p in parts:
        with torch.no_grad():
            p.codebook.copy_(torch.randn(16, 3))
    layer = GroupedQuantizer(parts).train()
    x = torch.randn(40, 6, requires_grad=True)
    out = layer(x)
    for g, p in enumerate(parts):
        want = torch.cdist(x.detach()[:, 3 * g:3 * g + 3].double(), p.codebook.double()).argmin(1)
        assert torch.equal(out.indices[:, g], want)
    # the commitment losses of both groups (means over each group's elements), averaged:
    # the scale of one shared quantizer over all elements
    q = torch.cat([parts[g].codebook.detach()[out.indices[:, g]] for g in range(2)], 1)
    want = 0.25 * (x.detach() - q).square().mean()
    torch.testing.assert_close(out.losses["commitment"], want)
    (out.quantized.sum() + sum(out.losses.values())).backward()
    assert x.grad is not None and all(p.codebook.grad is not None for p in parts)


def test_channel_first_and_codebook_free_groups():
    torch.manual_seed(2)
    layer = GroupedQuantizer(FSQ([8, 5]), groups=2, channel_last=False)
    x = torch.randn(2, 4, 3, 3)
    out = layer(x)
    assert out.indices.shape == (2, 3, 3, 2) and out.quantized.shape == x.shape
    torch.testing.assert_close(layer.decode_indices(out.indices), out.quantized)
    flat = GroupedQuantizer(FSQ([8, 5]), groups=2)(x.movedim(1, -1))
    assert torch.equal(flat.indices, out.indices)


@pytest.mark.parametrize("bad,match", [
    (lambda: GroupedQuantizer(FSQ([8, 5]), groups=0), "groups"),
    (lambda: GroupedQuantizer([]), "at least one"),
    (lambda: GroupedQuantizer([FSQ([8, 5]), FSQ([8, 5, 5])]), "same dim"),
    (lambda: GroupedQuantizer([FSQ([8, 5]), FSQ([4, 4])]), "same num_codes"),
    (lambda: GroupedQuantizer([FSQ([8, 5])], groups=2), "one per group"),
    (lambda: GroupedQuantizer(FSQ([8, 5], channel_last=False), groups=2), "channel-last"),
    (lambda: GroupedQuantizer(FSQ([8, 5]), groups=2)(torch.randn(3, 5)), "input_dim=4"),
    (lambda: GroupedQuantizer(FSQ([8, 5]), groups=2).decode_indices(torch.zeros(3, dtype=torch.long)), "groups=2"),
])
def test_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()
