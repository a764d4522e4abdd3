"""The one training loop (`fit`) every `fastgen train <model>` goes through, and what it
stands on: atomic checkpoints, resumable RNG state, progress bar, metrics.jsonl.

A training command builds its data and model, then calls `fit` with two hooks --
`evaluate()` (a dict of test metrics) and `write_pngs()` -- run every `eval_every`
epochs and at the end. `fit` writes OUT/metrics.jsonl and OUT/checkpoint.pt (atomically,
every epoch) and resumes from that checkpoint: same data order and noise as an
uninterrupted run.
"""
import contextlib
import json
import math
import os
import tempfile
import time

import torch

CHECKPOINT_FORMAT = "fastgen-checkpoint-1"


TMP_PREFIX = ".tmp-"


def atomic_write(path, write):
    """Call write(file) on a temporary file in path's folder, then os.replace it over
    `path`: a crash leaves the old file or the new one, never half of one. Ctrl-C during
    the write is held until the file is in place (an interrupted torch.save otherwise
    reports a C++ "enforce fail"), then raised."""
    import signal
    import threading
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    held = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *a: held.append(True)) if main else None
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
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
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
    return path


def remove_stale_temporaries(folder):
    """Delete what a killed atomic_write left in `folder` (its .tmp-* files)."""
    if not os.path.isdir(folder):
        return []
    gone = []
    for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX):
            try:
                os.unlink(os.path.join(folder, name))
                gone.append(name)
            except OSError:
                pass
    return gone


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
                desc=None, device="cpu", shard=None, after_step=None):
    """One pass over `data` (N, ...) minimizing model(x)["loss"]; returns the mean loss.

    shard=(rank, world): data parallel across processes. Every rank draws the same
    batches; the model's forward(x, shard=...) computes its part of each batch's loss
    (scaled so the ranks' mean is the batch's mean loss) and the gradients are averaged
    over the ranks before each step, so every rank takes the same step. after_step():
    called after every optimizer step (the weight average's update)."""
    model.train()
    idx = batches(data.shape[0], batch_size, generator, max_batches)
    bar = progress(idx, total=len(idx), desc=desc, enabled=show_progress)
    total, count = 0.0, 0
    for b in bar:
        x = data[b].to(device)
        loss = model(x)["loss"] if shard is None else model(x, shard=shard)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if shard is not None:
            loss = _average_over_ranks(model, loss)
        optimizer.step()
        if after_step is not None:
            after_step()
        total += float(loss.detach()) * x.shape[0]
        count += x.shape[0]
        if show_progress and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    if hasattr(bar, "close"):
        bar.close()
    return total / max(count, 1)


def _average_over_ranks(model, loss):
    """All-reduce (mean) of every parameter's gradient, in one flat buffer, and of the loss."""
    import torch.distributed as dist
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    off = 0
    for p in params:
        p.grad.copy_(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    return flat[-1]


def _same_start(model):
    """Every rank starts from rank 0's parameters and buffers."""
    import torch.distributed as dist
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, 0)


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


CHECKPOINT = "checkpoint.pt"


def open_run(out, kind, resume):
    """The checkpoint in `out` when resuming a run of model `kind` (None for a fresh run).
    An existing checkpoint without `resume`, or of another model, is a ValueError."""
    path = os.path.join(out, CHECKPOINT)
    if not os.path.exists(path):
        return None
    if not resume:
        raise ValueError(f"{path} exists; pass --resume to continue that run or choose another --out")
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != kind:
        raise ValueError(f"{path} holds a {ckpt['kind']!r} model but you asked to train {kind!r}")
    return ckpt


def load_model(path, kind, device="cpu", name="--checkpoint"):
    """(model in eval mode, checkpoint dict) from a checkpoint `fit` wrote for model `kind`."""
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != kind:
        raise ValueError(f"{name} {path} holds a {ckpt['kind']!r} model, not a {kind}")
    return model_from_checkpoint(ckpt, device), ckpt


def codebook_fingerprint(state_dict):
    """A short sha1 (hex) of a VQ model's codebook(s) -- the state-dict entries named
    `codebook` (and a SimVQ code map), in name order, shapes and float32 bytes; every
    floating entry where the quantizer has no codebook --, or None for an empty one.
    A prior stores the fingerprint of the VQ model it was trained on: a VQ model of the
    same shapes but other codes (another run, another seed) then fails the check instead
    of decoding the prior's codes into garbage."""
    import hashlib
    # a SimVQ codebook is a frozen basis through a learned map: both make the codes
    keys = sorted(k for k in state_dict if k.split(".")[-1] == "codebook" or ".code_map." in k)
    if not keys:
        # a quantizer without a codebook (FSQ, LFQ): its codes mean what the rest of the
        # model makes of them, so every floating weight tells one run from another
        keys = sorted(k for k in state_dict if torch.is_tensor(state_dict[k]) and state_dict[k].is_floating_point())
    if not keys:
        return None
    h = hashlib.sha1()
    for k in keys:
        t = state_dict[k].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{k}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# where a prior's checkpoint records the VQ model it was trained on
