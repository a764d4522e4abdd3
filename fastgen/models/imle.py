"""fastgen.models.IMLE: Implicit Maximum Likelihood Estimation (Li & Malik, 2018).

A generator G maps latent codes z ~ N(0, I) to data. IMLE makes every *data point* have
a generated sample close to it -- the opposite direction of a GAN's discriminator, which
is why it does not drop modes:

    every `staleness` epochs (a search round):
        draw samples_per_point * N codes, generate, and find for every data point x_i
        its nearest sample G(z_j(i)) (exact kNN, k = 1, in pixel or feature space)
    every step, on a batch of data points:
        loss = || G(z_j(i) + noise) - x_i ||^2   (or L1), noise ~ N(0, 0.01^2)

The search streams: samples are generated, searched (fastgen.ops.StreamingKNN) and
discarded chunk by chunk, so memory is O((N + chunk) * D) however many samples a round
draws; only the codes of the chosen samples are kept (`chosen_z`, a buffer, so a
checkpoint resumes mid-round).

Conditional IMLE (`condition_shape`): every data point x_i comes with an input c_i (e.g.
the top half of the image) and the generator maps (z, c) to data; a search round draws
samples_per_point samples G(z, c_i) for each point from its *own* input and keeps the
nearest -- the batched (B, N=1, M=samples_per_point) form of `knn`. One input then has
many plausible outputs (the completions of a half digit), which is what IMLE is for.

Defaults from the reference code: z_dim 64, samples_per_point 10, staleness 5, noise
0.01, Adam lr 1e-3 with betas (0.5, 0.999) (`fastgen train imle` sets them).
"""
import math
import time

import torch
from torch import nn

from fastgen.models.networks import make_decoder
from fastgen.ops import checks

NOISE_PER = ("step", "round")
LOSSES = ("l2", "l1")
CONDITIONS = ("top-half",)


