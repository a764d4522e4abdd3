"""Classifier-based rejection sampling: keep the samples a classifier is confident about.

    draw_confident(draw, n, min_confidence, labels=None, max_rounds=10, score=digit_confidence)

draw(m, labels) -> m images (labels: the m wanted classes, or None). A sample is kept when
the classifier gives its wanted class (or, without labels, its most likely class) at least
`min_confidence`; the others are drawn again, up to `max_rounds` rounds in all. A sample
that never passes keeps its best-scoring draw, so n images always come back; the stats say
how many passed. The VQ-VAE-2 paper's class-conditional samples use this kind of
rejection with a pretrained classifier; here the package's digits classifier is the scorer.
"""
import torch


def digit_confidence(images, labels=None):
    """(N,) the digits classifier's probability of `labels` (or of its top class)."""
    from fastgen.metrics.digit_features import digit_outputs
    probs = digit_outputs(images.detach().float().clamp(0, 1).cpu())[1]
    if labels is None:
        return probs.max(1).values
    return probs.gather(1, labels.long().cpu()[:, None])[:, 0]


def check_confidence(min_confidence, max_rounds, name="--min-confidence"):
    if not 0 < min_confidence < 1:
        raise ValueError(f"{name} must be in (0, 1), got {min_confidence}")
    if max_rounds < 1:
        raise ValueError(f"--max-rounds must be >= 1, got {max_rounds}")


@torch.no_grad()
def draw_confident(draw, n, min_confidence, labels=None, max_rounds=10, score=digit_confidence):
    """(images (n, ...), stats dict(accepted, rounds, draws)); see the module docstring."""
    check_confidence(min_confidence, max_rounds, "min_confidence")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != n):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    images = draw(n, labels)
    best = score(images, labels)
    draws, rounds = n, 1
    while rounds < max_rounds:
        todo = (best < min_confidence).nonzero()[:, 0]
        if todo.numel() == 0:
            break
        sub = None if labels is None else labels[todo.to(labels.device)]
        again = draw(todo.numel(), sub)
        s = score(again, sub)
        better = s > best[todo]
        keep = todo[better]
        images[keep.to(images.device)] = again[better.to(again.device)]
        best[keep] = s[better]
        draws += todo.numel()
        rounds += 1
    return images, dict(accepted=int((best >= min_confidence).sum()), rounds=rounds, draws=draws,
                        confidence=best)
