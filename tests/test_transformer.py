"""CodeTransformer: KV-cached sampling equals recomputation, filtering, guidance, captions,
and -- trained here on digits codes -- prompts that are obeyed measurably."""
import json

import pytest
import torch

from fastgen.cli import main
from fastgen.models.transformer import PAD, CodeTransformer, encode_captions


def test_kv_cache_gives_the_tokens_of_recomputing_the_prefix():
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    m = CodeTransformer(37, 21, text_tokens=12, dim=32, layers=3, heads=4).eval()
    text = encode_captions(["a seven", "7", "the digit 7"], 12)
    for kw in (dict(), dict(top_k=5), dict(top_p=0.7, temperature=0.8), dict(guidance=2.0, top_k=10)):
        seed = int(torch.randint(0, 2 ** 31, (1,)))
        a = m.sample(text, torch.Generator().manual_seed(seed), **kw)
        b = m.sample(text, torch.Generator().manual_seed(seed), cache=False, **kw)
        assert a.shape == (3, 21) and torch.equal(a, b), kw


def test_training_loss_is_the_teacher_forced_likelihood_and_causal():
    m = CodeTransformer(11, 6, text_tokens=4, dim=16, layers=2, heads=2, p_uncond=0.0).double().eval()
    text = encode_captions(["ab", "c"], 4)
    codes = torch.randint(0, 11, (2, 6))
    out = m(text, codes)
    assert out["nll"].shape == (2,) and torch.allclose(out["nll"].sum() / 12, out["loss"])
    # changing a later code does not change the likelihood of earlier ones
    logits = m._run(m._embed(text, codes[:, :-1], 0))
    changed = codes.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 11
    logits2 = m._run(m._embed(text, changed[:, :-1], 0))
    assert torch.allclose(logits[:, :4 + 4], logits2[:, :4 + 4])       # up to the position that predicts code 4
    assert not torch.allclose(logits[:, 4 + 4:], logits2[:, 4 + 4:])


def test_text_loss_is_the_captions_own_likelihood_weighted_as_dalle():
    w = 0.125
    m = CodeTransformer(11, 6, text_tokens=7, dim=16, layers=2, heads=2, p_uncond=0.0, text_loss_weight=w).double()
    m.eval()
    text = encode_captions(["abcdefg", "xy", "q"], 7)
    codes = torch.randint(0, 11, (3, 6))
    out = m(text, codes)
    hidden = m._hidden(m._embed(text, codes[:, :-1], 0))
    logp = torch.log_softmax(m.text_head(hidden[:, :6]), -1)
    # float64 reference: every byte after the first, then the end (the first PAD); later PADs not counted
    terms = [-logp[b, t - 1, int(text[b, t])] for b in range(3) for t in range(1, 7)
             if int(text[b, t]) != PAD or int(text[b, t - 1]) != PAD]
    assert len(terms) == 6 + 2 + 1
    want_text = torch.stack(terms).mean()
    torch.testing.assert_close(out["text_loss"], want_text)
    image = out["nll"].sum() / 18
    torch.testing.assert_close(out["loss"], w * want_text + (1 - w) * image)
    # a dropped caption (NULL, for guidance) adds nothing to the text loss
    from fastgen.models.transformer import null_captions
    with_null = torch.cat([text, null_captions(1, 7)])
    codes4 = torch.cat([codes, codes[:1]])
    torch.testing.assert_close(m(with_null, codes4)["text_loss"], want_text)
    # causal: a later caption byte does not change the prediction of an earlier one
    changed = text.clone()
    changed[0, 5] = ord("z")
    h2 = m._hidden(m._embed(changed, codes[:, :-1], 0))
    assert torch.allclose(m.text_head(h2[0, :5]), m.text_head(hidden[0, :5]))
    # the default models the image only and keeps the old state dict
    plain = CodeTransformer(11, 6, text_tokens=7, dim=16, layers=2, heads=2)
    assert "text_loss" not in plain(text, codes) and not any(k.startswith("text_head") for k in plain.state_dict())
    with pytest.raises(ValueError, match="text_loss_weight"):
        CodeTransformer(11, 6, text_loss_weight=1.0)


def test_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    k1 = CodeTransformer._filter(logits, 1.0, 1, None)
    assert torch.isinf(k1).tolist() == [[True, False, True, True]]
    p = CodeTransformer._filter(logits, 1.0, None, 0.5)       # the top token alone holds > 0.5
    assert torch.isfinite(p).tolist() == [[False, True, False, False]]
    p2 = CodeTransformer._filter(logits, 1.0, None, 0.85)   # probabilities .64, .24, .09, .03
    assert torch.isfinite(p2).tolist() == [[False, True, False, True]]


