"""Many GPNN samples of many images, split over processes with torch.distributed.

A job is one (image, sample index) pair, numbered image-major: job j = image j // n,
sample j % n. Rank r of a world of size w takes jobs r, r + w, r + 2w, ... and batches
its jobs of one image through `GPNN.sample_seeds`. Sample i of any image uses seed
`seed + i`, so the outputs do not depend on the number of processes, and every job
writes its own PNG atomically: a job whose PNG exists is skipped (rerun the same
command to finish an interrupted run; --overwrite to redo). After a barrier, rank 0
writes one contact sheet per image.

Launch (CPU, gloo; on GPUs each rank takes cuda:LOCAL_RANK):
    torchrun --nproc-per-node 4 -m fastgen.cli gpnn sample --images DIR -n 100 --out OUT
Without torchrun (WORLD_SIZE unset) the same code runs every job in one process.
"""
import os

import torch

from fastgen.distributed import init_from_env  # noqa: F401  (the launcher's entry, shared)

SHEET_MAX_SAMPLES = 15   # the contact sheet shows the source and at most this many samples


def image_files(folder):
    """Sorted image files directly inside `folder` (by extension), or an error naming --images."""
    from fastgen.images import IMAGE_EXTENSIONS, list_image_files
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images: {folder!r} is not a folder")
    files = list_image_files(folder)
    if not files:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder!r}")
    return files


def image_names(paths):
    """Output stem per image path; two images with one stem (a.png, a.jpg) get their extension added."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [os.path.basename(p).replace(".", "_") if stems.count(s) > 1 else s for s, p in zip(stems, paths)]


def sample_path(out, name, i):
    return os.path.join(out, f"{name}_sample{i:04d}.png")


def sheet_path(out, name):
    return os.path.join(out, f"{name}_sheet.png")


def rank_jobs(num_images, num_samples, rank, world):
    """[(image index, sample index)] that rank `rank` of `world` runs: jobs rank, rank + world, ..."""
    return [divmod(j, num_samples) for j in range(rank, num_images * num_samples, world)]


def run_samples(model, paths, load, num_samples, out, seed=0, output_size=None, batch=4,
                overwrite=False, progress=True, rank=0, world=1, barrier=None):
    """Run this rank's jobs; returns the PNG paths this rank wrote (skipped ones excluded).

    model: a GPNN; paths: image paths (None = the default image); load(path) -> (C, H, W)
    in [0, 1]; barrier: called after the jobs (torch.distributed.barrier under torchrun)."""
    from tqdm.auto import tqdm
    from fastgen.images import save_image
    if num_samples < 1:
        raise ValueError(f"-n must be >= 1, got {num_samples}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    names = image_names([p or "china.jpg" for p in paths])
    os.makedirs(out, exist_ok=True)
    jobs = rank_jobs(len(paths), num_samples, rank, world)
    if not overwrite:
        jobs = [(k, i) for k, i in jobs if not os.path.exists(sample_path(out, names[k], i))]
    written = []
    per_level = progress and world == 1 and len(jobs) <= batch
    bar = tqdm(total=len(jobs), desc=f"gpnn jobs (rank {rank}/{world})", unit="sample",
               disable=not progress or per_level or rank != 0)
    try:
        for k in sorted({k for k, _ in jobs}):
            image = load(paths[k])
            mine = [i for kk, i in jobs if kk == k]
            for s in range(0, len(mine), batch):
                group = mine[s:s + batch]
                x = model.sample_seeds(image, [seed + i for i in group], output_size, progress=per_level).cpu()
                for i, xi in zip(group, x):
                    written.append(save_image(xi, sample_path(out, names[k], i)))
                bar.update(len(group))
    except BaseException:
        if barrier is not None and world > 1:
            _tell_the_others_this_rank_failed()
        raise
    finally:
        bar.close()
    if barrier is not None:
        # ranks finish their shares at different times (a resumed run may leave one rank
        # nothing to do and another hours of work): wait without a deadline while the
        # others are alive (the group's --timeout applies to a rank that stopped), then
        # the barrier itself, which all ranks reach together
        if world > 1:
            from fastgen.distributed import wait_for_ranks
            wait_for_ranks("gpnn-jobs")
        barrier()
    if rank == 0:
        for k, name in enumerate(names):
            shown = [sample_path(out, name, i) for i in range(min(num_samples, SHEET_MAX_SAMPLES))]
            if all(os.path.exists(p) for p in shown):
                from fastgen.images import load_image, save_contact_sheet
                save_contact_sheet([load(paths[k])] + [load_image(p) for p in shown], sheet_path(out, name))
    return written


def _tell_the_others_this_rank_failed():
    """A rank whose jobs failed tells the ranks waiting at the end (they raise saying so
    instead of waiting for its heartbeat to stop); never hides the rank's own error."""
    try:
        from fastgen.distributed import wait_for_ranks
        wait_for_ranks("gpnn-jobs", failed=True)
    except Exception:  # noqa: BLE001 -- the rank's own error is what gets raised
        pass


def _spawned_worker(rank, world, port, kwargs, result_dir):
    """torch.multiprocessing.spawn entry (tests, local runs without torchrun): joins a gloo
    group on 127.0.0.1:port, runs `run_samples(**kwargs)` with images from load_source_image, and
    records the paths it wrote in result_dir/rank{rank}.txt."""
    import torch.distributed as dist
    from fastgen.images import load_source_image
    from fastgen.models.gpnn import GPNN
    from fastgen.distributed import init_tcp
    torch.set_num_threads(1)
    init_tcp(rank, world, port)
    try:
        kwargs = dict(kwargs)
        model = GPNN(**kwargs.pop("model"))
        max_side = kwargs.pop("max_side")
        written = run_samples(model, load=lambda p: load_source_image(p, max_side), rank=rank, world=world,
                              barrier=dist.barrier, progress=False, **kwargs)
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(written))
        dist.barrier()
    finally:
        dist.destroy_process_group()
