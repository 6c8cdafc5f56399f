"""Predict findings on new images: ``python -m cxr_lightning.predict ckpt_path=PATH input=FILE_OR_DIR``
(:func:`cxr_lightning.tasks.predict.predict`)."""
from cxr_lightning.cli import predict_main

if __name__ == "__main__":
    predict_main()
