"""The location-aware prototype bank of PPRB (spec §5.1), kept as pooled (C, 4, D) vectors."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import dsrb.ops as ops
from dsrb.ops.prototype_bank_update import update_in_place
from dsrb._checks import (as_finite, brief, check_bool, check_count, check_distributed, check_holds_values,
                          check_same_device, check_targets, check_tensor)

__all__ = ["PrototypeBank", "COMPAT_MODES"]

COMPAT_MODES = ("fixed", "official")


def check_compat(compat) -> str:
    if not isinstance(compat, str) or compat not in COMPAT_MODES:  # an array's `in` raised "truth value ..."
        raise ValueError(f"argument 'compat': expected one of {', '.join(map(repr, COMPAT_MODES))}, got {compat!r}")
    return compat


class PrototypeBank(nn.Module):
    """Per-(class, quadrant) prototypes of the known-positive semantic features.

    The official code stores up to 100 (H, W, D) attention-weighted maps per (class, quadrant) bucket and averages
    them; PPRB sums the blended map over space right away, so only the spatial sums matter and each bucket reduces
    to a running sum of semantic vectors S[b, c] plus a count (spec §5.2 item 7).

    Protocol (what the trainer does before the blending epochs)::

        bank.reset()
        for images, targets in train_loader:      # model in eval mode
            ... bank.update(S, targets, quadrant)  # or DSRB.update_prototypes(images, targets)
        bank.finalize(compat)

    Buffers (all in ``state_dict``, so checkpoints carry the bank; the official code does not save it):
        sums: (C, 4, D) float32 running sums of the stored samples per bucket.
        counts: (C, 4) int64 stored samples per bucket (at most ``cap``).
        prototypes: (C, 4, D) float32 prototypes computed by :meth:`finalize`.
        valid: (C,) bool, False for a class with no stored sample (its prototypes are zero and PPRB skips it).
        ready: () bool, True once :meth:`finalize` has run since the last :meth:`reset`.

    Args:
        num_classes: C.
        dim: D, the semantic feature size.
        cap: samples kept per bucket, the first ``cap`` met in loader order (100 officially).
        backend: backend of :func:`dsrb.ops.prototype_bank_update`.
    """

    def __init__(self, num_classes: int, dim: int, cap: int = 100, *, backend: str = "auto") -> None:
        super().__init__()
        num_classes, dim = check_count("num_classes", num_classes), check_count("dim", dim)
        cap = check_count("cap", cap)
        self.num_classes = num_classes
        self.dim = dim
        self.cap = cap
        self.backend = ops.check_backend_choice(backend)
        self.register_buffer("sums", torch.zeros(num_classes, 4, dim))
        self.register_buffer("counts", torch.zeros(num_classes, 4, dtype=torch.int64))
        self.register_buffer("prototypes", torch.zeros(num_classes, 4, dim))
        self.register_buffer("valid", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        # is_ready()'s host copy of `ready` once it is True: training asks every step, and on a GPU each read of the
        # buffer is a device synchronisation. Set by finalize(), cleared by reset(), read from the buffer when a
        # state dict is loaded. Under torch.compile it is a Python constant the graph is guarded on, so a compiled
        # forward needs no read of the buffer once the bank is ready.
        self._ready_seen = False
        self.register_load_state_dict_post_hook(PrototypeBank._read_ready)

    @staticmethod
    def _read_ready(module, incompatible_keys) -> None:
        module._ready_seen = module.ready.device.type != "meta" and bool(module.ready)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Refuse a state the bank cannot hold, each problem named by its key: nn.Module casts silently (a count of
        2.7 became 2, a flag of 0.5 True, a complex sum lost its imaginary part) and takes any value, and a negative
        count admitted samples past the cap and made its bucket's "official" prototype inf in a valid class, a sum
        without a count joined its class's mean, a NaN prototype made every blended logit of its class NaN."""
        kinds = {"sums": "float", "counts": "int", "prototypes": "float", "valid": "bool", "ready": "bool"}
        refused = len(error_msgs)
        given = {}
        for name, kind in kinds.items():
            t = state_dict.get(prefix + name)
            if not isinstance(t, torch.Tensor):
                continue  # missing, or no tensor: nn.Module says so
            try:
                check_tensor(prefix + name, t, kind=kind)
            except TypeError as err:
                error_msgs.append(str(err).replace("argument", "state", 1))
                continue
            if t.shape == getattr(self, name).shape and t.device.type != "meta":  # else nn.Module names the shape;
                given[name] = t                                                  # meta holds no values
        sums, counts, prototypes = map(given.get, ("sums", "counts", "prototypes"))
        if counts is not None and bool((counts < 0).any()):
            error_msgs.append(f"state '{prefix}counts': expected counts >= 0, got {int(counts.min())}")
        elif counts is not None and sums is not None:
            if bool((sums.ne(0).any(-1) & (counts.to(sums.device) == 0)).any()):  # a count of 0 holds no sample
                error_msgs.append(f"state '{prefix}sums': nonzero sums in buckets whose count in '{prefix}counts' "
                                  "is 0")
        for name, t in (("sums", sums), ("prototypes", prototypes)):
            # In the bank's dtype, as set_prototypes checks: a float32 state loaded into a half-precision model made
            # values past its range inf in the copy.
            own = getattr(self, name).dtype
            if t is not None and not bool(torch.isfinite(t.to(own)).all()):
                error_msgs.append(f"state '{prefix}{name}': expected finite values in {own} (the bank's dtype), found "
                                  "NaN or inf")
        if len(error_msgs) > refused:
            # nn.Module copies every tensor and raises at the end: a refused state was loaded all the same (a ready
            # bank with a NaN prototype or a negative count, for code that goes on after the error). Left unchanged.
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def is_ready(self) -> bool:
        """``bool(ready)``, read from the device only while the host copy says False (see ``_ready_seen``): after a
        direct write to the buffer. Not while torch.compile traces, where the read would be a graph break (fullgraph
        refused it with Dynamo's data-dependent error instead of the bank's own), nor on meta, which holds no value
        (the read failed with "Tensor.item() cannot be called on meta tensors"): there the host copy decides."""
        if not self._ready_seen and not torch.compiler.is_compiling() and self.ready.device.type != "meta":
            self._ready_seen = bool(self.ready)
        return self._ready_seen

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the bank: zero sums, counts and prototypes, mark every class invalid and the bank not ready."""
        self.sums.zero_()
        self.counts.zero_()
        self.prototypes.zero_()
        self.valid.zero_()
        self.ready.fill_(False)
        self._ready_seen = False

    def _check_open(self) -> None:
        """Raise a RuntimeError if the bank holds finalized prototypes (after :meth:`finalize`, :meth:`set_prototypes`
        or loading a ready bank): samples added then would join the last pass's buckets, most of them already at the
        cap, and the next :meth:`finalize` would give that pass's prototypes again. Reads the host copy only (no
        device synchronisation)."""
        if self._ready_seen:
            raise RuntimeError("the prototype bank holds finalized prototypes: call reset() (model.reset_prototypes()) "
                               "before a new prototype pass; samples added now would join the last pass's capped "
                               "buckets")

    @torch.no_grad()
    def update(self, S: torch.Tensor, T: torch.Tensor, quadrant: torch.Tensor, *, validate: bool = True,
               distributed: bool = False) -> None:
        """Add every known-positive S[b, c] (T[b, c] == 1) to bucket (c, quadrant[b, c]) while it holds < ``cap``.

        Samples are taken class by class, batch index ascending, as in the official loop. The features are
        accumulated in the bank's dtype (float32 unless the module was converted). A finalized bank refuses samples
        until :meth:`reset` (see :meth:`_check_open`).

        With ``distributed`` (every rank of the default process group calls it, once per step, as a
        DistributedSampler's loader yields), the cap counts the samples of every rank, met in the sampler's global
        order: step, then batch position, then rank (rank r's k-th sample is the sampler's (k * world + r)-th). The
        first ``cap`` in that order are kept, as one process meets them in its loader order. ``counts`` then holds
        every rank's samples and ``sums`` this rank's only: all-reduce ``sums`` before :meth:`finalize`. A value
        error is raised on the rank that holds the bad value only (the others then wait in the next collective, until
        the launcher stops them).

        Args:
            S: (B, C, D) semantic features.  T: (B, C) partial targets in {-1, 0, 1}.
            quadrant: (B, C) int64 quadrant index in [0, 3] (see :func:`dsrb.ops.quadrant_index`).
            validate: check the values of T and quadrant (see :func:`dsrb.ops.prototype_bank_update`).
            distributed: take the cap over every rank's samples (above).
        """
        check_tensor("S", S, kind="float", shape=(None, self.num_classes, self.dim))
        B = S.shape[0]
        check_tensor("T", T, kind="real", shape=(B, self.num_classes))
        check_tensor("quadrant", quadrant, kind="int", shape=(B, self.num_classes))
        # A bool, as every flag: "no" or 1 took the collective path (torch's "Default process group has not been
        # initialized", naming no argument), and None the single-process one.
        distributed = check_distributed("distributed", distributed)
        check_same_device(sums=self.sums, S=S, T=T, quadrant=quadrant)
        self._check_open()
        if S.requires_grad or S.dtype != self.sums.dtype:
            S = S.detach().to(self.sums.dtype)
        if not distributed:  # the op without its layout checks, made above (a pass calls this once per batch)
            update_in_place(self.sums, self.counts, S, T, quadrant, self.cap, validate=validate, backend=self.backend)
            return
        # Checked here, before any collective and before counts change: the admission below sets every entry it
        # leaves out to 0, so the op's own check would no longer see a bad value there.
        if check_bool("validate", validate):
            check_targets("T", T, ("quadrant", quadrant, 0, 3))
        T = self._admit_across_ranks(T, quadrant)  # updates counts; T keeps this rank's admitted known positives
        ops.prototype_bank_update_(self.sums, torch.zeros_like(self.counts), S, T, quadrant, B + 1,
                                   validate=False, backend=self.backend)

    @torch.no_grad()
    def _admit_across_ranks(self, T: torch.Tensor, quadrant: torch.Tensor) -> torch.Tensor:
        """``T`` with the known positives that the cap over every rank's samples leaves out set to 0 (unknown);
        ``counts`` += what every rank keeps. Each rank computes the same decisions from the gathered buckets."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.int64, device=T.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([T.shape[0]], device=T.device))
        longest = int(max(s.item() for s in sizes))
        # (B, C): the quadrant of each known positive, -1 for every other entry and for the rows padding a shorter batch
        bucket = torch.full((longest, self.num_classes), -1, dtype=torch.int64, device=T.device)
        bucket[: T.shape[0]] = torch.where(T == 1, quadrant.to(torch.int64), -1)
        gathered = [torch.empty_like(bucket) for _ in range(world)]
        dist.all_gather(gathered, bucket)
        order = torch.stack(gathered, dim=1).reshape(longest * world, self.num_classes)  # batch position, then rank
        candidate = (order[..., None] == torch.arange(4, device=T.device)).long()  # (longest * world, C, 4)
        earlier = torch.cumsum(candidate, dim=0) - candidate
        keep = (candidate == 1) & (self.counts[None] + earlier < self.cap)
        self.counts += keep.sum(0)
        mine = keep.any(-1).reshape(longest, world, self.num_classes)[: T.shape[0], rank]
        return torch.where(mine, T, torch.zeros_like(T))

    @torch.no_grad()
    def finalize(self, compat: str = "fixed") -> None:
        """Turn the sums and counts into prototypes (spec §5.1) and mark the bank ready.

        * non-empty bucket with n samples: sums / n ("fixed"), or sums / (n + 1) ("official": the zero placeholder
          row of the official bucket is averaged in, shrinking the prototype by n / (n + 1));
        * empty bucket: the class mean over all its stored samples (sum over its buckets / total count), in both
          modes;
        * class without any stored sample: zeros, and ``valid`` False (the official code crashes there).

        NaN or inf sums are a ValueError naming the classes, and the bank is left unchanged.
        """
        check_compat(compat)
        counts = self.counts.to(self.sums.dtype)  # (C, 4)
        # The empty buckets take their class's mean (zero for a class without samples).
        class_mean = self.sums.sum(1) / counts.sum(1).clamp(min=1).unsqueeze(-1)  # (C, D)
        # Refused as set_prototypes refuses them: a NaN or inf sample (from a non-finite image or weight, or a sum past
        # a half-precision bank's range) would make every blended logit of its class NaN. Any such sum makes its
        # class's mean non-finite too: 4x fewer values, and aminmax (NaN-propagating, one read) takes a tenth of
        # isfinite's time on them (13 against 130 us on the CPU at C 80, D 1024; the full test took 500 of the pass's
        # 1,000); the classes are named only on failure.
        if self.sums.device.type != "meta" and not bool(torch.isfinite(torch.stack(torch.aminmax(class_mean))).all()):
            bad = brief(map(str, (~torch.isfinite(class_mean).all(1)).nonzero().flatten().tolist()))
            raise ValueError(f"the prototype bank holds NaN or inf sums ({self.sums.dtype}) for classes {bad}: the "
                             "prototype pass met non-finite features (images, weights, or sums beyond the dtype's "
                             "range); reset() and run the pass again")
        denom = counts + 1 if compat == "official" else counts.clamp(min=1)
        torch.div(self.sums, denom.unsqueeze(-1), out=self.prototypes)  # every bucket's mean, in place
        empty = self.counts == 0
        # A large bank on the CPU copies the empty rows: there torch.where over (C, 4, D) costs about 100 us at C 80,
        # D 1024 and the copy 30; below about 1e5 elements the copy's fixed cost (nonzero, two index ops) is more. On
        # a GPU, nonzero() would be a device synchronisation. Both give the same bits.
        if self.sums.device.type == "cpu" and self.sums.numel() >= 2**17:
            rows = empty.view(-1).nonzero().squeeze(1)
            self.prototypes.view(-1, self.dim).index_copy_(0, rows, class_mean.index_select(0, rows // 4))
        else:
            torch.where(empty.unsqueeze(-1), class_mean.unsqueeze(1), self.prototypes, out=self.prototypes)
        torch.gt(self.counts.sum(1), 0, out=self.valid)
        self.ready.fill_(True)
        self._ready_seen = True

    @torch.no_grad()
    def set_prototypes(self, prototypes: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Use the given prototypes instead of a prototype pass (e.g. the spatial sums of official prototype maps):
        ``prototypes`` (C, 4, D) float, ``valid`` (C,) bool (default: every class). The bank is then ready."""
        check_tensor("prototypes", prototypes, kind="float", shape=(self.num_classes, 4, self.dim))
        prototypes = as_finite("prototypes", prototypes, self.prototypes, " (the bank's dtype)")
        if valid is not None:
            check_tensor("valid", valid, kind="bool", shape=(self.num_classes,))
            check_holds_values("valid", valid, self.valid)
        self.prototypes.copy_(prototypes)
        if valid is None:
            self.valid.fill_(True)
        else:
            self.valid.copy_(valid)
        self.ready.fill_(True)
        self._ready_seen = True

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, cap={self.cap}"
