"""Random-heatmap baseline: border share of maxima, and pointing game vs box share on the NIH boxes."""
import warnings

import numpy as np
import pandas as pd

from cxr_lightning.data.nih import read_bbox_table
from cxr_lightning.explain.localization import localization_scores, random_heatmaps

size = 224
h = random_heatmaps(4000, (size, size), seed=0)
idx = h.reshape(len(h), -1).argmax(1)
r, c = np.divmod(idx, size)
border = ((r <= 1) | (c <= 1) | (r >= size - 2) | (c >= size - 2)).mean()
print(f"maxima within one pixel of the border: {border:.3f} (uniform: {1 - ((size - 4) / size) ** 2:.3f})")
boxes = read_bbox_table("tests/fixtures/nih/BBox_List_2017.csv")
share = (boxes["w"] * boxes["h"] / 1024 ** 2)
print(f"{len(boxes)} NIH boxes; mean share of the image (hit rate of a uniform point): {share.mean():.4f}")
labels = sorted(boxes["Finding Label"].unique())
names = sorted(boxes["Image Index"].unique())
pairs = np.array(
    sorted({(names.index(i), labels.index(f)) for i, f in zip(boxes["Image Index"], boxes["Finding Label"])})
)
rows = []
for seed in range(200):  # repeat the seeded baseline to average out noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = localization_scores(np.zeros((len(pairs), 64, 64), np.float32), pairs, names, labels, boxes, 64, seed=seed)
    rows.append(t.loc["All", ["random_pointing_game", "random_iou@0.1", "random_iobb@0.1", "random_iobb@0.5"]])
print(pd.DataFrame(rows).mean().round(4).to_dict())
