"""Host cost of the crop draw per recovery iteration, eager vs compiled box arithmetic (CPU, 1 thread)."""
import time, torch
torch.set_num_threads(1)
from srel_fast.augment import draw_crop_params
from srel_fast.kernels import crop_boxes_from_uniforms
compiled = torch.compile(crop_boxes_from_uniforms, dynamic=False)
kw = dict(per_image=True, scale=(0.08, 1.0), jitter=32, jitter_range="nonnegative", out_size=(224, 224))
g = torch.Generator().manual_seed(0)
res = {}
for name, fn in (("eager", None), ("compiled", compiled)) * 2:
    for _ in range(20):
        draw_crop_params(100, 224, 224, g, boxes_from_uniforms=fn, **kw)
    t = time.perf_counter()
    for _ in range(500):
        draw_crop_params(100, 224, 224, g, boxes_from_uniforms=fn, **kw)
    res.setdefault(name, []).append((time.perf_counter() - t) / 500 * 1e3)
print({k: [round(v, 4) for v in vs] for k, vs in res.items()}, "ms per draw of 100 crops")