FINGERPRINT = "vq_fingerprint"


def check_codebook(prior_ckpt, prior_what, vq_ckpt, vq_what):
    """Refuse (ValueError, one line naming both checkpoints, e.g. prior_what = "--prior
    PATH") a VQ model whose codebook is not the one the prior was trained on. A prior
    written before fingerprints were stored is accepted with a warning on stderr."""
    import sys
    stored = prior_ckpt.get(FINGERPRINT)
    if stored is None:
        print(f"fastgen: warning: {prior_what} records no codebook fingerprint (written by an older fastgen): "
              f"cannot check that it was trained on {vq_what}", file=sys.stderr)
        return
    actual = codebook_fingerprint(vq_ckpt["model"])
    if actual != stored:
        raise ValueError(f"{prior_what} was trained on another VQ model's codes than {vq_what} (codebook "
                         f"fingerprint {stored}, this one {actual}): its codes would decode to garbage; use the VQ "
                         "checkpoint it was trained on")


def run_relative(path, run_dir):
    """`path` relative to the run folder `run_dir` (None where there is no such path, as
    across Windows drives): stored next to the absolute path, so a folder of runs moved
    or copied elsewhere still finds the checkpoints its runs depend on."""
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(run_dir))
    except ValueError:
        return None


def link_entries(key, path, run_dir):
    """The checkpoint entries that record a checkpoint a run depends on: key (absolute)
    and key + "_relative" (to the run folder)."""
    return {key: os.path.abspath(path), key + "_relative": run_relative(path, run_dir)}


def linked_checkpoint(ckpt, key, run_dir, what):
    """The path of the checkpoint that `ckpt` (in the folder `run_dir`) depends on, as
    link_entries recorded it: the path relative to the run folder first (the folders were
    moved together), else the absolute one; among those that exist, the first whose
    codebook matches the fingerprint `ckpt` records. A FileNotFoundError names both."""
    found = []
    rel = ckpt.get(key + "_relative")
    for p in ([os.path.normpath(os.path.join(run_dir, rel))] if rel else []) + [ckpt.get(key)]:
        if p and p not in found:
            found.append(p)
    existing = [p for p in found if os.path.isfile(p)]
    if not existing:
        raise FileNotFoundError(f"{what} depends on the VQ checkpoint {' or '.join(map(repr, found))}, "
                                "which no longer exists (moved or deleted?)")
    stored = ckpt.get(FINGERPRINT)
    if stored is not None and len(existing) > 1:
        for p in existing:
            try:
                if codebook_fingerprint(load_checkpoint(p)["model"]) == stored:
                    return p
            except (ValueError, KeyError):
                continue
    return existing[0]


def is_checkpoint(obj):
    """Whether a loaded object is a checkpoint `fit` wrote."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def model_from_checkpoint(ckpt, device="cpu", averaged=True):
    """The model of a loaded checkpoint, in eval mode: with its weight average (trained
    with --ema) unless averaged=False."""
    from fastgen.models import build_model
    model = build_model(ckpt["kind"], ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    if averaged and ckpt.get("ema"):
        from fastgen.ema import load_average
        load_average(model, ckpt["ema"])
    return model.eval()


def default_row_format(row):
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


def lr_factor(schedule, epoch, epochs):
    """The learning-rate multiplier of `epoch` (0-based) of `epochs`: 1 for "constant";
    for "cosine" half a cosine from 1 at the first epoch down to 0.05 at the last. Set per
    epoch from the epoch number and --epochs: a run resumed with the same --epochs
    continues the same curve; one given more epochs follows the stretched curve from
    where it stands (the rate can rise again)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        frac = epoch / max(epochs - 1, 1)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")


