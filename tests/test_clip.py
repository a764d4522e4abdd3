"""The CLIP-style image-text scorer (fastgen.models.ContrastiveScorer) and its command."""
import json
import math

import pytest
import torch

from fastgen.cli import main
from fastgen.models import ContrastiveScorer


def _reference_loss(zi, zt, scale, same):
    """Float64: the symmetric cross-entropy against targets spread over the positives."""
    logits = scale * zi.double() @ zt.double().T
    target = same.double() / same.double().sum(1, keepdim=True)
    rows = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    cols = -(target * torch.log_softmax(logits.T, 1)).sum(1).mean()
    return 0.5 * (rows + cols)


def test_loss_is_the_multi_positive_infonce():
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    m = ContrastiveScorer((1, 8, 8), text_tokens=12, dim=16, width=16).double()
    imgs = torch.rand(5, 1, 8, 8, dtype=torch.double)
    imgs = torch.cat([imgs, imgs[:2]])                      # rows 5, 6: images 0, 1 with other captions
    text = m.tokens(["a one", "a two", "a one", "three", "x", "the digit 1", "2"])
    out = m(imgs, text)
    zi, zt = m.embed_images(imgs), m.embed_text(text)
    assert torch.allclose(zi.norm(dim=1), torch.ones(7, dtype=torch.double))
    same = torch.zeros(7, 7, dtype=torch.bool)
    for a, b in [(0, 2), (0, 5), (1, 6), (2, 0), (5, 0), (6, 1)]:
        same[a, b] = True
    same |= torch.eye(7, dtype=torch.bool)
    want = _reference_loss(zi, zt, m.logit_scale.exp(), same)
    torch.testing.assert_close(out["loss"], want)
    # packed rows give the same loss; the bytes survive the float packing
    rows = m.pack(imgs, text)
    back_imgs, back_text = m.unpack(rows)
    assert torch.equal(back_text, text) and torch.equal(back_imgs, imgs)
    torch.testing.assert_close(m(rows)["loss"], want)
    out["loss"].backward()
    assert m.text_embed.weight.grad is not None and m.image_net[0].weight.grad is not None


def test_text_embedding_ignores_padding_and_reads_every_byte():
    m = ContrastiveScorer((1, 4, 4), text_tokens=10, dim=8, width=16).eval()
    a = m.embed_text(m.tokens(["seven"]))
    # PAD positions are masked out of attention and the mean: what PAD embeds to changes nothing
    from fastgen.models.transformer import PAD
    with torch.no_grad():
        m.text_embed.weight[PAD] += 5.0
    assert torch.allclose(a, m.embed_text(m.tokens(["seven"])), atol=1e-6)
    with torch.no_grad():
        m.text_embed.weight[ord("v")] += 5.0         # a byte of the caption does
    assert not torch.allclose(a, m.embed_text(m.tokens(["seven"])), atol=1e-3)
    assert not torch.allclose(a, m.embed_text(m.tokens(["sevens"])))
    # the small-image branch is an MLP
    assert isinstance(m.image_net[0], torch.nn.Flatten)


def test_learns_digits_zero_shot():
    from fastgen.commands.train_transformer import digit_captions
    from fastgen.data import digits_labels, load_digits
    torch.manual_seed(0)
    ds, (ytr, yte) = load_digits(), digits_labels()
    m = ContrastiveScorer((1, 8, 8), text_tokens=16, dim=32, width=32)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(150):
        i = torch.randint(0, ds.train.shape[0], (128,), generator=g)
        caps = [digit_captions(int(y))[int(torch.randint(0, 3, (1,), generator=g))] for y in ytr[i]]
        loss = m(ds.train[i], m.tokens(caps))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        zt = m.embed_text(m.tokens([f"the digit {d}" for d in range(10)]))
        acc = float(((m.embed_images(ds.test) @ zt.T).argmax(1) == yte).float().mean())
    assert acc > 0.6        # chance: 0.1


def test_bad_inputs():
    m = ContrastiveScorer((1, 8, 8), text_tokens=6, dim=8, width=16)
    with pytest.raises(ValueError, match="longer than"):
        m.tokens(["a much longer caption"])
    with pytest.raises(ValueError, match=r"images must be \(N, 1, 8, 8\)"):
        m.embed_images(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="finite"):
        m.embed_images(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="text must be integer"):
        m.embed_text(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="packed rows"):
        m(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        m(torch.rand(2, 1, 8, 8), m.tokens(["a", "b", "c"]))
    with pytest.raises(ValueError, match="divisible"):
        ContrastiveScorer((1, 8, 8), width=10)


def test_train_clip_command_and_resume(tmp_path, capsys):
    out = tmp_path / "clip"
    quick = ["--batches-per-epoch", "3", "--threads", "1", "--quiet", "--dim", "16", "--width", "16"]
    assert main(["train", "clip", "--data", "digits", "--epochs", "1", "--out", str(out), *quick]) == 0
    assert main(["train", "clip", "--resume", "--epochs", "2", "--out", str(out), "--batches-per-epoch", "3",
                 "--threads", "1", "--quiet"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert 0 <= rows[-1]["test_zero_shot_accuracy"] <= 1 and math.isfinite(rows[-1]["test_loss"])
    capsys.readouterr()
    assert main(["train", "clip", "--data", "photo-crops", "--size", "8", "--epochs", "1",
                 "--out", str(tmp_path / "x"), *quick]) != 0
    assert "--captions digits needs digits images, --data is 'photo-crops'" in capsys.readouterr().err