def test_captions_and_bad_inputs():
    t = encode_captions(["hé"], 5)
    assert t.tolist() == [[104, 195, 169, PAD, PAD]]
    with pytest.raises(ValueError, match="caption 0 is empty"):
        encode_captions([" "], 5)
    with pytest.raises(ValueError, match="longer than the model's context of 5"):
        encode_captions(["abcdef"], 5)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        encode_captions(["a\udcff"], 5)
    m = CodeTransformer(5, 4, text_tokens=3, dim=8, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"text must be \(B, 3\)"):
        m.sample(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"text must hold integer tokens in \[0, 258\)"):
        m.sample(torch.full((1, 3), 300))
    with pytest.raises(ValueError, match="text must hold integer tokens"):
        m.sample(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 5\)"):
        m(encode_captions(["a"], 3), torch.full((1, 4), 7))
    with pytest.raises(ValueError, match="packed rows"):
        m(torch.zeros(2, 5, dtype=torch.long))
    for bad, match in ((dict(temperature=0), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"),
                       (dict(guidance=-1), "guidance")):
        with pytest.raises(ValueError, match=match):
            m.sample(encode_captions(["a"], 3), **bad)
    with pytest.raises(ValueError, match="divisible by heads"):
        CodeTransformer(5, 4, dim=10, heads=4)


@pytest.fixture(scope="module")
def digits_vq(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq")
    assert main(["train", "vqvae", "--data", "digits", "--epochs", "4", "--out", str(out), "--quiet"]) == 0
    return str(out / "checkpoint.pt")


def test_prompts_are_obeyed_more_with_guidance(digits_vq):
    """Trained here for a few hundred steps on digits codes: a digits classifier (the
    package's) agrees with the prompted class well above chance, more with guidance."""
    from fastgen.commands.train_transformer import CodeSource, digit_captions, digits_labels
    from fastgen.data import load_digits
    from fastgen.metrics.digit_features import digit_classes
    torch.manual_seed(0)
    src = CodeSource("vqvae", digits_vq, "cpu")
    codes = src.encode(load_digits().train, "cpu")
    labels = digits_labels(src.ckpt["data_args"])[0]
    text = encode_captions([digit_captions(int(y))[1] for y in labels], 12)
    m = CodeTransformer(src.num_codes, src.length, text_tokens=12, dim=64, layers=2, heads=4, p_uncond=0.15)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(400):
        i = torch.randint(0, codes.shape[0], (64,), generator=g)
        loss = m(text[i], codes[i])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    prompts = [f"the digit {d}" for d in range(10) for _ in range(20)]
    want = torch.tensor([d for d in range(10) for _ in range(20)])
    agree = {}
    for guidance in (0.0, 2.0):
        drawn = m.sample(encode_captions(prompts, 12), torch.Generator().manual_seed(1), guidance=guidance)
        agree[guidance] = float((digit_classes(src.decode(drawn)) == want).double().mean())
    assert agree[0.0] > 0.3 and agree[2.0] > agree[0.0], agree


def test_commands_end_to_end(tmp_path, digits_vq, capsys):
    out = str(tmp_path / "tr")
    assert main(["train", "transformer", "--vqvae", digits_vq, "--dim", "32", "--layers", "1", "--heads", "2",
                 "--epochs", "1", "--batches-per-epoch", "3", "--out", out, "--quiet", "--text-loss-weight", "0.125"]) == 0
    assert (tmp_path / "tr" / "samples.png").is_file()
    row = [json.loads(line) for line in open(tmp_path / "tr" / "metrics.jsonl")][-1]
    assert row["test_text_nats_per_byte"] > 0 and row["test_nll_nats_per_code"] > 0
    s = str(tmp_path / "s")
    assert main(["sample", "transformer", "--checkpoint", out + "/checkpoint.pt", "--prompt", "a seven",
                 "--prompt", "the digit 2", "-n", "3", "--rerank", "2", "--top-k", "20", "--out", s]) == 0
    saved = torch.load(s + "/samples.pt", weights_only=True)
    assert saved["images"].shape == (6, 1, 8, 8) and saved["prompts"][3] == "the digit 2"
    capsys.readouterr()
    assert main(["sample", "transformer", "--checkpoint", out + "/checkpoint.pt", "--prompt", "a cat",
                 "--rerank", "2", "-n", "2", "--out", s]) == 2
    assert "must name a digit" in capsys.readouterr().err
    # a CLIP-style scorer re-ranks any prompt (here: a few steps of training, the mechanics)
    clip = str(tmp_path / "clip")
    assert main(["train", "clip", "--data", "digits", "--epochs", "1", "--batches-per-epoch", "2", "--dim", "16",
                 "--width", "16", "--out", clip, "--quiet"]) == 0
    assert main(["sample", "transformer", "--checkpoint", out + "/checkpoint.pt", "--prompt", "a cat",
                 "--rerank", "3", "--scorer", clip + "/checkpoint.pt", "-n", "2", "--out", s]) == 0
    assert torch.load(s + "/samples.pt", weights_only=True)["images"].shape == (2, 1, 8, 8)
    capsys.readouterr()
    assert main(["sample", "transformer", "--checkpoint", out + "/checkpoint.pt", "--prompt", "a cat",
                 "--scorer", clip + "/checkpoint.pt", "-n", "2", "--out", s]) == 2
    assert "--rerank K" in capsys.readouterr().err
    assert main(["train", "transformer", "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--vqvae CKPT or --vqvae2 CKPT is required" in capsys.readouterr().err


def test_captions_file_for_an_image_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    lines = []
    for i in range(12):
        colour = "red" if i % 2 else "blue"
        arr = np.zeros((8, 8, 3), np.uint8)
        arr[..., 0 if colour == "red" else 2] = 200 + i
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
        lines.append(f"{i:02d}.png\ta {colour} square")
    caps = tmp_path / "caps.tsv"
    # as a Windows editor saves it: a UTF-8 byte-order mark, CRLF line ends
    caps.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n").encode())
    fast = ["--epochs", "1", "--batches-per-epoch", "2", "--quiet"]
    vq = str(tmp_path / "vq")
    assert main(["train", "vqvae", "--data", str(folder), "--out", vq, *fast]) == 0
    out = str(tmp_path / "tr")
    assert main(["train", "transformer", "--vqvae", vq + "/checkpoint.pt", "--captions", str(caps), "--dim", "16",
                 "--layers", "1", "--heads", "2", "--out", out, *fast]) == 0
    assert main(["sample", "transformer", "--checkpoint", out + "/checkpoint.pt", "--prompt", "a red square",
                 "-n", "2", "--out", str(tmp_path / "s")]) == 0
    caps.write_text("\n".join(lines[:-1]) + "\n")                 # one image without a caption
    capsys.readouterr()
    assert main(["train", "transformer", "--vqvae", vq + "/checkpoint.pt", "--captions", str(caps),
                 "--out", str(tmp_path / "tr2"), *fast]) == 2
    assert "has no caption for 1 image" in capsys.readouterr().err
    caps.write_text("\n".join(lines[:5] + ["05.png\ta red square that is far too long"] + lines[6:]) + "\n")
    assert main(["train", "transformer", "--vqvae", vq + "/checkpoint.pt", "--captions", str(caps),
                 "--text-tokens", "16", "--out", str(tmp_path / "tr3"), *fast]) == 2
    err = capsys.readouterr().err
    assert f"{str(caps)!r} line 6" in err and "longer than the 16" in err


def test_caption_files_bom_line_ends_and_errors_naming_file_and_line(tmp_path):
    import os
    from fastgen.data import read_captions
    f = tmp_path / "caps.tsv"
    f.write_bytes(b"\xef\xbb\xbfa.png\ta red square\r\nsub/b.png\tthe digit 7\r\n\r\nc.png\tcaf\xc3\xa9\rd.png\tx")
    assert read_captions(str(f)) == {"a.png": "a red square", os.path.join("sub", "b.png"): "the digit 7",
                                     "c.png": "caf\u00e9", "d.png": "x"}
    for content, line, message in [
        (b"a.png\tok\r\nb.png\t\xff\xfe\r\n", 2, "is not UTF-8 text"),
        (b"a.png\tok\n\nb.png no tab\n", 3, "expected 'relative/path<TAB>caption'"),
        (b"a.png\tok\n\tcaption\n", 2, "image path before the tab is empty"),
        (b"a.png\t  \r\n", 1, "the caption of 'a.png' is empty"),
        (b"a.png\tx\r\n./a.png\ty\r\n", 2, "already has a caption (line 1)"),
        (b"a.png\t0123456789abc\n", 1, "longer than the 12"),
    ]:
        f.write_bytes(content)
        with pytest.raises(ValueError) as e:
            read_captions(str(f), max_bytes=12)
        assert f"--captions {str(f)!r} line {line}" in str(e.value) and message in str(e.value), str(e.value)