def fit(model, train_data, *, kind, out, epochs, config, ckpt=None, lr=1e-3, batch_size=64, seed=0,
        device="cpu", eval_every=1, max_batches=None, show_progress=True, evaluate=None, write_pngs=None,
        extra=None, describe=None, format_row=default_row_format, before_epoch=None, betas=(0.9, 0.999),
        flags=None, ema=None, lr_schedule="constant"):
    """Train `model` (whose forward returns {"loss": ...}) on `train_data` (N, ...) with Adam
    for epochs [ckpt's epoch, epochs): per epoch a pass over shuffled batches, then, every
    `eval_every` epochs and at the last, evaluate() (merged into the metrics row) and
    write_pngs(); the row goes to out/metrics.jsonl and the run to out/checkpoint.pt.

    kind, config: what build_model needs to rebuild the model from the checkpoint.
    ckpt: from open_run, to resume (model, optimizer, RNGs, history). extra: more entries
    for the checkpoint (e.g. the data settings). describe(n_params): a line printed
    before the first epoch. before_epoch(epoch): run before each epoch's batches (IMLE's
    search rounds); a dict it returns joins that epoch's metrics row. betas: Adam's.
    ema: a decay in (0, 1) to keep an average of the weights (fastgen.ema.WeightAverage):
    evaluate() and write_pngs() then run with it, and the checkpoint stores it (entry
    "ema") for sampling. lr_schedule: "constant" or "cosine" (lr_factor, per epoch).
    The global torch RNG is the caller's to seed (models draw their init and noise from
    it); the data order comes from a generator seeded `seed`.

    Under torch.distributed (torchrun) with more than one process, training is data
    parallel (train_epoch's shard) for models that declare `trains_sharded`; every rank
    runs the hooks' collectives (before_epoch), rank 0 alone writes files and prints.
    Returns the metrics history (a list of rows)."""
    from fastgen.distributed import world
    rank, size = world()
    if size > 1 and not getattr(model, "trains_sharded", False):
        raise ValueError(f"{kind} cannot train across processes yet (torchrun with {size} processes): "
                         "run it in one process")
    lead = rank == 0
    show_progress = show_progress and lead
    data_gen = torch.Generator().manual_seed(seed)
    base_lr = ckpt.get("base_lr", ckpt["lr"]) if ckpt else lr
    lr_factor(lr_schedule, 0, max(epochs, 1))          # a bad schedule name fails before any work
    optimizer = torch.optim.Adam(model.parameters(), lr=base_lr, betas=betas)
    if ema is not None:
        from fastgen.ema import WeightAverage, check_decay
        check_decay(ema)                 # a bad decay fails before any work
    history, start = [], 0
    ckpt_path = os.path.join(out, CHECKPOINT)
    if ckpt:
        history, start, done = resume(ckpt, model, optimizer, data_gen, ckpt_path, epochs)
        if done:
            return history
    if size > 1:
        _same_start(model)
    # the average starts from the weights training starts from (a resumed run's, not the
    # initialisation's: a run resumed with --ema added has no average yet)
    average = None
    if ema is not None:
        average = WeightAverage(model, ema)
        if ckpt and ckpt.get("ema"):
            average.load_state_dict(ckpt["ema"])
    if describe is not None and lead:
        print(describe(sum(p.numel() for p in model.parameters())) + (f", {size} processes" if size > 1 else ""))
    for epoch in range(start, epochs):
        t0 = time.time()
        row = {"epoch": epoch + 1}
        if before_epoch is not None:
            row.update(before_epoch(epoch) or {})
        for group in optimizer.param_groups:
            group["lr"] = base_lr * lr_factor(lr_schedule, epoch, epochs)
        train_loss = train_epoch(model, optimizer, train_data, batch_size, data_gen, max_batches=max_batches,
                                 show_progress=show_progress, desc=f"epoch {epoch + 1}/{epochs}", device=device,
                                 shard=(rank, size) if size > 1 else None,
                                 after_step=None if average is None else (lambda: average.update(model)))
        row["train_loss"] = train_loss
        if not lead:
            history.append(row)
            _rank0_outcome(None, size, epoch)
            continue
        try:
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                with average.applied(model) if average is not None else contextlib.nullcontext():
                    if evaluate is not None:
                        row.update(evaluate())
                    if write_pngs is not None:
                        write_pngs()
            row["seconds"] = round(time.time() - t0, 3)
            history.append(row)
            write_jsonl(history, os.path.join(out, "metrics.jsonl"))
            save_checkpoint({
                "format": CHECKPOINT_FORMAT, "kind": kind, "config": config,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr": optimizer.param_groups[0]["lr"],
                "base_lr": base_lr, **({"ema": average.state_dict()} if average is not None else {}),
                "epoch": epoch + 1, "history": history, "rng": rng_state(data_gen),
                "flags": (ckpt or {}).get("flags") or flags or {}, **(extra or {}),
            }, ckpt_path)
        except Exception as exc:       # noqa: BLE001 -- the other ranks learn of it, then it is re-raised
            _rank0_outcome(exc, size, epoch)
            raise
        _rank0_outcome(None, size, epoch)
        print(format_row(row), flush=True)
    return history


def _rank0_outcome(error, size, epoch):
    """Under torchrun rank 0 alone evaluates and saves; the others would meet its failure
    only as a broken connection in their next collective (gloo's "Connection closed by
    peer"). One all-reduce per epoch tells every rank; the others then raise saying so."""
    if size == 1:
        return
    from fastgen.distributed import all_sum, wait_for_ranks
    # rank 0's evaluation may outlast the collective timeout: wait (as long as it lives)
    wait_for_ranks("epoch")
    if all_sum(int(error is not None)) and error is None:
        raise RuntimeError(f"rank 0 failed while evaluating or saving epoch {epoch + 1} (its error is in its "
                           "own output); this rank stops too")
