"""The NVIDIA DALI back-end of the ImageFolder loaders: mixed (GPU) JPEG decode on CUDA, CPU
operators otherwise; one pipeline per epoch, fed that epoch's file order (semantics:
srel_fast.loaders)."""
from __future__ import annotations

import torch

from .distributed import shard_bounds
from .image_folder import CorruptImageError, ImageLoader, LoaderConfig, find_corrupt_images, mix_seed


class DaliImageLoader(ImageLoader):
    """NVIDIA DALI back-end: mixed (GPU) decode on CUDA, CPU operators otherwise."""

    backend = "dali"
    _READER = "reader"

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        import nvidia.dali  # noqa: F401  (fail early, clearly)
        import nvidia.dali.plugin.pytorch  # noqa: F401

        self.dali_device = "gpu" if self.device.type == "cuda" else "cpu"
        self.prefetch_queue_depth = 2

    def _build_pipeline(self, files: list[str], labels: list[int], seed: int):
        from nvidia.dali import fn, pipeline_def, types

        cfg = self.cfg
        gpu = self.dali_device == "gpu"
        out_type = types.RGB if cfg.channels == 3 else types.GRAY
        size = int(cfg.image_size)
        mean = [float(m) * 255.0 for m in cfg.mean]
        std = [float(s) * 255.0 for s in cfg.std]
        dec_device = "mixed" if gpu else "cpu"
        dec_kw = dict(device=dec_device, output_type=out_type)
        if gpu:
            dec_kw["jpeg_fancy_upsampling"] = True

        @pipeline_def
        def pipe():
            jpegs, lab = fn.readers.file(
                files=files, labels=labels, name=self._READER,
                shard_id=cfg.shard_id, num_shards=cfg.num_shards,
                random_shuffle=False, pad_last_batch=True, stick_to_shard=True)
            if cfg.train:
                img = fn.decoders.image_random_crop(
                    jpegs, random_area=[float(cfg.scale[0]), float(cfg.scale[1])],
                    random_aspect_ratio=[float(cfg.ratio[0]), float(cfg.ratio[1])],
                    num_attempts=10, **dec_kw)
                img = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
                img = fn.crop_mirror_normalize(
                    img, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=mirror)
            else:
                img = fn.decoders.image(jpegs, **dec_kw)
                if cfg.val_resize:
                    img = fn.resize(img, resize_shorter=float(cfg.effective_resize_size),
                                    interp_type=types.INTERP_LINEAR, antialias=True)
                img = fn.crop_mirror_normalize(
                    img, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
                    crop_pos_x=0.5, crop_pos_y=0.5, mean=mean, std=std)
            if gpu:
                lab = lab.gpu()
            return img, lab

        p = pipe(batch_size=self.batch_size, num_threads=max(1, int(cfg.num_workers)),
                 device_id=(self.device.index if gpu else None), seed=seed,
                 prefetch_queue_depth=self.prefetch_queue_depth)
        p.build()
        return p

    def _iter_epoch(self, epoch: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cfg = self.cfg
        order = self.epoch_order(epoch)
        files = [self.samples[i][0] for i in order]
        labels = [int(self.samples[i][1]) for i in order]
        lo, hi = shard_bounds(len(order), cfg.shard_id, cfg.num_shards)
        shard_files = files[lo:hi]
        seen = 0
        pipe = it = None
        try:
            pipe = self._build_pipeline(files, labels, mix_seed(cfg.seed, epoch, cfg.shard_id))
            it = DALIGenericIterator(
                [pipe], ["images", "labels"], reader_name=self._READER,
                last_batch_policy=LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL,
                auto_reset=False)
            for batch in it:
                images = batch[0]["images"]
                lab = batch[0]["labels"].reshape(-1).to(torch.int64)
                seen += 1
                yield images, lab
        except RuntimeError as e:
            if isinstance(e, CorruptImageError):
                raise
            self._raise_corrupt(e, shard_files, seen)
            raise
        finally:
            # Shut the pipeline down deterministically (its worker threads and
            # buffers), instead of leaving it to the garbage collector: the
            # iterator holds reference cycles, and a live (or failed) pipeline
            # must not linger while DataLoader workers are forked later.
            it = None  # noqa: F841
            if pipe is not None:
                try:
                    pipe._shutdown()
                except Exception:  # pragma: no cover - best effort
                    pass
                pipe = None

    def _raise_corrupt(self, err: Exception, shard_files: list[str], batches_done: int) -> None:
        """Map a DALI pipeline error to the undecodable file(s), if PIL finds any."""
        if "decod" not in str(err).lower() and "codec" not in str(err).lower():
            return
        b = self.batch_size
        start = max(0, batches_done - 1) * b
        stop = (batches_done + self.prefetch_queue_depth + 2) * b
        bad = find_corrupt_images(shard_files[start:stop]) or find_corrupt_images(shard_files)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CorruptImageError(f"cannot decode image file {shown} (DALI: {_dali_reason(err)})", bad) from err


def _dali_reason(err: Exception) -> str:
    """The informative line of a DALI pipeline error (the one after 'encountered:')."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for i, ln in enumerate(lines[:-1]):
        if ln.startswith("encountered"):
            return lines[i + 1]
    return lines[-1] if lines else type(err).__name__