def top_half(images):
    """The conditional task `fastgen train imle --conditional top-half` trains on: each
    image with its bottom half blanked (0); IMLE learns the many ways to complete it."""
    c = images.clone()
    c[..., images.shape[-2] // 2:, :] = 0
    return c


def make_conditions(kind, images):
    if kind not in CONDITIONS:
        raise ValueError(f"conditional must be one of {CONDITIONS}, got {kind!r}")
    return top_half(images)


class IMLE(nn.Module):
    """IMLE with its generator.

    Args:
        image_shape: (C, H, W) of the data, values in [0, 1].
        z_dim: latent size (64).
        arch: "mlp" or "conv" generator (fastgen.models.networks decoders + sigmoid).
        samples_per_point: samples drawn per data point in a search round (10).
        noise: std of the Gaussian noise added to each chosen code in training (0.01).
        noise_per: "step" (a fresh draw at every training step) or "round" (one draw per
            point per search round, kept until the next round, as the reference code does).
        loss: "l2" (sum of squares per point) or "l1".
        feature_dim: None searches in pixel space; an int searches in a fixed random
            projection to that many features (seeded by `feature_seed`).
        chunk: samples generated and searched at once (bounds the search's memory).
        generator: optional nn.Module mapping (B, z_dim) to (B, C, H, W) in [0, 1],
            replacing the built-in one (then arch is ignored).
        feature: optional nn.Module mapping (B, C, H, W) to (B, F) features for the
            search (replaces feature_dim).
        reject_eps: RS-IMLE (rejection sampling): samples closer than this (Euclidean,
            in search features) to any data point are discarded before the search, so a
            point is never matched to a sample that already sits on the data. None: off.
        adaptive_gamma: Adaptive IMLE: each point keeps a threshold tau_i; in a search
            round only points whose current sample G(z_i) has come within tau_i are
            searched again, and then tau_i = (1 - gamma) d_i with d_i the distance the
            generator had reached (thresholds only shrink). A point's first threshold
            comes from its first match. None: every point is searched every round.
        adaptive_wait: Adaptive IMLE: rounds a point waits after a search before it may
            be searched again (its staleness; 1: the next round).
        adaptive_period: Adaptive IMLE: a point not searched for this many rounds is
            searched anyway (forced re-sampling: a point whose sample never reaches its
            threshold is not stuck with it). None: never forced.
        feature_loss: optional nn.Module mapping (B, C, H, W) to (B, F) features (a
            perceptual network): the training loss adds feature_loss_weight times the
            squared feature distance between G(z) and its data point, as the search can
            use features. Kept outside the state dict (its weights are not trained or saved;
            pass it again when resuming).
        feature_loss_weight: the weight of that term (0: pixels only).
        condition_shape: conditional IMLE: the shape of each point's input c_i (given to
            `attach` / `search` as `conditions`); the built-in generator then reads
            (z, c) concatenated, a custom one is called as generator(z, c).
    """

    def __init__(self, image_shape, z_dim=64, arch="mlp", samples_per_point=10, noise=0.01, loss="l2",
                 feature_dim=None, feature_seed=0, chunk=4096, generator=None, feature=None, reject_eps=None,
                 adaptive_gamma=None, condition_shape=None, adaptive_wait=1, adaptive_period=10, noise_per="step",
                 feature_loss=None, feature_loss_weight=0.0):
        super().__init__()
        if not (0 <= float(feature_loss_weight) < math.inf):
            raise ValueError(f"feature_loss_weight must be a finite number >= 0, got {feature_loss_weight!r}")
        if noise_per not in NOISE_PER:
            raise ValueError(f"noise_per must be one of {NOISE_PER}, got {noise_per!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        for name, v in (("z_dim", z_dim), ("samples_per_point", samples_per_point), ("chunk", chunk)):
            checks.positive_int(v, name)
        if not (0 <= float(noise) < math.inf):
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        if feature_dim is not None:
            checks.positive_int(feature_dim, "feature_dim")
        if reject_eps is not None and not (0 < float(reject_eps) < math.inf):
            raise ValueError(f"reject_eps must be None or a positive finite number, got {reject_eps!r}")
        if adaptive_gamma is not None and not (0 <= float(adaptive_gamma) < 1):
            raise ValueError(f"adaptive_gamma must be None or in [0, 1), got {adaptive_gamma!r}")
        checks.positive_int(adaptive_wait, "adaptive_wait")
        if adaptive_period is not None:
            checks.positive_int(adaptive_period, "adaptive_period")
            if adaptive_period < adaptive_wait:
                raise ValueError(f"adaptive_period ({adaptive_period}) must be >= adaptive_wait ({adaptive_wait})")
        if condition_shape is not None:
            condition_shape = tuple(int(v) for v in condition_shape)
            if not condition_shape or min(condition_shape) < 1:
                raise ValueError(f"condition_shape must be a non-empty shape of positive sizes, got {condition_shape}")
            if reject_eps is not None:
                raise ValueError("reject_eps (RS-IMLE) is not supported with condition_shape (conditional IMLE)")
        self.condition_shape = condition_shape
        self.config = dict(image_shape=tuple(image_shape), z_dim=z_dim, arch=arch, condition_shape=condition_shape,
                           samples_per_point=samples_per_point, noise=float(noise), loss=loss,
                           feature_dim=feature_dim, feature_seed=feature_seed, chunk=chunk,
                           reject_eps=None if reject_eps is None else float(reject_eps),
                           adaptive_gamma=None if adaptive_gamma is None else float(adaptive_gamma),
                           adaptive_wait=int(adaptive_wait),
                           adaptive_period=None if adaptive_period is None else int(adaptive_period),
                           noise_per=noise_per,
                           **({"feature_loss_weight": float(feature_loss_weight)} if feature_loss_weight else {}))
        # a plain attribute, not a submodule: its weights stay out of parameters() and the state dict
        self.__dict__["feature_loss"] = feature_loss
        self.reject_eps, self.adaptive_gamma = self.config["reject_eps"], self.config["adaptive_gamma"]
        self.image_shape = tuple(image_shape)
        self.z_dim, self.samples_per_point, self.noise = z_dim, samples_per_point, float(noise)
        self.loss_kind, self.chunk = loss, chunk
        if generator is None:
            extra = 0 if condition_shape is None else math.prod(condition_shape)
            generator = make_decoder(arch, z_dim + extra, self.image_shape)
            self._logits = True   # the built-in decoders end in logits
        else:
            self._logits = False
        self.generator = generator
        self.feature = feature
        d = math.prod(self.image_shape)
        if feature is None and feature_dim is not None:
            g = torch.Generator().manual_seed(int(feature_seed))
            self.register_buffer("projection", torch.randn(d, feature_dim, generator=g) / math.sqrt(feature_dim))
        else:
            self.projection = None
        self.register_buffer("chosen_z", torch.zeros(0, z_dim))
        self.register_buffer("threshold", torch.zeros(0))   # Adaptive IMLE's tau_i (squared)
        # Adaptive IMLE: the round each point was last searched in, and rounds so far
        self.register_buffer("last_searched", torch.zeros(0, dtype=torch.long))
        self.register_buffer("rounds", torch.zeros((), dtype=torch.long))
        # noise_per="round": each point's perturbation of its chosen code, drawn once per
        # search round (kept in the state, so a resumed run trains on the same one)
        self.register_buffer("round_noise", torch.zeros(0, z_dim))
        self.data = self.conditions = None
        self.last_search = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # chosen_z's size is the data's, known only once a checkpoint or a search says it
        n_key = prefix + "chosen_z"
        if n_key in state_dict:
            # checkpoints written before Adaptive IMLE kept its round counters: every point
            # counts as searched adaptive_wait rounds before round 0, so the first round
            # after resuming searches the points that have converged, as before
            state_dict.setdefault(prefix + "last_searched", torch.full((state_dict[n_key].shape[0],),
                                                                       -self.config["adaptive_wait"], dtype=torch.long))
            state_dict.setdefault(prefix + "rounds", torch.zeros((), dtype=torch.long))
            # checkpoints written before noise_per: no round noise (with noise_per="round"
            # zeros until the next round draws one)
            rows = state_dict[n_key].shape[0] if self.config["noise_per"] == "round" else 0
            state_dict.setdefault(prefix + "round_noise", torch.zeros(rows, self.z_dim))
        for name in ("chosen_z", "threshold", "last_searched", "round_noise"):
            key = prefix + name
            if key in state_dict:
                cur = getattr(self, name)
                setattr(self, name, torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        c = self.config
        return (f"image_shape={c['image_shape']}, z_dim={c['z_dim']}, samples_per_point={c['samples_per_point']}, "
                f"noise={c['noise']}, loss={c['loss']!r}, feature_dim={c['feature_dim']}")

    # ------------------------------------------------------------------ pieces

    def generate(self, z, cond=None):
        """(B, z_dim) codes (and (B, *condition_shape) inputs) -> (B, C, H, W) in [0, 1]."""
        if self.condition_shape is None:
            x = self.generator(z)
        elif cond is None:
            raise ValueError("this IMLE is conditional: generate(z, cond) needs cond")
        elif cond.shape[0] != z.shape[0]:
            raise ValueError(f"cond has {cond.shape[0]} inputs but {z.shape[0]} codes were given (one input each)")
        elif self._logits:
            x = self.generator(torch.cat([z, cond.flatten(1).to(z.dtype)], 1))
        else:
            x = self.generator(z, cond)
        return torch.sigmoid(x) if self._logits else x

    def features(self, x):
        """(B, C, H, W) -> (B, F) float32 search features (pixels, projection or module)."""
        if self.feature is not None:
            f = self.feature(x)
            if f.dim() != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(f"feature must map a batch of {x.shape[0]} images to ({x.shape[0]}, F), "
                                 f"got shape {tuple(f.shape)}")
            return f.float().contiguous()
        f = x.flatten(1).float()
        return (f @ self.projection).contiguous() if self.projection is not None else f.contiguous()

    @torch.no_grad()
    def sample(self, n, generator=None, device="cpu", cond=None):
        """n samples; conditional: cond (n, *condition_shape), one sample per input."""
        z = torch.randn(n, self.z_dim, generator=generator, device=device)
        return self.generate(z, cond)

    # ------------------------------------------------------------------ the search round

    @torch.no_grad()
    def search(self, data, generator=None, conditions=None):
        """One search round over `data` (N, C, H, W): draws samples_per_point codes per point
        searched, generates and searches them chunk by chunk, keeps each point's nearest
        code in `chosen_z`. Returns {"mean_nearest_dist": mean squared distance (features)
        of the points searched, "samples": drawn, "searched": points searched, "rejected":
        samples discarded by reject_eps}. A round that fails leaves the model as it was."""
        self.check_data(data, conditions)
        # (drawn before the round, from the same generator: runs with other seeds get other noise)
        noise_seed = self._round_seed(generator) if self.config["noise_per"] == "round" else None
        was_training = self.training
        self.eval()
        try:
            if self.condition_shape is None:
                info = self._search_round(data, generator)
            else:
                info = self._conditional_round(data, conditions, generator)
        finally:
            self.train(was_training)
        if noise_seed is not None:
            self.round_noise = self._round_noise(noise_seed)
        self.last_search = info
        return dict(info)

    def _round_noise(self, seed):
        """This round's noise for every chosen code, from a seed every process of a
        torchrun draws alike (the round's generator), so they agree without talking."""
        n = self.chosen_z.shape[0]
        g = torch.Generator().manual_seed(seed)
        return (self.noise * torch.randn(n, self.z_dim, generator=g)).to(self.chosen_z.device)

    def _chunk_codes(self, seed, c, size, device):
        """The codes of the round's chunk c (global samples [c * chunk, c * chunk + size)):
        a generator seeded (seed + c), so any process can draw any chunk -- or regenerate
        the chosen codes -- without the others, and the round does not depend on how the
        chunks are shared out."""
        g = torch.Generator(device=device).manual_seed((seed + c) % (1 << 63))
        return torch.randn(size, self.z_dim, generator=g, device=device)

    def _round_seed(self, generator):
        dev = generator.device if generator is not None else "cpu"
        return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=dev))

    def _adaptive_who(self, current, threshold, last, fresh):
        """Adaptive IMLE: the points searched this round -- those whose current sample
        (squared distance `current`) has come within their threshold and that have waited
        adaptive_wait rounds, and those not searched for adaptive_period rounds."""
        n = threshold.shape[0]
        if self.adaptive_gamma is None or fresh:
            return torch.arange(n, device=threshold.device)
        age = int(self.rounds) - last
        pick = (current <= threshold) & (age >= self.config["adaptive_wait"])
        if self.config["adaptive_period"] is not None:
            pick |= age >= self.config["adaptive_period"]
        return torch.nonzero(pick).flatten()

    def _adaptive_update(self, threshold, last, who, current, found, fresh):
        """Thresholds of the points searched: (1 - gamma) times the distance the generator
        had reached (squared: (1 - gamma)^2 d^2), never above the old one; a point's
        first threshold comes from its first match (`found`)."""
        if self.adaptive_gamma is not None:
            shrink = (1 - self.adaptive_gamma) ** 2
            if fresh:
                threshold[who] = found.float() * shrink
            else:
                threshold[who] = torch.minimum(threshold[who], current[who] * shrink)
        last[who] = int(self.rounds)

    def _search_round(self, data, generator):
        from fastgen import distributed
        from fastgen.ops import StreamingKNN
        n = data.shape[0]
        device = data.device
        feats = torch.cat([self.features(data[i:i + self.chunk]) for i in range(0, n, self.chunk)])
        # the new state is built aside and kept only once the round has succeeded
        fresh = self.chosen_z.shape[0] != n
        chosen = torch.zeros(n, self.z_dim, device=device) if fresh else self.chosen_z.clone()
        threshold = torch.full((n,), math.inf, device=device) if fresh else self.threshold.clone()
        last = torch.zeros(n, dtype=torch.long, device=device) if fresh else self.last_searched.clone()
        current = None
        if self.adaptive_gamma is not None and not fresh:
            # how close each point's current sample has come
            current = torch.cat([self.features(self.generate(chosen[i:i + self.chunk]))
                                 for i in range(0, n, self.chunk)])
            current = (current - feats).square().sum(1)
        who = self._adaptive_who(current, threshold, last, fresh)
        info = {"samples": 0, "searched": int(who.numel()), "rejected": 0}
        seed = self._round_seed(generator)
        if who.numel():
            total = who.numel() * self.samples_per_point
            chunks = -(-total // self.chunk)
            # under torch.distributed each process draws and searches its own run of chunks
            rank, size = distributed.world()
            search = StreamingKNN(feats[who], 1)
            try:     # seconds generating / searching: where the round's time goes (metrics.jsonl)
                t_gen, t_search, rejected = self._search_chunks(search, seed, total, chunks, rank, size, data,
                                                                feats, device)
                error = None
            except Exception as exc:  # noqa: BLE001 -- re-raised below, after the ranks agree
                error = exc
            if size > 1:
                # a rank that failed (e.g. non-finite samples) must not leave the others
                # waiting in the merge for it: every rank learns whether any failed first
                failed = distributed.all_sum(int(error is not None))
                if error is None and failed:
                    raise RuntimeError(f"{failed} other rank(s) failed in this IMLE search round "
                                       "(their own errors say why)")
            if error is not None:
                raise error
            info["seconds_generate"], info["seconds_search"] = round(t_gen, 4), round(t_search, 4)
            dist, idx = search.result64()
            if size > 1:
                dist, idx = distributed.merge_across_ranks(dist, idx, 1)
                rejected = distributed.all_sum(rejected)
            info["samples"], info["rejected"] = total, rejected
            if bool((idx < 0).any()):
                raise RuntimeError(f"reject_eps={self.reject_eps} rejected every one of the {total} samples; "
                                   "use a smaller reject_eps or more samples_per_point")
            chosen[who] = self._codes_at(seed, idx[:, 0], total, device)
            self._adaptive_update(threshold, last, who, current, dist[:, 0], fresh)
            info["mean_nearest_dist"] = float(dist.mean())
        self.chosen_z, self.threshold, self.last_searched = chosen, threshold, last
        self.rounds = self.rounds + 1
        return info

    def _search_chunks(self, search, seed, total, chunks, rank, size, data, feats, device):
        """This rank's run of a round's chunks: draw, generate, (RS-IMLE: reject), add to
        `search`. Returns (seconds generating, seconds searching, samples rejected)."""
        from fastgen.ops import knn
        t_gen = t_search = 0.0
        rejected = 0
        for c in range(chunks * rank // size, chunks * (rank + 1) // size):
            start = c * self.chunk
            t0 = time.perf_counter()
            z = self._chunk_codes(seed, c, min(self.chunk, total - start), device)
            f = self.features(self.generate_checked(z, data))
            t1 = time.perf_counter()
            t_gen += t1 - t0
            ids = torch.arange(start, start + z.shape[0], device=device)
            if self.reject_eps is not None:
                # RS-IMLE: a sample within eps of any data point is not a candidate
                # (prune=False: the same data every chunk; no per-chunk sample or clustering)
                keep = knn(f, feats, 1, prune=False).dist[:, 0] >= self.reject_eps ** 2
                rejected += int((~keep).sum())
                f, ids = f[keep], ids[keep]
            search.add(f, index=ids)
            t_search += time.perf_counter() - t1
        return t_gen, t_search, rejected

    def _codes_at(self, seed, ids, total, device):
        """The codes of global sample numbers `ids` (of `total`), regenerated chunk by chunk
        at their drawn size (randn's values depend on the size asked for)."""
        out = torch.empty(ids.numel(), self.z_dim, device=device)
        which = ids // self.chunk
        for c in torch.unique(which).tolist():
            rows = torch.nonzero(which == c).flatten()
            size = min(self.chunk, total - c * self.chunk)
            out[rows] = self._chunk_codes(seed, c, size, device)[ids[rows] % self.chunk]
        return out

    def generate_checked(self, z, data, cond=None):
        """generate(), refusing samples whose shape is not the data's or that are not finite."""
        x = self.generate(z, cond)
        self._check_samples(x, data)
        return x

    def _conditional_round(self, data, conditions, generator):
        """Per point, samples_per_point samples from its own input; the nearest kept."""
        from fastgen.ops import knn
        n, m = data.shape[0], self.samples_per_point
        device = data.device
        fresh = self.chosen_z.shape[0] != n
        chosen = torch.zeros(n, self.z_dim, device=device) if fresh else self.chosen_z.clone()
        threshold = torch.full((n,), math.inf, device=device) if fresh else self.threshold.clone()
        last = torch.zeros(n, dtype=torch.long, device=device) if fresh else self.last_searched.clone()
        cur = None
        if self.adaptive_gamma is not None and not fresh:
            cur = torch.cat([(self.features(self.generate(chosen[i:i + self.chunk], conditions[i:i + self.chunk]))
                              - self.features(data[i:i + self.chunk])).square().sum(1)
                             for i in range(0, n, self.chunk)])
        who = self._adaptive_who(cur, threshold, last, fresh)
        info = {"samples": int(who.numel()) * m, "searched": int(who.numel()), "rejected": 0}
        if who.numel():
            dists = []
            per = max(1, self.chunk // m)          # points per chunk: chunk samples at once
            for s in range(0, who.numel(), per):
                pts = who[s:s + per]
                z = torch.randn(pts.numel(), m, self.z_dim, generator=generator, device=device)
                x = self.generate_checked(z.flatten(0, 1), data, conditions[pts].repeat_interleave(m, 0))
                f = self.features(x).view(pts.numel(), m, -1)
                d, i = knn(self.features(data[pts]).unsqueeze(1), f, 1)       # (B, 1, 1): batched
                chosen[pts] = z[torch.arange(pts.numel(), device=device), i[:, 0, 0]]
                dists.append(d[:, 0, 0])
            dist = torch.cat(dists)
            self._adaptive_update(threshold, last, who, cur, dist, fresh)
            info["mean_nearest_dist"] = float(dist.mean())
        self.chosen_z, self.threshold, self.last_searched = chosen, threshold, last
        self.rounds = self.rounds + 1
        return info

    def _check_samples(self, x, data):
        if x.shape[1:] != data.shape[1:]:
            raise ValueError(f"generator makes samples of shape {tuple(x.shape[1:])} but the data is "
                             f"{tuple(data.shape[1:])}")
        if not bool(torch.isfinite(x).all()):
            raise RuntimeError("the generator produced NaN or infinite samples (has training diverged? "
                               "try a smaller --lr)")

    def check_data(self, data, conditions=None):
        if not isinstance(data, torch.Tensor) or data.dim() != 4:
            raise ValueError(f"data must be an (N, C, H, W) tensor, got {getattr(data, 'shape', type(data))}")
        if data.shape[0] == 0:
            raise ValueError("data is empty (0 points)")
        if tuple(data.shape[1:]) != self.image_shape:
            raise ValueError(f"data has images of shape {tuple(data.shape[1:])} but the model was built for "
                             f"{self.image_shape}")
        if not bool(torch.isfinite(data).all()):
            raise ValueError("data contains NaN or infinite values")
        if self.condition_shape is None:
            if conditions is not None:
                raise ValueError("conditions given but the model is unconditional (no condition_shape)")
            return
        if not isinstance(conditions, torch.Tensor):
            raise ValueError(f"conditional IMLE needs conditions: a ({data.shape[0]}, "
                             f"{', '.join(map(str, self.condition_shape))}) tensor")
        if tuple(conditions.shape) != (data.shape[0], *self.condition_shape):
            raise ValueError(f"conditions must have shape {(data.shape[0], *self.condition_shape)} (one input per "
                             f"data point), got {tuple(conditions.shape)}")
        if not bool(torch.isfinite(conditions).all()):
            raise ValueError("conditions contain NaN or infinite values")

    # ------------------------------------------------------------------ training step

    trains_sharded = True     # fastgen.training.fit may run it data parallel (torchrun)

    def forward(self, index, shard=None):
        """Loss on the data points `index` (int64 (B,)) against their chosen samples:
        {"loss": mean over the batch of the per-point L2 (sum of squares) or L1}.

        shard=(rank, world): this process's contiguous part of the batch, its loss scaled
        by world / B so the mean over the ranks is the batch's mean. The noise is drawn
        for the whole batch on every rank, so the step does not depend on the world size."""
        if self.data is None or self.chosen_z.shape[0] != self.data.shape[0]:
            raise RuntimeError("IMLE has no chosen samples for its data: call search(data) first "
                               "(fastgen.training.fit does it through IMLE.before_epoch)")
        x = self.data[index]
        z = self.chosen_z[index]
        if self.config["noise_per"] == "round":
            z = z + self.round_noise[index]
        elif self.noise > 0:
            z = z + self.noise * torch.randn_like(z)
        c = None if self.conditions is None else self.conditions[index]
        scale = 1.0 / max(1, x.shape[0])
        if shard is not None:
            rank, size = shard
            part = torch.tensor_split(torch.arange(x.shape[0], device=x.device), size)[rank]
            x, z, c = x[part], z[part], None if c is None else c[part]
            scale *= size
        out = self.generate(z, c)
        diff = (out - x).flatten(1)
        per_point = diff.square().sum(1) if self.loss_kind == "l2" else diff.abs().sum(1)
        w = self.config.get("feature_loss_weight", 0.0)
        if w:
            if self.feature_loss is None:
                raise RuntimeError("this IMLE was configured with feature_loss_weight > 0 but has no feature_loss "
                                   "module (pass it to the constructor, e.g. when resuming)")
            fo, fx = self.feature_loss(out), self.feature_loss(x)
            per_point = per_point + w * (fo - fx).flatten(1).float().square().sum(1)
        return {"loss": per_point.sum() * scale}

    def attach(self, data, conditions=None):
        """The data points training indexes into (and, conditional, their inputs); kept by
        reference, not in the state."""
        self.check_data(data, conditions)
        self.data, self.conditions = data, conditions
        return self

    # what search() returns (and keeps as last_search): the keys of a search round's info
    SEARCH_INFO = ("samples", "searched", "rejected", "seconds_generate", "seconds_search", "mean_nearest_dist")

    def restore_last_search(self, history):
        """last_search as it was when a run's checkpoint was written: the info of the latest
        search round in its metrics history (fit joins before_epoch's dict to its epoch's
        row). last_search is not part of the state, so without this a run resumed at an
        epoch without a search would report it as missing (null) where the uninterrupted
        run reports the last round's values."""
        for row in reversed(list(history or ())):
            if isinstance(row, dict) and "searched" in row:
                self.last_search = {k: row[k] for k in self.SEARCH_INFO if k in row}
                break
        return self

    def before_epoch(self, staleness):
        """fit's hook: a search round at every `staleness`-th epoch (and whenever no
        samples are chosen yet, e.g. a fresh run)."""
        def hook(epoch):
            if epoch % staleness == 0 or self.chosen_z.shape[0] != self.data.shape[0]:
                return self.search(self.data, conditions=self.conditions)
            return None
        return hook

    @torch.no_grad()
    def nearest_pairs(self, count=16):
        """(data points, their chosen samples) for the first `count` points: the picture
        of what IMLE pulls together."""
        x = self.data[:count]
        c = None if self.conditions is None else self.conditions[:count]
        return x, self.generate(self.chosen_z[:count], c)
