"""Demo dataset generator: a miniature, synthetic ChestX-ray14 in NIH's exact file layout.

This is a demo for exercising the pipeline, not evidence about real X-rays. The pictures are
procedural cartoons of a chest (body outline, dark lung fields, bright heart and mediastinum,
ribs, smooth noise) and each of the 14 findings is a hand-made, localised sign painted where it
belongs. A model that does well here has learned these cartoons; nothing it does here says
anything about real radiographs.

What it does reproduce faithfully is the *shape* of the NIH release, so that every code path of
the real loader runs on it:

- ``Data_Entry_2017_v2020.csv`` with NIH's header (whose bracketed ``[Width,Height]`` and
  ``[x,y]`` columns split into four under ``pd.read_csv``), image names ``%08d_%03d.png``, and a
  ``Follow-up #`` that differs from the file number for some patients, as in the real table;
- ``train_val_list.txt`` / ``test_list.txt`` (patient-disjoint, about 20% of patients in test);
- ``BBox_List_2017.csv`` with NIH's header (``Bbox [x,y,w,h],,,``) and spelling (``Infiltrate``),
  boxes in the ORIGINAL 1024-pixel space although the demo PNGs are smaller;
- ``images_001/images/*.png`` spilling into ``images_002/`` ... like NIH's twelve folders.

Labels are imbalanced and multi-label like the real data (about half ``No Finding``,
Infiltration the most common finding, Hernia the rarest, rare classes oversampled so the test
split can still measure AUROC); findings persist between a patient's visits, and age, sex and
view position shift the odds of some findings, so demographics and prior visits carry signal.

Everything is a pure function of ``seed``: each image's randomness is derived from
``(seed, patient, visit)``, so the files are byte-identical whatever the number of workers.

    python -m cxr_lightning.demo --out DIR [--patients 500 --image-size 256 --seed 0 --workers N]
"""
from __future__ import annotations

from cxr_lightning.data.demo.anatomy import chest_anatomy
from cxr_lightning.data.demo.cohort import sample_table, split_test_patients
from cxr_lightning.data.demo.render import draw_chest, finding_box, sample_boxes
from cxr_lightning.data.demo.write import DEMO_DEFAULTS, demo_dir, ensure_demo, generate
from cxr_lightning.data.nih import BOX_FINDINGS

__all__ = [
    "BOX_FINDINGS",
    "DEMO_DEFAULTS",
    "chest_anatomy",
    "draw_chest",
    "demo_dir",
    "ensure_demo",
    "finding_box",
    "generate",
    "sample_boxes",
    "sample_table",
    "split_test_patients",
]
