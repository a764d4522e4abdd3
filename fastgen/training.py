"""Generic training-loop helpers: progress bar, atomic checkpoints, resumable RNG state."""
import json
import os
import tempfile

import torch

CHECKPOINT_FORMAT = "fastgen-checkpoint-1"


def atomic_write(path, write):
    """Call write(file) on a temporary file in path's folder, then os.replace it over
    `path`: a crash leaves the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(obj, path):
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_jsonl(rows, path):
    return atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, with a clear error when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / not a torch file / foreign pickle
        raise ValueError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a fastgen checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def rng_state(data_generator):
    """Everything random in a run: the global torch RNG (noise in the model) and the
    generator that shuffles the data (and CUDA's RNG where present)."""
    state = {"torch": torch.get_rng_state(), "data": data_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, data_generator):
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(iterable, total=None, desc=None, enabled=True):
    """A tqdm bar on stderr (a plain iterator when disabled or tqdm is missing)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def batches(n, batch_size, generator, max_batches=None):
    """Shuffled index batches covering range(n) (the last one may be short)."""
    perm = torch.randperm(n, generator=generator)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return out[:max_batches] if max_batches else out


def train_epoch(model, optimizer, data, batch_size, generator, *, max_batches=None, show_progress=True,
                desc=None, device="cpu"):
    """One pass over `data` (N, ...) minimizing model(x)["loss"]; returns the mean loss."""
    model.train()
    idx = batches(data.shape[0], batch_size, generator, max_batches)
    bar = progress(idx, total=len(idx), desc=desc, enabled=show_progress)
    total, count = 0.0, 0
    for b in bar:
        x = data[b].to(device)
        loss = model(x)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * x.shape[0]
        count += x.shape[0]
        if show_progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    if hasattr(bar, "close"):
        bar.close()
    return total / max(count, 1)


def resume(ckpt, model, optimizer, data_gen, ckpt_path, epochs):
    """Load a checkpoint written by a training command into model, optimizer and RNGs.

    Returns (history, start_epoch, done): done is True when the run already has
    `epochs` epochs, in which case there is nothing left to train.
    """
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"], data_gen)
    history, start = list(ckpt["history"]), int(ckpt["epoch"])
    print(f"resuming {ckpt_path} after epoch {start}")
    if start >= epochs:
        print(f"already trained {start} epochs (--epochs {epochs}); nothing to do")
    return history, start, start >= epochs
